"""Swap in the guest: the swap statistics move and agree with /proc/vmstat, and an inflate pushes the guest into swap.

The swap device is zram (the image carries the module to load on demand, vballoon.guest.image.ON_DEMAND_DRIVERS):
RAM-backed, so only pages that compress well give the guest memory back. The hogs that are swapped out to make
room for the balloon are `memhog alloc` pages (one byte written per page: tens of bytes each in zram); a smaller
`memhog fill` hog holds a pattern, swapped out with them, that must come back intact. The statistics test swaps
within a memory cgroup instead (cgroup v2 memory.max): a pattern twice the cgroup's limit must be swapped out as
it is filled and in as it is read, while the rest of the guest keeps its memory; pswpin, pswpout and pgmajfault
are global counters all the same.

Variants: all; swap is the guest's mm, and the statistics are the driver's (BAL-DRV-ST-4) on every transport.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from suites.guest.test_stats import INTERVAL_S, driver_stats, fresh_report_between
from vballoon.guest.memhog import start_hog, stop_all_hogs
from vballoon.guest.procfs import GuestMemory, read_guest_memory
from vballoon.qemu.balloon import MIB
from vballoon.qemu.machine import Machine
from vballoon.spec import PAGE_SIZE

ZRAM_MIB = 512  # the swap device's size (zram stores only what is swapped out, compressed)
# The pattern hog of the inflate test: filled first, so the oldest anonymous memory and swapped out ahead of the
# alloc hog; read back after the deflate. 64 MiB took 2.5 s more to fill and read back than 32 MiB needs.
PATTERN_MIB = 32
CGROUP = "/sys/fs/cgroup/vballoon-swap"
CGROUP_LIMIT_MIB = 16  # memory.max of the statistics test's cgroup
# The statistics test's pattern: twice its cgroup's limit, so at least CGROUP_LIMIT_MIB of it is swapped out as it
# is filled and swapped in (major faults) as it is read back. Its size does not change what the counters show, only
# how long it takes: the former hog beyond the guest's MemAvailable took 19-27 s a variant under TCG.
CGROUP_PATTERN_MIB = 2 * CGROUP_LIMIT_MIB
HOG_DEADLINE_S = 300.0  # an alloc hog that swaps as it goes: measured 20-60 s under TCG
# The inflate: FIT_MARGIN_MIB fits in MemAvailable, the rest (about 80 MiB) must be swapped out. Only that the
# inflate goes beyond MemAvailable matters; 256 MiB (208 MiB beyond) took 10.7 s under TCG on pci-modern, swapping.
BALLOON_MIB = 128
FIT_MARGIN_MIB = 48  # the alloc hog of the inflate test leaves this much of MemAvailable free
SWAP_COUNTERS = ("stat-swap-in", "stat-swap-out", "stat-major-faults")


@pytest.fixture
def swap_vm(shared_vm: Machine) -> Iterator[Machine]:
    """The shared guest with a zram swap device of ZRAM_MIB and stats polled every INTERVAL_S; put back after."""
    vm = shared_vm
    loaded = vm.ssh.run("modprobe zram num_devices=1", check=False)
    if loaded.status != 0:
        assert vm.image.config_enabled("ZRAM") is not True, (
            f"the guest kernel has CONFIG_ZRAM but `modprobe zram` failed: {loaded.stderr.strip()} (the image "
            "must carry the module: vballoon.guest.image.ON_DEMAND_DRIVERS)")
        pytest.skip(f"the guest kernel {vm.image.kernel_version} has no zram (CONFIG_ZRAM): no swap device")
    vm.ssh.run(f"echo {ZRAM_MIB}M > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0")
    vm.host_balloon.set_stats_polling_interval(INTERVAL_S)
    yield vm
    stop_all_hogs(vm.ssh)
    vm.ssh.run("swapoff /dev/zram0 && echo 1 > /sys/block/zram0/reset && modprobe -r zram", timeout=120)


def swap_counters(memory: GuestMemory) -> dict[str, int]:
    """pswpin, pswpout and pgmajfault from /proc/vmstat."""
    return {name: memory.vmstat[name] for name in ("pswpin", "pswpout", "pgmajfault")}


def swapped_out_bytes(vm: Machine, pid: int) -> int:
    """VmSwap of guest process `pid`: how much of its memory is in swap."""
    line = vm.ssh.output(f"grep VmSwap: /proc/{pid}/status").split()
    return int(line[1]) * 1024


def assert_report_between(vm: Machine, what: str) -> dict[str, int]:
    """A report gathered between two /proc/vmstat readings carries the swap counters between them; its values."""
    before, report, after = fresh_report_between(vm)
    sources = [s for s in driver_stats(vm, before).counters(report.present()) if s.qom_key in SWAP_COUNTERS]
    assert {s.qom_key for s in sources} == set(SWAP_COUNTERS), (
        f"BAL-DRV-ST-4: expected the report to carry {SWAP_COUNTERS}, got {sorted(report.present())}")
    for source in sources:
        low, high, got = source.value(before), source.value(after), report.values[source.qom_key]
        assert low <= got <= high, (
            f"BAL-DRV-ST-4: {what}: {source.qom_key}: expected between /proc/vmstat {'+'.join(source.vmstat)} "
            f"x {source.unit} before and after ({low}..{high}), got {got}")
    return {key: report.values[key] for key in SWAP_COUNTERS}


@pytest.fixture
def memory_cgroup(swap_vm: Machine) -> Iterator[str]:
    """A cgroup v2 directory in the swap guest with memory.max of CGROUP_LIMIT_MIB (cgroup2 mounted if the image
    has not); removed after, with cgroup2 unmounted if it was mounted here."""
    vm = swap_vm
    if vm.image.config_enabled("MEMCG") is False:
        pytest.skip(f"the guest kernel {vm.image.kernel_version} has no memory cgroup (CONFIG_MEMCG)")
    root = CGROUP.rsplit("/", 1)[0]
    mounted = vm.ssh.run(f"grep -q ' {root} cgroup2 ' /proc/mounts", check=False).status == 0
    if not mounted:
        vm.ssh.run(f"mount -t cgroup2 cgroup2 {root}")
    vm.ssh.run(f"echo +memory > {root}/cgroup.subtree_control && mkdir {CGROUP} && "
               f"echo {CGROUP_LIMIT_MIB}M > {CGROUP}/memory.max")
    yield CGROUP
    stop_all_hogs(vm.ssh)
    vm.ssh.run(f"rmdir {CGROUP}" + ("" if mounted else f" && umount {root}"))


@pytest.mark.req("BAL-DRV-ST-4", "BAL-DRV-ST-8")
def test_swap_statistics_move_with_vmstat(swap_vm: Machine, memory_cgroup: str) -> None:
    """A pattern twice the memory.max of its cgroup is swapped out as it is filled, reading it back swaps in with
    major faults: stat-swap-out, stat-swap-in (bytes: pswpout/pswpin x 4096) and stat-major-faults (pgmajfault) of
    a report gathered between two /proc/vmstat readings lie between them, and each rose over the test.

    Broken on purpose: comparing the swap counters with /proc/vmstat as page counts (no x 4096) failed on
    pci-modern; with memory.max at twice the pattern's size (nothing swapped) the rise check failed on pci-modern."""
    vm = swap_vm
    first = assert_report_between(vm, "before swapping")
    pattern = start_hog(vm.ssh, f"fill --mib {CGROUP_PATTERN_MIB} --seed 21 --hold-forever", "swap-pattern",
                        cgroup=memory_cgroup)
    pattern.wait_line(rf"memhog: holding {CGROUP_PATTERN_MIB} MiB", HOG_DEADLINE_S)
    verdict = pattern.verify_now(HOG_DEADLINE_S)
    pattern.stop()
    swapped = swap_counters(read_guest_memory(vm.ssh))
    print(f"{vm.variant.name}: {CGROUP_PATTERN_MIB} MiB pattern in a {CGROUP_LIMIT_MIB} MiB memory cgroup: "
          f"vmstat {swapped}")
    assert verdict.endswith(" ok"), f"expected the pattern swapped out and back in intact, got {verdict!r}"
    last = assert_report_between(vm, "after swapping")
    rose = {key: last[key] - first[key] for key in SWAP_COUNTERS}
    assert all(value > 0 for value in rose.values()), (
        f"BAL-DRV-ST-4: expected {SWAP_COUNTERS} to rise while the guest swapped out and in (vmstat {swapped}), got "
        f"changes {rose}")


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-ACT-1", "BAL-DRV-ST-4")
def test_inflate_pushes_the_guest_into_swap(swap_vm: Machine) -> None:
    """With a hog holding all but FIT_MARGIN_MIB of MemAvailable, an inflate of BALLOON_MIB reaches its target by
    swapping the hog out: pswpout grows by at least what the inflate took beyond MemAvailable, nobody is
    OOM-killed, stat-swap-out follows pswpout, and the deflated guest reads its pattern back from swap.

    Broken on purpose: counting pswpout in bytes without the x 4096 failed on pci-modern; reading the pattern's
    VmSwap before the inflate (0) failed on pci-modern."""
    vm = swap_vm
    ram = vm.memory_mib * MIB
    pattern = start_hog(vm.ssh, f"fill --mib {PATTERN_MIB} --seed 22 --hold-forever", "swap-pattern")
    pattern.wait_line(rf"memhog: holding {PATTERN_MIB} MiB", HOG_DEADLINE_S)
    wanted = read_guest_memory(vm.ssh).mem("MemAvailable") // MIB - FIT_MARGIN_MIB
    hog = start_hog(vm.ssh, f"alloc --mib {wanted} --step-mib 8 --hold-forever", "swap-alloc")
    hog.wait_line(rf"memhog: allocated {wanted} MiB", HOG_DEADLINE_S)
    before = read_guest_memory(vm.ssh)
    vm.host_balloon.reach_target(ram - BALLOON_MIB * MIB, timeout=HOG_DEADLINE_S)
    after = read_guest_memory(vm.ssh)
    pattern_swapped = swapped_out_bytes(vm, pattern.pid)
    swapped_out = (after.vmstat["pswpout"] - before.vmstat["pswpout"]) * PAGE_SIZE
    shortfall = BALLOON_MIB * MIB - before.mem("MemAvailable")
    print(f"{vm.variant.name}: {BALLOON_MIB} MiB inflate with {before.mem('MemAvailable') // MIB} MiB available: "
          f"{swapped_out // MIB} MiB swapped out, {pattern_swapped // MIB} MiB of the pattern")
    assert hog.running() and after.vmstat["oom_kill"] == before.vmstat["oom_kill"], (
        f"BAL-DRV-OP-1: expected the inflate to swap the hog out, not kill it, got hog running {hog.running()}, "
        f"oom_kill {before.vmstat['oom_kill']} -> {after.vmstat['oom_kill']}")
    assert swapped_out >= shortfall, (
        f"BAL-DRV-OP-1: an inflate of {BALLOON_MIB} MiB with {before.mem('MemAvailable')} bytes available: expected "
        f"at least {shortfall} bytes swapped out (pswpout), got {swapped_out}")
    assert pattern_swapped > 0, (
        f"expected the inflate to swap out part of the {PATTERN_MIB} MiB pattern (the oldest anonymous memory), so "
        f"that reading it back reads swap; got VmSwap {pattern_swapped}")
    assert_report_between(vm, "after the inflate")
    hog.stop()
    vm.host_balloon.reach_target(ram)
    verdict = pattern.verify_now(HOG_DEADLINE_S)
    pattern.stop()
    assert verdict.endswith(" ok"), f"expected the pattern back intact after the inflate and deflate, got {verdict!r}"
