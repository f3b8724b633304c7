"""Is the guest kernel well? Trouble in its log, allowing OOM-killer reports only when asked.

Trouble is what `GUEST_TROUBLE` names (Oops, BUG, WARNING, Call Trace, panic,
GPF) plus the reports of the page allocator's debug checks (page poisoning
finding a changed free page, bad page state). Running out of memory prints a
Call Trace of the allocating task: in an OOM-killer report ("invoked
oom-killer" to the kill), and in a failed allocation's report
("page allocation failure" to the end of its trace). A test that exhausts the
guest's memory on purpose (a real OOM, BAL-DRV-OOM-1; the balloon taking all
there is, BAL-DRV-OP-1) allows exactly those Call Trace lines, nothing else.
"""

from __future__ import annotations

import re

GUEST_TROUBLE = re.compile(r"(Oops|BUG:|WARNING:|Call Trace|Kernel panic|general protection fault)")
PAGE_CHECK_TROUBLE = re.compile(r"(pagealloc: memory corruption|Bad page state|Bad page map|page dumped because)")
MEMORY_REPORT_START = re.compile(r"(invoked oom-killer:|page allocation failure: order:)")
MEMORY_REPORT_END = re.compile(r"(Out of memory: Killed process|oom_reaper: reaped process|Memory cgroup out of memory"
                               r"|</TASK>)")
CALL_TRACE = re.compile(r"Call Trace")


def kernel_trouble(log: str, allow_memory_reports: bool = False) -> list[str]:
    """Lines of a kernel log (dmesg or serial console) that show trouble, in order; with `allow_memory_reports`,
    the Call Trace of an OOM-killer or allocation-failure report is not trouble."""
    found: list[str] = []
    in_memory_report = False
    for line in log.splitlines():
        if allow_memory_reports and MEMORY_REPORT_START.search(line):
            in_memory_report = True
        elif MEMORY_REPORT_END.search(line):
            in_memory_report = False
        trouble = GUEST_TROUBLE.search(line) or PAGE_CHECK_TROUBLE.search(line)
        if trouble and not (in_memory_report and CALL_TRACE.search(line) and trouble.group(0) == "Call Trace"):
            found.append(line.strip())
    return found


def after_marker(log: str, marker: str) -> str:
    """The part of a kernel log after the last line containing `marker` (all of it if absent)."""
    position = log.rfind(marker)
    if position < 0:
        return log
    return log[log.find("\n", position) + 1:] if "\n" in log[position:] else ""
