"""Running a scenario on the reference device alone, the oracle of every reference-only fuzz target.

The invariant: applying operations raises nothing (the device turns driver mistakes into its defined
`DeviceError`, host requests it refuses into `RequestRejected`, and both are absorbed where QEMU absorbs
them), and `BalloonDevice.check_invariants()` holds after every operation.
"""

from __future__ import annotations

import traceback

from vballoon.transport import Operation, ReferenceTransport, Scenario


class ReferenceFault(Exception):
    """The reference broke its own contract: an exception escaped, or an invariant failed."""

    def __init__(self, kind: str, step: int, op: Operation, detail: str) -> None:
        super().__init__(f"{kind} at operation {step} {op!r}: {detail}")
        self.kind = kind
        self.step = step
        self.op = op
        self.detail = detail


def step_reference(reference: ReferenceTransport, op: Operation) -> tuple[int | None, str | None]:
    """Apply one operation, then fire due timers while the machine runs (as QEMU's main loop does)."""
    result = reference.apply(op)
    if reference.running:
        reference.device.run_timers()
    return result


def run_reference(scenario: Scenario) -> ReferenceTransport:
    """Run `scenario` on a fresh reference device; `ReferenceFault` when its contract breaks."""
    reference = ReferenceTransport(scenario.variant, scenario.legacy_interface)
    for number, op in enumerate(scenario.operations, 1):
        try:
            step_reference(reference, op)
        except Exception as error:  # noqa: BLE001 - anything escaping is the finding
            raise ReferenceFault("reference-exception", number, op,
                                 "".join(traceback.format_exception_only(error)).strip()) from error
        try:
            reference.device.check_invariants()
        except AssertionError as error:
            raise ReferenceFault("reference-invariant", number, op, str(error) or "check_invariants failed") from None
    return reference
