"""Host memory a QEMU process holds for its guest: resident pages plus hugetlbfs pages (BAL-DRV-OP-1, BAL-DRV-FPR-6).

/proc/PID/smaps_rollup leaves hugetlbfs mappings out of Rss; /proc/PID/smaps
counts them per mapping as Shared_Hugetlb and Private_Hugetlb.
"""

from __future__ import annotations

from pathlib import Path

COUNTED_FIELDS = ("Rss:", "Shared_Hugetlb:", "Private_Hugetlb:")


def qemu_memory_bytes(pid: int) -> int:
    """Bytes of host memory backing the process: Rss plus hugetlb pages, summed over /proc/PID/smaps."""
    total_kib = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith(COUNTED_FIELDS):
            total_kib += int(line.split()[1])
    return total_kib * 1024
