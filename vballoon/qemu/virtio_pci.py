"""A virtio-pci driver that runs on the host and reaches the device over qtest.

PCI: configuration space through ports 0xcf8/0xcfc, bus 0 only (q35 puts
`-device` on its root bus), BAR sizing and assignment in the 32-bit PCI hole
above RAM and in I/O ports from 0xc000, then I/O, memory and bus mastering
enabled.

Virtio: the modern interface (capability list: common, notify, ISR and
device configuration) and the legacy I/O BAR behind one `VirtioPciInterface`;
`VirtioPciDriver` runs the status sequence, negotiates any feature subset
(including ones no sane driver picks, BAL-DEV-LEG-FEAT-1), lays rings out in
guest RAM with `vballoon.virtqueue` (packed when VIRTIO_F_RING_PACKED is
negotiated, split otherwise), notifies, and polls the used ring with a
deadline (no MSI-X: the used ring is the completion signal).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from vballoon.errors import QemuError, UsageError
from vballoon.qemu.qtest import QtestClient
from vballoon.spec import Endian, Feature, Status, buffer_endian, has_feature
from vballoon.virtqueue import DriverQueue, PackedLayout, RingLayout, SplitLayout, UsedElement, open_driver_queue
from vballoon.waiting import DeadlineExceeded, wait_for

# --- PCI ------------------------------------------------------------------------

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_ENABLE = 0x80000000
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_HEADER_TYPE = 0x0E
PCI_BAR0 = 0x10
PCI_BAR_COUNT = 6
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_BUS_MASTER = 0x4
STATUS_CAP_LIST = 0x10
HEADER_MULTI_FUNCTION = 0x80
BAR_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
NO_DEVICE = 0xFFFF

MMIO_WINDOW = (0xE0000000, 0xFEC00000)
"""32-bit PCI hole above RAM, below the IOAPIC (as QEMU's libqos uses on x86)."""
IO_WINDOW = (0xC000, 0x10000)

VIRTIO_VENDOR_ID = 0x1AF4
BALLOON_DEVICE_ID_MODERN = 0x1045
"""0x1040 + virtio device id 5: a device without the legacy interface."""
BALLOON_DEVICE_ID_TRANSITIONAL = 0x1002
"""The legacy id, used by transitional and legacy-only devices."""


@dataclass(frozen=True)
class PciAddress:
    bus: int
    slot: int
    function: int

    def config_address(self, offset: int) -> int:
        """The value written to 0xcf8 for the dword holding `offset`."""
        return CONFIG_ENABLE | self.bus << 16 | self.slot << 11 | self.function << 8 | offset & 0xFC

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"


@dataclass(frozen=True)
class Bar:
    """A sized Base Address Register; `address` once assigned."""

    index: int
    is_io: bool
    is_64bit: bool
    size: int
    address: int = 0


class Region:
    """A window of I/O ports or memory (one BAR, or a part of it) accessed at 1, 2 or 4 bytes."""

    def __init__(self, qtest: QtestClient, base: int, is_io: bool) -> None:
        self.qtest = qtest
        self.base = base
        self.is_io = is_io

    def read(self, offset: int, width: int) -> int:
        if self.is_io:
            return self.qtest.port_in(self.base + offset, width)
        return self.qtest.read_int(self.base + offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        if self.is_io:
            self.qtest.port_out(self.base + offset, width, value)
        else:
            self.qtest.write_int(self.base + offset, width, value)


class PciResources:
    """Bump allocators for BAR addresses: MMIO in the 32-bit hole, I/O ports from 0xc000."""

    def __init__(self) -> None:
        self._next = {True: IO_WINDOW[0], False: MMIO_WINDOW[0]}
        self._limit = {True: IO_WINDOW[1], False: MMIO_WINDOW[1]}

    def allocate(self, bar: Bar) -> int:
        """A naturally aligned address for `bar`."""
        address = _align(self._next[bar.is_io], bar.size)
        if address + bar.size > self._limit[bar.is_io]:
            kind = "I/O" if bar.is_io else "MMIO"
            raise QemuError(f"BAR {bar.index} needs {bar.size:#x} bytes of {kind} space; the window is full")
        self._next[bar.is_io] = address + bar.size
        return address


class PciFunction:
    """One PCI function's configuration space through 0xcf8/0xcfc."""

    def __init__(self, qtest: QtestClient, address: PciAddress) -> None:
        self.qtest = qtest
        self.address = address

    def config_read(self, offset: int, width: int) -> int:
        """Read 1, 2 or 4 bytes of config space (the access stays inside one dword)."""
        self.qtest.outl(CONFIG_ADDRESS_PORT, self.address.config_address(offset))
        return self.qtest.port_in(CONFIG_DATA_PORT + (offset & 3), width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.qtest.outl(CONFIG_ADDRESS_PORT, self.address.config_address(offset))
        self.qtest.port_out(CONFIG_DATA_PORT + (offset & 3), width, value)

    @property
    def vendor_id(self) -> int:
        return self.config_read(PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.config_read(PCI_DEVICE_ID, 2)

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, capability id) of each entry of the capability list."""
        if not self.config_read(PCI_STATUS, 2) & STATUS_CAP_LIST:
            return []
        found: list[tuple[int, int]] = []
        offset = self.config_read(PCI_CAPABILITY_LIST, 1) & 0xFC
        while offset and len(found) < 48:
            found.append((offset, self.config_read(offset, 1)))
            offset = self.config_read(offset + 1, 1) & 0xFC
        return found

    def size_bars(self) -> list[Bar]:
        """Size every implemented BAR by writing all ones (decoding must be off)."""
        bars: list[Bar] = []
        index = 0
        while index < PCI_BAR_COUNT:
            offset = PCI_BAR0 + 4 * index
            original = self.config_read(offset, 4)
            self.config_write(offset, 4, 0xFFFFFFFF)
            probed = self.config_read(offset, 4)
            self.config_write(offset, 4, original)
            if probed == 0:
                index += 1
                continue
            if probed & BAR_IO:
                bars.append(Bar(index, True, False, (~(probed & ~0x3) + 1) & 0xFFFF))
                index += 1
                continue
            is_64bit = bool(probed & BAR_MEM_TYPE_64)
            mask = probed & ~0xF
            if is_64bit:
                self.config_write(offset + 4, 4, 0xFFFFFFFF)
                mask |= self.config_read(offset + 4, 4) << 32
                self.config_write(offset + 4, 4, 0)
                size = (~mask + 1) & (1 << 64) - 1
            else:
                size = (~mask + 1) & 0xFFFFFFFF
            bars.append(Bar(index, False, is_64bit, size))
            index += 2 if is_64bit else 1
        return bars

    def enable(self, resources: PciResources) -> dict[int, Bar]:
        """Assign every BAR, then enable I/O, memory decoding and bus mastering."""
        assigned: dict[int, Bar] = {}
        with self.qtest.pipeline():
            bars = self.size_bars()
            for bar in bars:
                address = resources.allocate(bar)
                self.config_write(PCI_BAR0 + 4 * bar.index, 4, address)
                if bar.is_64bit:
                    self.config_write(PCI_BAR0 + 4 * bar.index + 4, 4, 0)
                assigned[bar.index] = Bar(bar.index, bar.is_io, bar.is_64bit, bar.size, address)
            command = self.config_read(PCI_COMMAND, 2)
            self.config_write(PCI_COMMAND, 2, command | COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER)
        return assigned


def enumerate_bus(qtest: QtestClient, bus: int = 0) -> list[PciFunction]:
    """Every function present on `bus`."""
    found: list[PciFunction] = []
    for slot in range(32):
        first = PciFunction(qtest, PciAddress(bus, slot, 0))
        if first.vendor_id == NO_DEVICE:
            continue
        found.append(first)
        if first.config_read(PCI_HEADER_TYPE, 1) & HEADER_MULTI_FUNCTION:
            for function in range(1, 8):
                candidate = PciFunction(qtest, PciAddress(bus, slot, function))
                if candidate.vendor_id != NO_DEVICE:
                    found.append(candidate)
    return found


def find_function(qtest: QtestClient, vendor_id: int, device_ids: tuple[int, ...]) -> PciFunction:
    """The one function on bus 0 with `vendor_id` and one of `device_ids`."""
    matches = [f for f in enumerate_bus(qtest) if f.vendor_id == vendor_id and f.device_id in device_ids]
    if len(matches) != 1:
        wanted = " or ".join(f"{vendor_id:04x}:{d:04x}" for d in device_ids)
        raise QemuError(f"expected one PCI function {wanted} on bus 0, found {len(matches)}")
    return matches[0]


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# --- virtio-pci interfaces ---------------------------------------------------------


class CfgType(IntEnum):
    """virtio_pci_cap.cfg_type."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


PCI_CAP_ID_VENDOR = 0x09
CAP_CFG_TYPE = 3
CAP_BAR = 4
CAP_OFFSET = 8
CAP_LENGTH = 12
CAP_NOTIFY_MULTIPLIER = 16

# struct virtio_pci_common_cfg
COMMON_DFSELECT = 0
COMMON_DF = 4
COMMON_GFSELECT = 8
COMMON_GF = 12
COMMON_MSIX = 16
COMMON_NUMQ = 18
COMMON_STATUS = 20
COMMON_CFGGENERATION = 21
COMMON_Q_SELECT = 22
COMMON_Q_SIZE = 24
COMMON_Q_MSIX = 26
COMMON_Q_ENABLE = 28
COMMON_Q_NOFF = 30
COMMON_Q_DESCLO = 32
COMMON_Q_DESCHI = 36
COMMON_Q_AVAILLO = 40
COMMON_Q_AVAILHI = 44
COMMON_Q_USEDLO = 48
COMMON_Q_USEDHI = 52

# The legacy I/O BAR (MSI-X off, so the device config starts at 20)
LEGACY_HOST_FEATURES = 0
LEGACY_GUEST_FEATURES = 4
LEGACY_QUEUE_PFN = 8
LEGACY_QUEUE_NUM = 12
LEGACY_QUEUE_SEL = 14
LEGACY_QUEUE_NOTIFY = 16
LEGACY_STATUS = 18
LEGACY_ISR = 19
LEGACY_CONFIG = 20
LEGACY_PFN_SHIFT = 12


class VirtioPciInterface(Protocol):
    """The registers a virtio-pci driver uses, modern or legacy."""

    is_legacy: bool

    def read_status(self) -> int: ...

    def write_status(self, value: int) -> None: ...

    def device_features(self) -> int: ...

    def write_driver_features(self, features: int) -> None: ...

    def queue_max_size(self, index: int) -> int: ...

    def ring_layout(self, size: int, base: int, packed: bool) -> RingLayout: ...

    def ring_bytes(self, size: int, packed: bool) -> int: ...

    def enable_queue(self, index: int, layout: RingLayout) -> None: ...

    def notify(self, index: int) -> None: ...

    def read_isr(self) -> int: ...

    def config_read(self, offset: int, width: int) -> int: ...

    def config_write(self, offset: int, width: int, value: int) -> None: ...


@dataclass(frozen=True)
class VirtioCap:
    """One virtio vendor capability: where a structure lives."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    notify_multiplier: int = 0


def virtio_caps(function: PciFunction) -> list[VirtioCap]:
    """The virtio vendor capabilities of `function`, in list order."""
    caps: list[VirtioCap] = []
    for offset, cap_id in function.capabilities():
        if cap_id != PCI_CAP_ID_VENDOR:
            continue
        cfg_type = function.config_read(offset + CAP_CFG_TYPE, 1)
        multiplier = function.config_read(offset + CAP_NOTIFY_MULTIPLIER, 4) if cfg_type == CfgType.NOTIFY else 0
        caps.append(VirtioCap(cfg_type, function.config_read(offset + CAP_BAR, 1),
                              function.config_read(offset + CAP_OFFSET, 4),
                              function.config_read(offset + CAP_LENGTH, 4), multiplier))
    return caps


class ModernInterface:
    """The virtio 1.x interface: structures found through the capability list."""

    is_legacy = False

    def __init__(self, qtest: QtestClient, function: PciFunction, bars: dict[int, Bar]) -> None:
        self.qtest = qtest
        regions: dict[int, tuple[Region, VirtioCap]] = {}
        for cap in virtio_caps(function):
            if cap.cfg_type in (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR, CfgType.DEVICE) \
                    and cap.cfg_type not in regions and cap.bar in bars:
                bar = bars[cap.bar]
                regions[cap.cfg_type] = (Region(qtest, bar.address + cap.offset, bar.is_io), cap)
        missing = [t.name for t in (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR) if t not in regions]
        if missing:
            raise QemuError(f"PCI function {function.address} lacks the virtio capabilities {missing}")
        self.common = regions[CfgType.COMMON][0]
        self.notify_region, notify_cap = regions[CfgType.NOTIFY]
        self.notify_multiplier = notify_cap.notify_multiplier
        self.isr = regions[CfgType.ISR][0]
        self.device = regions[CfgType.DEVICE][0] if CfgType.DEVICE in regions else None
        self._notify_offsets: dict[int, int] = {}
        """queue_notify_off per queue: read-only and fixed, so read once (as drivers do at queue setup)."""

    def read_status(self) -> int:
        return self.common.read(COMMON_STATUS, 1)

    def write_status(self, value: int) -> None:
        self.common.write(COMMON_STATUS, 1, value)

    def device_features(self) -> int:
        features = 0
        for select in (0, 1):
            self.common.write(COMMON_DFSELECT, 4, select)
            features |= self.common.read(COMMON_DF, 4) << 32 * select
        return features

    def write_driver_features(self, features: int) -> None:
        for select in (0, 1):
            self.common.write(COMMON_GFSELECT, 4, select)
            self.common.write(COMMON_GF, 4, features >> 32 * select & 0xFFFFFFFF)

    def num_queues(self) -> int:
        return self.common.read(COMMON_NUMQ, 2)

    def config_generation(self) -> int:
        return self.common.read(COMMON_CFGGENERATION, 1)

    def queue_max_size(self, index: int) -> int:
        self.common.write(COMMON_Q_SELECT, 2, index)
        return self.common.read(COMMON_Q_SIZE, 2)

    def ring_layout(self, size: int, base: int, packed: bool) -> RingLayout:
        return PackedLayout.modern(size, base) if packed else SplitLayout.modern(size, base)

    def ring_bytes(self, size: int, packed: bool) -> int:
        if packed:
            return PackedLayout.region_bytes(size) + 16
        return SplitLayout.desc_bytes(size) + SplitLayout.avail_bytes(size) + SplitLayout.used_bytes(size) + 16

    def enable_queue(self, index: int, layout: RingLayout) -> None:
        """Size, then the Descriptor, Driver and Device Areas (split: table, avail and used rings; packed: ring and
        the driver's and the device's event suppression structures), then queue_enable."""
        with self.qtest.pipeline():
            self.common.write(COMMON_Q_SELECT, 2, index)
            self.common.write(COMMON_Q_SIZE, 2, layout.size)
            for low, address in zip((COMMON_Q_DESCLO, COMMON_Q_AVAILLO, COMMON_Q_USEDLO), layout.areas, strict=True):
                self.common.write(low, 4, address & 0xFFFFFFFF)
                self.common.write(low + 4, 4, address >> 32)
            self.common.write(COMMON_Q_ENABLE, 2, 1)

    def notify(self, index: int) -> None:
        if index not in self._notify_offsets:
            self.common.write(COMMON_Q_SELECT, 2, index)
            self._notify_offsets[index] = self.common.read(COMMON_Q_NOFF, 2) * self.notify_multiplier
        self.notify_region.write(self._notify_offsets[index], 2, index)

    def read_isr(self) -> int:
        return self.isr.read(0, 1)

    def config_read(self, offset: int, width: int) -> int:
        return self._device_region().read(offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self._device_region().write(offset, width, value)

    def _device_region(self) -> Region:
        if self.device is None:
            raise QemuError("the device has no device-specific configuration capability")
        return self.device


class LegacyInterface:
    """The virtio 0.9.5 interface: registers in I/O BAR 0."""

    is_legacy = True

    def __init__(self, qtest: QtestClient, bars: dict[int, Bar]) -> None:
        if 0 not in bars or not bars[0].is_io:
            raise QemuError("the device has no legacy I/O BAR 0 (is it modern-only, disable-legacy=on?)")
        self.qtest = qtest
        self.io = Region(qtest, bars[0].address, True)

    def read_status(self) -> int:
        return self.io.read(LEGACY_STATUS, 1)

    def write_status(self, value: int) -> None:
        self.io.write(LEGACY_STATUS, 1, value)

    def device_features(self) -> int:
        return self.io.read(LEGACY_HOST_FEATURES, 4)

    def write_driver_features(self, features: int) -> None:
        if features >> 32:
            raise UsageError(f"legacy virtio-pci has 32 feature bits; cannot write {features:#x}")
        self.io.write(LEGACY_GUEST_FEATURES, 4, features)

    def queue_max_size(self, index: int) -> int:
        self.io.write(LEGACY_QUEUE_SEL, 2, index)
        return self.io.read(LEGACY_QUEUE_NUM, 2)

    def ring_layout(self, size: int, base: int, packed: bool) -> RingLayout:
        self._split_only(packed)
        return SplitLayout.legacy(size, base)

    def ring_bytes(self, size: int, packed: bool) -> int:
        self._split_only(packed)
        return SplitLayout.legacy_region_bytes(size)

    @staticmethod
    def _split_only(packed: bool) -> None:
        if packed:
            raise UsageError("the legacy interface has split rings only: a packed ring needs VIRTIO_F_VERSION_1, "
                             "use the modern interface")

    def enable_queue(self, index: int, layout: RingLayout) -> None:
        """Legacy queues have the device's size; the driver only gives the page frame of the ring."""
        with self.qtest.pipeline():
            self.io.write(LEGACY_QUEUE_SEL, 2, index)
            self.io.write(LEGACY_QUEUE_PFN, 4, layout.desc >> LEGACY_PFN_SHIFT)

    def notify(self, index: int) -> None:
        self.io.write(LEGACY_QUEUE_NOTIFY, 2, index)

    def read_isr(self) -> int:
        return self.io.read(LEGACY_ISR, 1)

    def config_read(self, offset: int, width: int) -> int:
        return self.io.read(LEGACY_CONFIG + offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.io.write(LEGACY_CONFIG + offset, width, value)


# --- guest RAM and the driver -------------------------------------------------------


class GuestAllocator:
    """A bump allocator over guest RAM in [start, end): rings, buffers and pages for tests."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        address = _align(self.next, align)
        if address + size > self.end:
            raise UsageError(f"guest RAM allocator exhausted: {size:#x} bytes wanted at {address:#x}, "
                             f"RAM for tests ends at {self.end:#x}; start QEMU with more memory")
        self.next = address + size
        return address


FIRST_FREE_RAM = 0x100000
"""Allocations start above the first MiB (the BIOS area and its ROM shadow)."""


class VirtioPciDriver:
    """Drives one virtio-pci function: status, features, queues, notifications, config."""

    def __init__(self, qtest: QtestClient, function: PciFunction, interface: VirtioPciInterface,
                 allocator: GuestAllocator) -> None:
        self.qtest = qtest
        self.function = function
        self.interface = interface
        self.allocator = allocator
        self.features = 0
        self.queues: dict[int, DriverQueue] = {}

    @classmethod
    def open(cls, qtest: QtestClient, ram_bytes: int, device_ids: tuple[int, ...], legacy: bool) -> "VirtioPciDriver":
        """Find the function, assign its BARs and pick its modern (or legacy) interface."""
        function = find_function(qtest, VIRTIO_VENDOR_ID, device_ids)
        bars = function.enable(PciResources())
        interface: VirtioPciInterface = LegacyInterface(qtest, bars) if legacy else \
            ModernInterface(qtest, function, bars)
        return cls(qtest, function, interface, GuestAllocator(FIRST_FREE_RAM, ram_bytes))

    @property
    def endian(self) -> Endian:
        """Byte order of queue buffers for the negotiated features."""
        return buffer_endian(self.features)

    # --- status and features ------------------------------------------------

    @property
    def status(self) -> int:
        return self.interface.read_status()

    def set_status(self, value: int) -> None:
        self.interface.write_status(value)

    def reset(self, timeout: float = 5.0) -> None:
        """Write 0 to the status and wait until the device reads back 0."""
        self.interface.write_status(0)
        self.queues.clear()
        self.features = 0
        if self.qtest.pipelining:  # QEMU resets within the status write: one read, checked when the pipeline goes out
            self.qtest.expect(self.interface.read_status, lambda status: status == 0, "device status after reset")
            return
        wait_for(lambda: self.interface.read_status() == 0, timeout, "the device status to read 0 after reset",
                 interval=0.001)

    def negotiate(self, features: int, *, features_ok: bool | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write `features` (any subset, offered or not).

        With `features_ok` (default: on the modern interface) set FEATURES_OK
        and return whether the device kept it; on legacy return True. Inside a
        pipeline the check rides it: True comes back at once, and a refusal
        raises QtestExpectationFailed when the pipeline goes out.
        """
        self.reset()
        self.set_status(Status.ACKNOWLEDGE)
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        self.interface.write_driver_features(features)
        self.features = features
        if features_ok is None:
            features_ok = not self.interface.is_legacy
        if not features_ok:
            return True
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        if self.qtest.pipelining:
            self.qtest.expect(self.interface.read_status, lambda status: bool(status & Status.FEATURES_OK),
                              f"FEATURES_OK kept for features {features:#x}")
            return True
        return bool(self.status & Status.FEATURES_OK)

    def driver_ok(self) -> None:
        self.set_status(self.status | Status.DRIVER_OK)

    # --- queues ------------------------------------------------------------

    @property
    def packed(self) -> bool:
        """Whether the negotiated features make the rings packed (VIRTIO_F_RING_PACKED)."""
        return has_feature(self.features, Feature.RING_PACKED)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """Lay out queue `index` in guest RAM (the device's maximum size by default) and enable it."""
        maximum = self.interface.queue_max_size(index)
        if maximum == 0:
            raise QemuError(f"the device has no virtqueue {index}")
        size = size or maximum
        if self.interface.is_legacy and size != maximum:
            raise UsageError(f"legacy queue {index} has the device's size {maximum}; cannot use {size}")
        return self.create_queue(index, size)

    def create_queue(self, index: int, size: int) -> DriverQueue:
        """Lay out queue `index` of `size` in guest RAM for the negotiated ring layout and enable it, without a
        register read (pipelines keep it in one round trip)."""
        packed = self.packed
        base = self.allocator.alloc(self.interface.ring_bytes(size, packed), align=4096)
        layout = self.interface.ring_layout(size, base, packed)
        queue = open_driver_queue(self.qtest, layout, event_idx=has_feature(self.features, Feature.EVENT_IDX),
                                  endian=self.endian)
        self.interface.enable_queue(index, layout)
        self.queues[index] = queue
        return queue

    def notify(self, index: int) -> None:
        self.interface.notify(index)

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[UsedElement]:
        """Poll queue `index`'s used ring until `count` new entries arrived; QemuError on the deadline."""
        queue = self.queues[index]
        collected: list[UsedElement] = []

        def enough() -> list[UsedElement] | None:
            collected.extend(queue.collect_used())
            return collected if len(collected) >= count else None

        try:
            return wait_for(enough, timeout, f"{count} used entries on queue {index}", interval=0.001,
                            describe_last=lambda: f"{len(collected)} so far, device status {self.status:#x}")
        except DeadlineExceeded as error:
            raise QemuError(str(error)) from None

    # --- device configuration ------------------------------------------------

    def config_read(self, offset: int, width: int) -> int:
        return self.interface.config_read(offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.interface.config_write(offset, width, value)

    def read_isr(self) -> int:
        return self.interface.read_isr()
