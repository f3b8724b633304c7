"""QEMU's rate limit of BALLOON_CHANGE, judged from the events a host received (BAL-DRV-ACT-1 reaches the host
through them).

monitor_qapi_event_conf (monitor/monitor.c, QEMU 7.2 and 10.0.13) throttles BALLOON_CHANGE to one per 1000 ms of
QEMU_CLOCK_REALTIME: an event with no throttle period running goes out at once and opens a period; one raised
during a period is held, a later one replacing it, and goes out when the period ends, opening the next. So the
host gets at most one event per interval, and the last value always arrives, at most one interval late. This is
QEMU's behaviour, not the specification's: the interval is QEMU's constant, taken as read in its source.

Each event's "timestamp" is the wall-clock time QEMU built it (qmp_event_build_dict, qapi/qmp-event.c), not the
time it went out: a held event keeps the time it was raised. Hence these checks, each able to fail:

- one event per value: a held event replaces the one before it, so no value is announced twice in a row while
  actual moves one way;
- sent times: QEMU sent an event after the host's look at the socket before the one that found it, and by that
  look; so the next event's receipt, less this event's previous look, is at least one interval (less the slack);
- QEMU's timestamps: event k+1 was raised after event k went out (raising and sending both hold the BQL), which
  was one interval after event k-1 went out, so events k-1 and k+1 are at least one interval apart by QEMU's own
  clock, with nothing of the host's in it;
- delivery: no event was still unsent one interval (plus the slack) after QEMU raised it.

Bounding each sending time between two looks keeps a host that stalls while reading from looking like QEMU
sending early or late.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

RATE_LIMIT_S = 1.0
"""QEMU's BALLOON_CHANGE period (monitor_qapi_event_conf: 1000 * SCALE_MS, QEMU 7.2 and 10.0.13)."""
CLOCK_SLACK_S = 0.001
"""The timestamps are g_get_real_time (wall clock), the period runs on the monotonic clock: they part only by
NTP slewing, at most 500 ppm, 0.5 ms a second."""


@dataclass(frozen=True)
class Change:
    """One BALLOON_CHANGE: its actual (bytes), when QEMU raised it, and between which two of the host's looks at
    the socket it arrived (epoch seconds)."""

    actual: int
    raised: float
    sent_after: float
    received: float

    @classmethod
    def of(cls, event: dict[str, Any], sent_after: float, received: float) -> Change:
        stamp = event["timestamp"]
        return cls(int(event["data"]["actual"]), stamp["seconds"] + stamp["microseconds"] / 1e6, sent_after,
                   received)


def pacing_problems(changes: list[Change], slack: float, interval: float = RATE_LIMIT_S) -> list[str]:
    """What in `changes` breaks QEMU's throttling of `interval` seconds, one line each; `slack` is how late QEMU's
    timer may fire and how long a sent event may wait for the host's look after next."""
    problems = []
    for earlier, later in itertools.pairwise(changes):
        if later.actual == earlier.actual:
            problems.append(f"actual {later.actual} announced twice in a row (raised at {later.raised:.6f})")
        if later.received - earlier.sent_after < interval - slack:
            problems.append(f"events sent at most {later.received - earlier.sent_after:.3f} s apart, expected at "
                            f"least {interval:g} s less {slack:g} s of slack (actual {later.actual})")
    for before, after in zip(changes, changes[2:], strict=False):
        if after.raised - before.raised < interval - CLOCK_SLACK_S:
            problems.append(f"three events raised within {after.raised - before.raised:.6f} s by QEMU's "
                            f"timestamps, expected at least {interval:g} s from the first to the third "
                            f"(actual {before.actual} to {after.actual})")
    for change in changes:
        if change.sent_after - change.raised > interval + slack:
            problems.append(f"actual {change.actual} sent at least {change.sent_after - change.raised:.3f} s after "
                            f"QEMU raised it, expected at most {interval:g} s plus {slack:g} s of slack")
    return problems
