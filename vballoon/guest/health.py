"""Is the guest kernel well? Trouble in its log, allowing OOM-killer reports only when asked.

Trouble is what `GUEST_TROUBLE` names (Oops, BUG, WARNING, Call Trace, panic,
GPF) plus the reports of the page allocator's debug checks (page poisoning
finding a changed free page, bad page state). An OOM-killer report prints a
Call Trace of the allocating task; a test that provokes a real OOM
(BAL-DRV-OOM-1) allows exactly that: Call Trace lines between an
"invoked oom-killer" header and the end of that report, nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path

from vballoon.qemu.machine import GUEST_TROUBLE

PAGE_CHECK_TROUBLE = re.compile(r"(pagealloc: memory corruption|Bad page state|Bad page map|page dumped because)")
OOM_REPORT_START = re.compile(r"invoked oom-killer:")
OOM_REPORT_END = re.compile(r"(Out of memory: Killed process|oom_reaper: reaped process|Memory cgroup out of memory)")
CALL_TRACE = re.compile(r"Call Trace")


def kernel_trouble(log: str, allow_oom_reports: bool = False) -> list[str]:
    """Lines of a kernel log (dmesg or serial console) that show trouble, in order."""
    found: list[str] = []
    in_oom_report = False
    for line in log.splitlines():
        if allow_oom_reports and OOM_REPORT_START.search(line):
            in_oom_report = True
        elif OOM_REPORT_END.search(line):
            in_oom_report = False
        trouble = GUEST_TROUBLE.search(line) or PAGE_CHECK_TROUBLE.search(line)
        if trouble and not (in_oom_report and CALL_TRACE.search(line) and trouble.group(0) == "Call Trace"):
            found.append(line.strip())
    return found


def log_since(path: Path, offset: int) -> str:
    """The text a log file gained after byte `offset`."""
    with path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def after_marker(log: str, marker: str) -> str:
    """The part of a kernel log after the last line containing `marker` (all of it if absent)."""
    position = log.rfind(marker)
    if position < 0:
        return log
    return log[log.find("\n", position) + 1:] if "\n" in log[position:] else ""
