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

Hibernation (S4) goes through the same freeze and restore, with the guest's memory written to a swap disk
in between and read back by a new kernel: its guest has a virtio-blk disk to hibernate to, boots with
`vballoon.resume=vda` (the image's /init then resumes from the disk before it loads the balloon driver),
and is powered on again in a new QEMU with the same disk once it has powered off.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.machines import MachineFactory
from fixtures.qtest_device import expect_conformance
from fixtures.variant_gates import require_qmp_command
from vballoon.guest.driver import LINUX_PAGE_POISON_VAL
from vballoon.guest.health import kernel_trouble
from vballoon.guest.image import READY_MARKER, RESUME_MARKER
from vballoon.guest.memhog import start_hog
from vballoon.guest.procfs import GuestMemory, read_guest_memory
from vballoon.matrix import Variant
from vballoon.qemu.balloon import MIB
from vballoon.qemu.machine import Machine
from vballoon.qemu.migration import balloon_config_u32
from vballoon.qemu.process import tail
from vballoon.session import Session
from vballoon.spec import PAGE_SIZE, ConfigField, Feature
from vballoon.waiting import wait_for

S3_ENABLED = ("-global", "ICH9-LPC.disable_s3=0")
# Measured: S3 entry 0.1 s and resume at once after system_wakeup under TCG; freeze with pm_test=devices
# returns after its 5 s test delay. Deadlines allow a loaded host.
SUSPEND_DEADLINE_S = 60.0
# Hibernation under TCG, 256 MiB guest: measured 2.5-3.5 s to write a 62-81 MiB image and power off, then from
# the power-off to the resumed guest in a new QEMU 7.9-8.0 s on QEMU 7.2 / Linux 6.1 and 9.9-12.0 s on 10.0 / 6.12
# (0.7-1.3 s of it reading the image; 16-19 s when the same QEMU was reset). Deadlines allow a loaded host.
HIBERNATE_DEADLINE_S = 120.0
RESUME_DEADLINE_S = 120.0
S4_MEMORY_MIB = 256  # the balloon's round trip through an image needs no more; a smaller image is written faster
S4_PATTERN_MIB = 32  # memory the guest holds a pattern in across hibernation
SWAP_DISK = "vda"  # the guest's name for the one virtio-blk disk
HIBERNATION_RETURNED = "vballoon: the write of disk to /sys/power/state returned"
IMAGE_READ = re.compile(r"PM: .*Read \d+ kbytes.*")  # the resuming kernel's line once it read the image
BALLOON_BACK_DEADLINE_S = 60.0
STATS_DEADLINE_S = 30.0
# virtio_dev_remove: the driver resets the device, then the core sets ACKNOWLEDGE again for the next driver.
UNBOUND_STATUS = ("VIRTIO_CONFIG_S_ACKNOWLEDGE",)


@pytest.fixture
def s3_vm(machines: MachineFactory, variant: Variant) -> Machine:
    """A guest of the variant whose firmware offers S3, for this test alone; its logs kept when it fails. It boots
    the bzImage (MachineSpec.pvh): woken from S3 after a PVH boot, the guest boots afresh."""
    return machines.guest(variant, extra_args=S3_ENABLED, pvh=False)


@pytest.fixture
def swap_disk(tmp_path: Path) -> Iterator[Path]:
    """A sparse raw file as large as the S4 guest's RAM, to hibernate to: a hibernation image holds at most half of
    RAM (each page saved is copied to a free page first), so it always fits. Deleted after the test (pytest keeps
    its last temp folders; QEMU, stopped later, holds it open until then)."""
    disk = tmp_path / "swap.raw"
    with disk.open("wb") as f:
        f.truncate(S4_MEMORY_MIB * MIB)
    try:
        yield disk
    finally:
        disk.unlink()


def s4_guest(machines: MachineFactory, variant: Variant, disk: Path, resumes: bool = False) -> Machine:
    """A S4_MEMORY_MIB guest of the variant with `disk` as its virtio-blk disk; `vballoon.resume=vda` makes /init
    resume from the disk. `-no-shutdown` keeps QEMU up when the guest powers off at the end of hibernating. The
    guest boots cold: the disk's path is part of the command line, so a snapshot saved of it would never be loaded
    again. With `resumes`, QEMU starts paused and waits for no boot: the kernel resumes the image on the disk."""
    return machines.guest(variant, role="resumed" if resumes else None, warm=False, memory_mib=S4_MEMORY_MIB,
                          kernel_args=(f"vballoon.resume={SWAP_DISK}",), paused=resumes, resumes=resumes,
                          extra_args=("-drive", f"file={disk},if=none,id=swap0,format=raw",
                                      "-device", "virtio-blk-pci,drive=swap0,romfile=", "-no-shutdown"))


@pytest.fixture
def s4_vm(machines: MachineFactory, variant: Variant, swap_disk: Path) -> Machine:
    """The guest to hibernate, for this test alone (`s4_guest`)."""
    return s4_guest(machines, variant, swap_disk)


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
    assert_balloon_taken_again(vm, target, before, f"'{state}'")
    report = vm.host_balloon.wait_report_after(last_update, STATS_DEADLINE_S, f"a stats report after '{state}' (BAL-DRV-ST-3)")
    print(f"{state}: balloon back to {target} bytes; stats report at {report.last_update}")
    check_poison_val_after_resume(vm, state, session)
    vm.host_balloon.reach_target(ram // 2)
    vm.host_balloon.reach_target(ram)
    trouble = kernel_trouble(vm.ssh.output("dmesg"))
    assert not trouble, f"guest dmesg after '{state}': expected no WARNING/BUG/Oops, got {trouble[:5]}"


def assert_balloon_taken_again(vm: Machine, target: int, before: GuestMemory, across: str) -> None:
    """BAL-DRV-OP-1/BAL-DRV-OP-4: after a sleep (`across`), actual returns to `target` and /proc/vmstat moved by the
    balloon's pages each way since `before`: the driver gave them back when frozen and took them again on restore."""
    wait_for(lambda: vm.host_balloon.query_balloon() == target, BALLOON_BACK_DEADLINE_S,
             f"actual to be {target} again after {across} (BAL-DRV-OP-1)",
             describe_last=lambda: f"actual {vm.host_balloon.query_balloon()}")
    after = read_guest_memory(vm.ssh)
    pages = (vm.memory_mib * MIB - target) // PAGE_SIZE
    moved = {k: after.vmstat[k] - before.vmstat[k] for k in ("balloon_deflate", "balloon_inflate")}
    assert moved == {"balloon_deflate": pages, "balloon_inflate": pages}, (
        f"BAL-DRV-OP-4/BAL-DRV-OP-1: across {across}, expected the driver to give back and retake the "
        f"{pages}-page balloon, got vmstat changes {moved}")


def check_poison_val_after_resume(vm: Machine, state: str, session: Session) -> None:
    """BAL-DRV-PP-2: the sleep reset the device (QEMU's reset clears poison_val; after hibernation it is a new
    QEMU's device, whose poison_val starts at 0), so the driver must write poison_val again before DRIVER_OK.
    Linux's virtballoon_restore (6.1, 6.12) does not; with page_poison=1 QEMU then discards reported free pages the
    guest expects to hold 0xaa, and page poisoning reports corruption."""
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


def hibernate_and_power_on(vm: Machine, machines: MachineFactory, disk: Path, target: int,
                           stats: bool) -> tuple[Machine, str]:
    """Hibernate to the swap disk (mode shutdown: the guest powers off once the image is written), wait until QEMU
    holds the powered-off guest and stop it; power on a new QEMU with the same disk, give it the balloon's target
    (and a 1 s stats interval with `stats`) as the host would, continue it and connect SSH once the resumed guest
    answers. Returns the new guest and its serial console.

    Mode `shutdown` rather than `platform`: q35 offers no S4 unless `ICH9-LPC.disable_s4=0`, and QEMU ends an S4
    entry as it ends a power-off, so `platform` would only add the firmware's hooks around the same power-off.
    A new QEMU rather than system_reset in the old one: that is what a power cycle is."""
    start = vm.mark()
    vm.ssh.run("echo shutdown > /sys/power/disk && setsid sh -c 'echo disk > /sys/power/state; "
               f"echo {HIBERNATION_RETURNED} $? > /dev/console' </dev/null >/dev/null 2>&1 &")
    vm.disconnect_ssh()
    started = time.monotonic()
    # A hibernation that fails returns from the write in the running guest, which goes on.
    wait_for(lambda: vm.qmp.command("query-status")["status"] == "shutdown"
             or HIBERNATION_RETURNED in vm.serial_text(start.serial), HIBERNATE_DEADLINE_S,
             "QEMU to report the guest powered off after writing its hibernation image",
             describe_last=lambda: f"status {vm.qmp.command('query-status')['status']}; serial "
                                   f"{tail(vm.logs.serial, 3)!r}")
    status = vm.qmp.command("query-status")["status"]
    assert status == "shutdown", (
        f"expected the guest to power off once its hibernation image was written, got status {status}; serial "
        f"{tail(vm.logs.serial, 5)!r}")
    powered_off = time.monotonic()
    vm.stop()
    resumed = s4_guest(machines, vm.variant, disk, resumes=True)
    resumed.host_balloon.set_target(target)
    if stats:
        resumed.host_balloon.set_stats_polling_interval(1)
    resumed.qmp.command("cont")
    # The write to /sys/power/state returns in the resumed guest; a guest that boots afresh starts sshd instead.
    wait_for(lambda: any(line in resumed.serial_text() for line in (HIBERNATION_RETURNED, READY_MARKER)),
             RESUME_DEADLINE_S, "the guest to resume (or boot)",
             describe_last=lambda: repr(tail(resumed.logs.serial, 3)))
    resumed.connect_ssh(RESUME_DEADLINE_S)
    print(f"{vm.variant.name}: hibernated in {powered_off - started:.1f} s, resumed in "
          f"{time.monotonic() - powered_off:.1f} s")
    return resumed, resumed.serial_text()


def guest_identity(vm: Machine, token_file: str) -> tuple[str, str]:
    """The kernel's boot_id and the token in a tmpfs file ('missing' without it): both survive a resume, neither a
    boot."""
    boot_id, token = vm.ssh.output(f"cat /proc/sys/kernel/random/boot_id; cat {token_file} 2>/dev/null "
                                   "|| echo missing").split()
    return boot_id, token


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OP-2", "BAL-DRV-OP-4", "BAL-DRV-ACT-1", "BAL-DRV-ST-2", "BAL-DRV-ST-3",
                 "BAL-DRV-PP-2")
def test_balloon_survives_hibernation_and_resume(s4_vm: Machine, machines: MachineFactory, swap_disk: Path,
                                                 session: Session) -> None:
    """Hibernation to a swap disk, power off, and resume in a new QEMU with the same disk: the guest resumed (same
    boot_id, its tmpfs token, the boot kernel read the image and never started sshd), the driver gave the balloon
    back before the image was taken and took it again on restore (actual at the target the new QEMU was given,
    vmstat moved by the balloon's pages each way), a pattern held across it is intact, stats flow, inflate and
    deflate work, dmesg is clean.

    Broken on purpose: the image's signature on the disk overwritten (host side) before the power-on booted the
    guest afresh and failed on the boot_id; hibernating without swapon on the disk failed at once ("Image
    allocation is 3384 pages short", status running)."""
    vm, ram = s4_vm, s4_vm.memory_mib * MIB
    offered_sleep_state(vm, "disk")
    resume = vm.ssh.output(f"cat /sys/power/resume /sys/class/block/{SWAP_DISK}/dev").split()
    assert resume[0] == resume[1], (
        f"/init: expected /sys/power/resume to name /dev/{SWAP_DISK} ({resume[1]}), got {resume[0]}")
    vm.ssh.run(f"mkswap /dev/{SWAP_DISK} >/dev/null && swapon /dev/{SWAP_DISK}")
    token_file = "/dev/shm/vballoon-hibernation"
    vm.ssh.run(f"echo {secrets.token_hex(8)} > {token_file}")
    identity = guest_identity(vm, token_file)
    pattern = start_hog(vm.ssh, f"fill --mib {S4_PATTERN_MIB} --seed 41 --hold-forever", "hibernation-pattern")
    pattern.wait_line(rf"memhog: holding {S4_PATTERN_MIB} MiB", HIBERNATE_DEADLINE_S)
    target = ram * 3 // 4
    vm.host_balloon.reach_target(target)
    stats = Feature.STATS_VQ in vm.variant.accepted_features()
    if stats:
        vm.host_balloon.set_stats_polling_interval(1)
        last_update = vm.host_balloon.wait_report_after(0, STATS_DEADLINE_S, "a first stats report").last_update
    before = read_guest_memory(vm.ssh)
    vm, console = hibernate_and_power_on(vm, machines, swap_disk, target, stats)
    resumed = guest_identity(vm, token_file)
    assert resumed == identity, (
        f"expected the guest resumed from its image (boot_id and tmpfs token {identity}), got {resumed}: a fresh "
        f"boot; boot console: {console[-2000:]!r}")
    read = IMAGE_READ.search(console)
    assert RESUME_MARKER in console and read and f"{HIBERNATION_RETURNED} 0" in console \
        and READY_MARKER not in console, (
        f"expected the boot console to show /init resuming, the kernel reading the image, the hibernating write "
        f"returning 0 and no sshd started, got {console[-2000:]!r}")
    print(f"resume: {read.group(0)}")
    assert_balloon_taken_again(vm, target, before, "hibernation")
    verdict = replace(pattern, shell=vm.ssh).verify_now(RESUME_DEADLINE_S)
    assert verdict.endswith(" ok"), f"expected the {S4_PATTERN_MIB} MiB pattern intact after resume, got {verdict!r}"
    if stats:
        vm.host_balloon.wait_report_after(last_update, STATS_DEADLINE_S, "a stats report after resume (BAL-DRV-ST-3)")
    check_poison_val_after_resume(vm, "disk", session)
    vm.host_balloon.reach_target(ram // 2)
    vm.host_balloon.reach_target(ram)
    trouble = kernel_trouble(vm.ssh.output("dmesg"))
    assert not trouble, f"guest dmesg after hibernation: expected no WARNING/BUG/Oops, got {trouble[:5]}"


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
