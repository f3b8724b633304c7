"""Memory statistics as the device keeps them, and the polling timer.

One buffer is parsed per report; the values are what `qom-get guest-stats`
shows.  Time comes from an injected clock (seconds), so results are
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vballoon.reference.errors import RequestRejected
from vballoon.spec import LINUX_S_NR, STAT_UNSET, STATS, Endian, decode_stats

Clock = Callable[[], float]
MAX_POLL_INTERVAL = 0xFFFFFFFF


@dataclass
class StatsState:
    """Latest statistics, the time they came, and the polling timer."""

    clock: Clock
    stat_count: int = LINUX_S_NR
    """Tags below this are recognised; the rest are ignored (BAL-DEV-ST-1)."""

    def __post_init__(self) -> None:
        self.values = [STAT_UNSET] * self.stat_count
        self.last_update = 0
        self.poll_interval = 0
        self.poll_deadline: float | None = None
        self.buffers_seen = 0

    def receive(self, data: bytes, endian: Endian, *, legacy: bool) -> None:
        """Take the statistics of one buffer from the stats queue.

        Values are reset first, so an omitted or empty buffer clears them and
        still updates last-update (QEMU 7.2 and 10.0).  Entries may come in any order
        (BAL-DEV-ST-2); unknown tags are ignored (BAL-DEV-ST-1); a duplicate
        tag's last value wins; a trailing partial entry is ignored.  A legacy
        device ignores the values of the first buffer (BAL-DEV-LEG-ST-FIRST):
        the driver filled it before it had statistics.
        """
        self.buffers_seen += 1
        if not (legacy and self.buffers_seen == 1):
            self.values = [STAT_UNSET] * self.stat_count
            for tag, value in decode_stats(data, endian).entries:
                if tag < self.stat_count:
                    self.values[tag] = value
            self.last_update = int(self.clock())
        self.rearm()

    def rearm(self) -> None:
        """Restart the polling timer after a report, if polling is on."""
        if self.poll_interval:
            self.poll_deadline = self.clock() + self.poll_interval

    def set_poll_interval(self, seconds: int) -> None:
        """Set guest-stats-polling-interval with QEMU's validation (7.2 and 10.0): negative and above 2^32-1
        refused; 0 stops polling."""
        if seconds < 0:
            raise RequestRejected(f"polling interval {seconds} refused: it must not be negative")
        if seconds > MAX_POLL_INTERVAL:
            raise RequestRejected(f"polling interval {seconds} refused: it must fit in 32 bits")
        if seconds == self.poll_interval:
            return
        if seconds == 0:
            self.poll_interval, self.poll_deadline = 0, None
            return
        # A new timer fires at once; a running one restarts with the new interval.
        self.poll_deadline = self.clock() + (seconds if self.poll_interval else 0)
        self.poll_interval = seconds

    def timer_due(self) -> bool:
        return self.poll_deadline is not None and self.clock() >= self.poll_deadline

    def guest_stats(self) -> dict[str, object]:
        """The value of QOM property guest-stats: last-update and one key per recognised tag."""
        return {
            "last-update": self.last_update,
            "stats": {STATS[tag].qom_key: value for tag, value in enumerate(self.values)},
        }
