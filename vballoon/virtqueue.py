"""Split virtqueues over guest memory, driver side and device side.

Everything goes through a `Memory` (`read(addr, n)`, `write(addr, data)`):
`BytesMemory` here, the reference device's guest RAM, or real QEMU memory
over qtest.  The driver side lays out rings, adds chains of out and in
buffers (direct or through an indirect table), publishes them and collects
used entries.  The device side pops chains, checks them the way the spec
and QEMU's (7.2 and 10.0) virtqueue_pop do, and pushes used entries.  A chain that
breaks a ring rule raises `MalformedRingError`, which a device turns into
DEVICE_NEEDS_RESET (QEMU: virtio_error).

Ring layout code is kept behind `DriverQueue` / `DeviceQueue` so that a
packed ring can be added beside the split one.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar

from vballoon.errors import VballoonError
from vballoon.spec import Endian, struct_prefix

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
RING_HEADER_SIZE = 4  # flags + idx
EVENT_SIZE = 2  # used_event / avail_event
MAX_QUEUE_SIZE = 32768
LEGACY_ALIGN = 4096
_T = TypeVar("_T")
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


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
class UsedElement:
    """A used-ring entry: head descriptor id and bytes written by the device."""

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


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's vring_need_event: did the index move past `event_idx`?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


@dataclass(frozen=True)
class SplitLayout:
    """Addresses of the three parts of a split virtqueue of `size` entries."""

    size: int
    desc: int
    avail: int
    used: int

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_QUEUE_SIZE:
            raise VirtqueueError(f"queue size {self.size} outside 1..{MAX_QUEUE_SIZE}")

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
    def used_event_addr(self) -> int:
        return self.avail + RING_HEADER_SIZE + 2 * self.size

    @property
    def avail_event_addr(self) -> int:
        return self.used + RING_HEADER_SIZE + USED_ELEM_SIZE * self.size


@functools.lru_cache(maxsize=None)
def _structs(endian: Endian) -> tuple[struct.Struct, struct.Struct, struct.Struct]:
    """u16, a used element (u32 id, u32 len) and a descriptor, compiled once per byte order."""
    prefix = struct_prefix(endian)
    return struct.Struct(prefix + "H"), struct.Struct(prefix + "II"), struct.Struct(prefix + "QIHH")


class _RingAccess:
    """Little helpers shared by both sides: 16/32-bit fields of one split ring."""

    def __init__(self, memory: Memory, layout: SplitLayout, endian: Endian) -> None:
        self.memory = memory
        self.layout = layout
        self.endian = endian
        self._u16, self._used_elem, self._desc = _structs(endian)

    def read16(self, addr: int) -> int:
        value: int = self._u16.unpack(self.memory.read(addr, 2))[0]
        return value

    def write16(self, addr: int, value: int) -> None:
        self.memory.write(addr, self._u16.pack(value & 0xFFFF))

    def read_desc_fields(self, table: int, index: int) -> tuple[int, int, int, int]:
        """addr, len, flags, next of one descriptor (without building a `Descriptor`: the device's hot path)."""
        fields: tuple[int, int, int, int] = self._desc.unpack(self.memory.read(table + DESC_SIZE * index, DESC_SIZE))
        return fields

    def write_desc_fields(self, table: int, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        self.memory.write(table + DESC_SIZE * index, self._desc.pack(addr, length, flags, next_))

    def write_desc(self, table: int, index: int, desc: Descriptor) -> None:
        self.write_desc_fields(table, index, desc.addr, desc.length, desc.flags, desc.next)

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


class DriverQueue(Protocol):
    """What a driver does with a virtqueue, whatever its ring layout."""

    def add(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *, indirect_table: int | None = None) -> int: ...

    def publish(self, head: int) -> None: ...

    def should_notify(self) -> bool: ...

    def collect_used(self) -> list[UsedElement]: ...


class DeviceQueue(Protocol):
    """What a device does with a virtqueue, whatever its ring layout."""

    def pop(self) -> Chain | None: ...

    def push(self, head: int, length: int) -> None: ...

    def should_interrupt(self) -> bool: ...


class SplitDriverQueue:
    """Driver side of a split virtqueue: lays out, fills and reaps one ring."""

    def __init__(self, memory: Memory, layout: SplitLayout, *, event_idx: bool = False, endian: Endian = "little") -> None:
        self.ring = _RingAccess(memory, layout, endian)
        self.layout = layout
        self.event_idx = event_idx
        self._never_used = 0
        """Descriptors from here to the ring's size have not been used yet; they are handed out first."""
        self._freed: list[int] = []
        """Descriptors given back, oldest first; handed out once no unused one is left."""
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
        return self.layout.size - self._never_used + len(self._freed)

    def _take_free(self) -> int:
        if self._never_used < self.layout.size:
            self._never_used += 1
            return self._never_used - 1
        return self._freed.pop(0)

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    def write_descriptor(self, index: int, desc: Descriptor) -> None:
        """Write one raw descriptor into the table (for building malformed chains)."""
        self.ring.write_desc(self.layout.desc, index, desc)

    def add(self, out: Sequence[Buffer], in_: Sequence[Buffer] = (), *, indirect_table: int | None = None) -> int:
        """Write a chain of out then in buffers; return its head. Not yet published.

        With `indirect_table`, the buffers go into an indirect table at that
        address and the ring uses one descriptor that points to it.
        """
        buffers = [(b, 0) for b in out] + [(b, DESC_F_WRITE) for b in in_]
        if not buffers:
            raise VirtqueueError("a chain needs at least one buffer")
        write = self.ring.write_desc_fields
        if indirect_table is not None:
            for i, (buf, flags) in enumerate(buffers):
                last = i == len(buffers) - 1
                write(indirect_table, i, buf.addr, buf.length, flags | (0 if last else DESC_F_NEXT), 0 if last else i + 1)
            buffers = [(Buffer(indirect_table, DESC_SIZE * len(buffers)), DESC_F_INDIRECT)]
        if len(buffers) > self.num_free:
            raise VirtqueueError(f"chain of {len(buffers)} descriptors but only {self.num_free} free")
        indices = [self._take_free() for _ in buffers]
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
            self._freed.extend(chain)
            elements.append(elem)
            self._last_used_idx = (self._last_used_idx + 1) & 0xFFFF
        return elements


class SplitDeviceQueue:
    """Device side of a split virtqueue, with the checks of QEMU's (7.2 and 10.0) virtqueue_pop."""

    def __init__(self, memory: Memory, layout: SplitLayout, *, event_idx: bool = False, endian: Endian = "little") -> None:
        self.ring = _RingAccess(memory, layout, endian)
        self.layout = layout
        self.event_idx = event_idx
        self.last_avail_idx = 0
        self.used_idx = 0
        self.in_use = 0
        self._signalled_used: int | None = None

    def pending(self) -> int:
        """Chains published but not yet popped; MalformedRingError if the index jumped."""
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
        out_data = b"".join(self._read(self.ring.memory.read, b.addr, b.length) for b in out)
        self.in_use += 1
        return Chain(head, tuple(out), tuple(in_), out_data)

    def _read(self, reader: Callable[..., _T], *args: int) -> _T:
        """Call `reader`; memory the driver pointed outside of is a ring violation."""
        try:
            return reader(*args)
        except MemoryAccessError as exc:
            raise MalformedRingError("unmapped", str(exc)) from None

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
            if length == 0:
                raise MalformedRingError("zero-length", f"descriptor {index} has length 0")
            if flags & DESC_F_WRITE:
                in_.append(Buffer(addr, length))
            elif in_:
                raise MalformedRingError("order", f"device-readable descriptor {index} after a device-writable one")
            else:
                out.append(Buffer(addr, length))
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
