"""Host memory a QEMU process holds for its guest (BAL-DRV-OP-1, BAL-DRV-OP-2, BAL-DRV-FPR-6).

The total: resident pages plus hugetlbfs pages. /proc/PID/smaps_rollup leaves
hugetlbfs mappings out of Rss; /proc/PID/smaps counts them per mapping as
Shared_Hugetlb and Private_Hugetlb. Rss counts private anonymous pages and the
shared or memfd pages QEMU maps; a page QEMU discards (MADV_DONTNEED,
MADV_REMOVE, fallocate PUNCH_HOLE) leaves its mapping, so it leaves Rss.
Per guest page: /proc/PID/pagemap, bit 63 "present" for each host virtual page.

A page QEMU discarded can come back without the guest touching it: the
host's khugepaged collapses a 2 MiB range of QEMU's RAM (which QEMU madvises
MADV_HUGEPAGE) into a transparent huge page while up to max_ptes_none of its
4 KiB pages are absent, filling them. `collapsed_pages` finds such pages
(/proc/kpageflags THP), and `khugepaged_fill_bound` says how many khugepaged
can have filled in a given time.
"""

from __future__ import annotations

import math
import struct
import time
from array import array
from collections.abc import Iterable
from pathlib import Path

from vballoon.spec import PAGE_SIZE
from vballoon.waiting import wait_for

COUNTED_FIELDS = ("Rss:", "Shared_Hugetlb:", "Private_Hugetlb:")
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_ENTRY_BYTES = 8
PAGEMAP_PFN = (1 << 55) - 1
KPF_THP = 1 << 22  # include/uapi/linux/kernel-page-flags.h
KHUGEPAGED = Path("/sys/kernel/mm/transparent_hugepage/khugepaged")
HUGE_PAGE_PTES = 512  # 4 KiB pages in a 2 MiB x86-64 huge page
SETTLED_SLACK = 1 << 20  # a settled process's memory moves by less than 1 MiB over the quiet period


def qemu_memory_bytes(pid: int) -> int:
    """Bytes of host memory backing the process: Rss plus hugetlb pages, summed over /proc/PID/smaps."""
    total_kib = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith(COUNTED_FIELDS):
            total_kib += int(line.split()[1])
    return total_kib * 1024


def settled_memory_bytes(pid: int, quiet_s: float, timeout: float) -> int:
    """Wait until the process's host memory moved by less than SETTLED_SLACK over `quiet_s` seconds; return it."""
    samples: list[tuple[float, int]] = []

    def settled() -> int | None:
        now = time.monotonic()
        samples.append((now, qemu_memory_bytes(pid)))
        window = [value for at, value in samples if at >= now - quiet_s]
        if samples[0][0] > now - quiet_s or max(window) - min(window) >= SETTLED_SLACK:
            return None
        return samples[-1][1]

    return wait_for(settled, timeout, f"QEMU pid {pid}'s host memory to stay within {SETTLED_SLACK} bytes for "
                    f"{quiet_s:g} s", interval=0.5, max_interval=0.5,
                    describe_last=lambda: f"last samples {[value for _, value in samples[-5:]]}")


def present_pages(pid: int, hva: int, pages: int) -> bytes:
    """For each of `pages` host pages from virtual address `hva`, 1 if it is present in memory, else 0."""
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(hva // PAGE_SIZE * PAGEMAP_ENTRY_BYTES)
        entries = array("Q", pagemap.read(pages * PAGEMAP_ENTRY_BYTES))
    return bytes(1 if entry & PAGEMAP_PRESENT else 0 for entry in entries)


def collapsed_pages(pid: int, hva: int, pages: Iterable[int]) -> set[int]:
    """Of `pages` (host pages numbered from virtual address `hva`), those present in a transparent huge page."""
    found: set[int] = set()
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kpageflags:
        for page in pages:
            pagemap.seek((hva // PAGE_SIZE + page) * PAGEMAP_ENTRY_BYTES)
            (entry,) = struct.unpack("<Q", pagemap.read(PAGEMAP_ENTRY_BYTES))
            if not entry & PAGEMAP_PRESENT:
                continue
            kpageflags.seek((entry & PAGEMAP_PFN) * PAGEMAP_ENTRY_BYTES)
            (flags,) = struct.unpack("<Q", kpageflags.read(PAGEMAP_ENTRY_BYTES))
            if flags & KPF_THP:
                found.add(page)
    return found


def khugepaged_fill_bound(seconds: float) -> int:
    """The most absent 4 KiB pages the host's khugepaged can have filled in `seconds`: every scan_sleep_millisecs
    it scans pages_to_scan page table entries, collapsing each 2 MiB range with at most max_ptes_none of them absent
    (mm/khugepaged.c); 0 when the host has no khugepaged."""
    try:
        to_scan, sleep_ms, none = (int((KHUGEPAGED / name).read_text())
                                   for name in ("pages_to_scan", "scan_sleep_millisecs", "max_ptes_none"))
    except OSError:
        return 0
    passes = math.floor(seconds * 1000 / max(sleep_ms, 1)) + 1
    return passes * max(to_scan // HUGE_PAGE_PTES, 1) * none
