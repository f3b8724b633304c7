"""The reading of the driver's "Out of puff" lines that the back-off test uses (BAL-DRV-OP-1), on kernel logs of
our own in Linux 6.1's format."""

from __future__ import annotations

import pytest

from vballoon.guest.out_of_puff import pages_per_guest_page, parse


def _puff(at: float, pages: int = 1) -> str:
    return f"[{at:12.6f}] virtio_balloon virtio1: Out of puff! Can't get {pages} pages"


def _suppressed(at: float, count: int) -> str:
    return f"[{at:12.6f}] fill_balloon: {count} callbacks suppressed"


def test_bursts_split_at_suppressed_lines_and_intervals_stay_within_them() -> None:
    log = parse("\n".join([
        "[    1.000000] virtio_balloon virtio1: something else",
        _puff(5.0), _puff(5.2), _puff(5.41),
        _suppressed(10.1, 20),
        _puff(10.1), _puff(10.31, pages=2),
    ]))
    assert [len(burst) for burst in log.bursts] == [3, 2]
    assert [round(i, 3) for i in log.retry_intervals()] == [0.2, 0.21, 0.21]
    assert log.suppressed == ((10.1, 20),)
    assert [p.pages for p in log.puffs] == [1, 1, 1, 1, 2]


def test_first_window_cadence_counts_the_dropped_rounds() -> None:
    """3 printed and 21 dropped rounds between 5.0 s and the next window's first round at 10.0 s: 24 intervals."""
    log = parse("\n".join([_puff(5.0), _puff(5.2), _puff(5.4), _suppressed(10.0, 21), _puff(10.0)]))
    assert log.first_window_cadence() == pytest.approx(5.0 / 24)


def test_a_driver_that_stops_printing_has_no_cadence_and_no_intervals() -> None:
    log = parse(_puff(5.0))
    assert log.first_window_cadence() is None and log.retry_intervals() == []
    assert parse("").puffs == ()


def test_a_driver_without_its_sleep_shows_intervals_below_it() -> None:
    """Rounds 10 ms apart: what a driver that retries without msleep(200) would print."""
    log = parse("\n".join(_puff(5.0 + i / 100) for i in range(10)))
    assert max(log.retry_intervals()) < 0.2


def test_pages_per_guest_page() -> None:
    assert pages_per_guest_page(4096) == 1 and pages_per_guest_page(65536) == 16
