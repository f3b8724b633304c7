"""The guest health check: what in a kernel log is trouble, and which memory-exhaustion reports a test may allow."""

from __future__ import annotations

from vballoon.guest.health import kernel_trouble

# Linux 6.12, a guest the balloon starved (suites/guest/test_response.py): a failed atomic allocation's report.
ALLOCATION_FAILURE = """\
[    5.415300] virtio_balloon virtio1: Out of puff! Can't get 1 pages
[    5.463077] kworker/u4:1: page allocation failure: order:0, mode:0x40820(GFP_ATOMIC|__GFP_COMP), nodemask=(null)
[    5.463783] CPU: 0 UID: 0 PID: 27 Comm: kworker/u4:1 Not tainted 6.12.118+deb13-cloud-amd64 #1  Debian 6.12.118-1
[    5.464148] Workqueue: ipv6_addrconf addrconf_dad_work
[    5.464321] Call Trace:
[    5.465588]  <TASK>
[    5.465823]  dump_stack_lvl+0x5d/0x80
[    5.465923]  warn_alloc+0x164/0x190
[    5.466312]  </TASK>
[    5.466725] Mem-Info:
"""
LATER_TROUBLE = "[    9.000000] WARNING: CPU: 0 PID: 1 at mm/page_alloc.c:4000\n[    9.000001] Call Trace:\n"


def test_an_allocation_failure_report_is_trouble_unless_the_test_exhausts_memory() -> None:
    assert kernel_trouble(ALLOCATION_FAILURE) == ["[    5.464321] Call Trace:"]
    assert kernel_trouble(ALLOCATION_FAILURE, allow_memory_reports=True) == []


def test_only_the_report_itself_is_allowed() -> None:
    found = kernel_trouble(ALLOCATION_FAILURE + LATER_TROUBLE, allow_memory_reports=True)
    assert found == ["[    9.000000] WARNING: CPU: 0 PID: 1 at mm/page_alloc.c:4000", "[    9.000001] Call Trace:"], \
        f"expected the WARNING after the report and its trace, got {found}"
