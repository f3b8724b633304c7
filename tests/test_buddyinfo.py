"""The guest's free blocks by order from /proc/buddyinfo (BAL-DRV-FPR-5, BAL-DRV-FPR-6), on text of our own."""

from __future__ import annotations

import pytest

from vballoon.guest.buddyinfo import free_blocks_from_order, free_bytes_from_order, parse_buddyinfo

# Linux 6.1's /proc/buddyinfo of a 512 MiB guest after a memory hog exited (orders 0-10).
BUDDYINFO = """Node 0, zone      DMA      0      0      0      0      0      1      1      1      0      1      3
Node 0, zone    DMA32      1     10     12     16     16     13     12     13     10      9     95
"""


pytestmark = pytest.mark.req("BAL-DRV-FPR-6")


def test_zones_parse_with_one_count_per_order() -> None:
    zones = parse_buddyinfo(BUDDYINFO)
    assert zones == {"0/DMA": [0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 3],
                     "0/DMA32": [1, 10, 12, 16, 16, 13, 12, 13, 10, 9, 95]}


def test_free_memory_from_pageblock_order_counts_only_blocks_that_large() -> None:
    """Order 9 and 10 blocks: DMA 1 + 3*2 pageblocks, DMA32 9 + 95*2 pageblocks, of 2 MiB each."""
    zones = parse_buddyinfo(BUDDYINFO)
    assert free_bytes_from_order(zones, 9) == (1 + 3 * 2 + 9 + 95 * 2) * 2 * 1024 * 1024
    assert free_blocks_from_order(zones, 9) == 1 + 3 + 9 + 95


def test_all_orders_count_every_free_page() -> None:
    zones = parse_buddyinfo(BUDDYINFO)
    pages = sum(count << order for counts in zones.values() for order, count in enumerate(counts))
    assert free_bytes_from_order(zones, 0) == pages * 4096


def test_lines_that_are_not_zones_are_ignored() -> None:
    assert parse_buddyinfo("garbage\n\nNode 0, zone Normal 2 1\n") == {"0/Normal": [2, 1]}
