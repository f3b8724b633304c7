"""Virtqueues over guest memory, split and packed, driver side and device side.

Everything goes through a `Memory` (`read(addr, n)`, `write(addr, data)`):
`BytesMemory` here, the reference device's guest RAM, or real QEMU memory
over qtest.  The driver side lays out rings, adds chains of out and in
buffers (direct or through an indirect table), publishes them and collects
used entries.  The device side pops chains, checks them the way the spec
and QEMU's (7.2 and 10.0) virtqueue_pop do, and pushes used entries.  A chain that
breaks a ring rule raises `MalformedRingError`, which a device turns into
DEVICE_NEEDS_RESET (QEMU: virtio_error).

Both layouts sit behind `DriverQueue` / `DeviceQueue`: a caller picks the
layout once (`SplitLayout` or `PackedLayout`, virtio 2.7 and 2.8) and opens
its queues with `open_driver_queue` / `open_device_queue`.  A chain is named
by what the driver's `add` returned: the head descriptor of a split ring,
the buffer id of a packed one; used entries carry the same name.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar, Union

from vballoon.errors import VballoonError
from vballoon.spec import Endian, struct_prefix

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
"""Event suppression flags of a packed ring (virtio 2.8.10); 3 is reserved."""
EVENT_WRAP_SHIFT = 15
"""off_wrap of an event suppression structure: offset in bits 0-14, wrap counter in bit 15."""

DESC_SIZE = 16
USED_ELEM_SIZE = 8
RING_HEADER_SIZE = 4  # flags + idx
EVENT_SIZE = 2  # used_event / avail_event
EVENT_SUPPRESS_SIZE = 4  # packed: off_wrap + flags
MAX_QUEUE_SIZE = 32768
LEGACY_ALIGN = 4096
_T = TypeVar("_T")
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
EVENT_SUPPRESS_ALIGN = 4


class MemoryAccessError(VballoonError):
    """An access outside the memory that backs the rings and buffers."""


class VirtqueueError(VballoonError):
    """Driver-side misuse (no free descriptors) or a device answer the driver cannot accept."""


class MalformedRingError(VballoonError):
    """The driver broke a ring rule; the device must stop using the queue.

    `rule` names the broken rule in a stable, short form (for example
    "loop", "next-out-of-range", "zero-length", "order",
    "nested-indirect") so tests can match on it.
    """

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule


class Memory(Protocol):
    """Guest-physical memory as the device and the driver see it."""

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class BytesMemory:
    """A flat bytearray at guest-physical `base`, bounds-checked."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.base = base
        self.data = bytearray(size)

    def _offset(self, addr: int, n: int) -> int:
        offset = addr - self.base
        if n < 0 or offset < 0 or offset + n > len(self.data):
            raise MemoryAccessError(
                f"access of {n} bytes at {addr:#x} outside memory "
                f"[{self.base:#x}, {self.base + len(self.data):#x})"
            )
        return offset

    def read(self, addr: int, n: int) -> bytes:
        offset = self._offset(addr, n)
        return bytes(self.data[offset : offset + n])

    def write(self, addr: int, data: bytes) -> None:
        offset = self._offset(addr, len(data))
        self.data[offset : offset + len(data)] = data


@dataclass(frozen=True)
class Buffer:
    """One guest-physical buffer: where it is and how long."""

    addr: int
    length: int


@dataclass(frozen=True)
class Descriptor:
    """A split-ring descriptor (16 bytes: le64 addr, le32 len, le16 flags, le16 next)."""

    addr: int
    length: int
    flags: int = 0
    next: int = 0


@dataclass(frozen=True)
class PackedDescriptor:
    """A packed-ring descriptor (16 bytes: le64 addr, le32 len, le16 id, le16 flags)."""

    addr: int
    length: int
    id: int = 0
    flags: int = 0


@dataclass(frozen=True)
class UsedElement:
    """A used entry: the chain's name (split: head descriptor, packed: buffer id) and bytes written by the device."""

    id: int
    length: int


@dataclass(frozen=True)
class Chain:
    """A chain popped by the device: out buffers (driver wrote) then in buffers (device may write)."""

    head: int
    out: tuple[Buffer, ...]
    in_: tuple[Buffer, ...]
    out_data: bytes


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _check_size(size: int) -> None:
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise VirtqueueError(f"queue size {size} outside 1..{MAX_QUEUE_SIZE}")


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's vring_need_event: did the index move past `event_idx`?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def packed_need_event(off_wrap: int, wrap: bool, new: int, old: int, size: int) -> bool:
    """vring_need_event for a packed ring: `off_wrap` names a ring position in the lap of its wrap bit, `new` and
    `old` are positions in the lap of `wrap` (QEMU's vring_packed_need_event, Linux's virtqueue_kick_prepare_packed)."""
    offset = off_wrap & ~(1 << EVENT_WRAP_SHIFT)
    if wrap != bool(off_wrap >> EVENT_WRAP_SHIFT):
        offset -= size
    return need_event(offset, new, old)


@dataclass(frozen=True)
class SplitLayout:
    """Addresses of the three parts of a split virtqueue of `size` entries."""

    size: int
    desc: int
    avail: int
    used: int

    def __post_init__(self) -> None:
        _check_size(self.size)

    @staticmethod
    def desc_bytes(size: int) -> int:
        return DESC_SIZE * size

    @staticmethod
    def avail_bytes(size: int) -> int:
        """flags, idx, ring[size], used_event."""
        return RING_HEADER_SIZE + 2 * size + EVENT_SIZE

    @staticmethod
    def used_bytes(size: int) -> int:
        """flags, idx, ring[size], avail_event."""
        return RING_HEADER_SIZE + USED_ELEM_SIZE * size + EVENT_SIZE

    @classmethod
    @functools.lru_cache(maxsize=1024)  # every negotiation lays out the same rings again
    def modern(cls, size: int, base: int) -> SplitLayout:
        """Three parts packed from `base` with the modern alignments (16, 2, 4)."""
        desc = _align(base, DESC_ALIGN)
        avail = _align(desc + cls.desc_bytes(size), AVAIL_ALIGN)
        used = _align(avail + cls.avail_bytes(size), USED_ALIGN)
        return cls(size, desc, avail, used)

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def legacy(cls, size: int, base: int, align: int = LEGACY_ALIGN) -> SplitLayout:
        """The legacy single region at `base` (a multiple of `align`): used ring on the next `align` boundary."""
        if base % align:
            raise VirtqueueError(f"legacy ring base {base:#x} not aligned to {align}")
        avail = base + cls.desc_bytes(size)
        used = _align(avail + cls.avail_bytes(size), align)
        return cls(size, base, avail, used)

    @classmethod
    def legacy_region_bytes(cls, size: int, align: int = LEGACY_ALIGN) -> int:
        """Bytes of the legacy region (the spec's vring_size)."""
        return _align(cls.desc_bytes(size) + cls.avail_bytes(size), align) + cls.used_bytes(size)

    @property
    def areas(self) -> tuple[int, int, int]:
        """The transport's Descriptor, Driver and Device Area addresses: desc table, avail ring, used ring."""
        return self.desc, self.avail, self.used

    @property
    def collect_range(self) -> tuple[int, int]:
        """(address, length) of the memory `collect_used` reads: the used ring."""
        return self.used, self.used_bytes(self.size)

    @property
    def end(self) -> int:
        """The first address past the used ring."""
        return self.used + self.used_bytes(self.size)

    @property
    def used_event_addr(self) -> int:
        return self.avail + RING_HEADER_SIZE + 2 * self.size

    @property
    def avail_event_addr(self) -> int:
        return self.used + RING_HEADER_SIZE + USED_ELEM_SIZE * self.size


@dataclass(frozen=True)
class PackedLayout:
    """Addresses of the three parts of a packed virtqueue of `size` descriptors (virtio 2.8.10.1): the descriptor
    ring, the driver event suppression structure (Driver Area) and the device's (Device Area)."""

    size: int
    desc: int
    driver: int
    device: int

    def __post_init__(self) -> None:
        _check_size(self.size)

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def modern(cls, size: int, base: int) -> PackedLayout:
        """The three parts one after the other from `base`, with the alignments 16, 4, 4."""
        desc = _align(base, DESC_ALIGN)
        driver = _align(desc + DESC_SIZE * size, EVENT_SUPPRESS_ALIGN)
        return cls(size, desc, driver, driver + EVENT_SUPPRESS_SIZE)

    @staticmethod
    def region_bytes(size: int) -> int:
        """Bytes `modern` needs from a base aligned to 16."""
        return DESC_SIZE * size + 2 * EVENT_SUPPRESS_SIZE

    @property
    def areas(self) -> tuple[int, int, int]:
        """The transport's Descriptor, Driver and Device Area addresses."""
        return self.desc, self.driver, self.device

    @property
    def collect_range(self) -> tuple[int, int]:
        """(address, length) of the memory `collect_used` reads: the descriptor ring."""
        return self.desc, DESC_SIZE * self.size

    @property
    def end(self) -> int:
        """The first address past the device's event suppression structure."""
        return self.device + EVENT_SUPPRESS_SIZE


RingLayout = Union[SplitLayout, PackedLayout]


@functools.lru_cache(maxsize=None)
def _structs(endian: Endian) -> tuple[struct.Struct, ...]:
    """u16, a used element (u32 id, u32 len), a descriptor, a packed descriptor without / with only its flags'
    neighbours (addr, len, id / len, id) and an event suppression structure (off_wrap, flags), compiled once per
    byte order."""
    prefix = struct_prefix(endian)
    return tuple(struct.Struct(prefix + fmt) for fmt in ("H", "II", "QIHH", "QIH", "IH", "HH"))


class _Access:
    """16-bit fields and descriptors in memory, in one byte order: what both layouts read and write."""

    def __init__(self, memory: Memory, endian: Endian) -> None:
        self.memory = memory
        self.endian = endian
        self._u16, self._used_elem, self._desc, self._addr_len_id, self._len_id, self._event = _structs(endian)

    def read16(self, addr: int) -> int:
        value: int = self._u16.unpack(self.memory.read(addr, 2))[0]
        return value

    def write16(self, addr: int, value: int) -> None:
        self.memory.write(addr, self._u16.pack(value & 0xFFFF))

    def read_desc_fields(self, table: int, index: int) -> tuple[int, int, int, int]:
        """The four fields of one descriptor (split: addr, len, flags, next; packed: addr, len, id, flags), without
        building a dataclass: the device's hot path."""
        fields: tuple[int, int, int, int] = self._desc.unpack(self.memory.read(table + DESC_SIZE * index, DESC_SIZE))
        return fields

    def write_desc_fields(self, table: int, index: int, addr: int, length: int, third: int, fourth: int) -> None:
        self.memory.write(table + DESC_SIZE * index, self._desc.pack(addr, length, third, fourth))

    def write_desc(self, table: int, index: int, desc: Descriptor) -> None:
        self.write_desc_fields(table, index, desc.addr, desc.length, desc.flags, desc.next)


class _RingAccess(_Access):
    """The fields of one split ring."""

    def __init__(self, memory: Memory, layout: SplitLayout, endian: Endian) -> None:
        super().__init__(memory, endian)
        self.layout = layout

    def read_used_elem(self, slot: int) -> UsedElement:
        addr = self.layout.used + RING_HEADER_SIZE + USED_ELEM_SIZE * (slot % self.layout.size)
        return UsedElement(*self._used_elem.unpack(self.memory.read(addr, USED_ELEM_SIZE)))

    def write_used_elem(self, slot: int, head: int, length: int) -> None:
        addr = self.layout.used + RING_HEADER_SIZE + USED_ELEM_SIZE * (slot % self.layout.size)
        self.memory.write(addr, self._used_elem.pack(head, length))

    def avail_slot_addr(self, slot: int) -> int:
        return self.layout.avail + RING_HEADER_SIZE + 2 * (slot % self.layout.size)

    def avail_flags(self) -> int:
        return self.read16(self.layout.avail)

    def avail_idx(self) -> int:
        return self.read16(self.layout.avail + 2)

    def used_flags(self) -> int:
        return self.read16(self.layout.used)

    def used_idx(self) -> int:
        return self.read16(self.layout.used + 2)


class _PackedAccess(_Access):
    """The fields of one packed ring: descriptors and the two event suppression structures."""

    def __init__(self, memory: Memory, layout: PackedLayout, endian: Endian) -> None:
        super().__init__(memory, endian)
        self.layout = layout

    def read_event(self, area: int) -> tuple[int, int]:
        """(off_wrap, flags) of the event suppression structure at `area`."""
        fields: tuple[int, int] = self._event.unpack(self.memory.read(area, EVENT_SUPPRESS_SIZE))
        return fields

    def write_unflagged(self, index: int, addr: int, length: int, buffer_id: int) -> None:
        """A descriptor but its flags, which keep what the ring held (the first of a chain not yet available)."""
        self.memory.write(self.layout.desc + DESC_SIZE * index, self._addr_len_id.pack(addr, length, buffer_id))

    def write_event(self, area: int, flags: int, off_wrap: int) -> None:
        self.write16(area, off_wrap)
        self.write16(area + 2, flags)

    def write_used(self, index: int, buffer_id: int, length: int, flags: int) -> None:
        """A used descriptor: len and id first, flags last (as QEMU's vring_packed_desc_write); addr untouched."""
        slot = self.layout.desc + DESC_SIZE * index
        self.memory.write(slot + 8, self._len_id.pack(length, buffer_id))
        self.write16(slot + 14, flags)


class DriverQueue(Protocol):
    """What a driver does with a virtqueue, whatever its ring layout."""

    layout: RingLayout

    @property
    def num_free(self) -> int: ...

    def add(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *, indirect_table: int | None = None) -> int: ...

    def publish(self, head: int) -> None: ...

    def add_and_publish(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *,
                        indirect_table: int | None = None) -> int: ...

    def should_notify(self) -> bool: ...

    def collect_used(self) -> list[UsedElement]: ...


class DeviceQueue(Protocol):
    """What a device does with a virtqueue, whatever its ring layout."""

    def pop(self) -> Chain | None: ...

    def push(self, head: int, length: int) -> None: ...

    def should_interrupt(self) -> bool: ...


class _FreeList:
    """Numbers 0..size-1 (descriptors, buffer ids) handed out: never-used ones first, then given-back ones oldest
    first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._never_used = 0
        self._freed: list[int] = []

    @property
    def count(self) -> int:
        return self.size - self._never_used + len(self._freed)

    def take(self) -> int:
        if self._never_used < self.size:
            self._never_used += 1
            return self._never_used - 1
        return self._freed.pop(0)

    def give_back(self, numbers: Sequence[int]) -> None:
        self._freed.extend(numbers)


def _buffers(out: Sequence[Buffer], in_: Sequence[Buffer]) -> list[tuple[Buffer, int]]:
    """Out then in buffers with their WRITE flag; a chain needs one at least."""
    buffers = [(b, 0) for b in out] + [(b, DESC_F_WRITE) for b in in_]
    if not buffers:
        raise VirtqueueError("a chain needs at least one buffer")
    return buffers


class SplitDriverQueue:
    """Driver side of a split virtqueue: lays out, fills and reaps one ring."""

    def __init__(self, memory: Memory, layout: SplitLayout, *, event_idx: bool = False, endian: Endian = "little") -> None:
        self.ring = _RingAccess(memory, layout, endian)
        self.layout = layout
        self.event_idx = event_idx
        self._free = _FreeList(layout.size)
        self._outstanding: dict[int, list[int]] = {}  # head -> descriptor indices
        self._avail_idx = 0
        self._last_used_idx = 0
        self._notified_idx = 0
        self.initialise()

    def initialise(self) -> None:
        """Zero the avail and used rings (flags, idx, entries, event fields)."""
        self.ring.memory.write(self.layout.avail, bytes(SplitLayout.avail_bytes(self.layout.size)))
        self.ring.memory.write(self.layout.used, bytes(SplitLayout.used_bytes(self.layout.size)))

    @property
    def num_free(self) -> int:
        return self._free.count

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    def write_descriptor(self, index: int, desc: Descriptor) -> None:
        """Write one raw descriptor into the table (for building malformed chains)."""
        self.ring.write_desc(self.layout.desc, index, desc)

    def add_raw(self, chain: Sequence[Descriptor]) -> int:
        """Write `chain` into free descriptors as it is, its `next` fields naming positions in `chain` (a loop may
        name an earlier one); return its head, not yet published. For building malformed chains."""
        if len(chain) > self.num_free:
            raise VirtqueueError(f"chain of {len(chain)} descriptors but only {self.num_free} free")
        indices = [self._free.take() for _ in chain]
        for index, desc in zip(indices, chain, strict=True):
            self.write_descriptor(index, Descriptor(desc.addr, desc.length, desc.flags, indices[desc.next]))
        self._outstanding[indices[0]] = indices
        return indices[0]

    def publish_everywhere(self, head: int, count: int) -> None:
        """Malformed: `head` in every avail slot and avail->idx moved on by `count` at once (more than the ring
        holds when `count` > size); the used ring then no longer follows the driver's bookkeeping."""
        for slot in range(self.layout.size):
            self.ring.write16(self.ring.avail_slot_addr(slot), head)
        self._avail_idx = (self._avail_idx + count) & 0xFFFF
        self.ring.write16(self.layout.avail + 2, self._avail_idx)

    def add(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *, indirect_table: int | None = None) -> int:
        """Write a chain of out then in buffers; return its head. Not yet published.

        With `indirect_table`, the buffers go into an indirect table at that
        address and the ring uses one descriptor that points to it.
        """
        buffers = _buffers(out, in_)
        write = self.ring.write_desc_fields
        if indirect_table is not None:
            for i, (buf, flags) in enumerate(buffers):
                last = i == len(buffers) - 1
                write(indirect_table, i, buf.addr, buf.length, flags | (0 if last else DESC_F_NEXT), 0 if last else i + 1)
            buffers = [(Buffer(indirect_table, DESC_SIZE * len(buffers)), DESC_F_INDIRECT)]
        if len(buffers) > self.num_free:
            raise VirtqueueError(f"chain of {len(buffers)} descriptors but only {self.num_free} free")
        indices = [self._free.take() for _ in buffers]
        for i, (buf, flags) in enumerate(buffers):
            last = i == len(buffers) - 1
            write(self.layout.desc, indices[i], buf.addr, buf.length, flags | (0 if last else DESC_F_NEXT),
                  0 if last else indices[i + 1])
        self._outstanding[indices[0]] = indices
        return indices[0]

    def publish(self, head: int) -> None:
        """Put `head` in the avail ring and advance avail->idx."""
        self.ring.write16(self.ring.avail_slot_addr(self._avail_idx), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.ring.write16(self.layout.avail + 2, self._avail_idx)

    def add_and_publish(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *, indirect_table: int | None = None) -> int:
        head = self.add(out, in_, indirect_table=indirect_table)
        self.publish(head)
        return head

    def should_notify(self) -> bool:
        """Whether to notify the device about chains published since the last call.

        With EVENT_IDX: notify if avail->idx moved past the device's
        avail_event; otherwise unless the device set USED_F_NO_NOTIFY.
        """
        old, new = self._notified_idx, self._avail_idx
        self._notified_idx = new
        if self.event_idx:
            return need_event(self.ring.read16(self.layout.avail_event_addr), new, old)
        return new != old and not self.ring.used_flags() & USED_F_NO_NOTIFY

    def set_used_event(self, value: int) -> None:
        """Ask for an interrupt once used->idx passes `value` (EVENT_IDX)."""
        self.ring.write16(self.layout.used_event_addr, value)

    def set_avail_flags(self, flags: int) -> None:
        self.ring.write16(self.layout.avail, flags)

    def collect_used(self) -> list[UsedElement]:
        """Read used entries published since the last call and free their descriptors."""
        used_idx = self.ring.used_idx()
        pending = (used_idx - self._last_used_idx) & 0xFFFF
        if pending > self.layout.size:
            raise VirtqueueError(f"device moved used->idx from {self._last_used_idx} to {used_idx}")
        elements = []
        for _ in range(pending):
            elem = self.ring.read_used_elem(self._last_used_idx)
            chain = self._outstanding.pop(elem.id, None)
            if chain is None:
                raise VirtqueueError(f"device used id {elem.id}, which is not an outstanding head")
            self._free.give_back(chain)
            elements.append(elem)
            self._last_used_idx = (self._last_used_idx + 1) & 0xFFFF
        return elements


class PackedDriverQueue:
    """Driver side of a packed virtqueue (virtio 2.8): wrap counters, buffer ids, chains, indirect tables.

    Every descriptor of a chain carries the buffer id: the spec reads it from
    the last one, QEMU (7.2 and 10.0) from the first, Linux writes it in all.
    `add` writes a chain but leaves its first descriptor's flags as they were
    (not available); `publish` writes them, which makes the chain available.
    """

    def __init__(self, memory: Memory, layout: PackedLayout, *, event_idx: bool = False,
                 endian: Endian = "little") -> None:
        self.ring = _PackedAccess(memory, layout, endian)
        self.layout = layout
        self.event_idx = event_idx
        self.next_avail = 0
        self.avail_wrap = True
        """The Driver Ring Wrap Counter (virtio 2.8.1), initially 1."""
        self.next_used = 0
        self.used_wrap = True
        """The wrap counter of the next used descriptor expected, initially 1."""
        self._ids = _FreeList(layout.size)
        self._outstanding: dict[int, int] = {}  # buffer id -> descriptors in the ring
        self._unpublished: dict[int, tuple[int, int]] = {}  # buffer id -> (first descriptor, its flags)
        self._in_ring = 0
        self._published = 0
        self.initialise()

    def initialise(self) -> None:
        """Zero the descriptor ring (the spec's initial state) and both event suppression structures (events
        enabled)."""
        layout = self.layout
        self.ring.memory.write(layout.desc, bytes(DESC_SIZE * layout.size))
        self.ring.memory.write(layout.driver, bytes(EVENT_SUPPRESS_SIZE))
        self.ring.memory.write(layout.device, bytes(EVENT_SUPPRESS_SIZE))

    @property
    def num_free(self) -> int:
        """Ring descriptors not held by outstanding chains."""
        return self.layout.size - self._in_ring

    def _avail_flags(self) -> int:
        """AVAIL to the driver's wrap counter, USED to its inverse."""
        return PACKED_DESC_F_AVAIL if self.avail_wrap else PACKED_DESC_F_USED

    def _advance_avail(self) -> None:
        self.next_avail += 1
        if self.next_avail == self.layout.size:
            self.next_avail = 0
            self.avail_wrap = not self.avail_wrap

    def read_descriptor(self, index: int) -> PackedDescriptor:
        return PackedDescriptor(*self.ring.read_desc_fields(self.layout.desc, index))

    def write_descriptor(self, index: int, desc: PackedDescriptor) -> None:
        """Write one raw descriptor into the ring (for building malformed rings); no bookkeeping."""
        self.ring.write_desc_fields(self.layout.desc, index, desc.addr, desc.length, desc.id, desc.flags)

    def add(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *, indirect_table: int | None = None) -> int:
        """Write a chain of out then in buffers from the next free descriptor; return its buffer id. Not yet
        published.

        With `indirect_table`, the buffers go into a table of packed
        descriptors at that address (flags: WRITE only) and the ring uses one
        descriptor that points to it.
        """
        buffers = _buffers(out, in_)
        write = self.ring.write_desc_fields
        if indirect_table is not None:
            for i, (buf, flags) in enumerate(buffers):
                write(indirect_table, i, buf.addr, buf.length, 0, flags)
            buffers = [(Buffer(indirect_table, DESC_SIZE * len(buffers)), DESC_F_INDIRECT)]
        if len(buffers) > self.num_free:
            raise VirtqueueError(f"chain of {len(buffers)} descriptors but only {self.num_free} free")
        buffer_id = self._ids.take()
        first, first_flags = self.next_avail, 0
        for i, (buf, flags) in enumerate(buffers):
            flags |= self._avail_flags() | (DESC_F_NEXT if i < len(buffers) - 1 else 0)
            if i == 0:
                first_flags = flags
                self.ring.write_unflagged(self.next_avail, buf.addr, buf.length, buffer_id)
            else:
                write(self.layout.desc, self.next_avail, buf.addr, buf.length, buffer_id, flags)
            self._advance_avail()
        self._outstanding[buffer_id] = len(buffers)
        self._unpublished[buffer_id] = (first, first_flags)
        self._in_ring += len(buffers)
        return buffer_id

    def publish(self, head: int) -> None:
        """Make the chain of buffer id `head` available: write its first descriptor's flags."""
        if head not in self._unpublished:
            raise VirtqueueError(f"buffer id {head} is not a chain added and not yet published")
        first, flags = self._unpublished.pop(head)
        self.ring.write16(self.layout.desc + DESC_SIZE * first + 14, flags)
        self._published += self._outstanding[head]

    def add_and_publish(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *,
                        indirect_table: int | None = None) -> int:
        head = self.add(out, in_, indirect_table=indirect_table)
        self.publish(head)
        return head

    def should_notify(self) -> bool:
        """Whether to notify the device about descriptors published since the last call: the device's event
        suppression structure says ENABLE, or (EVENT_IDX) DESC with the descriptor it names passed."""
        added, self._published = self._published, 0
        if not added:
            return False
        off_wrap, flags = self.ring.read_event(self.layout.device)
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return flags != RING_EVENT_FLAGS_DISABLE
        return packed_need_event(off_wrap, self.avail_wrap, self.next_avail, self.next_avail - added, self.layout.size)

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        """The driver's event suppression structure: which used descriptors should raise an interrupt."""
        self.ring.write_event(self.layout.driver, flags, off_wrap)

    def collect_used(self) -> list[UsedElement]:
        """Used descriptors from the next expected one on, in ring order; each skips its chain's length and frees
        its buffer id (virtio 2.8.6)."""
        elements = []
        expected = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED
        while self._outstanding:
            _, length, buffer_id, flags = self.ring.read_desc_fields(self.layout.desc, self.next_used)
            if flags & expected != (expected if self.used_wrap else 0):
                break  # used means AVAIL and USED both equal to the used wrap counter (Linux's is_used_desc_packed)
            ndescs = self._outstanding.pop(buffer_id, None)
            if ndescs is None or buffer_id in self._unpublished:
                raise VirtqueueError(f"device used buffer id {buffer_id} at descriptor {self.next_used}, "
                                     f"which is not an outstanding published buffer")
            self._ids.give_back([buffer_id])
            self._in_ring -= ndescs
            self.next_used += ndescs
            if self.next_used >= self.layout.size:
                self.next_used -= self.layout.size
                self.used_wrap = not self.used_wrap
            elements.append(UsedElement(buffer_id, length))
        return elements


def _take_buffer(out: list[Buffer], in_: list[Buffer], index: int, addr: int, length: int, writable: int) -> None:
    """One descriptor of a chain, with the checks of QEMU's virtqueue_map_desc and its order check."""
    if length == 0:
        raise MalformedRingError("zero-length", f"descriptor {index} has length 0")
    if writable:
        in_.append(Buffer(addr, length))
    elif in_:
        raise MalformedRingError("order", f"device-readable descriptor {index} after a device-writable one")
    else:
        out.append(Buffer(addr, length))


class _DeviceSide:
    """What both layouts' device sides share: reads that turn a bad address into a ring violation, and the chain."""

    memory: Memory

    def _read(self, reader: Callable[..., _T], *args: int) -> _T:
        """Call `reader`; memory the driver pointed outside of is a ring violation."""
        try:
            return reader(*args)
        except MemoryAccessError as exc:
            raise MalformedRingError("unmapped", str(exc)) from None

    def _chain(self, head: int, out: list[Buffer], in_: list[Buffer]) -> Chain:
        out_data = b"".join(self._read(self.memory.read, b.addr, b.length) for b in out)
        return Chain(head, tuple(out), tuple(in_), out_data)


class SplitDeviceQueue(_DeviceSide):
    """Device side of a split virtqueue, with the checks of QEMU's (7.2 and 10.0) virtqueue_pop, and one it lacks
    (`pending`)."""

    def __init__(self, memory: Memory, layout: SplitLayout, *, event_idx: bool = False, endian: Endian = "little") -> None:
        self.ring = _RingAccess(memory, layout, endian)
        self.memory = memory
        self.layout = layout
        self.event_idx = event_idx
        self.last_avail_idx = 0
        self.used_idx = 0
        self.in_use = 0
        self._signalled_used: int | None = None

    def pending(self) -> int:
        """Chains published but not yet popped; MalformedRingError if avail->idx moved on by more than the queue
        size. This check is the reference's choice, not QEMU's: the spec sets no device requirement for it (2.7.6
        only says where the driver puts the next entry), so a device may fail (VQ-DEV-STATUS-1) or read the ring
        modulo its size. QEMU 7.2 and 10.0 read on: virtqueue_split_pop never reaches virtqueue_num_heads (its
        "Guest moved used index" error is virtqueue_get_avail_bytes's only). The malformed chain kind avail-jump
        allows both (`vballoon.scenario.malformed.OUTCOMES`)."""
        avail_idx = self._read(self.ring.avail_idx)
        count = (avail_idx - self.last_avail_idx) & 0xFFFF
        if count > self.layout.size:
            raise MalformedRingError(
                "avail-idx-jump", f"avail->idx moved from {self.last_avail_idx} to {avail_idx}, queue size {self.layout.size}"
            )
        return count

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty."""
        if not self.pending():
            return None
        if self.in_use >= self.layout.size:
            raise MalformedRingError("queue-size-exceeded", f"{self.in_use} chains in use, queue size {self.layout.size}")
        head = self._read(self.ring.read16, self.ring.avail_slot_addr(self.last_avail_idx))
        if head >= self.layout.size:
            raise MalformedRingError("head-out-of-range", f"avail ring names descriptor {head}, queue size {self.layout.size}")
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self.ring.write16(self.layout.avail_event_addr, self.last_avail_idx)
        out, in_ = self._walk(head)
        chain = self._chain(head, out, in_)
        self.in_use += 1
        return chain

    def _walk(self, head: int) -> tuple[list[Buffer], list[Buffer]]:
        """Follow a chain from `head`: direct descriptors, then at most one indirect table."""
        out: list[Buffer] = []
        in_: list[Buffer] = []
        table, limit, index = self.layout.desc, self.layout.size, head
        in_indirect = False
        seen = 0
        read_desc = self.ring.read_desc_fields
        while True:
            addr, length, flags, next_ = self._read(read_desc, table, index)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise MalformedRingError("nested-indirect", f"indirect descriptor {index} inside an indirect table")
                if length == 0 or length % DESC_SIZE:
                    raise MalformedRingError("indirect-size", f"indirect table of {length} bytes")
                # The device ignores WRITE and NEXT on the descriptor that refers to a table;
                # the table ends the chain (drivers must not set INDIRECT with NEXT).
                table, limit, index, in_indirect, seen = addr, length // DESC_SIZE, 0, True, 0
                continue
            _take_buffer(out, in_, index, addr, length, flags & DESC_F_WRITE)
            seen += 1
            if seen > limit:
                raise MalformedRingError("loop", f"chain longer than {limit} descriptors")
            if not flags & DESC_F_NEXT:
                return out, in_
            if next_ >= limit:
                raise MalformedRingError("next-out-of-range", f"descriptor {index} names next {next_}, limit {limit}")
            index = next_

    def push(self, head: int, length: int) -> None:
        """Write used entry (head, length) and advance used->idx."""
        self.ring.write_used_elem(self.used_idx, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.ring.write16(self.layout.used + 2, self.used_idx)
        self.in_use -= 1

    def should_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for entries pushed since the last call.

        With EVENT_IDX: if used->idx moved past used_event (always the first
        time); otherwise unless the driver set AVAIL_F_NO_INTERRUPT.
        """
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if not self.event_idx:
            return not self.ring.avail_flags() & AVAIL_F_NO_INTERRUPT
        return old is None or need_event(self.ring.read16(self.layout.used_event_addr), new, old)


class PackedDeviceQueue(_DeviceSide):
    """Device side of a packed virtqueue, with the checks of QEMU's (7.2 and 10.0) virtqueue_packed_pop.

    A descriptor is available when its AVAIL bit equals the device's wrap
    counter and its USED bit does not (virtio 2.8.1).  A chain's buffer id is
    the last descriptor's (virtio 2.8.6; QEMU takes the first one's, the same
    for drivers that write it in every descriptor).  In an indirect table
    only WRITE counts and the table's length ends the chain (virtio 2.8.7).
    """

    def __init__(self, memory: Memory, layout: PackedLayout, *, event_idx: bool = False,
                 endian: Endian = "little") -> None:
        self.ring = _PackedAccess(memory, layout, endian)
        self.memory = memory
        self.layout = layout
        self.event_idx = event_idx
        self.last_avail_idx = 0
        self.avail_wrap = True
        self.used_idx = 0
        self.used_wrap = True
        """The Device Ring Wrap Counter (virtio 2.8.1), initially 1."""
        self.in_use = 0
        """Ring descriptors held by popped chains."""
        self._popped: dict[int, list[int]] = {}  # buffer id -> descriptor counts of its popped chains, oldest first
        self._signalled_used: int | None = None

    def pop(self) -> Chain | None:
        """The chain at the next descriptor if the driver made it available, else None."""
        size, read = self.layout.size, self.ring.read_desc_fields
        addr, length, buffer_id, flags = self._read(read, self.layout.desc, self.last_avail_idx)
        if bool(flags & PACKED_DESC_F_AVAIL) != self.avail_wrap or bool(flags & PACKED_DESC_F_USED) == self.avail_wrap:
            return None
        if self.in_use >= size:
            raise MalformedRingError("queue-size-exceeded", f"{self.in_use} descriptors in use, queue size {size}")
        out: list[Buffer] = []
        in_: list[Buffer] = []
        if flags & DESC_F_INDIRECT:
            if length == 0 or length % DESC_SIZE:
                raise MalformedRingError("indirect-size", f"indirect table of {length} bytes")
            for index in range(length // DESC_SIZE):
                entry_addr, entry_length, _, entry_flags = self._read(read, addr, index)
                _take_buffer(out, in_, index, entry_addr, entry_length, entry_flags & DESC_F_WRITE)
            ndescs = 1
        else:
            index, ndescs = self.last_avail_idx, 1
            while True:
                if ndescs > 1 and flags & DESC_F_INDIRECT:
                    raise MalformedRingError("indirect-in-chain", f"descriptor {index} refers to an indirect table "
                                                                  "inside a chain")
                _take_buffer(out, in_, index, addr, length, flags & DESC_F_WRITE)
                if not flags & DESC_F_NEXT:
                    break
                ndescs += 1
                if ndescs > size:
                    raise MalformedRingError("loop", f"chain longer than {size} descriptors")
                index = index + 1 if index + 1 < size else 0
                addr, length, buffer_id, flags = self._read(read, self.layout.desc, index)
        chain = self._chain(buffer_id, out, in_)
        self.last_avail_idx += ndescs
        if self.last_avail_idx >= size:
            self.last_avail_idx -= size
            self.avail_wrap = not self.avail_wrap
        self.in_use += ndescs
        self._popped.setdefault(buffer_id, []).append(ndescs)
        return chain

    def push(self, head: int, length: int) -> None:
        """Write the used descriptor of buffer id `head` at the next used position and skip its chain's length."""
        counts = self._popped.get(head)
        if not counts:
            raise VirtqueueError(f"push of buffer id {head}, which the device has not popped")
        ndescs = counts.pop(0)
        if not counts:
            del self._popped[head]
        self.ring.write_used(self.used_idx, head, length,
                             PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED if self.used_wrap else 0)
        self.used_idx += ndescs
        if self.used_idx >= self.layout.size:
            self.used_idx -= self.layout.size
            self.used_wrap = not self.used_wrap
        self.in_use -= ndescs

    def should_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for descriptors used since the last call: its event suppression
        structure says ENABLE, or (EVENT_IDX) DESC with the descriptor it names passed (always the first time)."""
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        off_wrap, flags = self.ring.read_event(self.layout.driver)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        return old is None or packed_need_event(off_wrap, self.used_wrap, new, old, self.layout.size)


def open_driver_queue(memory: Memory, layout: RingLayout, *, event_idx: bool = False,
                      endian: Endian = "little") -> SplitDriverQueue | PackedDriverQueue:
    """The driver side of a queue laid out as `layout`."""
    if isinstance(layout, PackedLayout):
        return PackedDriverQueue(memory, layout, event_idx=event_idx, endian=endian)
    return SplitDriverQueue(memory, layout, event_idx=event_idx, endian=endian)


def open_device_queue(memory: Memory, layout: RingLayout, *, event_idx: bool = False,
                      endian: Endian = "little") -> SplitDeviceQueue | PackedDeviceQueue:
    """The device side of a queue laid out as `layout`."""
    if isinstance(layout, PackedLayout):
        return PackedDeviceQueue(memory, layout, event_idx=event_idx, endian=endian)
    return SplitDeviceQueue(memory, layout, event_idx=event_idx, endian=endian)
