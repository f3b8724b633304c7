"""The guest's zones from /proc/zoneinfo: PFN span and managed pages, for the balloon's accounting (BAL-DRV-ACT-1).

Without DEFLATE_ON_OOM, Linux's virtio_balloon takes each inflated page out
of its zone's managed pages (adjust_managed_page_count in fill_balloon), puts
it back on deflate, and when compaction migrates a balloon page into another
zone moves the count with it (virtballoon_migratepage, Linux 6.1 and 6.12);
with DEFLATE_ON_OOM it leaves managed pages, hence MemTotal, alone. So a zone's
managed pages fall by exactly the balloon pages inside its span, or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from vballoon.guest.ssh import GuestShell


@dataclass(frozen=True)
class Zone:
    """One populated zone: its first PFN, the PFNs it spans and the pages the page allocator manages in it."""

    start_pfn: int
    spanned: int
    managed: int

    def holds(self, pfn: int) -> bool:
        return self.start_pfn <= pfn < self.start_pfn + self.spanned


def parse_zoneinfo(text: str) -> dict[str, Zone]:
    """`Node 0, zone DMA32` sections to {"0/DMA32": Zone}; zones without pages (no start_pfn line) are left out."""
    fields: dict[str, dict[str, int]] = {}
    current: dict[str, int] = {}
    for line in text.splitlines():
        words = line.replace(",", " ").replace(":", " ").split()
        if len(words) == 4 and words[0] == "Node" and words[2] == "zone":
            current = fields.setdefault(f"{words[1]}/{words[3]}", {})
        elif len(words) == 2 and words[0] in ("spanned", "managed", "start_pfn") and words[1].isdigit():
            current[words[0]] = int(words[1])
    return {name: Zone(zone["start_pfn"], zone["spanned"], zone["managed"])
            for name, zone in fields.items() if "start_pfn" in zone}


def read_zones(shell: GuestShell) -> dict[str, Zone]:
    """The guest's populated zones now."""
    return parse_zoneinfo(shell.output("cat /proc/zoneinfo"))


def pages_by_zone(zones: dict[str, Zone], pfns: set[int]) -> dict[str, int]:
    """How many of `pfns` fall in each zone's span (every zone named, 0 when none)."""
    return {name: sum(zone.holds(pfn) for pfn in pfns) for name, zone in zones.items()}


def managed_drop(before: dict[str, Zone], after: dict[str, Zone]) -> dict[str, int]:
    """Managed pages each zone lost between two readings (negative when it gained)."""
    return {name: zone.managed - after[name].managed for name, zone in before.items()}
