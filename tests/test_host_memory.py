"""Host memory of a process, read on this test process itself (BAL-DRV-OP-1, BAL-DRV-FPR-6)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
import mmap
import os

import pytest

from vballoon.qemu.host_memory import (KHUGEPAGED, collapsed_pages, khugepaged_fill_bound, present_pages,
                                       qemu_memory_bytes, settled_memory_bytes)
from vballoon.spec import PAGE_SIZE

pytestmark = pytest.mark.req("BAL-DRV-OP-1")
PAGES = 64


@pytest.fixture
def mapping() -> Iterator[mmap.mmap]:
    area = mmap.mmap(-1, PAGES * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_NOHUGEPAGE)
    yield area
    area.close()


def address_of(area: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(area))


def test_present_pages_are_the_touched_ones(mapping: mmap.mmap) -> None:
    """Pages 3 and 40 written, the rest never touched; then page 40 discarded with MADV_DONTNEED, as QEMU
    discards a ballooned page."""
    base = address_of(mapping)
    for page in (3, 40):
        mapping[page * PAGE_SIZE] = 1
    present = present_pages(os.getpid(), base, PAGES)
    assert [page for page in range(PAGES) if present[page]] == [3, 40]
    mapping.madvise(mmap.MADV_DONTNEED, 40 * PAGE_SIZE, PAGE_SIZE)
    present = present_pages(os.getpid(), base, PAGES)
    assert [page for page in range(PAGES) if present[page]] == [3]


def test_memory_counts_a_touched_mapping(mapping: mmap.mmap) -> None:
    before = qemu_memory_bytes(os.getpid())
    for page in range(PAGES):
        mapping[page * PAGE_SIZE] = 1
    assert qemu_memory_bytes(os.getpid()) - before >= PAGES * PAGE_SIZE


def test_a_quiet_process_settles() -> None:
    assert settled_memory_bytes(os.getpid(), quiet_s=0.5, timeout=10) > 0


HUGE = 2 << 20


def anon_huge_kib(address: int) -> int:
    """AnonHugePages of this process's mapping that holds `address`, from /proc/self/smaps (the kernel's count)."""
    inside = False
    for line in open("/proc/self/smaps").read().splitlines():
        if "-" in line.split()[0] and ":" not in line.split()[0]:
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_pages_of_a_transparent_huge_page_are_told_apart() -> None:
    """A touched 2 MiB range madvised MADV_HUGEPAGE is a transparent huge page (as QEMU's RAM is); one madvised
    MADV_NOHUGEPAGE is not. (Broken on purpose: testing KPF_HUGE, bit 17, instead finds none.)"""
    area = mmap.mmap(-1, 3 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        start = (-address_of(area)) % HUGE  # the first 2 MiB boundary inside the mapping
        area.madvise(mmap.MADV_HUGEPAGE, start, HUGE)
        area.madvise(mmap.MADV_NOHUGEPAGE, start + HUGE, HUGE)
        area[start:start + 2 * HUGE] = b"\1" * (2 * HUGE)
        base = address_of(area) + start
        pages = HUGE // PAGE_SIZE
        if anon_huge_kib(base) == 0:
            pytest.skip("this host gave no transparent huge page to a MADV_HUGEPAGE range (THP off or no free 2 MiB)")
        assert collapsed_pages(os.getpid(), base, range(pages)) == set(range(pages))
        assert collapsed_pages(os.getpid(), base + HUGE, range(pages)) == set()
    finally:
        area.close()


def test_khugepaged_can_fill_a_bounded_number_of_pages() -> None:
    """Per pass (pages_to_scan 4096 entries: 8 ranges) at most max_ptes_none (511) absent pages a range: 4088 pages a
    pass, and one more pass every scan_sleep_millisecs (10 s) - with the host's defaults."""
    if not (KHUGEPAGED / "pages_to_scan").exists():
        pytest.skip("this host's kernel has no khugepaged")
    values = [int((KHUGEPAGED / n).read_text()) for n in ("pages_to_scan", "scan_sleep_millisecs", "max_ptes_none")]
    if values != [4096, 10000, 511]:
        pytest.skip(f"khugepaged is not at its defaults here: {values}")
    assert khugepaged_fill_bound(0.5) == 8 * 511
    assert khugepaged_fill_bound(25.0) == 3 * 8 * 511
