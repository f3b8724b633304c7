"""Running a scenario on the reference device alone, the oracle of every reference-only fuzz target.

The invariant: applying operations raises nothing (the device turns driver mistakes into its defined
`DeviceError`, host requests it refuses into `RequestRejected`, and both are absorbed where QEMU absorbs
them), and `BalloonDevice.check_invariants()` holds after every operation.

Most inputs start the same way: pool fills, then one Negotiate. `ReferenceTemplates` keeps the reference
as it stands after such a setup, pickled, per device and setup, and later inputs with the same setup start
from a copy of it instead of negotiating again. The copy is the state the setup produces (the reference is
deterministic and its clock stands still), so an input replayed alone, from scratch, behaves the same.
Immutable parts (enum members, hashable frozen dataclasses such as the device properties and ring layouts)
are not pickled: a copy shares them with its template, which halves the cost of a copy.
"""

from __future__ import annotations

import io
import pickle
import traceback
from collections import OrderedDict
from enum import Enum
from typing import Any, Collection, Hashable

from vballoon.matrix import Variant
from vballoon.transport import (MEMORY_MIB, FillPage, Negotiate, Operation, ReferenceTransport, Reset, Scenario,
                                queues_used)

TEMPLATE_CAPACITY = 256
"""Setups kept (a template is 1-31 KiB, mostly the ring pages of the queues set up)."""


class ReferenceFault(Exception):
    """The reference broke its own contract: an exception escaped, or an invariant failed."""

    def __init__(self, kind: str, step: int, op: Operation, detail: str) -> None:
        super().__init__(f"{kind} at operation {step} {op!r}: {detail}")
        self.kind = kind
        self.step = step
        self.op = op
        self.detail = detail


def step_reference(reference: ReferenceTransport, op: Operation,
                   queues: Collection[str] | None = None) -> tuple[int | None, str | None]:
    """Apply one operation (a Negotiate setting up `queues`, default all), then fire due timers while the
    machine runs (as QEMU's main loop does)."""
    result = reference.apply(op, queues)
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


def _immutable(obj: object) -> bool:
    """Whether `obj` can be shared by a template and its copies: an enum member or a hashable frozen dataclass."""
    if isinstance(obj, Enum):
        return True
    params = getattr(type(obj), "__dataclass_params__", None)
    if params is None or not params.frozen:
        return False
    try:
        hash(obj)
    except TypeError:  # a mutable field
        return False
    return True


class _SharingPickler(pickle.Pickler):
    """Pickles a reference, leaving out the immutable objects it refers to (collected in `shared`)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.shared: list[object] = []
        self._index: dict[int, int] = {}

    def persistent_id(self, obj: object) -> int | None:
        if not _immutable(obj):
            return None
        index = self._index.get(id(obj))
        if index is None:
            index = self._index[id(obj)] = len(self.shared)
            self.shared.append(obj)  # kept alive here, so its id stays its own
        return index


class _Template:
    """One kept setup: the pickled reference, the objects it shares, and the setup's answers."""

    def __init__(self, reference: ReferenceTransport, answers: list[tuple[int | None, str | None]]) -> None:
        buffer = io.BytesIO()
        pickler = _SharingPickler(buffer)
        pickler.dump(reference)
        self.blob = buffer.getvalue()
        self.shared = tuple(pickler.shared)
        self.answers = tuple(answers)

    def copy(self) -> ReferenceTransport:
        unpickler = pickle.Unpickler(io.BytesIO(self.blob))
        unpickler.persistent_load = self.shared.__getitem__  # type: ignore[assignment]
        reference: Any = unpickler.load()
        return reference


class ReferenceTemplates:
    """References after a setup, pickled once the setup comes a second time, least recently used dropped first."""

    def __init__(self, capacity: int = TEMPLATE_CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[Hashable, _Template] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        """Setups run once: pickling costs more than a setup that never comes back."""

    def start(self, variant: Variant, legacy_interface: bool, setup: tuple[Operation, ...],
              ram_bytes: int = MEMORY_MIB << 20, queues: frozenset[str] | None = None
              ) -> tuple[ReferenceTransport, list[tuple[int | None, str | None]]]:
        """A reference that has run `setup`, its Negotiate setting up `queues` (None: every queue), and the answer
        of each setup operation; `ReferenceFault` (and nothing kept) when the setup itself breaks the reference's
        contract."""
        key = (variant, legacy_interface, ram_bytes, setup, queues)
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            return kept.copy(), list(kept.answers)
        reference = ReferenceTransport(variant, legacy_interface, ram_bytes)
        answers = run_checked(reference, setup, queues_after=queues)
        if setup and key in self._seen:
            self._kept[key] = _Template(reference, answers)
            del self._seen[key]
        elif setup:
            self._seen[key] = None
        for lru in (self._kept, self._seen):
            if len(lru) > self.capacity:
                lru.popitem(last=False)
        return reference, answers


TEMPLATES = ReferenceTemplates()


def run_checked(reference: ReferenceTransport, operations: tuple[Operation, ...], first: int = 1,
                queues_after: frozenset[str] | None = frozenset()) -> list[tuple[int | None, str | None]]:
    """Apply `operations` (numbered from `first`) checking the contract after each; their answers. A Negotiate
    sets up the queues used before the next one: in `operations`, and for the last one also `queues_after`,
    the ones used after `operations` (None: unknown, so every queue)."""
    answers = []
    last_phase = max((i for i, op in enumerate(operations) if isinstance(op, (Negotiate, Reset))), default=-1)
    for index, op in enumerate(operations):
        number = first + index
        queues = None
        if isinstance(op, Negotiate):
            queues = queues_used(operations, index + 1)
            if index == last_phase:  # its queues' buffers may come after `operations`
                queues = None if queues_after is None else queues | queues_after
        try:
            answers.append(step_reference(reference, op, queues))
        except Exception as error:  # noqa: BLE001 - anything escaping is the finding
            raise ReferenceFault("reference-exception", number, op,
                                 "".join(traceback.format_exception_only(error)).strip()) from error
        if isinstance(op, FillPage):
            continue  # the driver writing its own page: no device state to check
        try:
            reference.device.check_invariants()
        except AssertionError as error:
            raise ReferenceFault("reference-invariant", number, op, str(error) or "check_invariants failed") from None
    return answers


def run_reference(scenario: Scenario, templates: ReferenceTemplates = TEMPLATES) -> ReferenceTransport:
    """Run `scenario` on the reference (from a template of its setup); `ReferenceFault` when its contract breaks."""
    ops = scenario.operations
    setup = setup_length(ops)
    reference, _ = templates.start(scenario.variant, scenario.legacy_interface, ops[:setup],
                                   queues=queues_used(ops, setup))
    run_checked(reference, ops[setup:], setup + 1)
    return reference
