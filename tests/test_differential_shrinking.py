"""Bounded shrinking of the hypothesis differential (`vballoon.fuzz.shrinking`): a real failing property on QEMU
stops shrinking at the bound and reports the smallest case found so far; the bound's setting.

Broken on purpose once: with `run_bounded` calling run_state_machine_as_test outside `bounded_shrinking`,
test_a_failure_on_qemu_shrinks_within_the_bound failed on the time from the first failure to the report.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis.internal.conjecture import engine

from suites.device.test_differential import CASES, DIFFERENTIAL_SETTINGS, differential_machine
from vballoon.errors import UsageError
from vballoon.fuzz.shrinking import (SHRINK_SECONDS, SHRINK_SECONDS_VARIABLE, ShrinkClock, bounded_shrinking,
                                     run_bounded, shrink_seconds)
from vballoon.qemu.process import QemuBinary
from vballoon.reference import device as reference_device
from vballoon.reference.ram import PageOutcome
from vballoon.scenario.operations import Operation, scenario_to_json
from vballoon.session import Session

SHORT_BOUND = 5.0
"""Seconds: far below the 164 s this failure takes to shrink to its end on pci-modern."""
PAST_THE_BOUND = 10.0
"""Seconds a run may end after the bound: the example running when it passes (up to 15 operations on a fresh QEMU,
under a second) and the final replay of the smallest one."""


def reported_scenario(failure: BaseException) -> str:
    """The scenario line (JSON) of a differential failure's reproducer."""
    return next(line for line in str(failure).splitlines() if line.startswith("# scenario: ")).removeprefix("# scenario: ")


@pytest.mark.req("BAL-DEV-OP-1")
def test_a_failure_on_qemu_shrinks_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the reference told that inflated pages stay unchanged (QEMU zeroes them, which BAL-DEV-OP-1 allows), the
    differential fails on pci-modern; shrinking stops SHORT_BOUND seconds in and the report is the smallest failing
    case hypothesis found by then (one this run failed on while shrinking), with its reproducer and a note that the
    bound stopped it."""
    monkeypatch.setattr(reference_device, "INFLATED", frozenset({PageOutcome.UNCHANGED}))
    session = Session(QemuBinary.find(os.environ.get("VBALLOON_QEMU")))
    clock = ShrinkClock(SHORT_BOUND)
    failing: list[str] = []
    base = differential_machine(session, CASES[0], {}, clock)

    class Recording(base):  # type: ignore[valid-type, misc]
        def apply(self, op: Operation) -> None:
            try:
                super().apply(op)
            except AssertionError:
                failing.append(scenario_to_json(self.run.scenario))
                raise

    with pytest.raises(AssertionError) as failed:
        run_bounded(Recording, DIFFERENTIAL_SETTINGS, clock)
    ended = time.monotonic()
    assert clock.first_failure is not None, "expected the clock to hear of the failure"
    shrinking = ended - clock.first_failure
    assert SHORT_BOUND <= shrinking <= SHORT_BOUND + PAST_THE_BOUND, \
        f"expected the report {SHORT_BOUND:g}-{SHORT_BOUND + PAST_THE_BOUND:g} s after the first failure, got {shrinking:.1f} s"
    assert "BAL-DEV-OP-1: page" in str(failed.value), f"expected the inflated page's difference, got {failed.value}"
    assert len(failing) > 1, f"expected shrinking to try failing cases after the first, got {len(failing)}"
    reported = reported_scenario(failed.value)
    assert reported in failing[:-1], f"expected the report to be a case that failed before its replay, got {reported}"
    notes = "\n".join(getattr(failed.value, "__notes__", []))
    assert f"stopped at its {SHORT_BOUND:g} s bound" in notes and "smallest found so far" in notes, \
        f"expected the bound's note, got notes {notes!r}"
    assert engine.MAX_SHRINKING_SECONDS != SHORT_BOUND, "expected hypothesis' own bound back after the run"


def test_a_failure_within_the_bound_gets_no_note() -> None:
    clock = ShrinkClock(SHRINK_SECONDS)
    clock.failed()
    failure = AssertionError("a difference")
    clock.note(failure)
    assert getattr(failure, "__notes__", []) == [], "expected no note for a failure shrunk within the bound"


@pytest.mark.parametrize("value, expected", [(None, SHRINK_SECONDS), ("", SHRINK_SECONDS), ("90", 90.0), ("2.5", 2.5)])
def test_the_bound_comes_from_the_environment(value: str | None, expected: float) -> None:
    environ = {} if value is None else {SHRINK_SECONDS_VARIABLE: value}
    assert shrink_seconds(environ) == expected, f"expected {expected} s for {value!r}"


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_bad_bound_is_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(UsageError) as refused:
        shrink_seconds({SHRINK_SECONDS_VARIABLE: value})
    message = str(refused.value)
    assert message.startswith(f"{SHRINK_SECONDS_VARIABLE}={value!r}:") and "\n" not in message, \
        f"expected one line naming {SHRINK_SECONDS_VARIABLE}, got {message!r}"


def test_the_bound_is_hypothesis_own_for_the_block_only() -> None:
    default = engine.MAX_SHRINKING_SECONDS
    with bounded_shrinking(7.0):
        assert engine.MAX_SHRINKING_SECONDS == 7.0, "expected the bound inside the block"
    assert engine.MAX_SHRINKING_SECONDS == default, f"expected {default} back, got {engine.MAX_SHRINKING_SECONDS}"
