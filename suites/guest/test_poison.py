"""Page poison from a real guest: the poison_val QEMU receives, when it is written, and memory integrity around it."""

from __future__ import annotations

import pytest

from vballoon.guest.driver import LINUX_PAGE_POISON_VAL, first_driver_ok, poison_val_written, trace_probe_writes
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
