"""A real OOM in the guest while the balloon holds memory: deflate-on-OOM gives pages back, else the balloon holds."""

from __future__ import annotations

import time

import pytest

from vballoon.guest.memhog import BackgroundHog, start_hog
from vballoon.guest.procfs import read_guest_memory
from vballoon.matrix import Variant
from vballoon.qemu.balloon import MIB
from vballoon.qemu.machine import Machine
from vballoon.waiting import wait_for

BALLOON_MIB = 256
BEYOND_AVAILABLE_MIB = 64
REPORT_DEADLINE_S = 20.0  # a 1 s polling interval under TCG: reports measured 1-2 s apart
HOG_DEADLINE_S = 180.0  # measured 10-40 s under TCG for a 250 MiB hog that meets the OOM path


def inflate_and_hog(vm: Machine) -> tuple[int, int, BackgroundHog]:
    """Inflate by BALLOON_MIB, then hog MemAvailable + BEYOND_AVAILABLE_MIB; (target, oom_kill before, hog)."""
    target = (vm.memory_mib - BALLOON_MIB) * MIB
    vm.host_balloon.reach_target(target)
    memory = read_guest_memory(vm.ssh)
    wanted = memory.mem("MemAvailable") // MIB + BEYOND_AVAILABLE_MIB
    hog = start_hog(vm.ssh, f"alloc --mib {wanted} --step-mib 8 --hold-forever", "oom", oom_score_adj=1000)
    return target, memory.vmstat["oom_kill"], hog


@pytest.mark.req("BAL-DRV-OOM-2")
def test_deflate_on_oom_feeds_the_hog(with_deflate_on_oom: Variant, shared_vm: Machine) -> None:
    """With DEFLATE_ON_OOM the driver gives balloon pages to the hog: actual shrinks, nobody is OOM-killed."""
    vm = shared_vm
    target, kills_before, hog = inflate_and_hog(vm)
    hog.wait_line(r"memhog: holding \d+ MiB", HOG_DEADLINE_S)
    actual = vm.host_balloon.query_balloon()
    kills = read_guest_memory(vm.ssh).vmstat["oom_kill"] - kills_before
    assert actual > target, (f"BAL-DRV-OOM-2: expected actual above the target {target} after the guest ran out "
                             f"of memory (pages deflated for the hog), got {actual}")
    assert actual < vm.memory_mib * MIB, f"expected the balloon to still hold pages, got actual {actual} (all RAM)"
    assert kills == 0, (f"BAL-DRV-OOM-2: expected no OOM kill while the balloon holds {vm.memory_mib * MIB - actual} "
                        f"bytes, got {kills} (oom_kill in /proc/vmstat)")
    hog.stop()


@pytest.mark.oom_report_expected
@pytest.mark.req("BAL-DRV-OOM-1", "BAL-DRV-ST-4")
def test_balloon_holds_under_oom(without_deflate_on_oom: Variant, shared_vm: Machine) -> None:
    """Without DEFLATE_ON_OOM the balloon keeps its pages: the OOM killer acts and the guest survives; where
    the driver reports OOM kills (stat-oom-kills, Linux 6.12) the next report counts this one."""
    vm = shared_vm
    vm.host_balloon.set_stats_polling_interval(1)
    reports_oom_kills = "stat-oom-kills" in vm.host_balloon.wait_report_after(0, REPORT_DEADLINE_S, "a stats report").present()
    target, kills_before, hog = inflate_and_hog(vm)
    wait_for(lambda: not hog.running(), HOG_DEADLINE_S, "the OOM killer to end the hog",
             describe_last=lambda: repr(hog.output()[-200:]))
    kills = read_guest_memory(vm.ssh).vmstat["oom_kill"] - kills_before
    assert kills >= 1, f"expected the OOM killer to act (oom_kill in /proc/vmstat), got {kills} kills"
    actual = vm.host_balloon.query_balloon()
    assert actual == target, (f"BAL-DRV-OOM-1: expected the balloon to hold (actual {target}) through the OOM, "
                              f"got {actual}")
    vm.ssh.run("true", timeout=30)
    if reports_oom_kills:
        after_kill = read_guest_memory(vm.ssh).vmstat["oom_kill"]
        report = vm.host_balloon.wait_report_after(int(time.time()), REPORT_DEADLINE_S, "a stats report after the OOM kill")
        assert report.values["stat-oom-kills"] >= after_kill > kills_before, (
            f"BAL-DRV-ST-4: expected stat-oom-kills to count the OOM kill (/proc/vmstat oom_kill {kills_before} "
            f"before, {after_kill} after), got {report.values['stat-oom-kills']}")
