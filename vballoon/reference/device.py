"""The reference balloon device: the device side of the spec, register by register.

A transport (modern or legacy virtio-pci, or a test) drives it through
feature, status, config and queue registers and queue notifications; the
host side uses `set_target`, `query_balloon`, the stats properties and the
free-page-hint requests QEMU's migration code makes.  Everything it does
is observable: events, interrupts, errors, the ballooned/hinted/reported
page sets, and for each page the outcomes a conforming device may produce.
"""

from __future__ import annotations

import functools
import itertools
import struct
from dataclasses import dataclass

from vballoon.errors import DecodeError
from vballoon.reference.errors import DeviceError, RequestRejected
from vballoon.reference.hinting import FreePageHinting, HintState
from vballoon.reference.ram import GuestRam, PageOutcome, poison_page
from vballoon.reference.stats import Clock, StatsState
from vballoon.spec import (
    CONFIG_FIELD_SIZE,
    LINUX_S_NR,
    PFN_SHIFT,
    BalloonConfig,
    ConfigField,
    Endian,
    Feature,
    Status,
    buffer_endian,
    config_size,
    decode_cmd_id,
    decode_pfns,
    feature_mask,
)
from vballoon.virtqueue import (Chain, MalformedRingError, PackedDeviceQueue, PackedLayout, SplitDeviceQueue,
                                SplitLayout, open_device_queue)

INFLATEQ = "inflateq"
DEFLATEQ = "deflateq"
STATSQ = "statsq"
FREE_PAGE_VQ = "free_page_vq"
REPORTING_VQ = "reporting_vq"

QUEUE_MAX_SIZES = {INFLATEQ: 128, DEFLATEQ: 128, STATSQ: 128, FREE_PAGE_VQ: 1024, REPORTING_VQ: 32}
"""Queue sizes virtio_balloon_device_realize asks for (QEMU 7.2 and 10.0). The spec lets a device pick any
size (virtio 2.7/4.1.4.3: the device reports a maximum), and QEMU 10.0.x's virtio_add_queue raises every queue
to VIRTQUEUE_MAX_SIZE (1024), so a reference standing for a real QEMU takes its `DeviceShape` from that binary
(vballoon.qemu.profile); these sizes are the default shape."""


@dataclass(frozen=True)
class DeviceShape:
    """What conforming devices choose differently and the reference copies from the device under test."""

    stat_count: int = LINUX_S_NR
    """Tags the device stores: 0..stat_count-1 (10 in QEMU 7.2, 16 in 10.0); the rest are ignored (BAL-DEV-ST-1)."""
    queue_max_sizes: tuple[tuple[str, int], ...] = tuple(QUEUE_MAX_SIZES.items())
    """(queue, maximum size) of every queue the device can create."""


DEFAULT_SHAPE = DeviceShape()
"""QEMU 10.0's stats count with the queue sizes realize asks for: the reference's shape without a QEMU to copy."""

INFLATED = frozenset({PageOutcome.UNCHANGED, PageOutcome.ZERO})
REPORTED_WITHOUT_POISON = frozenset({PageOutcome.UNCHANGED, PageOutcome.ZERO})
REPORTED_WITH_POISON = frozenset({PageOutcome.UNCHANGED, PageOutcome.POISON})
HINTED = frozenset({PageOutcome.ANY})
_CONFIG_FIELDS = struct.Struct("<4I")
"""num_pages, actual, free_page_hint_cmd_id, poison_val (BAL-CFG-LEG-LE: little endian on every interface)."""
_ACTUAL, _POISON_VAL = int(ConfigField.ACTUAL), int(ConfigField.POISON_VAL)
_CONFIG_WIDTHS = (1, 2, 4)
_ACTUAL_END = _ACTUAL + CONFIG_FIELD_SIZE
LEGACY_FEATURE_BITS = (1 << 32) - 1
"""What the legacy virtio-pci layout shows of the device features: one 32-bit register."""


@dataclass(frozen=True)
class DeviceProperties:
    """Device properties, named after QEMU's virtio-balloon properties."""

    ram_size: int = 512 << 20
    deflate_on_oom: bool = False
    free_page_hint: bool = False
    free_page_reporting: bool = False
    page_poison: bool = True
    qemu_4_0_config_size: bool = False
    modern: bool = True
    """Offer VERSION_1 (modern virtio-pci); False models a legacy interface (a legacy-only device, or a transitional
    one driven through its legacy registers): no VERSION_1, and one 32-bit feature register."""
    guest_endian: Endian = "little"
    """Byte order of legacy buffers (guest-native; little on x86)."""
    shape: DeviceShape = DEFAULT_SHAPE
    """Stats count and queue sizes, as the QEMU under test has them."""
    ring_features: int = feature_mask(Feature.INDIRECT_DESC, Feature.EVENT_IDX)
    """Transport features offered besides the balloon bits, as QEMU's indirect_desc, event_idx and packed properties
    ask (QEMU 7.2 and 10.0 also offer RING_RESET). A driver that accepts RING_PACKED gets packed rings."""

    @functools.cached_property  # read on every status write and invariant check
    def offered_features(self) -> int:
        """STATS_VQ always, MUST_TELL_HOST never, the rest from the properties (virtio_balloon_get_features,
        QEMU 7.2 and 10.0)."""
        bits = [Feature.STATS_VQ]
        bits += [Feature.DEFLATE_ON_OOM] if self.deflate_on_oom else []
        bits += [Feature.FREE_PAGE_HINT] if self.free_page_hint else []
        bits += [Feature.PAGE_POISON] if self.page_poison else []
        bits += [Feature.REPORTING] if self.free_page_reporting else []
        bits += [Feature.VERSION_1] if self.modern else []
        offered = feature_mask(*bits) | self.ring_features
        return offered if self.modern else offered & LEGACY_FEATURE_BITS

    @functools.cached_property  # read on every config access
    def config_size(self) -> int:
        return config_size(self.offered_features, self.qemu_4_0_config_size)

    @functools.cached_property
    def queue_sizes(self) -> tuple[int, ...]:
        """Maximum size of each queue, in index order."""
        sizes = dict(self.shape.queue_max_sizes)
        return tuple(sizes[name] for name in self.queue_names)

    @functools.cached_property
    def queue_names(self) -> tuple[str, ...]:
        """Queues in index order; absent queues take no index."""
        names = [INFLATEQ, DEFLATEQ, STATSQ]
        names += [FREE_PAGE_VQ] if self.free_page_hint else []
        names += [REPORTING_VQ] if self.free_page_reporting else []
        return tuple(names)


@dataclass(frozen=True)
class BalloonChange:
    """A BALLOON_CHANGE event: guest memory in bytes after a change of `actual`.

    QEMU rate-limits this QMP event to one a second (the last value wins);
    the reference records every change.
    """

    actual: int


@dataclass(slots=True)
class Queue:
    """Registers and ring of one virtqueue."""

    name: str
    max_size: int
    size: int
    ring: SplitDeviceQueue | PackedDeviceQueue | None = None
    interrupts: int = 0


@dataclass
class DriverViolation:
    """A driver action the spec forbids, with the requirement it breaks."""

    requirement: str
    detail: str


def _width_rejected(width: int) -> RequestRejected:
    return RequestRejected(f"config access width {width}: use 1, 2 or 4")


class BalloonDevice:
    """The reference virtio-balloon device."""

    def __init__(self, properties: DeviceProperties = DeviceProperties(), clock: Clock = lambda: 0.0) -> None:
        if not 1 <= properties.shape.stat_count <= LINUX_S_NR:
            raise RequestRejected(f"stat_count {properties.shape.stat_count} outside 1..{LINUX_S_NR}")
        self.properties = properties
        self.ram = GuestRam(properties.ram_size)
        self.stats = StatsState(clock, properties.shape.stat_count)
        self.hinting = FreePageHinting()
        self.num_pages = 0
        self.actual = 0
        self.events: list[BalloonChange] = []
        self.config_changes = 0
        self.ballooned: set[int] = set()
        self.hinted: set[int] = set()
        self.reported: set[int] = set()
        self.skipped_pfns: list[int] = []
        self.errors: list[str] = []
        self.driver_violations: list[DriverViolation] = []
        self._reset_transport()

    # --- transport state -------------------------------------------------------

    def _reset_transport(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.broken = False
        self.poison_val = 0
        self.staged_actual: bytes | None = None
        """Legacy: bytes of `actual` written before its last byte (BAL-DEV-LEG-ACT)."""
        self.held_stats: tuple[int, Chain] | None = None
        """The stats buffer the device holds until the next poll: (queue index, chain)."""
        sizes = self.properties.queue_sizes
        self.queues = list(map(Queue, self.properties.queue_names, sizes, sizes))

    def reset(self) -> None:
        """Device reset: status, features, queues, poison_val; num_pages and actual persist (QEMU 7.2 and 10.0)."""
        self.hinting.reset()
        self.stats.buffers_seen = 0
        self._reset_transport()

    @property
    def offered_features(self) -> int:
        return self.properties.offered_features

    def _has(self, feature: Feature) -> bool:
        return bool(self.driver_features >> feature & 1)  # has_feature inline: asked on every buffer

    @property
    def modern(self) -> bool:
        return self._has(Feature.VERSION_1)

    @property
    def endian(self) -> Endian:
        return buffer_endian(self.driver_features, self.properties.guest_endian)

    def write_driver_features(self, features: int) -> None:
        """The driver accepts features; ignored once FEATURES_OK is set (as QEMU 7.2 and 10.0)."""
        if not self.status & Status.FEATURES_OK:
            self.driver_features = features

    def write_status(self, value: int) -> None:
        """Write the device status register; 0 resets the device.

        FEATURES_OK sticks only if the accepted features are a subset of the
        offered ones (QEMU 7.2 and 10.0 instead masks unoffered bits and keeps it).
        DEVICE_NEEDS_RESET is the device's bit and survives driver writes.
        """
        if value == 0:
            self.reset()
            return
        newly = value & ~self.status
        if newly & Status.FEATURES_OK and self.driver_features & ~self.properties.offered_features:
            value &= ~Status.FEATURES_OK
        self.status = value | (self.status & Status.DEVICE_NEEDS_RESET)

    def _violation(self, requirement: str, detail: str) -> None:
        self.driver_violations.append(DriverViolation(requirement, detail))

    def _fail(self, reason: str) -> None:
        """virtio_error: stop the device; a modern device also sets DEVICE_NEEDS_RESET."""
        self.errors.append(reason)
        self.broken = True
        if self.modern:
            self.status |= Status.DEVICE_NEEDS_RESET
            self.config_changes += 1

    def fail(self, reason: str) -> None:
        """A device error a caller chose where the spec allows one (a malformed chain's outcome): as `_fail`."""
        self._fail(reason)

    # --- configuration space ---------------------------------------------------

    @property
    def config_size(self) -> int:
        return self.properties.config_size

    def config(self) -> BalloonConfig:
        return BalloonConfig(self.num_pages, self.actual, self.hinting.config_cmd_id, self.poison_val)

    def config_bytes(self) -> bytes:
        """The config space as the driver reads it: `config().encode(config_size)`, without the dataclass."""
        fields = _CONFIG_FIELDS.pack(self.num_pages, self.actual, self.hinting.config_cmd_id, self.poison_val)
        return fields[:self.properties.config_size]

    def read_config(self, offset: int, width: int) -> int:
        """Read 1, 2 or 4 config bytes (little endian: BAL-CFG-LEG-LE); all ones past the end."""
        if width not in _CONFIG_WIDTHS:  # checked here, not in a helper: every config access passes by
            raise _width_rejected(width)
        if offset < 0 or offset + width > self.properties.config_size:
            return (1 << 8 * width) - 1
        return int.from_bytes(self.config_bytes()[offset : offset + width], "little")

    def write_config(self, offset: int, width: int, value: int) -> None:
        """Write 1, 2 or 4 config bytes; only `actual` and `poison_val` are driver-writable.

        Writes past the end are ignored, as in QEMU 7.2.
        """
        if width not in _CONFIG_WIDTHS:
            raise _width_rejected(width)
        if offset < 0 or offset + width > self.properties.config_size:
            return
        image = bytearray(self.config_bytes())
        if self.staged_actual is not None:
            image[_ACTUAL:_ACTUAL_END] = self.staged_actual
        end = offset + width
        image[offset:end] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        if offset < _ACTUAL_END and end > _ACTUAL:
            self._write_actual(bytes(image[_ACTUAL:_ACTUAL_END]), last_byte_written=end >= _ACTUAL_END)
        if end > _POISON_VAL:  # only a 16-byte config space reaches it
            self._write_poison_val(int.from_bytes(image[_POISON_VAL:], "little"))

    def _write_actual(self, data: bytes, *, last_byte_written: bool) -> None:
        """Apply `actual`; a legacy device waits for its last byte (BAL-DEV-LEG-ACT).

        A legacy driver writes `actual` in one access (BAL-DRV-LEG-ACT); a
        narrower write is staged here.  QEMU 7.2 and 10.0 apply every byte at once.
        """
        if not self.modern and not last_byte_written:
            if self.staged_actual is None:
                self._violation("BAL-DRV-LEG-ACT", "actual written in more than one access")
            self.staged_actual = data
            return
        self.staged_actual = None
        new = int.from_bytes(data, "little")
        if new != self.actual:
            self.actual = new
            self.events.append(BalloonChange(self.properties.ram_size - (new << PFN_SHIFT)))

    def _write_poison_val(self, value: int) -> None:
        """poison_val holds only with PAGE_POISON negotiated (QEMU 7.2 and 10.0 keep 0 otherwise)."""
        if not self._has(Feature.PAGE_POISON):
            return
        if self.status & Status.DRIVER_OK and value != self.poison_val:
            self._violation("BAL-DRV-PP-3", "poison_val changed while DRIVER_OK is set")
        self.poison_val = value

    # --- queues ----------------------------------------------------------------

    def queue_index(self, name: str) -> int:
        return self.properties.queue_names.index(name)

    def set_queue_size(self, index: int, size: int) -> None:
        """Set a queue's size; values outside 1..max are ignored (QEMU 7.2 and 10.0)."""
        queue = self.queues[index]
        if 1 <= size <= queue.max_size:
            queue.size = size

    def set_queue_rings(self, index: int, desc: int, driver: int, device: int) -> None:
        """Modern: the Descriptor, Driver and Device Area addresses (split: table, avail and used rings; with
        RING_PACKED: the ring and the two event suppression structures); the queue is usable at once."""
        queue = self.queues[index]
        layout_class = PackedLayout if self._has(Feature.RING_PACKED) else SplitLayout
        queue.ring = open_device_queue(self.ram, layout_class(queue.size, desc, driver, device),
                                       event_idx=self._has(Feature.EVENT_IDX), endian=self.endian)

    def set_queue_pfn(self, index: int, pfn: int) -> None:
        """Legacy: the ring region at `pfn` << 12 with 4096 alignment; 0 disables the queue."""
        if pfn == 0:
            self.queues[index].ring = None
            return
        layout = SplitLayout.legacy(self.queues[index].size, pfn << PFN_SHIFT)
        self.set_queue_rings(index, layout.desc, layout.avail, layout.used)

    def notify(self, index: int) -> None:
        """The driver notifies queue `index`: process what it made available."""
        queue = self.queues[index]
        if queue.ring is None or self.broken:
            return
        handler = _QUEUE_HANDLERS[queue.name]
        try:
            while (chain := queue.ring.pop()) is not None:
                handler(self, index, chain)
        except (MalformedRingError, DeviceError) as exc:
            self._fail(str(exc))

    def _complete(self, index: int, chain: Chain) -> None:
        """Return a buffer with used length 0, as QEMU does (the driver ignores it: BAL-LEG-USED). A broken
        device returns nothing: QEMU's (7.2 and 10.0) virtqueue_fill drops the element once virtio_error has run (the stats
        poll timer still fires)."""
        ring = self.queues[index].ring
        assert ring is not None
        if self.broken:
            return
        ring.push(chain.head, 0)
        if ring.should_interrupt():
            self.queues[index].interrupts += 1

    def _pfns_in_ram(self, chain: Chain) -> list[int]:
        """PFNs of an inflate/deflate buffer; those outside RAM are skipped but still acked."""
        decoded, ram_pages = decode_pfns(chain.out_data, self.endian).pfns, self.ram.num_pages  # PFNs are unsigned
        # filter, not comprehensions: under a fuzzer's instrumentation a comprehension costs a call per PFN
        self.skipped_pfns += filter(ram_pages.__le__, decoded)
        return list(filter(ram_pages.__gt__, decoded))

    def _inflate(self, index: int, chain: Chain) -> None:
        """Take pages into the balloon; their content becomes unchanged-or-zero (BAL-DEV-OP-1)."""
        pfns = self._pfns_in_ram(chain)
        self.ballooned.update(pfns)
        self.ram.allow(pfns, INFLATED)
        self._complete(index, chain)

    def _deflate(self, index: int, chain: Chain) -> None:
        """Give pages back; the driver must only deflate pages it inflated (BAL-DRV-OP-7)."""
        pfns = self._pfns_in_ram(chain)
        strangers = list(itertools.filterfalse(self.ballooned.__contains__, pfns))
        if strangers:
            listed = ", ".join(f"{pfn:#x}" for pfn in strangers[:8]) + (", ..." if len(strangers) > 8 else "")
            self._violation("BAL-DRV-OP-7", f"deflate of {len(strangers)} page(s) not in the balloon: {listed}")
        self.ballooned.difference_update(pfns)
        self._complete(index, chain)

    def _receive_stats(self, index: int, chain: Chain) -> None:
        """Parse a stats buffer and hold it until the next poll.

        A second buffer while one is held breaks BAL-DRV-ST-1; the held one
        is returned at once (QEMU 7.2 and 10.0).  A buffer whose size is not a
        multiple of 10 breaks BAL-DRV-ST-5.
        """
        if self.held_stats is not None:
            self._violation("BAL-DRV-ST-1", "a second stats buffer while one is held")
            self._complete(*self.held_stats)
        if len(chain.out_data) % 10:
            self._violation("BAL-DRV-ST-5", f"stats buffer of {len(chain.out_data)} bytes")
        self.held_stats = (index, chain)
        self.stats.receive(chain.out_data, self.endian, legacy=not self.modern)

    def _free_page_hints(self, index: int, chain: Chain) -> None:
        """A command id (out) and/or hinted pages (in) on free_page_vq.

        An out buffer shorter than 4 bytes is a device error, as QEMU 7.2 and 10.0
        ("received an incorrect cmd id"); the driver sends 4 (BAL-DRV-FPH-1).
        Pages count only under the current id (BAL-DEV-FPH-3) and may then
        hold anything until the driver writes them (BAL-DEV-FPH-4).
        """
        if chain.out:
            try:
                cmd_id = decode_cmd_id(chain.out_data, self.endian)
            except DecodeError as exc:
                raise DeviceError(f"received an incorrect cmd id: {exc}") from None
            self.hinting.receive_cmd_id(cmd_id)
        if chain.in_ and self.hinting.accepts_pages():
            for buffer in chain.in_:
                pages = self.ram.whole_pages(buffer)
                self.hinted.update(pages)
                self.ram.allow(pages, HINTED)
        self._complete(index, chain)

    def _report(self, index: int, chain: Chain) -> None:
        """Reported free pages: unchanged or zero without PAGE_POISON (BAL-DEV-FPR-1),
        unchanged or poison_val with it (BAL-DEV-FPR-2)."""
        poisoned = self._has(Feature.PAGE_POISON)
        allowed, pattern = (REPORTED_WITH_POISON, self.poison_pattern()) if poisoned else (REPORTED_WITHOUT_POISON, None)
        for buffer in chain.in_:
            pages = self.ram.whole_pages(buffer)
            self.reported.update(pages)
            self.ram.allow(pages, allowed, pattern)
        self._complete(index, chain)

    # --- host side -----------------------------------------------------------------

    def set_target(self, target: int) -> None:
        """QMP `balloon`: guest memory target in bytes; above RAM is clamped, <= 0 refused (QEMU's words differ
        between versions, so a comparison judges the refusal, not its text)."""
        if target <= 0:
            raise RequestRejected(f"balloon target {target} refused: it must be a positive size")
        target = min(target, self.properties.ram_size)
        self.num_pages = (self.properties.ram_size - target) >> PFN_SHIFT
        self.config_changes += 1

    def query_balloon(self) -> int:
        """QMP `query-balloon`: guest memory in bytes, RAM minus `actual` pages."""
        return self.properties.ram_size - (self.actual << PFN_SHIFT)

    def take_events(self) -> list[BalloonChange]:
        events, self.events = self.events, []
        return events

    def set_stats_polling_interval(self, seconds: int) -> None:
        """QOM guest-stats-polling-interval (seconds)."""
        self.stats.set_poll_interval(seconds)

    def guest_stats(self) -> dict[str, object]:
        """QOM guest-stats."""
        return self.stats.guest_stats()

    def run_timers(self) -> None:
        """Fire the stats poll if due: give the held buffer back so the driver refills it."""
        if not self.stats.timer_due():
            return
        if self.held_stats is None or not self._has(Feature.STATS_VQ):
            self.stats.rearm()
            return
        held, self.held_stats = self.held_stats, None
        self.stats.poll_deadline = None
        self._complete(*held)

    def request_free_page_hints(self) -> int:
        """Ask for hints under a new command id; returns the id."""
        cmd_id = self.hinting.request()
        self.config_changes += 1
        return cmd_id

    def stop_free_page_hints(self) -> None:
        if self.hinting.state is not HintState.STOP:
            self.hinting.stop()
            self.config_changes += 1

    def free_page_hints_done(self) -> None:
        if self.hinting.state is not HintState.DONE:
            self.hinting.done()
            self.config_changes += 1

    # --- observations --------------------------------------------------------------

    def poison_pattern(self) -> bytes:
        return poison_page(self.poison_val, self.endian)

    def allowed_page_outcomes(self, pfn: int) -> frozenset[PageOutcome]:
        return self.ram.allowed(pfn)

    def page_content_allowed(self, pfn: int, observed: bytes) -> bool:
        """Whether a device that left `observed` in page `pfn` conforms."""
        return self.ram.content_allowed(pfn, observed)


_QUEUE_HANDLERS = {
    INFLATEQ: BalloonDevice._inflate,
    DEFLATEQ: BalloonDevice._deflate,
    STATSQ: BalloonDevice._receive_stats,
    FREE_PAGE_VQ: BalloonDevice._free_page_hints,
    REPORTING_VQ: BalloonDevice._report,
}
"""What the device does with a chain popped from each queue."""
