"""The guest's zones from /proc/zoneinfo and the balloon's managed-page accounting (BAL-DRV-ACT-1), on text of our
own."""

from __future__ import annotations

import pytest

from vballoon.guest.zoneinfo import Zone, managed_drop, pages_by_zone, parse_zoneinfo

# Linux 6.1's /proc/zoneinfo of a 512 MiB guest (pci-modern, QEMU 7.2), per-node and per-zone counters cut short.
ZONEINFO = """Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 982
      nr_swapcached 0
  pages free     3808
        boost    0
        min      22
        low      27
        high     32
        spanned  4095
        present  3998
        managed  3840
        cma      0
        protection: (0, 438, 438, 438, 438)
      nr_free_pages 3808
  pagesets
    cpu: 0
              count: 0
              high:  27
              batch: 1
  vm stats threshold: 2
  node_unreclaimable:  0
  start_pfn:           1
Node 0, zone    DMA32
  pages free     107234
        boost    0
        spanned  126944
        present  126944
        managed  116231
        cma      0
        protection: (0, 0, 0, 0, 0)
      nr_free_pages 107234
    cpu: 0
              count: 531
              high:  822
  vm stats threshold: 6
  node_unreclaimable:  0
  start_pfn:           4096
Node 0, zone   Normal
  pages free     0
        boost    0
        spanned  0
        present  0
        managed  0
        cma      0
        protection: (0, 0, 0, 0, 0)
"""

pytestmark = pytest.mark.req("BAL-DRV-ACT-1")


def test_populated_zones_parse_with_span_and_managed_pages() -> None:
    """An empty zone (no start_pfn line) is left out; pageset lines such as `high:  27` are not the zone's."""
    assert parse_zoneinfo(ZONEINFO) == {"0/DMA": Zone(start_pfn=1, spanned=4095, managed=3840),
                                        "0/DMA32": Zone(start_pfn=4096, spanned=126944, managed=116231)}


def test_pages_fall_in_the_zone_whose_span_holds_them() -> None:
    zones = parse_zoneinfo(ZONEINFO)
    assert pages_by_zone(zones, {1, 4095, 4096, 4096 + 126943, 4096 + 126944}) == {"0/DMA": 2, "0/DMA32": 2}


def test_managed_drop_is_per_zone_and_signed() -> None:
    before = parse_zoneinfo(ZONEINFO)
    after = {"0/DMA": Zone(1, 4095, 3841), "0/DMA32": Zone(4096, 126944, 116231 - 65536)}
    assert managed_drop(before, after) == {"0/DMA": -1, "0/DMA32": 65536}
