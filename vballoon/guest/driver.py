"""The guest's virtio_balloon driver seen from the host: reloading it, and the config writes it makes (BAL-DRV-PP-2/3).

Config writes are read from QEMU's `memory_region_ops_write` trace, switched on
over HMP only around the driver's probe so the rest of the run stays fast.
Modern virtio-pci: the device config region is 'virtio-pci-device-virtio-balloon'
and the common config 'virtio-pci-common-virtio-balloon' (device_status at
0x14). Legacy: one I/O region 'virtio-pci' holding the header (device_status
at 0x12) and the device config after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from vballoon.qemu.machine import Machine
from vballoon.qemu.migration import legacy_config_offset

OPS_WRITE = re.compile(r"memory_region_ops_write cpu \d+ mr (?P<mr>0x[0-9a-f]+) addr (?P<addr>0x[0-9a-f]+) "
                       r"value (?P<value>0x[0-9a-f]+) size (?P<size>\d+) name '(?P<name>[^']*)'")
POISON_VAL_OFFSET = 12
# What Linux writes to poison_val with page_poison=1: PAGE_POISON (0xaa) in every byte (virtballoon_probe).
LINUX_PAGE_POISON_VAL = 0xAAAAAAAA
DRIVER_OK = 0x4
MODERN_DEVICE_REGION = "virtio-pci-device-virtio-balloon"
MODERN_COMMON_REGION = "virtio-pci-common-virtio-balloon"
MODERN_STATUS_OFFSET = 0x14
LEGACY_REGION = "virtio-pci"
LEGACY_STATUS_OFFSET = 0x12
LEGACY_BAR_SIZE = 0x40


@dataclass(frozen=True)
class ConfigWrite:
    """One guest write to the balloon's registers, in trace order."""

    what: str  # "config" or "status"
    offset: int
    value: int
    size: int


def reload_driver(vm: Machine) -> None:
    """rmmod and insmod virtio_balloon: the driver resets the device and probes it again."""
    vm.ssh.run("cd /lib/modules/$(uname -r) && rmmod virtio_balloon && "
               "insmod $(grep -o '^[^:]*/virtio_balloon\\.ko[^:]*' modules.dep)")


def trace_probe_writes(vm: Machine) -> list[ConfigWrite]:
    """Reload the driver with `memory_region_ops_write` traced; the balloon register writes it made."""
    return trace_writes(vm, lambda: reload_driver(vm))


def trace_writes(vm: Machine, action: Callable[[], None]) -> list[ConfigWrite]:
    """Run `action` with `memory_region_ops_write` traced; the balloon register writes made meanwhile."""
    start = vm.logs.stderr.stat().st_size
    vm.qmp.command("human-monitor-command", **{"command-line": "trace-event memory_region_ops_write on"})
    try:
        action()
    finally:
        vm.qmp.command("human-monitor-command", **{"command-line": "trace-event memory_region_ops_write off"})
    legacy = vm.variant.transport == "legacy"
    return balloon_writes(vm.stderr_since(start), legacy, legacy_config_offset(vm) if legacy else 0)


def balloon_writes(trace: str, legacy: bool, legacy_config_offset: int = 0) -> list[ConfigWrite]:
    """The writes to the balloon's device_status and device config in a trace; the legacy device config starts
    at `legacy_config_offset` of its I/O BAR (20, or 24 with MSI-X)."""
    writes: list[ConfigWrite] = []
    for match in OPS_WRITE.finditer(trace):
        name, addr = match["name"], int(match["addr"], 16)
        value, size = int(match["value"], 16), int(match["size"])
        if legacy and name == LEGACY_REGION:
            offset = addr % LEGACY_BAR_SIZE
            if offset == LEGACY_STATUS_OFFSET:
                writes.append(ConfigWrite("status", 0, value, size))
            elif offset >= legacy_config_offset:
                writes.append(ConfigWrite("config", offset - legacy_config_offset, value, size))
        elif not legacy and name == MODERN_COMMON_REGION and addr % 0x1000 == MODERN_STATUS_OFFSET:
            writes.append(ConfigWrite("status", 0, value, size))
        elif not legacy and name == MODERN_DEVICE_REGION:
            writes.append(ConfigWrite("config", addr % 0x1000, value, size))
    return writes


def poison_val_written(writes: list[ConfigWrite]) -> tuple[int | None, int | None]:
    """(poison_val as assembled from the writes covering bytes 12-15, index of its last write)."""
    image = bytearray(4)
    covered: set[int] = set()
    last: int | None = None
    for index, write in enumerate(writes):
        if write.what != "config":
            continue
        for byte in range(write.size):
            position = write.offset + byte - POISON_VAL_OFFSET
            if 0 <= position < 4:
                image[position] = (write.value >> (8 * byte)) & 0xFF
                covered.add(position)
                last = index
    return (int.from_bytes(image, "little"), last) if covered == {0, 1, 2, 3} else (None, last)


def first_driver_ok(writes: list[ConfigWrite]) -> int | None:
    """Index of the first status write that sets DRIVER_OK."""
    return next((i for i, w in enumerate(writes) if w.what == "status" and w.value & DRIVER_OK), None)


def poison_val_writes_while_driver_ok(writes: list[ConfigWrite], driver_ok: bool = True) -> list[int]:
    """Indices of the config writes touching poison_val (bytes 12-15) while DRIVER_OK was set (BAL-DRV-PP-3):
    DRIVER_OK as the last status write left it, `driver_ok` before the first."""
    found = []
    for index, write in enumerate(writes):
        if write.what == "status":
            driver_ok = bool(write.value & DRIVER_OK)
        elif driver_ok and write.offset < POISON_VAL_OFFSET + 4 and write.offset + write.size > POISON_VAL_OFFSET:
            found.append(index)
    return found
