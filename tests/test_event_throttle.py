"""The BALLOON_CHANGE pacing checks guest tests use (QEMU's monitor throttling, BAL-DRV-ACT-1), on event
sequences of our own: QEMU's own pacing passes, each way of breaking it is named."""

from __future__ import annotations

from vballoon.qemu.event_throttle import RATE_LIMIT_S, Change, pacing_problems

MIB = 1 << 20
SLACK = 0.1


def _throttled(changes_at: list[tuple[float, int]], interval: float = RATE_LIMIT_S) -> list[Change]:
    """What QEMU's monitor sends for actual values changing at the given times (monitor_qapi_event_queue_no_reenter
    and monitor_qapi_event_handler): the first at once, then the newest held one at each period's end; the
    host looks at the socket 3 ms before and 2 ms after each sending."""
    sent: list[Change] = []
    period_end: float | None = None
    held: tuple[float, int] | None = None
    for at, actual in [*changes_at, (float("inf"), 0)]:
        while period_end is not None and period_end <= at:
            if held is None:
                period_end = None
                break
            sent.append(Change(held[1], held[0], period_end - 0.003, period_end + 0.002))
            held, period_end = None, period_end + interval
        if at == float("inf"):
            break
        if period_end is None:
            sent.append(Change(actual, at, at - 0.003, at + 0.002))
            period_end = at + interval
        else:
            held = (at, actual)
    return sent


def _inflate(start: float, rounds: int, every: float) -> list[tuple[float, int]]:
    """An inflate writing actual every `every` seconds, one MiB less each time."""
    return [(start + i * every, (512 - i) * MIB) for i in range(1, rounds + 1)]


def test_qemu_pacing_passes() -> None:
    changes = _throttled(_inflate(100.0, 400, 0.01))
    assert len(changes) == 5 and changes[-1].actual == 112 * MIB
    assert pacing_problems(changes, SLACK) == []


def test_unthrottled_events_are_named() -> None:
    """Every change sent at once, as with no rate limit: too close by receive time and by timestamps."""
    changes = [Change(actual, at, at - 0.003, at + 0.002) for at, actual in _inflate(100.0, 5, 0.01)]
    problems = pacing_problems(changes, SLACK)
    assert any("sent at most 0.015 s apart" in p for p in problems), problems
    assert any("three events raised within 0.020000 s" in p for p in problems), problems


def test_a_throttle_with_a_shorter_period_is_named() -> None:
    """A 0.5 s period: the events are too close for QEMU's 1 s."""
    changes = _throttled(_inflate(100.0, 400, 0.01), interval=0.5)
    assert any("sent at most 0.505 s apart" in p for p in pacing_problems(changes, SLACK))


def test_held_back_events_carry_their_raise_time_and_pass() -> None:
    """Consecutive held events are raised less than a period apart (the third check takes k-1 and k+1)."""
    changes = _throttled([(100.0, 500 * MIB), (100.1, 499 * MIB), (101.05, 498 * MIB), (102.02, 497 * MIB)])
    assert [c.raised for c in changes] == [100.0, 100.1, 101.05, 102.02]
    assert changes[3].raised - changes[2].raised < RATE_LIMIT_S
    assert pacing_problems(changes, SLACK) == []


def test_an_event_held_longer_than_a_period_is_named() -> None:
    changes = [Change(500 * MIB, 100.0, 99.997, 100.002), Change(499 * MIB, 100.1, 101.495, 101.5)]
    assert pacing_problems(changes, SLACK) == [
        "actual 523239424 sent at least 1.395 s after QEMU raised it, expected at most 1 s plus 0.1 s of slack"]


def test_a_value_announced_twice_is_named() -> None:
    changes = [Change(500 * MIB, 100.0, 99.997, 100.002), Change(500 * MIB, 100.5, 100.997, 101.002)]
    assert pacing_problems(changes, SLACK) == ["actual 524288000 announced twice in a row (raised at 100.500000)"]


def test_a_host_stalled_while_reading_is_not_taken_for_qemu() -> None:
    """QEMU sends at 100.0 and 101.0; the host's look at 99.997 is followed by a 1.5 s stall, so it reads the
    first event at 101.5, with the second: received together, yet sent at least 1 s apart, neither late."""
    changes = [Change(500 * MIB, 100.0, 99.997, 101.5), Change(499 * MIB, 100.5, 99.997, 101.5)]
    assert pacing_problems(changes, SLACK) == []


def test_an_event_already_sent_at_the_look_before_is_within_the_slack() -> None:
    """The reader took one look too many to see the first event (sent at 100.0, looked at 100.002 without it):
    the second, sent 1 s later, is 0.998 s after that look, within the slack and not within none."""
    changes = [Change(500 * MIB, 100.0, 100.002, 100.007), Change(499 * MIB, 100.5, 100.997, 101.0)]
    assert pacing_problems(changes, SLACK) == []
    assert len(pacing_problems(changes, 0.0)) == 1
