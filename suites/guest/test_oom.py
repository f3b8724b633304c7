"""A real OOM in the guest while the balloon holds memory: deflate-on-OOM gives pages back, else the balloon holds.

Every variant runs these (each takes the one its DEFLATE_ON_OOM setting allows): on the quick tier the deflate
runs over modern and legacy virtio-pci (pci-transitional+doom+..., pci-legacy+doom+...), the hold on pci-modern;
the standard tier adds legacy variants without DEFLATE_ON_OOM.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from vballoon.guest.memhog import BackgroundHog, start_hog
from vballoon.guest.pfn_trace import TRACE_EVENTS, pfn_messages
from vballoon.guest.procfs import GuestMemory, read_guest_memory
from vballoon.matrix import Variant
from vballoon.qemu.balloon import MIB
from vballoon.qemu.hmp import trace_events_on
from vballoon.qemu.machine import Machine
from vballoon.spec import PAGE_SIZE
from vballoon.waiting import DeadlineExceeded, wait_for

BALLOON_MIB = 256
BEYOND_AVAILABLE_MIB = 64
REPORT_DEADLINE_S = 20.0  # a 1 s polling interval under TCG: reports measured 1-2 s apart
HOG_DEADLINE_S = 180.0  # measured 10-40 s under TCG for a 250 MiB hog that meets the OOM path
TRACE_DEADLINE_S = 10.0  # QEMU's trace lines reach its stderr file after the guest has written actual
# Linux 6.1 and 6.12 deflate VIRTIO_BALLOON_OOM_NR_PAGES (256) pages per OOM notification (virtio_balloon_oom_notify).
OOM_DEFLATE_PAGES = 256


def inflate(vm: Machine) -> int:
    """Inflate by BALLOON_MIB; the target."""
    target = (vm.memory_mib - BALLOON_MIB) * MIB
    vm.host_balloon.reach_target(target)
    return target


def hog_beyond_available(vm: Machine) -> tuple[GuestMemory, BackgroundHog]:
    """Hog MemAvailable + BEYOND_AVAILABLE_MIB; (the guest's memory before, the hog)."""
    memory = read_guest_memory(vm.ssh)
    wanted = memory.mem("MemAvailable") // MIB + BEYOND_AVAILABLE_MIB
    return memory, start_hog(vm.ssh, f"alloc --mib {wanted} --step-mib 8 --hold-forever", "oom", oom_score_adj=1000)


@pytest.mark.req("BAL-DRV-OOM-2", "BAL-DRV-OP-4")
def test_deflate_on_oom_feeds_the_hog(with_deflate_on_oom: Variant, shared_vm: Machine) -> None:
    """With DEFLATE_ON_OOM the driver gives balloon pages to the hog: actual shrinks, nobody is OOM-killed, and
    every page given back went through the deflateq: vmstat balloon_deflate counts what actual rose by, in whole
    OOM notifications of OOM_DEFLATE_PAGES, and QEMU took that many PFNs more off one queue than off the other.
    (Compaction under the hog's pressure migrates balloon pages meanwhile: each move is one PFN on each queue,
    vmstat balloon_migrate, BAL-DRV-OP-4; so the smaller queue holds at most the moves counted.)

    Broken on purpose, each failed on pci-legacy+doom+fpr-poison-eventidx: expecting the PFNs of actual's rise on
    one queue only (18944 pages released, 19954 PFNs on two queues); expecting one PFN more on the deflateq (18944
    released, 128 migrated: 19072 and 128 PFNs)."""
    vm = shared_vm
    target = inflate(vm)
    with trace_events_on(vm, *TRACE_EVENTS) as start:
        before, hog = hog_beyond_available(vm)
        hog.wait_line(r"memhog: holding \d+ MiB", HOG_DEADLINE_S)
        seen: list[tuple[int, int, int, int, int]] = []

        def consistent() -> tuple[int, int, int, int, int] | None:
            """(released, balloon_deflate and balloon_migrate rises, PFNs on the fuller and the other queue) once
            QEMU's trace, actual and vmstat agree; deflates may go on a while after the hog holds."""
            released = (vm.host_balloon.query_balloon() - target) // PAGE_SIZE
            after = read_guest_memory(vm.ssh).vmstat
            queues = sorted(Counter(m.queue for m in pfn_messages(vm.stderr_since(start))).values(), reverse=True)
            more, fewer = (queues + [0, 0])[:2]
            seen.append((released, after["balloon_deflate"] - before.vmstat["balloon_deflate"],
                         after["balloon_migrate"] - before.vmstat["balloon_migrate"], more, fewer))
            counted, migrated = seen[-1][1:3]
            return seen[-1] if counted == released == more - fewer and fewer <= migrated else None

        try:
            released, counted, migrated, more, fewer = wait_for(
                consistent, TRACE_DEADLINE_S, "QEMU's trace, actual and vmstat to agree on the pages deflated")
        except DeadlineExceeded:
            released, counted, migrated, more, fewer = seen[-1]
    kills = read_guest_memory(vm.ssh).vmstat["oom_kill"] - before.vmstat["oom_kill"]
    hog.stop()
    print(f"{vm.variant.name}: {released} pages released for the hog, {migrated} balloon pages migrated; PFNs per "
          f"queue {more} and {fewer}")
    assert released > 0, (f"BAL-DRV-OOM-2: expected actual above the target {target} after the guest ran out "
                          f"of memory (pages deflated for the hog), got {released} pages more")
    assert target + released * PAGE_SIZE < vm.memory_mib * MIB, "expected the balloon to still hold pages"
    assert kills == 0, (f"BAL-DRV-OOM-2: expected no OOM kill while the balloon holds pages, got {kills} (oom_kill "
                        "in /proc/vmstat)")
    assert counted == released == more - fewer and fewer <= migrated, (
        f"BAL-DRV-OP-4: actual rose by {released} pages and {migrated} balloon pages migrated: expected {released} "
        f"counted in vmstat balloon_deflate and {released} PFNs more on one queue (the deflateq) than on the other, "
        f"which has at most {migrated}; got {counted} counted and {more} and {fewer} PFNs")
    assert released % OOM_DEFLATE_PAGES == 0, (
        f"BAL-DRV-OOM-2: expected Linux to deflate {OOM_DEFLATE_PAGES} pages per OOM notification, got {released} "
        "pages in all")


@pytest.mark.oom_report_expected
@pytest.mark.req("BAL-DRV-OOM-1", "BAL-DRV-ST-4")
def test_balloon_holds_under_oom(without_deflate_on_oom: Variant, shared_vm: Machine) -> None:
    """Without DEFLATE_ON_OOM the balloon keeps its pages: the OOM killer acts and the guest survives; where
    the driver reports OOM kills (stat-oom-kills, Linux 6.12) the next report counts this one."""
    vm = shared_vm
    vm.host_balloon.set_stats_polling_interval(1)
    reports_oom_kills = "stat-oom-kills" in vm.host_balloon.wait_report_after(0, REPORT_DEADLINE_S, "a stats report").present()
    target = inflate(vm)
    before, hog = hog_beyond_available(vm)
    kills_before = before.vmstat["oom_kill"]
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
