"""The Linux driver's "Out of puff" lines in a guest's kernel log: when it cannot get a page to inflate with
(BAL-DRV-OP-1: it SHOULD supply as many pages as it can, and no more).

fill_balloon (drivers/virtio/virtio_balloon.c, Linux 6.1 and 6.12) asks the page allocator for one guest page at
a time, at most VIRTIO_BALLOON_ARRAY_PFNS_MAX (256) balloon pages a round. When an allocation fails it logs
"Out of puff! Can't get %u pages" with VIRTIO_BALLOON_PAGES_PER_PAGE, the balloon pages one guest page holds
(guest page size / 4 KiB: 1 on x86-64, the `mov $0x1,%edx` before _dev_info in both Debian modules), sleeps
msleep(200) and ends the round; update_balloon_size_func requeues itself while the target is not met. The line
goes through dev_info_ratelimited: at most 10 per 5 s window, and the call that opens the next window first logs
"fill_balloon: N callbacks suppressed" for the lines it dropped (___ratelimit, lib/ratelimit.c).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from vballoon.spec import PAGE_SIZE

ARRAY_PFNS_MAX = 256
"""VIRTIO_BALLOON_ARRAY_PFNS_MAX: balloon pages one fill_balloon round asks for at most."""
RETRY_SLEEP_S = 0.2
"""msleep(200) after a failed allocation: the shortest time between two failed rounds."""

_PUFF = re.compile(r"^\[\s*(?P<at>\d+\.\d+)\] .*Out of puff! Can't get (?P<pages>\d+) pages")
_SUPPRESSED = re.compile(r"^\[\s*(?P<at>\d+\.\d+)\] fill_balloon: (?P<count>\d+) callbacks suppressed")


@dataclass(frozen=True)
class Puff:
    """One "Out of puff" line: kernel log time (s) and the pages it could not get."""

    at: float
    pages: int


@dataclass(frozen=True)
class PuffLog:
    """The driver's back-off as its log shows it: the lines in order, and where the rate limit dropped some."""

    puffs: tuple[Puff, ...]
    bursts: tuple[tuple[Puff, ...], ...]
    """Runs of lines with no "callbacks suppressed" between them: each run's lines are consecutive failed rounds."""
    suppressed: tuple[tuple[float, int], ...]
    """Each "callbacks suppressed" line: its time and the lines the rate limit dropped before it."""

    def retry_intervals(self) -> list[float]:
        """Seconds between consecutive failed rounds (within a burst)."""
        return [later.at - earlier.at for burst in self.bursts for earlier, later in itertools.pairwise(burst)]

    def first_window_cadence(self) -> float | None:
        """Mean seconds between failed rounds over the first rate-limit window, printed or not: from the first
        line to the first "callbacks suppressed" line (logged by the round that opens the next window), over the
        rounds in between; None before that line."""
        if not self.suppressed or not self.bursts:
            return None
        at, dropped = self.suppressed[0]
        return (at - self.bursts[0][0].at) / (len(self.bursts[0]) + dropped)


def parse(log: str) -> PuffLog:
    """The "Out of puff" and "fill_balloon: N callbacks suppressed" lines of `dmesg` output."""
    puffs: list[Puff] = []
    bursts: list[list[Puff]] = [[]]
    suppressed: list[tuple[float, int]] = []
    for line in log.splitlines():
        if match := _PUFF.match(line):
            puff = Puff(float(match["at"]), int(match["pages"]))
            puffs.append(puff)
            bursts[-1].append(puff)
        elif match := _SUPPRESSED.match(line):
            suppressed.append((float(match["at"]), int(match["count"])))
            bursts.append([])
    return PuffLog(tuple(puffs), tuple(tuple(burst) for burst in bursts if burst), tuple(suppressed))


def pages_per_guest_page(guest_page_size: int) -> int:
    """VIRTIO_BALLOON_PAGES_PER_PAGE: 4 KiB balloon pages in one guest page, the N of every "Out of puff" line."""
    return guest_page_size // PAGE_SIZE
