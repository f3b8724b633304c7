"""Guest RAM in QEMU's host memory, page by page (BAL-DRV-OP-1): which guest pages QEMU holds, and whether pages
the balloon took are out of it.

QEMU's RAM starts at guest-physical 0 in one block below 4 GiB (HMP `gpa2hva`
finds it); /proc/PID/pagemap says which of its pages are present. A page QEMU
discarded can come back without the guest touching it when the host's
khugepaged collapses its 2 MiB range into a transparent huge page
(vballoon.qemu.host_memory): such pages are told apart and bounded by what
khugepaged can fill in the time, not counted against the balloon.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from vballoon.qemu.hmp import hmp
from vballoon.qemu.host_memory import collapsed_pages, khugepaged_fill_bound, present_pages
from vballoon.qemu.machine import Machine
from vballoon.spec import PAGE_SIZE


def ram_hva(vm: Machine) -> int:
    """Where guest-physical 0 is in QEMU's address space."""
    return int(hmp(vm, "gpa2hva 0").split()[-1], 16)  # "Host virtual address for 0x0 (pc.ram) is 0x7f..."


def guest_pages_present(vm: Machine) -> bytes:
    """For each guest page, 1 if QEMU has it in host memory."""
    return present_pages(vm.pid, ram_hva(vm), (vm.memory_mib << 20) // PAGE_SIZE)


def pages_back_in_host_memory(vm: Machine, pages: Iterable[int], since: float) -> str | None:
    """None when none of the guest `pages` is in QEMU's host memory, but for pages khugepaged filled in a
    transparent huge page, at most as many as it can have filled since `since` (time.monotonic()); else what is
    wrong. Seen on QEMU 7.2 / Linux 6.1 with two guests on the 2 cores: 863 of 32,768 ballooned pages present after
    a 128 MiB inflate, all in huge pages. A device that does not discard leaves them all present."""
    wanted = list(pages)
    present = guest_pages_present(vm)
    resident = [page for page in wanted if present[page]]
    refilled = collapsed_pages(vm.pid, ram_hva(vm), resident)
    stray = [hex(page * PAGE_SIZE) for page in resident if page not in refilled]
    bound = khugepaged_fill_bound(time.monotonic() - since)
    if not stray and len(refilled) <= bound:
        return None
    return (f"expected none of the {len(wanted)} pages in host memory, but for at most {bound} that khugepaged "
            f"filled in a transparent huge page; got {len(stray)} present outside one (e.g. {stray[:5]}) and "
            f"{len(refilled)} in one")
