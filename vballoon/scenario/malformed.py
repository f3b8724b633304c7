"""Malformed rings: the kinds of `MalformedChain`, what the spec lets a device answer to each, and the chain itself.

Every split-ring kind is a driver violation. The spec says what the driver must not do (VQ-DRV-DESC-1, VQ-DRV-IND-1,
VQ-DRV-IND-2) but not what the device then does, except that a device which enters an error state SHOULD set
DEVICE_NEEDS_RESET (VQ-DEV-STATUS-1). So the reference answers each kind with the set of outcomes a device
may choose (`OUTCOMES`): a device error (virtio_error in QEMU: DEVICE_NEEDS_RESET on the modern interface, a
broken device on both, later buffers ignored until a reset), or the chain used as a device reads it. Which
one QEMU chose is read from QEMU (`ReferenceExecutor.settle`); an outcome outside the set is a difference.
The packed-ring kind (wrong-wrap) is a descriptor the driver did not make available, which the device must
ignore (VQ-DEV-PACKED-1): one outcome, which the reference device reaches on its own.

What QEMU 7.2 and 10.0 do (hw/virtio/virtio.c, virtqueue_split_pop and virtqueue_map_desc, the same in both):

- loop: "Looped descriptor" once a chain has more descriptors than the queue: a device error.
- long-chain: an indirect table of queue size + 1 descriptors. The table's own size bounds the walk, so
  QEMU uses it, up to VIRTQUEUE_MAX_SIZE (1024) descriptors in all ("too many write descriptors in indirect
  table": a device error where the queue has 1024 entries, as in 10.0).
- outside-ram: a device-writable page at `OUTSIDE_RAM`, where nothing is mapped. dma_memory_map gives a
  bounce buffer for it (one page, one at a time), so QEMU uses the chain; a device may refuse it instead.
- past-ram-end: a device-writable page whose second half lies past RAM's end: mapped in two pieces (RAM,
  then a bounce buffer), used.
- avail-jump: avail->idx moves on by queue size + 1 at once, every slot naming one chain. QEMU's
  virtqueue_split_pop does not check the distance (only virtqueue_get_avail_bytes does, which the balloon
  does not call): it uses that chain queue size + 1 times. The queue's used ring then no longer follows the
  driver's bookkeeping: its used entries are not compared until the next negotiation (`ABANDONS_QUEUE`).
- nested-indirect: an indirect table whose second descriptor has INDIRECT (and WRITE) set. QEMU looks for
  INDIRECT on the head descriptor only and maps the inner table as one device-writable buffer: used.
- wrong-wrap (packed rings only; the others are split-ring chains): a descriptor at the driver's next position
  whose AVAIL and USED bits say the previous lap (AVAIL inverted from the driver's wrap counter). The device
  must not use it (VQ-DEV-PACKED-1): the only outcome allowed is that it is ignored, which the reference
  device does (its packed pop sees no new descriptor) and QEMU's is_desc_avail in virtqueue_packed_pop too.
  The driver keeps no record of it: its next chain goes over it, and the queue goes on working.

The chain carries the operation's `out` as its first, device-readable descriptor; its device-writable
descriptors are ones inflateq and deflateq never write to, so a chain used as QEMU reads it means what
`AddBuffer(queue, out, ...)` means (`equivalent_buffers`), and its used entry shows that QEMU answered (QEMU
may handle a notification after the qtest write returns). Chains go to those two queues only
(`MALFORMED_QUEUES`): statsq holds a buffer it uses, and the hint and report queues act on the writable
pages, whose outcome would not be known.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

from vballoon.reference.device import DEFLATEQ, INFLATEQ
from vballoon.spec import PAGE_SIZE
from vballoon.virtqueue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, PACKED_DESC_F_AVAIL,
                                PACKED_DESC_F_USED, Buffer, Descriptor, PackedDescriptor, PackedDriverQueue,
                                SplitDriverQueue)


class RingOutcome(Enum):
    """What a device may do with a malformed chain."""

    ERROR = "device error"
    USED = "chain used"
    IGNORED = "chain ignored"


MALFORMED_QUEUES = (INFLATEQ, DEFLATEQ)
"""The queues malformed chains go to."""
MALFORMED_KINDS = ("loop", "long-chain", "outside-ram", "past-ram-end", "avail-jump", "nested-indirect", "wrong-wrap")
"""The kinds of malformed chain, in the order the fuzz format numbers them."""
PACKED_KINDS = ("wrong-wrap",)
"""The kinds for packed rings."""
SPLIT_KINDS = tuple(kind for kind in MALFORMED_KINDS if kind not in PACKED_KINDS)
"""The kinds for split rings."""
INDIRECT_KINDS = frozenset({"long-chain", "nested-indirect"})
"""Kinds built with indirect tables: only after a negotiation that accepted INDIRECT_DESC."""
ABANDONS_QUEUE = frozenset({"avail-jump"})
"""Kinds after which the queue's used ring is no longer compared (until the next negotiation or reset)."""
OUTCOMES: dict[str, frozenset[RingOutcome]] = {
    "loop": frozenset({RingOutcome.ERROR}),
    "long-chain": frozenset({RingOutcome.ERROR, RingOutcome.USED}),
    "outside-ram": frozenset({RingOutcome.ERROR, RingOutcome.USED}),
    "past-ram-end": frozenset({RingOutcome.ERROR, RingOutcome.USED}),
    "avail-jump": frozenset({RingOutcome.ERROR, RingOutcome.USED}),
    "nested-indirect": frozenset({RingOutcome.ERROR, RingOutcome.USED}),
    "wrong-wrap": frozenset({RingOutcome.IGNORED}),
}
"""The outcomes the spec allows a device for each kind (see the module docstring)."""
REQUIREMENTS: dict[str, str] = {"loop": "VQ-DRV-DESC-1", "long-chain": "VQ-DRV-IND-2",
                                "nested-indirect": "VQ-DRV-IND-1", "wrong-wrap": "VQ-DEV-PACKED-1"}
"""The requirement each kind checks besides VQ-DEV-STATUS-1: the driver requirement it breaks, where the spec has
one, or (wrong-wrap) the device requirement that says what the device does."""
DEVICE_REQUIREMENTS: dict[str, str] = {"wrong-wrap": "VQ-DEV-PACKED-1"}
"""The device requirement an outcome outside a kind's set breaks, where it is not VQ-DEV-STATUS-1."""
OUTSIDE_RAM = 1 << 30
"""The 1 GiB mark: past the scenarios' 128 MiB of RAM, below the 32-bit PCI hole where the BARs live."""


def equivalent_buffers(kind: str, ram_bytes: int) -> tuple[Buffer, ...]:
    """The device-writable buffers of a kind's chain that take a ring descriptor of their own (the chain used as
    QEMU reads it is the out bytes and these; indirect kinds take one ring descriptor for everything)."""
    if kind == "outside-ram":
        return (Buffer(OUTSIDE_RAM, PAGE_SIZE),)
    if kind == "past-ram-end":
        return (Buffer(ram_bytes - PAGE_SIZE // 2, PAGE_SIZE),)
    return ()


def ring_descriptors(kind: str) -> int:
    """Descriptors of the ring a kind's chain takes (a wrong-wrap descriptor is written over by the next chain)."""
    return 2 if kind in ("loop", "outside-ram", "past-ram-end") else 0 if kind in PACKED_KINDS else 1


def kinds_for(packed: bool) -> tuple[str, ...]:
    """The kinds of a ring layout."""
    return PACKED_KINDS if packed else SPLIT_KINDS


def add_malformed_chain(queue: SplitDriverQueue | PackedDriverQueue, kind: str, payload: Buffer,
                        place: Callable[[bytes], int], ram_bytes: int) -> None:
    """Write the chain of `kind` with `payload` (device-readable, already in memory) and publish it; `place` puts
    bytes (indirect tables) in guest memory and returns their address."""
    if isinstance(queue, PackedDriverQueue) != (kind in PACKED_KINDS):
        raise ValueError(f"a {kind} chain on a {type(queue).__name__}: the {'packed' if kind in PACKED_KINDS else 'split'}"
                         " layout has it")
    if isinstance(queue, PackedDriverQueue):  # wrong-wrap: AVAIL and USED of the previous lap
        previous_lap = PACKED_DESC_F_USED if queue.avail_wrap else PACKED_DESC_F_AVAIL
        queue.write_descriptor(queue.next_avail, PackedDescriptor(payload.addr, payload.length, 0, previous_lap))
        return
    out = Descriptor(payload.addr, payload.length, DESC_F_NEXT, 1)
    if kind == "loop":
        queue.publish(queue.add_raw([out, Descriptor(payload.addr, payload.length, DESC_F_NEXT, 0)]))
    elif kind in ("outside-ram", "past-ram-end"):
        (writable,) = equivalent_buffers(kind, ram_bytes)
        queue.publish(queue.add_raw([out, Descriptor(writable.addr, writable.length, DESC_F_WRITE, 0)]))
    elif kind == "avail-jump":
        head = queue.add_raw([Descriptor(payload.addr, payload.length, 0, 0)])
        queue.publish_everywhere(head, queue.layout.size + 1)
    elif kind == "long-chain":
        page = place(bytes(PAGE_SIZE))
        entries = queue.layout.size
        table = _table([out] + [Descriptor(page, PAGE_SIZE, DESC_F_WRITE | DESC_F_NEXT, i + 2) for i in range(entries - 1)]
                       + [Descriptor(page, PAGE_SIZE, DESC_F_WRITE, 0)])
        queue.publish(queue.add_raw([Descriptor(place(table), len(table), DESC_F_INDIRECT, 0)]))
    elif kind == "nested-indirect":
        page = place(bytes(PAGE_SIZE))
        inner = place(_table([Descriptor(page, PAGE_SIZE, DESC_F_WRITE, 0)]))
        table = _table([out, Descriptor(inner, DESC_SIZE, DESC_F_INDIRECT | DESC_F_WRITE, 0)])
        queue.publish(queue.add_raw([Descriptor(place(table), len(table), DESC_F_INDIRECT, 0)]))
    else:
        raise ValueError(f"unknown malformed chain kind {kind!r}; one of {', '.join(MALFORMED_KINDS)}")


def _table(descriptors: list[Descriptor]) -> bytes:
    """An indirect table (little endian: indirect tables exist on modern and legacy x86 alike)."""
    return b"".join(d.addr.to_bytes(8, "little") + d.length.to_bytes(4, "little") + d.flags.to_bytes(2, "little")
                    + d.next.to_bytes(2, "little") for d in descriptors)
