"""Balloon statistics from a real guest: polling, the set of tags, values against /proc, lifecycle events."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from vballoon.guest.driver import reload_driver
from vballoon.guest.linux_stats import DriverStats
from vballoon.guest.procfs import GuestMemory, read_guest_memory
from vballoon.qemu.balloon import StatsReport
from vballoon.qemu.machine import Machine
from vballoon.waiting import wait_for

INTERVAL_S = 1
REPORTS = 4
# Gaps between reports with a 1 s interval: measured 1-2 s (last-update has
# whole-second resolution) on the 2-core TCG host with another TCG guest running.
MAX_GAP_S = 4
REPORT_DEADLINE_S = 20.0
# Gauges move while the guest runs (sshd, the reading itself). Measured over 25
# reports on pci-modern (2-core TCG host, another TCG guest running): largest
# |stat - /proc/meminfo| 0 KiB free, 16 KiB available, 0 KiB caches. Tolerances
# are 1 MiB / 256 KiB: far above that noise, far below any unit or field mix-up.
GAUGE_TOLERANCE = {"stat-free-memory": 1 << 20, "stat-available-memory": 1 << 20, "stat-disk-caches": 256 << 10}



def driver_stats(vm: Machine, memory: GuestMemory) -> DriverStats:
    """What this guest's driver fills, from its kernel release and /proc/vmstat."""
    return DriverStats.of(vm.image.kernel_version, memory)


def collect_reports(vm: Machine, count: int) -> list[StatsReport]:
    balloon = vm.host_balloon
    reports = [balloon.wait_report_after(int(time.time()), REPORT_DEADLINE_S, "a first stats report (BAL-DRV-ST-2)")]
    while len(reports) < count:
        reports.append(balloon.wait_report_after(reports[-1].last_update, REPORT_DEADLINE_S,
                                                 "the next stats report (BAL-DRV-ST-3)"))
    return reports


def fresh_report_between(vm: Machine) -> tuple[GuestMemory, StatsReport, GuestMemory]:
    """(/proc before, a report the guest gathered after that read, /proc after reading the report).

    QEMU arms its next request only after receiving a report, so the report after
    one received after `before` was gathered after `before`.
    """
    before = read_guest_memory(vm.ssh)
    read_at = int(time.time())
    first = vm.host_balloon.wait_report_after(read_at, REPORT_DEADLINE_S, "a report received after reading /proc")
    report = vm.host_balloon.wait_report_after(first.last_update, REPORT_DEADLINE_S, "the report after it")
    return before, report, read_guest_memory(vm.ssh)


@pytest.mark.req("BAL-DRV-ST-2", "BAL-DRV-ST-3", "BAL-DRV-ST-4", "BAL-DRV-ST-8")
def test_reports_every_interval_with_the_same_supported_tags(shared_vm: Machine) -> None:
    """last-update advances about once per interval; every report carries exactly the stats the kernel supports."""
    vm = shared_vm
    vm.host_balloon.set_stats_polling_interval(INTERVAL_S)
    reports = collect_reports(vm, REPORTS)
    gaps = [b.last_update - a.last_update for a, b in zip(reports, reports[1:], strict=False)]
    assert max(gaps) <= MAX_GAP_S, (
        f"BAL-DRV-ST-3: polling every {INTERVAL_S} s: expected reports at most {MAX_GAP_S} s apart, got gaps {gaps}")
    allowed = driver_stats(vm, read_guest_memory(vm.ssh)).allowed_sets(frozenset(reports[0].values))
    assert reports[0].present() in allowed, (
        f"BAL-DRV-ST-4: Linux {vm.image.kernel_version}: expected the stats set to be "
        f"{' or '.join(str(sorted(a)) for a in allowed)} and the rest unset, got {sorted(reports[0].present())}")
    for number, report in enumerate(reports[1:], start=1):
        assert report.present() == reports[0].present(), (
            f"BAL-DRV-ST-8: report {number}: expected the same stats as report 0 {sorted(reports[0].present())}, "
            f"got {sorted(report.present())}")


@pytest.mark.req("BAL-DRV-ST-4")
def test_values_agree_with_proc(shared_vm: Machine) -> None:
    """Every counter the report carries (tags 0-3, 8-15 as this kernel fills them) lies between two /proc/vmstat
    readings around the report; MemTotal is exact; gauges within tolerance."""
    vm = shared_vm
    vm.host_balloon.set_stats_polling_interval(INTERVAL_S)
    before, report, after = fresh_report_between(vm)
    counters = driver_stats(vm, before).counters(report.present())
    assert counters, f"BAL-DRV-ST-4: expected counter statistics in the report, got {sorted(report.present())}"
    for source in counters:
        low, high, got = source.value(before), source.value(after), report.values[source.qom_key]
        assert low <= got <= high, (
            f"BAL-DRV-ST-4: {source.qom_key}: expected between /proc/vmstat {'+'.join(source.vmstat)} "
            f"x {source.unit} before and after ({low}..{high}), got {got}")
    assert report.values["stat-total-memory"] == after.mem("MemTotal"), (
        f"BAL-DRV-ST-4: stat-total-memory: expected MemTotal {after.mem('MemTotal')}, "
        f"got {report.values['stat-total-memory']}")
    meminfo_of = {"stat-free-memory": lambda m: m.mem("MemFree"),
                  "stat-available-memory": lambda m: m.mem("MemAvailable"),
                  "stat-disk-caches": lambda m: m.mem("Cached") + m.mem("Buffers") + m.mem("SwapCached")}
    for key, tolerance in GAUGE_TOLERANCE.items():
        low = min(meminfo_of[key](before), meminfo_of[key](after)) - tolerance
        high = max(meminfo_of[key](before), meminfo_of[key](after)) + tolerance
        assert low <= report.values[key] <= high, (
            f"BAL-DRV-ST-4: {key}: expected within {tolerance} bytes of /proc/meminfo ({low}..{high}), "
            f"got {report.values[key]}")


def assert_reports_resume(vm: Machine, interruption: Callable[[], None], after: str) -> None:
    """Reports arrive again after `interruption`, with the same stats as before it (BAL-DRV-ST-8)."""
    vm.host_balloon.set_stats_polling_interval(INTERVAL_S)
    first = collect_reports(vm, 1)[0]
    interruption()
    resumed = vm.host_balloon.wait_report_after(int(time.time()), REPORT_DEADLINE_S, f"a stats report after {after}")
    assert resumed.present() == first.present(), (
        f"BAL-DRV-ST-8: expected the same stats after {after}, got {sorted(resumed.present())} "
        f"instead of {sorted(first.present())}")


@pytest.mark.req("BAL-DRV-ST-3", "BAL-DRV-ST-8")
def test_reports_resume_after_stop_and_cont(shared_vm: Machine) -> None:
    """Stopping the VM pauses nothing for good: after cont, reports arrive again with the same tags."""
    def stop_and_cont() -> None:
        shared_vm.qmp.command("stop")
        shared_vm.qmp.command("cont")

    assert_reports_resume(shared_vm, stop_and_cont, "stop/cont")


@pytest.mark.req("BAL-DRV-ST-2", "BAL-DRV-ST-8")
def test_reports_resume_after_driver_reload(shared_vm: Machine) -> None:
    """rmmod/insmod virtio_balloon: the new driver instance offers a stats buffer again, same tags."""
    assert_reports_resume(shared_vm, lambda: reload_driver(shared_vm), "rmmod/insmod virtio_balloon")


@pytest.mark.req("BAL-DRV-ST-2", "BAL-DRV-ST-4")
def test_reports_resume_after_system_reset(fresh_vm: Machine) -> None:
    """After system_reset the rebooted guest's driver reports again, with the new boot's MemTotal."""
    vm = fresh_vm
    vm.host_balloon.set_stats_polling_interval(INTERVAL_S)
    collect_reports(vm, 1)
    boots = vm.serial_text().count(vm.image.ready_marker)
    vm.qmp.command("system_reset")
    reset_at = int(time.time())
    wait_for(lambda: vm.serial_text().count(vm.image.ready_marker) > boots, 90, "the guest to boot again")
    vm.ssh.close()
    vm.wait_ready(60)
    report = vm.host_balloon.wait_report_after(reset_at + 1, REPORT_DEADLINE_S, "a report from the rebooted guest")
    memtotal = read_guest_memory(vm.ssh).mem("MemTotal")
    assert report.values["stat-total-memory"] == memtotal, (
        f"BAL-DRV-ST-4: after system_reset: expected stat-total-memory {memtotal}, "
        f"got {report.values['stat-total-memory']}")
