"""Bounded shrinking of the hypothesis differential's failures (suites/device/test_differential.py).

A shrink candidate there is a whole example on a fresh QEMU over qtest (up to 15 operations, each observed in full),
and a failure can take minutes to shrink to its end; a QEMU change that breaks the device fails every device
variant's test, each shrinking on its own. Hypothesis bounds a test's shrink phase by wall-clock time with the
module constant `MAX_SHRINKING_SECONDS` of `hypothesis.internal.conjecture.engine` (five minutes), read at every
test call and kept monkeypatchable on purpose: its maintainers declined a setting for it
(HypothesisWorks/hypothesis#3400). `bounded_shrinking` lowers it for one run. When the bound ends the phase,
hypothesis reports the smallest failing example found so far (its warning says "five minutes" whatever the bound),
and `ShrinkClock` adds a note to the failure saying so.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

import hypothesis
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from vballoon.errors import UsageError, VballoonError

SHRINK_SECONDS = 60.0
"""Seconds one failing differential test may shrink. With the reference made to forbid zeroed inflated pages, a
failure on pci-modern shrank to its end in 164 s in one run and ran into hypothesis' five minutes in another (2 cores,
TCG); with a 20 s bound it ended 24 s after the first failure, as short as the full shrink (the pool fill, a
negotiation, one malformed chain). 60 s keeps the six device variants of a QEMU that fails them all to six minutes."""
SHRINK_SECONDS_VARIABLE = "VBALLOON_SHRINK_SECONDS"
"""The environment variable that sets another bound (seconds)."""


def shrink_seconds(environ: Mapping[str, str] | None = None) -> float:
    """The shrink bound: `SHRINK_SECONDS_VARIABLE` from `environ` (the process environment by default), else
    `SHRINK_SECONDS`; UsageError (one line) for anything but a finite number of seconds above 0."""
    value = (os.environ if environ is None else environ).get(SHRINK_SECONDS_VARIABLE, "")
    if not value:
        return SHRINK_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"{SHRINK_SECONDS_VARIABLE}={value!r}: expected the seconds a failing differential test may "
                         f"shrink, a number above 0; unset it for the default {SHRINK_SECONDS:g}")
    return seconds


@contextmanager
def bounded_shrinking(seconds: float) -> Iterator[None]:
    """Within the block, hypothesis stops shrinking a test's failures `seconds` after its shrink phase began."""
    if not hasattr(engine, "MAX_SHRINKING_SECONDS"):
        raise VballoonError(f"hypothesis {hypothesis.__version__} has no engine.MAX_SHRINKING_SECONDS, so vballoon "
                            f"cannot bound shrinking; install a hypothesis that has it (5.12 and later do)")
    default = engine.MAX_SHRINKING_SECONDS
    engine.MAX_SHRINKING_SECONDS = seconds
    try:
        yield
    finally:
        engine.MAX_SHRINKING_SECONDS = default


class ShrinkClock:
    """When a run first failed, to tell a reported failure whose shrinking the bound cut short."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.first_failure: float | None = None

    def failed(self) -> None:
        """An example failed (the first one starts the clock)."""
        if self.first_failure is None:
            self.first_failure = time.monotonic()

    def note(self, failure: BaseException) -> None:
        """Add to the failure hypothesis reports that it is the smallest found so far, when shrinking ran into the
        bound (with generation ending at the first failure, the time since it is the shrink phase's)."""
        if self.first_failure is None:
            return
        elapsed = time.monotonic() - self.first_failure
        if elapsed >= self.seconds:
            failure.add_note(f"vballoon: shrinking stopped at its {self.seconds:g} s bound ({elapsed:.0f} s after the "
                             f"first failure; {SHRINK_SECONDS_VARIABLE} sets it): the failing case above is the "
                             f"smallest found so far, not necessarily a minimal one")


def run_bounded(machine: type[RuleBasedStateMachine], settings: hypothesis.settings, clock: ShrinkClock) -> None:
    """Run the state machine with `settings`, shrinking a failure for at most `clock.seconds` (the machine tells
    `clock` of each failure); a failure cut short says so."""
    try:
        with bounded_shrinking(clock.seconds):
            run_state_machine_as_test(machine, settings=settings)
    except AssertionError as failure:
        clock.note(failure)
        raise
