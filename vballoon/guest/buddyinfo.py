"""The guest's free memory by block order (/proc/buddyinfo) and the order Linux reports from (BAL-DRV-FPR-5, -6).

Linux's free page reporting hands the device only free blocks of at least
`page_reporting_order` (pageblock order, 2 MiB on x86, unless set otherwise),
so what reporting can return to the host is the free memory held in blocks of
that order and above; memory freed into smaller blocks stays with the guest.
"""

from __future__ import annotations

from vballoon.errors import GuestError
from vballoon.guest.ssh import GuestShell
from vballoon.spec import PAGE_SIZE

REPORTING_ORDER_PARAMETER = "/sys/module/page_reporting/parameters/page_reporting_order"


def parse_buddyinfo(text: str) -> dict[str, list[int]]:
    """`Node 0, zone   DMA32   3   5 ...` lines to {"0/DMA32": [free blocks of order 0, 1, ...]}."""
    zones: dict[str, list[int]] = {}
    for line in text.splitlines():
        words = line.replace(",", " ").split()
        if len(words) < 5 or words[0] != "Node" or words[2] != "zone":
            continue
        zones[f"{words[1]}/{words[3]}"] = [int(count) for count in words[4:]]
    return zones


def free_bytes_from_order(zones: dict[str, list[int]], order: int) -> int:
    """Bytes of free memory held in blocks of `order` or larger, over all zones."""
    return sum(count << block_order for counts in zones.values()
               for block_order, count in enumerate(counts) if block_order >= order) * PAGE_SIZE


def free_blocks_from_order(zones: dict[str, list[int]], order: int) -> int:
    """Free blocks of `order` or larger, over all zones."""
    return sum(sum(counts[order:]) for counts in zones.values())


def read_buddyinfo(shell: GuestShell) -> dict[str, list[int]]:
    """The guest's /proc/buddyinfo now, parsed."""
    return parse_buddyinfo(shell.output("cat /proc/buddyinfo"))


def reporting_order(shell: GuestShell) -> int:
    """The smallest block order the guest's kernel reports (it sets it when the balloon registers for reporting)."""
    text = shell.output(f"cat {REPORTING_ORDER_PARAMETER} 2>/dev/null || true").strip()
    if not text.isdigit():
        raise GuestError(f"the guest kernel has no {REPORTING_ORDER_PARAMETER} (got {text!r}); free page reporting "
                         "needs Linux 5.14 or later")
    return int(text)
