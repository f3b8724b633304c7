"""Waiting for a condition with a deadline: the only way vballoon waits.

Under TCG every step takes an unpredictable time, so nothing sleeps for a
fixed period: callers poll a condition until it holds or the deadline passes,
and the timeout message says what was awaited and what was last seen.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """A condition did not hold before its deadline."""


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.05,
    describe_last: Callable[[], str] | None = None,
    max_interval: float = 1.0,
) -> T:
    """Call `probe` until it returns something other than None/False, or time out.

    The interval grows from `interval` to at most `max_interval` (1 s by default) so
    short waits are cheap and long ones do not spin.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        now = time.monotonic()
        if now >= deadline:
            last = f"; last seen: {describe_last()}" if describe_last else ""
            raise DeadlineExceeded(f"timed out after {timeout:g} s waiting for {what}{last}")
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 1.5, max_interval)
