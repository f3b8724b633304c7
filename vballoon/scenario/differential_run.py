"""One scenario run step by step on a fresh QEMU and on the reference, judged after every operation.

`DifferentialRun` drives the hypothesis differential (suites/device/test_differential.py): each operation goes
to the reference executor, then to the QEMU executor, and QEMU's observation is judged against the reference's
(`judge.compare`, and `judge.UsedLedger` for used entries). The fuzzing differential
(`vballoon.fuzz.differential.QemuDifferential`) judges the same device with the same judge on one long-lived
QEMU, observed once per input. What each observes of QEMU, so a change to one is checked against the other
(here | the fuzzer), and why they differ:

- device status and config space: after every operation, config a byte at a time | once at the end of the
  input, config a word at a time in the same round trip as the last used rings.
- config reads and host requests: each read's value and each request's refusal (by meaning, not QEMU's words)
  at its step | the same, per operation; the fuzzer leaves reads of poison_val unjudged once its driver left
  poison_val unspecified (its inputs may skip writing it; the state machine always writes one value).
- used entries: every set-up queue after every operation, QEMU given up to `USED_TIMEOUT` to use what the
  reference used, judged by `UsedLedger` (late only while the VM is stopped) | the touched queues before each
  Negotiate or Reset and at the end, QEMU given 0.25 s, and NOT judged: only a used ring naming a chain the
  driver never made available is a finding. This is the one observation the fuzzer collects but leaves
  unjudged without a speed reason.
- query-balloon: after every operation | only when a config write of the input reaches `actual` (nothing else
  changes it).
- guest-stats and whether last-update is set: after every operation | only when the input added a stats buffer
  (QEMU's poll timer gives a held buffer back without changing the values); after an input that sent statistics
  both sides get an empty report first (guest-stats survives a reset).
- BALLOON_CHANGE events: every value since QEMU started, a subsequence of the reference's (QEMU rate-limits)
  | the input's values, a value an earlier input caused within the rate limit's reach dropped from their head.
- pool pages: all eight after every operation | only those a buffer of the input names (each read is 4 KiB).
- device errors (`qemu-system-x86_64:` lines on stderr): counted since QEMU started, read last in the
  observation, after its QMP round trips (no wait for QEMU's free page hint iothread) | counted since the input
  started, and after a hint buffer the reference broke on, QEMU is waited for until its DEVICE_NEEDS_RESET or
  its message shows.
- crash and hang: crash lines on stderr, an exit, or a qtest request unanswered within QtestMachine's timeout:
  QEMU not alive, a difference without requirement | the same, a hang after 5 s: a crash or hang finding.
- known deviations: a difference a listed deviation explains ends the example and makes the test an expected
  failure | the input yields no finding; an input that inflates or reports its driver's own rings yields none
  either (the state machine never names those pages).

The fuzzer's side differs for speed: it runs hundreds of inputs a second on one QEMU, so it observes once per
input, reads only what the input could have changed, and counts from the input's start. The step-by-step run
pays a fresh QEMU (about 70 ms) and a full observation per operation for a failure that names its step and
shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vballoon.errors import QemuError
from vballoon.matrix import Variant
from vballoon.qemu.machine import QemuBinary
from vballoon.qemu.profile import qemu_profile
from vballoon.scenario.judge import Difference, UsedLedger, compare
from vballoon.scenario.observation import Observation
from vballoon.scenario.operations import Operation, Scenario
from vballoon.scenario.qemu_executor import QemuExecutor
from vballoon.scenario.reference_executor import ReferenceExecutor


@dataclass(frozen=True)
class Step:
    """One operation on both executors: what each showed and how QEMU differed."""

    operation: Operation
    expected: Observation
    got: Observation
    differences: tuple[Difference, ...]


class DifferentialRun:
    """A scenario run step by step on a fresh QEMU and on the reference (a context manager)."""

    def __init__(self, qemu: QemuBinary, variant: Variant, legacy_interface: bool, log_dir: Path) -> None:
        self.reference = ReferenceExecutor(variant, legacy_interface, shape=qemu_profile(qemu).device_shape,
                                           follow_device=True)
        self.qemu = QemuExecutor(qemu, variant, legacy_interface, log_dir)
        self.ledger = UsedLedger()
        self.operations: list[Operation] = []
        self.variant = variant
        self.legacy_interface = legacy_interface

    def __enter__(self) -> "DifferentialRun":
        self.qemu.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.qemu.stop()

    def step(self, op: Operation) -> Step:
        """Apply `op` to the reference, then to QEMU, and compare what they show."""
        self.operations.append(op)
        self.qemu.recording.append(f"# step {len(self.operations)}: {op!r}")
        reference_answer = self.reference.apply(op)
        try:
            answer = self.qemu.apply(op)
        except QemuError as error:
            answer = (None, f"operation failed: {error}")
        if self.reference.unsettled is not None:  # a malformed chain: QEMU's outcome, if the spec allows it
            self.reference.settle(not self.reference.device.broken and self.qemu.malformed_outcome())
        expected = self.reference.observe(reference_answer)
        waiting = self.ledger.expect(expected)
        got = self.qemu.observe(answer, waiting if self.reference.running and not self.reference.device.broken else {})
        differences = compare(self.reference, expected, got)
        if got.alive:
            differences += self.ledger.settle(got, self.reference.running, self.reference.device.broken)
        return Step(op, expected, got, tuple(differences))

    @property
    def scenario(self) -> Scenario:
        return Scenario(self.variant, self.legacy_interface, tuple(self.operations))

    def reproducer(self) -> str:
        return self.qemu.reproducer(self.scenario)
