"""Running a scenario on the reference device alone, the oracle of every reference-only fuzz target.

The invariant: applying operations raises nothing (the device turns driver mistakes into its defined
`DeviceError`, host requests it refuses into `RequestRejected`, and both are absorbed where QEMU absorbs
them), and `BalloonDevice.check_invariants()` holds after every operation.

Most inputs start the same way: pool fills, then one Negotiate. `ReferenceTemplates` keeps the reference
as it stands after such a setup, pickled, per device and setup, and later inputs with the same setup start
from a copy of it instead of negotiating again. The copy is the state the setup produces (the reference is
deterministic and its clock stands still), so an input replayed alone, from scratch, behaves the same.
"""

from __future__ import annotations

import pickle
import traceback
from collections import OrderedDict
from typing import Hashable

from vballoon.matrix import Variant
from vballoon.transport import MEMORY_MIB, FillPage, Negotiate, Operation, ReferenceTransport, Scenario

TEMPLATE_CAPACITY = 256
"""Setups kept (a template is 30-70 KiB: the ring pages and the pool pages written)."""


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


def setup_length(operations: tuple[Operation, ...]) -> int:
    """How many leading operations only set the device up: pool fills, then the first Negotiate (0: none)."""
    for number, op in enumerate(operations, 1):
        if isinstance(op, Negotiate):
            return number
        if not isinstance(op, FillPage):
            return 0
    return 0


class ReferenceTemplates:
    """References after a setup, pickled once the setup comes a second time, least recently used dropped first."""

    def __init__(self, capacity: int = TEMPLATE_CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[Hashable, tuple[bytes, tuple[tuple[int | None, str | None], ...]]] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        """Setups run once: pickling costs more than a setup that never comes back."""

    def start(self, variant: Variant, legacy_interface: bool, setup: tuple[Operation, ...],
              ram_bytes: int = MEMORY_MIB << 20) -> tuple[ReferenceTransport, list[tuple[int | None, str | None]]]:
        """A reference that has run `setup` and the answer of each setup operation; `ReferenceFault` (and
        nothing kept) when the setup itself breaks the reference's contract."""
        key = (variant, legacy_interface, ram_bytes, setup)
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            return pickle.loads(kept[0]), list(kept[1])
        reference = ReferenceTransport(variant, legacy_interface, ram_bytes)
        answers = run_checked(reference, setup)
        if setup and key in self._seen:
            self._kept[key] = (pickle.dumps(reference, pickle.HIGHEST_PROTOCOL), tuple(answers))
            del self._seen[key]
        elif setup:
            self._seen[key] = None
        for lru in (self._kept, self._seen):
            if len(lru) > self.capacity:
                lru.popitem(last=False)
        return reference, answers


TEMPLATES = ReferenceTemplates()


def run_checked(reference: ReferenceTransport, operations: tuple[Operation, ...],
                first: int = 1) -> list[tuple[int | None, str | None]]:
    """Apply `operations` (numbered from `first`) checking the contract after each; their answers."""
    answers = []
    for number, op in enumerate(operations, first):
        try:
            answers.append(step_reference(reference, op))
        except Exception as error:  # noqa: BLE001 - anything escaping is the finding
            raise ReferenceFault("reference-exception", number, op,
                                 "".join(traceback.format_exception_only(error)).strip()) from error
        try:
            reference.device.check_invariants()
        except AssertionError as error:
            raise ReferenceFault("reference-invariant", number, op, str(error) or "check_invariants failed") from None
    return answers


def run_reference(scenario: Scenario, templates: ReferenceTemplates = TEMPLATES) -> ReferenceTransport:
    """Run `scenario` on the reference (from a template of its setup); `ReferenceFault` when its contract breaks."""
    ops = scenario.operations
    setup = setup_length(ops)
    reference, _ = templates.start(scenario.variant, scenario.legacy_interface, ops[:setup])
    run_checked(reference, ops[setup:], setup + 1)
    return reference
