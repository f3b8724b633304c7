"""The driver's lifecycle with the balloon inflated: suspend and resume, remove and probe again.

Linux (6.1, 6.12) gives every page back and resets the device when it is frozen for
a system sleep (virtballoon_freeze -> remove_common) or removed
(virtballoon_remove), and inflates again to the host's target on restore or
probe. From outside that must look like nothing happened: the balloon is its
old size after resume, stats flow, resizes work, dmesg stays clean; after
rmmod the guest has all its memory and the device is reset; after modprobe the
balloon returns to the target.

Variants: every variant of the run for suspend/resume and reload: freeze,
restore, remove and probe touch every virtqueue the variant negotiated (stats,
free page hint, reporting) and the transport's reset, so all of them matter.
S3 needs `-global ICH9-LPC.disable_s3=0` on q35, so the suspend tests boot a
guest of their own (one at a time: the variant's shared guest is stopped first).
"""

from __future__ import annotations


import pytest

from fixtures.machines import MachineFactory
from fixtures.qtest_device import expect_conformance
from fixtures.variant_gates import require_qmp_command
from vballoon.guest.driver import LINUX_PAGE_POISON_VAL
from vballoon.guest.health import kernel_trouble
from vballoon.guest.procfs import read_guest_memory
from vballoon.matrix import Variant
from vballoon.qemu.balloon import MIB
from vballoon.qemu.machine import Machine
from vballoon.qemu.migration import balloon_config_u32
from vballoon.session import Session
from vballoon.spec import PAGE_SIZE, ConfigField, Feature
from vballoon.waiting import wait_for

S3_ENABLED = ("-global", "ICH9-LPC.disable_s3=0")
# Measured: S3 entry 0.1 s and resume at once after system_wakeup under TCG; freeze with pm_test=devices
# returns after its 5 s test delay. Deadlines allow a loaded host.
SUSPEND_DEADLINE_S = 60.0
BALLOON_BACK_DEADLINE_S = 60.0
STATS_DEADLINE_S = 30.0
# virtio_dev_remove: the driver resets the device, then the core sets ACKNOWLEDGE again for the next driver.
UNBOUND_STATUS = ("VIRTIO_CONFIG_S_ACKNOWLEDGE",)


@pytest.fixture
def s3_vm(machines: MachineFactory, variant: Variant) -> Machine:
    """A guest of the variant whose firmware offers S3, for this test alone; its logs kept when it fails."""
    return machines.guest(variant, extra_args=S3_ENABLED)


def offered_sleep_state(vm: Machine, state: str) -> None:
    """Skip unless the guest offers `state` in /sys/power/state."""
    offered = vm.ssh.output("cat /sys/power/state 2>/dev/null || true").split()
    if state not in offered:
        pytest.skip(f"the guest kernel does not offer '{state}' in /sys/power/state (it offers {offered})")


def suspend_to_ram(vm: Machine) -> None:
    """echo mem > /sys/power/state in the background, wait until QEMU sees the guest suspended, system_wakeup."""
    vm.ssh.run("setsid sh -c 'echo mem > /sys/power/state' </dev/null >/dev/null 2>&1 &")
    wait_for(lambda: vm.qmp.command("query-status")["status"] == "suspended", SUSPEND_DEADLINE_S,
             "QEMU to report the guest suspended (S3)")
    vm.qmp.command("system_wakeup")
    wait_for(lambda: vm.qmp.command("query-status")["status"] == "running", SUSPEND_DEADLINE_S,
             "the guest to run again after system_wakeup")


def suspend_to_idle(vm: Machine) -> None:
    """echo freeze with pm_test=devices: devices are suspended and resumed without needing a wake source.

    QEMU's system_wakeup only wakes S3; s2idle waits for a wake interrupt QEMU has no command for.
    """
    if vm.ssh.run("test -w /sys/power/pm_test", check=False).status != 0:
        pytest.skip("freeze (s2idle): QEMU cannot wake it (system_wakeup wakes S3 only) and the guest kernel "
                    "has no /sys/power/pm_test (CONFIG_PM_DEBUG) to resume on its own")
    vm.ssh.run("echo devices > /sys/power/pm_test && echo freeze > /sys/power/state; "
               "status=$?; echo none > /sys/power/pm_test; exit $status", timeout=SUSPEND_DEADLINE_S)


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OP-2", "BAL-DRV-OP-4", "BAL-DRV-ACT-1", "BAL-DRV-ST-2", "BAL-DRV-ST-3",
                 "BAL-DRV-PP-2")
@pytest.mark.parametrize("state", ["mem", "freeze"])
def test_balloon_survives_suspend_and_resume(s3_vm: Machine, state: str, session: Session) -> None:
    """After a system sleep the balloon has its old size (the driver gave its pages back and took them again),
    stats keep flowing, inflate and deflate work, and the kernel logged no WARNING."""
    vm, ram = s3_vm, s3_vm.memory_mib * MIB
    offered_sleep_state(vm, state)
    target = ram * 3 // 4
    vm.host_balloon.reach_target(target)
    vm.host_balloon.set_stats_polling_interval(1)
    last_update = vm.host_balloon.wait_report_after(0, STATS_DEADLINE_S, "a first stats report").last_update
    before = read_guest_memory(vm.ssh)
    (suspend_to_ram if state == "mem" else suspend_to_idle)(vm)
    wait_for(lambda: vm.host_balloon.query_balloon() == target, BALLOON_BACK_DEADLINE_S,
             f"actual to be {target} again after resume (BAL-DRV-OP-1)",
             describe_last=lambda: f"actual {vm.host_balloon.query_balloon()}")
    after = read_guest_memory(vm.ssh)
    pages = (ram - target) // PAGE_SIZE
    moved = {k: after.vmstat[k] - before.vmstat[k] for k in ("balloon_deflate", "balloon_inflate")}
    assert moved == {"balloon_deflate": pages, "balloon_inflate": pages}, (
        f"BAL-DRV-OP-4/BAL-DRV-OP-1: across '{state}', expected the driver to give back and retake the "
        f"{pages}-page balloon, got vmstat changes {moved}")
    report = vm.host_balloon.wait_report_after(last_update, STATS_DEADLINE_S, f"a stats report after '{state}' (BAL-DRV-ST-3)")
    print(f"{state}: balloon back to {target} bytes; stats report at {report.last_update}")
    check_poison_val_after_resume(vm, state, session)
    vm.host_balloon.reach_target(ram // 2)
    vm.host_balloon.reach_target(ram)
    trouble = kernel_trouble(vm.ssh.output("dmesg"))
    assert not trouble, f"guest dmesg after '{state}': expected no WARNING/BUG/Oops, got {trouble[:5]}"


def check_poison_val_after_resume(vm: Machine, state: str, session: Session) -> None:
    """BAL-DRV-PP-2: the sleep reset the device (QEMU's reset clears poison_val), so the driver must write
    poison_val again before DRIVER_OK. Linux's virtballoon_restore (6.1, 6.12) does not; with page_poison=1 QEMU then
    discards reported free pages the guest expects to hold 0xaa, and page poisoning reports corruption."""
    if Feature.PAGE_POISON not in vm.variant.accepted_features():
        return
    expected = LINUX_PAGE_POISON_VAL if vm.variant.guest_boot == "pgpoison" else 0
    got = balloon_config_u32(vm, ConfigField.POISON_VAL)
    if got != expected:
        # QEMU discards reported pages while it believes poison_val is 0; page poisoning then finds them zeroed.
        vm.expect_console_trouble("pagealloc: memory corruption")
    expect_conformance(got == expected, "BAL-DRV-PP-2", session.qemu,
                       f"after '{state}' the device's poison_val is {got:#x}, expected {expected:#x}: the driver "
                       "set DRIVER_OK again without writing poison_val", vm.image.kernel_version)


def driver_status(vm: Machine) -> tuple[str, ...]:
    """The device status QEMU holds for the balloon (x-query-virtio-status; the test skips without it)."""
    require_qmp_command(vm.qemu, "x-query-virtio-status", "the device status QEMU holds across the driver's reload")
    return vm.host_balloon.virtio_status().status


@pytest.mark.req("BAL-DRV-OP-2", "BAL-DRV-OP-4", "BAL-DRV-ACT-1", "BAL-DRV-OP-1")
def test_unload_gives_memory_back_and_reload_inflates_again(shared_vm: Machine, variant: Variant) -> None:
    """rmmod with the balloon at half of RAM: every page back to the guest (actual = RAM, MemTotal whole), the
    device reset; modprobe: the driver is ready again and inflates to the host's target."""
    vm, ram = shared_vm, shared_vm.memory_mib * MIB
    full_memtotal = read_guest_memory(vm.ssh).mem("MemTotal")
    target = ram // 2
    vm.host_balloon.reach_target(target)
    before = read_guest_memory(vm.ssh)
    vm.ssh.run("rmmod virtio_balloon", timeout=120)
    unloaded = read_guest_memory(vm.ssh)
    pages = (ram - target) // PAGE_SIZE
    deflated = unloaded.vmstat["balloon_deflate"] - before.vmstat["balloon_deflate"]
    assert deflated == pages, f"BAL-DRV-OP-4: rmmod: expected {pages} pages deflated, got {deflated}"
    actual = vm.host_balloon.query_balloon()
    assert actual == ram, f"BAL-DRV-ACT-1: after rmmod: expected actual {ram} (balloon empty), got {actual}"
    if Feature.DEFLATE_ON_OOM not in variant.accepted_features():
        assert unloaded.mem("MemTotal") == full_memtotal, (
            f"BAL-DRV-OP-2: after rmmod: expected MemTotal {full_memtotal} (all memory back), "
            f"got {unloaded.mem('MemTotal')}")
    status = driver_status(vm)
    assert status == UNBOUND_STATUS, (
        f"after rmmod: expected the device reset and acknowledged again {UNBOUND_STATUS}, got {status}")
    vm.ssh.run("modprobe virtio_balloon", timeout=120)
    wait_for(lambda: vm.host_balloon.query_balloon() == target, BALLOON_BACK_DEADLINE_S,
             f"actual to return to the target {target} after modprobe (BAL-DRV-OP-1)",
             describe_last=lambda: f"actual {vm.host_balloon.query_balloon()}")
    status = driver_status(vm)
    assert "VIRTIO_CONFIG_S_DRIVER_OK" in status, f"after modprobe: expected DRIVER_OK, got {status}"
    stats_before = vm.host_balloon.stats_report().last_update
    vm.host_balloon.set_stats_polling_interval(1)
    vm.host_balloon.wait_report_after(stats_before, STATS_DEADLINE_S, "a stats report from the reloaded driver (BAL-DRV-ST-2)")
