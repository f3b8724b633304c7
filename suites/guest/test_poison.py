"""Page poison from a real guest: the poison_val QEMU receives, when it is written, and memory integrity around it."""

from __future__ import annotations

import pytest

from vballoon.guest.driver import (LINUX_PAGE_POISON_VAL, first_driver_ok, poison_val_writes_while_driver_ok,
                                   poison_val_written, reload_driver, trace_probe_writes, trace_writes)
from vballoon.guest.memhog import run_hog
from vballoon.matrix import Variant
from vballoon.qemu.balloon import MIB
from vballoon.qemu.machine import Machine
from vballoon.spec import Feature

PATTERN = "--mib 64 --seed 23 --file /dev/shm/poison"
CYCLES = 3


@pytest.fixture
def poison_variant(variant: Variant) -> Variant:
    """The variant, if Linux negotiates PAGE_POISON with it (requested before the guest, so a skip boots nothing)."""
    if Feature.PAGE_POISON not in variant.accepted_features():
        pytest.skip(f"PAGE_POISON is not negotiated by variant {variant.name}: no poison_val is written")
    return variant


@pytest.mark.req("BAL-DRV-PP-2", "BAL-DRV-FEAT-POISON")
def test_poison_val_written_before_driver_ok(poison_variant: Variant, shared_vm: Machine) -> None:
    """The driver writes poison_val (0 with init_on_free, 0xaaaaaaaa with page_poison) before DRIVER_OK."""
    variant = poison_variant
    writes = trace_probe_writes(shared_vm)
    value, index = poison_val_written(writes)
    expected = 0 if variant.guest_boot == "iof" else LINUX_PAGE_POISON_VAL
    assert value == expected, (
        f"BAL-DRV-PP-2: guest boot {variant.guest_boot}: expected poison_val {expected:#x} written, got "
        f"{'no complete write' if value is None else hex(value)} (writes seen: {writes[:12]})")
    driver_ok = first_driver_ok(writes)
    assert driver_ok is not None and index is not None and index < driver_ok, (
        f"BAL-DRV-PP-2: expected the poison_val write (#{index}) before the DRIVER_OK status write (#{driver_ok})")


@pytest.mark.req("BAL-DRV-PP-3")
def test_poison_val_is_not_written_while_driver_ok(poison_variant: Variant, shared_vm: Machine) -> None:
    """With every balloon register write traced across an inflate, a deflate and a driver reload, the only
    poison_val writes are the new probe's, made before its DRIVER_OK; none while DRIVER_OK is set. (Broken on
    purpose: counting the reload's writes as made under DRIVER_OK, i.e. ignoring its reset, finds them; the
    synthetic cases are in tests/test_guest_driver.py.)"""
    vm, ram = shared_vm, shared_vm.memory_mib * MIB

    def workout() -> None:
        vm.host_balloon.reach_target(ram - 64 * MIB)
        vm.host_balloon.reach_target(ram)
        reload_driver(vm)

    writes = trace_writes(vm, workout)
    _, probe_write = poison_val_written(writes)
    assert probe_write is not None, f"expected the reload's probe to write poison_val, saw writes {writes[:12]}"
    offending = poison_val_writes_while_driver_ok(writes)
    assert not offending, (f"BAL-DRV-PP-3: expected no poison_val write while DRIVER_OK is set, got "
                           f"{[writes[i] for i in offending]}")


@pytest.mark.req("BAL-DRV-PP-1", "BAL-DRV-OP-6")
def test_memory_integrity_across_balloon_cycles(shared_vm: Machine) -> None:
    """A 64 MiB pattern in tmpfs verifies after each inflate/deflate cycle; memory reused from the balloon
    raises no page-poison report (the health check reads dmesg)."""
    vm, ram = shared_vm, shared_vm.memory_mib * MIB
    run_hog(vm.ssh, f"fill {PATTERN}")
    for cycle in range(CYCLES):
        vm.host_balloon.reach_target(ram // 2)
        vm.host_balloon.reach_target(ram)
        run_hog(vm.ssh, "alloc --mib 128 --step-mib 32")  # reuse the deflated pages
        verdict = run_hog(vm.ssh, f"verify {PATTERN}")
        assert verdict.strip().endswith(" ok"), f"BAL-DRV-OP-6: cycle {cycle}: expected pattern intact, got {verdict!r}"
