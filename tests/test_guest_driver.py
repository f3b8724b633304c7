"""The driver's register writes read from QEMU's trace (BAL-DRV-PP-2, BAL-DRV-PP-3), on traces of our own."""

from __future__ import annotations

from vballoon.guest.driver import (MODERN_COMMON_REGION, MODERN_DEVICE_REGION, balloon_writes, first_driver_ok,
                                   poison_val_writes_while_driver_ok, poison_val_written)


def _write(name: str, addr: int, value: int, size: int) -> str:
    """A QEMU 7.2 log-backend line of memory_region_ops_write."""
    return (f"321@5.0:memory_region_ops_write cpu 0 mr 0x55d0 addr {addr:#x} value {value:#x} size {size} "
            f"name '{name}'")


def _status(value: int) -> str:
    return _write(MODERN_COMMON_REGION, 0x14, value, 1)


def _poison(value: int) -> str:
    return _write(MODERN_DEVICE_REGION, 12, value, 4)


def test_a_probe_after_a_reset_writes_poison_val_before_driver_ok() -> None:
    writes = balloon_writes("\n".join([_status(0), _status(1), _status(3), _poison(0xAAAAAAAA), _status(0xB),
                                       _status(0xF)]), legacy=False)
    assert poison_val_written(writes) == (0xAAAAAAAA, 3) and first_driver_ok(writes) == 5
    assert poison_val_writes_while_driver_ok(writes) == []


def test_a_write_while_driver_ok_is_found() -> None:
    """What a driver breaking BAL-DRV-PP-3 looks like: poison_val written with DRIVER_OK set, before any reset
    (the traced window starts with the device running), and after a probe's DRIVER_OK."""
    writes = balloon_writes("\n".join([_poison(1), _status(0), _poison(2), _status(0xF), _write(
        MODERN_DEVICE_REGION, 14, 0xFFFF, 2)]), legacy=False)
    assert poison_val_writes_while_driver_ok(writes) == [0, 4]
    assert poison_val_writes_while_driver_ok(writes, driver_ok=False) == [4]


def test_writes_beside_poison_val_do_not_count() -> None:
    writes = balloon_writes("\n".join([_write(MODERN_DEVICE_REGION, 4, 7, 4), _write(MODERN_DEVICE_REGION, 16, 7, 4),
                                       _write("virtio-pci-device-virtio-net", 12, 7, 4)]), legacy=False)
    assert len(writes) == 2 and poison_val_writes_while_driver_ok(writes) == []
