"""Scenarios of balloon operations as plain data: the operation types, `Scenario`, and its JSON form.

An operation is a small frozen dataclass of ints, bytes and tuples, so a fuzzer can encode and replay it
(`vballoon.fuzz.format`) and a scenario prints as one line of JSON (`scenario_to_json`). What an operation
does is each executor's: `reference_executor` and `qemu_executor` each map every operation type to a handler.
Adding an operation means a dataclass here (and in `OPERATIONS`), one entry in each executor's table, and
its encoding in `vballoon.fuzz.format`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Sequence, Union

from vballoon.errors import DecodeError, UsageError
from vballoon.matrix import Variant
from vballoon.spec import BALLOON_FEATURES, ConfigField, Feature, feature_mask

MEMORY_MIB = 128
"""The guest RAM every scenario runs with."""
POOL_FIRST_PFN = 0x800
"""The scenario's page pool starts at 8 MiB: above QEMU's rings and buffers, below the reference driver's."""
POOL_PAGES = 8
POOL_PFNS = tuple(range(POOL_FIRST_PFN, POOL_FIRST_PFN + POOL_PAGES))
_BALLOON_BITS, _VERSION_1 = feature_mask(*BALLOON_FEATURES), feature_mask(Feature.VERSION_1)
_LAYOUT_BITS = feature_mask(Feature.VERSION_1, Feature.RING_PACKED)
NEGOTIATED_BITS = _BALLOON_BITS | feature_mask(Feature.INDIRECT_DESC)
"""What a Negotiate may accept: the balloon bits, and INDIRECT_DESC for the malformed chains built of indirect tables."""


@dataclass(frozen=True)
class Negotiate:
    """Reset, accept `features` (balloon bits 0-5 and INDIRECT_DESC; VERSION_1 and RING_PACKED are added where the
    interface offers them, as Linux takes the packed layout whenever offered), write
    `poison_val` if given, set up the queues (every one, or those an executor is given: `queues_used`),
    DRIVER_OK."""

    features: int
    poison_val: int | None = None

    def driver_features(self, offered: int) -> int:
        """The features the driver accepts from a device offering `offered`: the balloon bits and INDIRECT_DESC of
        `features`, plus VERSION_1 and RING_PACKED when the interface offers them."""
        return self.features & NEGOTIATED_BITS | offered & _LAYOUT_BITS


@dataclass(frozen=True)
class SetTarget:
    """QMP `balloon` with RAM minus `pages_below_ram` pages (0 or more pages than RAM: refused)."""

    pages_below_ram: int


@dataclass(frozen=True)
class WriteConfig:
    """One config write of `width` bytes (1, 2, 4) at `offset` (actual is at 4, poison_val at 12)."""

    offset: int
    width: int
    value: int


@dataclass(frozen=True)
class ReadConfig:
    """One config read; the value is `Observation.read_value`."""

    offset: int
    width: int


@dataclass(frozen=True)
class AddBuffer:
    """One chain on `queue` (a reference queue name): `out` as one device-readable buffer when not empty,
    then one device-writable page per PFN of `in_pfns`; notify."""

    queue: str
    out: bytes = b""
    in_pfns: tuple[int, ...] = ()


@dataclass(frozen=True)
class MalformedChain:
    """One chain on `queue` (inflateq or deflateq) that breaks a ring rule of `kind` (one of
    `vballoon.scenario.malformed.MALFORMED_KINDS` for the queue's layout: `uses_packed_rings`), with `out` (not
    empty) as its device-readable bytes; notify."""

    queue: str
    kind: str
    out: bytes

    @property
    def in_pfns(self) -> tuple[int, ...]:
        """Pool pages the device may write: none (the chain's writable descriptors lie outside the pool)."""
        return ()


@dataclass(frozen=True)
class FillPage:
    """The driver writes `byte` over the whole page `pfn`."""

    pfn: int
    byte: int


@dataclass(frozen=True)
class SetPollingInterval:
    """qom-set guest-stats-polling-interval (seconds)."""

    seconds: int


@dataclass(frozen=True)
class Stop:
    """QMP stop: virtual time (the stats timer) stands still."""


@dataclass(frozen=True)
class Cont:
    """QMP cont."""


@dataclass(frozen=True)
class Reset:
    """The driver writes 0 to the device status."""


Operation = Union[Negotiate, SetTarget, WriteConfig, ReadConfig, AddBuffer, MalformedChain, FillPage,
                  SetPollingInterval, Stop, Cont, Reset]
HostRequest = Union[SetTarget, SetPollingInterval, Stop, Cont]
HOST_REQUESTS = (SetTarget, SetPollingInterval, Stop, Cont)
"""The operations a host makes: QMP commands on QEMU."""
BUFFERS = (AddBuffer, MalformedChain)
"""The operations that make a chain available on a queue."""
OPERATIONS: dict[str, type] = {cls.__name__: cls for cls in (Negotiate, SetTarget, WriteConfig, ReadConfig,
                                                              AddBuffer, MalformedChain, FillPage,
                                                              SetPollingInterval, Stop, Cont, Reset)}


def uses_packed_rings(variant: Variant, legacy_interface: bool) -> bool:
    """Whether a scenario's negotiations take the packed layout: packed=on seen through the modern interface (the
    legacy one offers no bit past 31)."""
    return variant.packed and not legacy_interface


def queues_used(ops: Sequence[Operation], start: int) -> frozenset[str]:
    """The queues `ops` add buffers to from `start` up to the next Negotiate or Reset: the ones a Negotiate just
    before `start` needs to set up (a device never touches a queue without buffers)."""
    used = set()
    for op in ops[start:]:
        if isinstance(op, (Negotiate, Reset)):
            break
        if isinstance(op, BUFFERS):
            used.add(op.queue)
    return frozenset(used)


def touches_poison_val(offset: int, width: int) -> bool:
    """Whether a config access of `width` bytes at `offset` covers a byte of poison_val."""
    return offset < ConfigField.POISON_VAL + 4 and offset + width > ConfigField.POISON_VAL


@dataclass(frozen=True)
class Scenario:
    """A device configuration and the operations to run on it."""

    variant: Variant
    legacy_interface: bool
    operations: tuple[Operation, ...]


def scenario_to_json(scenario: Scenario) -> str:
    """One line of JSON: the variant by name, each operation as [name, fields...] with bytes in hex."""
    ops = [[type(op).__name__, *(v.hex() if isinstance(v, bytes) else v for v in dataclasses.astuple(op))]
           for op in scenario.operations]
    return json.dumps({"variant": scenario.variant.name, "legacy_interface": scenario.legacy_interface,
                       "operations": ops}, separators=(",", ":"))


def scenario_from_json(text: str) -> Scenario:
    """The inverse of `scenario_to_json`; DecodeError on anything else."""
    try:
        data = json.loads(text)
        operations = []
        for name, *values in data["operations"]:
            cls = OPERATIONS[name]
            kinds = [f.type for f in dataclasses.fields(cls)]
            args = [bytes.fromhex(v) if kind == "bytes" else tuple(v) if kind.startswith("tuple") else v
                    for v, kind in zip(values, kinds, strict=True)]
            operations.append(cls(*args))
        return Scenario(Variant.from_name(data["variant"]), bool(data["legacy_interface"]), tuple(operations))
    except (ValueError, KeyError, TypeError, UsageError) as error:
        raise DecodeError(f"not a vballoon scenario: {error}") from None
