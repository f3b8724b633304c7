"""A minimal in-memory balloon driver for the reference device.

It does what a virtio-pci driver does through registers: negotiates
features, lays out rings (packed when it accepts RING_PACKED, split
otherwise) in guest RAM with `vballoon.virtqueue`, writes
buffers there, publishes them and notifies.  Tests, fuzzers and the
reference side of a transport use it to reach the device exactly as a
guest would.
"""

from __future__ import annotations

import functools
from typing import Collection, Iterable, Sequence

from vballoon.errors import UsageError
from vballoon.reference.device import FREE_PAGE_VQ, REPORTING_VQ, STATSQ, BalloonDevice
from vballoon.spec import (
    BALLOON_FEATURES,
    PAGE_SIZE,
    PFN_SHIFT,
    ConfigField,
    Feature,
    Status,
    encode_cmd_id,
    encode_pfns,
    encode_stats,
    feature_mask,
)
from vballoon.virtqueue import (Buffer, DriverQueue, PackedLayout, RingLayout, SplitLayout, UsedElement,
                                open_driver_queue)

DRIVER_REGION = 2 << 20
"""Bytes at the top of RAM the driver keeps for rings and buffers."""
_SCRATCH_ALIGN = 64
_WANTED = feature_mask(*BALLOON_FEATURES[1:], Feature.INDIRECT_DESC, Feature.EVENT_IDX, Feature.VERSION_1,
                       Feature.RING_PACKED)
"""What `ReferenceDriver.negotiate` accepts by default: every balloon and ring feature but MUST_TELL_HOST (like
Linux, the packed layout whenever it is offered)."""
_VERSION_1, _EVENT_IDX, _PAGE_POISON, _RING_PACKED = (
    feature_mask(bit) for bit in (Feature.VERSION_1, Feature.EVENT_IDX, Feature.PAGE_POISON, Feature.RING_PACKED))


@functools.lru_cache(maxsize=64)  # every negotiation lays out the same rings again
def _ring_layouts(sizes: tuple[int, ...], start: int, modern: bool, packed: bool) -> tuple[RingLayout, ...]:
    """The rings of queues of `sizes`, one after the other from `start` (legacy: each on a page boundary)."""
    layouts: list[RingLayout] = []
    for size in sizes:
        if packed:
            layout: RingLayout = PackedLayout.modern(size, start)
        elif modern:
            layout = SplitLayout.modern(size, start)
        else:
            layout = SplitLayout.legacy(size, -(-start // PAGE_SIZE) * PAGE_SIZE)
        layouts.append(layout)
        start = layout.end
    return tuple(layouts)


class ReferenceDriver:
    """Drives a `BalloonDevice` over split rings kept in the top `DRIVER_REGION` of its RAM."""

    def __init__(self, device: BalloonDevice) -> None:
        self.device = device
        self.region_start = device.ram.size - DRIVER_REGION
        if self.region_start < 0:
            raise UsageError(f"RAM of {device.ram.size} bytes is smaller than the driver region of {DRIVER_REGION}")
        self.queues: dict[str, DriverQueue] = {}
        self._scratch_start = self.region_start + DRIVER_REGION // 2
        self._next_scratch = self._scratch_start

    @property
    def first_driver_pfn(self) -> int:
        """Pages from here up hold rings and buffers; tests balloon pages below it."""
        return self.region_start >> PFN_SHIFT

    def negotiate(self, features: int | None = None, *, poison_val: int | None = None,
                  queues: Collection[str] | None = None) -> bool:
        """Run the init sequence; True if FEATURES_OK stuck and DRIVER_OK is set.

        By default accepts every offered balloon and ring feature except
        MUST_TELL_HOST.  `poison_val` is written before DRIVER_OK
        (BAL-DRV-PP-2) when PAGE_POISON is accepted. Sets up the virtqueues
        named in `queues` (default: all; a driver configures the ones it
        uses, virtio 4.1.5.1.3), each at the same place either way.
        """
        device = self.device
        device.write_status(0)
        device.write_status(Status.ACKNOWLEDGE)
        device.write_status(Status.ACKNOWLEDGE | Status.DRIVER)
        if features is None:
            features = device.offered_features & _WANTED
        device.write_driver_features(features)
        status = Status.ACKNOWLEDGE | Status.DRIVER
        modern = bool(features & _VERSION_1)  # bit tests here, not has_feature: this runs for every negotiation
        if modern:  # legacy devices have no FEATURES_OK
            device.write_status(status | Status.FEATURES_OK)
            if not device.status & Status.FEATURES_OK:
                return False
            status |= Status.FEATURES_OK
        self.queues = {}
        layouts = _ring_layouts(tuple([queue.size for queue in device.queues]), self.region_start, modern,
                                bool(features & _RING_PACKED))
        event_idx, endian = bool(features & _EVENT_IDX), device.endian
        for index, (queue, layout) in enumerate(zip(device.queues, layouts, strict=True)):
            if queues is not None and queue.name not in queues:
                continue
            if modern:
                device.set_queue_rings(index, *layout.areas)
            else:
                device.set_queue_pfn(index, layout.desc >> PFN_SHIFT)
            self.queues[queue.name] = open_driver_queue(device.ram, layout, event_idx=event_idx, endian=endian)
        if poison_val is not None and features & _PAGE_POISON:
            device.write_config(ConfigField.POISON_VAL, 4, poison_val)
        device.write_status(status | Status.DRIVER_OK)
        return True

    def _scratch(self, length: int) -> int:
        """Address of `length` free bytes in the circular buffer area."""
        if self._next_scratch + length > self.device.ram.size:
            self._next_scratch = self._scratch_start
        addr = self._next_scratch
        self._next_scratch += -(-length // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
        return addr

    def place(self, data: bytes) -> int:
        """Put `data` in the scratch area and return its address (for chains a caller writes itself)."""
        addr = self._scratch(len(data))
        self.device.ram.write(addr, data)
        return addr

    def send(self, queue: str, out: bytes = b"", in_: Sequence[Buffer] = (), *, indirect: bool = False,
             notify: bool = True) -> int:
        """Put `out` in guest RAM, make one chain of it and `in_`, publish, notify if needed (and `notify`)."""
        ring = self.queues[queue]
        out_buffers = []
        if out:
            addr = self._scratch(len(out))
            self.device.ram.write(addr, out)
            out_buffers.append(Buffer(addr, len(out)))
        table = self._scratch(16 * (len(out_buffers) + len(in_))) if indirect else None
        head = ring.add_and_publish(out_buffers, in_, indirect_table=table)
        if notify and ring.should_notify():
            self.device.notify(self.device.queue_index(queue))
        return head

    def collect(self, queue: str) -> list[UsedElement]:
        return self.queues[queue].collect_used()

    def inflate(self, pfns: Iterable[int], *, indirect: bool = False) -> int:
        return self.send("inflateq", encode_pfns(pfns, self.device.endian), indirect=indirect)

    def deflate(self, pfns: Iterable[int]) -> int:
        return self.send("deflateq", encode_pfns(pfns, self.device.endian))

    def set_actual(self, pages: int) -> None:
        """Report the balloon size in one 4-byte access (BAL-DRV-ACT-1, BAL-DRV-LEG-ACT)."""
        self.device.write_config(ConfigField.ACTUAL, 4, pages)

    def send_stats(self, entries: Iterable[tuple[int, int]]) -> int:
        return self.send(STATSQ, encode_stats(entries, self.device.endian))

    def send_cmd_id(self, cmd_id: int) -> int:
        return self.send(FREE_PAGE_VQ, encode_cmd_id(cmd_id, self.device.endian))

    def hint_pages(self, pfns: Iterable[int]) -> int:
        return self.send(FREE_PAGE_VQ, in_=[Buffer(pfn << PFN_SHIFT, PAGE_SIZE) for pfn in pfns])

    def report_pages(self, pfns: Iterable[int]) -> int:
        return self.send(REPORTING_VQ, in_=[Buffer(pfn << PFN_SHIFT, PAGE_SIZE) for pfn in pfns])
