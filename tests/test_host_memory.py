"""Host memory of a process, read on this test process itself (BAL-DRV-OP-1, BAL-DRV-FPR-6)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
import mmap
import os

import pytest

from vballoon.qemu.host_memory import present_pages, qemu_memory_bytes, settled_memory_bytes
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
