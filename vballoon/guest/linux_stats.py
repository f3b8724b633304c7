"""Which statistics the Linux balloon driver under test fills, and the /proc source of each.

The driver's `update_balloon_stats` (drivers/virtio/virtio_balloon.c) decides
the tags. What it fills depends on the kernel: its version (tags 10-15 from
/proc/vmstat are in 6.12, not in 6.1) and its config, which the running guest
shows in /proc/vmstat (`pgfault` exists only with CONFIG_VM_EVENT_COUNTERS,
`htlb_buddy_alloc_success` only with CONFIG_HUGETLB_PAGE). Sources read:
Linux 6.1 and 6.12 (Debian 12's and 13's). A version between the two may or
may not fill tags 10-15: both sets are allowed there, and every report of one
driver must still carry the same set (BAL-DRV-ST-8). A kernel older than 6.1
is judged by 6.1's rules (tags 6-9 arrived before it; no older source was read).
"""

from __future__ import annotations

from dataclasses import dataclass

from vballoon.guest.image import release_version
from vballoon.guest.procfs import GuestMemory
from vballoon.spec import PAGE_SIZE

Version = tuple[int, ...]
WITHOUT_VM_EVENT_TAGS_UP_TO: Version = (6, 1)
"""Newest kernel read whose update_balloon_stats fills tags 0-9 only (Linux 6.1)."""
WITH_VM_EVENT_TAGS_FROM: Version = (6, 12)
"""Oldest kernel read whose update_balloon_vm_stats also fills tags 10-15 (Linux 6.12)."""


@dataclass(frozen=True)
class StatSource:
    """Where a statistic comes from in the guest: a sum of /proc/vmstat counters times a unit, or meminfo."""

    qom_key: str
    vmstat: tuple[str, ...] = ()
    """Counters summed; a field name ending in '*' takes every field with that prefix (allocstall_*)."""
    unit: int = 1
    """Bytes per counted item: PAGE_SIZE for page counts the driver converts (pages_to_bytes), else 1."""

    def value(self, memory: GuestMemory) -> int:
        """This statistic as /proc/vmstat gives it at one moment."""
        total = 0
        for field in self.vmstat:
            if field.endswith("*"):
                total += sum(v for name, v in memory.vmstat.items() if name.startswith(field[:-1]))
            else:
                total += memory.vmstat[field]
        return total * self.unit


SWAP_AND_FAULTS = (
    StatSource("stat-swap-in", ("pswpin",), PAGE_SIZE),
    StatSource("stat-swap-out", ("pswpout",), PAGE_SIZE),
    StatSource("stat-major-faults", ("pgmajfault",)),
    StatSource("stat-minor-faults", ("pgfault",)),
)
"""Tags 0-3, filled with CONFIG_VM_EVENT_COUNTERS (6.1 and 6.12)."""
RECLAIM = (
    StatSource("stat-oom-kills", ("oom_kill",)),
    StatSource("stat-alloc-stalls", ("allocstall_*",)),
    StatSource("stat-async-scans", ("pgscan_kswapd",), PAGE_SIZE),
    StatSource("stat-direct-scans", ("pgscan_direct",), PAGE_SIZE),
    StatSource("stat-async-reclaims", ("pgsteal_kswapd",), PAGE_SIZE),
    StatSource("stat-direct-reclaims", ("pgsteal_direct",), PAGE_SIZE),
)
"""Tags 10-15, filled with CONFIG_VM_EVENT_COUNTERS from 6.12 (ALLOC_STALL sums every zone's allocstall)."""
HUGETLB = (
    StatSource("stat-htlb-pgalloc", ("htlb_buddy_alloc_success",)),
    StatSource("stat-htlb-pgfail", ("htlb_buddy_alloc_fail",)),
)
"""Tags 8-9, filled with CONFIG_VM_EVENT_COUNTERS and CONFIG_HUGETLB_PAGE."""
GAUGES = frozenset({"stat-free-memory", "stat-total-memory", "stat-available-memory", "stat-disk-caches"})
"""Tags 4-7, from si_meminfo and the page cache: always filled."""


@dataclass(frozen=True)
class DriverStats:
    """The statistics one guest's driver may fill: one set, or two where its version lies between those read."""

    release: str
    has_vm_events: bool
    has_hugetlb: bool

    @classmethod
    def of(cls, release: str, memory: GuestMemory) -> "DriverStats":
        """From the kernel release and the guest's /proc/vmstat (which shows the two config options)."""
        return cls(release, "pgfault" in memory.vmstat, "htlb_buddy_alloc_success" in memory.vmstat)

    @property
    def fills_reclaim_tags(self) -> bool | None:
        """Whether tags 10-15 are filled: known for versions read, None in between."""
        version = release_version(self.release)[:2]
        if version and version <= WITHOUT_VM_EVENT_TAGS_UP_TO:
            return False
        if version and version >= WITH_VM_EVENT_TAGS_FROM:
            return True
        return None

    def sources(self, reclaim: bool) -> tuple[StatSource, ...]:
        """The counter statistics filled, with or without tags 10-15."""
        if not self.has_vm_events:
            return ()
        return SWAP_AND_FAULTS + (RECLAIM if reclaim else ()) + (HUGETLB if self.has_hugetlb else ())

    def allowed_sets(self, known_to_qemu: frozenset[str]) -> tuple[frozenset[str], ...]:
        """Each set of statistics a report may carry, restricted to those QEMU names (it ignores the others)."""
        choices = (False, True) if self.fills_reclaim_tags is None else (self.fills_reclaim_tags,)
        return tuple(dict.fromkeys(
            (GAUGES | {source.qom_key for source in self.sources(reclaim)}) & known_to_qemu for reclaim in choices))

    def counters(self, present: frozenset[str]) -> tuple[StatSource, ...]:
        """The counter sources of the statistics a report carried."""
        return tuple(source for source in self.sources(True) if source.qom_key in present)
