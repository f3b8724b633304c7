"""Statistics buffers sent to QEMU's balloon over qtest, read back through `qom-get guest-stats`."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, expect_conformance, over
from vballoon.qemu.balloon import polling_interval_command
from vballoon.qemu.qtest_machine import STATSQ, QtestBalloon, QtestMachine
from vballoon.spec import STAT_UNSET, STATS, StatTag, encode_stats
from vballoon.waiting import wait_for

QOM_KEYS = {info.qom_key: info.tag for info in STATS}
STATS_TIMEOUT = 5.0
POLLING_INTERVAL_S = 1
RETURN_TIMEOUT = 10.0  # one polling interval under TCG, with room for a loaded host

LEGACY_INTERFACES = tuple(case for case in TRANSPORTS if case.legacy_interface)


def expected_stats(reported_keys: dict[str, Any], entries: list[tuple[int, int]]) -> dict[str, int]:
    """What guest-stats should show for `entries`: the last value per known tag, unset elsewhere."""
    values = dict(entries)
    return {key: values.get(QOM_KEYS[key], STAT_UNSET) for key in reported_keys}


def wait_for_stats(balloon: QtestBalloon, wanted: dict[str, int]) -> dict[str, Any]:
    """guest-stats once its stats equal `wanted` (the device parses the buffer after the notify)."""

    def shown() -> dict[str, Any] | None:
        got = balloon.guest_stats()
        return got if got["stats"] == wanted else None

    return wait_for(shown, STATS_TIMEOUT, f"guest-stats to show {wanted}",
                    describe_last=lambda: str(balloon.guest_stats()))


def start_with_stats(balloon: QtestBalloon, qtest_machine: QtestMachine, legacy: bool) -> None:
    """DRIVER_OK; on the legacy interface also hand over the first buffer, whose values the device may ignore,
    and wait for it to come back, so that the next buffer is an ordinary one."""
    balloon.start()
    if not legacy:
        return
    qtest_machine.host_balloon.set_stats_polling_interval(POLLING_INTERVAL_S)
    balloon.exchange(STATSQ, [encode_stats([(StatTag.MEMFREE, 1)])], timeout=RETURN_TIMEOUT)


@pytest.mark.req("BAL-DEV-ST-1", "BAL-DEV-ST-2", "BAL-DRV-ST-5")
@over(TRANSPORTS)
def test_unknown_tags_any_order_and_a_partial_tail(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                   device_variant: DeviceVariant) -> None:
    """Entries in any order are all taken, unknown tags ignored, bytes short of a whole entry ignored."""
    start_with_stats(balloon, qtest_machine, device_variant.legacy_interface)
    entries = [(StatTag.MEMTOT, 1 << 30), (99, 5), (StatTag.SWAP_IN, 7), (0xFFFF, 9), (16, 3),
               (StatTag.OOM_KILL, 4), (StatTag.MEMFREE, 1 << 29), (StatTag.MAJFLT, 2)]
    data = encode_stats(entries, balloon.driver.endian) + bytes(4)
    balloon.post(STATSQ, [data])
    reported = balloon.guest_stats()["stats"]
    got = wait_for_stats(balloon, expected_stats(reported, entries))
    assert got["last-update"] > 0, f"last-update should be set once a buffer was parsed: {got}"


@pytest.mark.req("BAL-DEV-ST-2")
@over(TRANSPORTS)
def test_a_later_buffer_replaces_every_value(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                             device_variant: DeviceVariant) -> None:
    """Stats absent from the next buffer read as unset again; a duplicated tag takes its last value."""
    start_with_stats(balloon, qtest_machine, device_variant.legacy_interface)
    qtest_machine.host_balloon.set_stats_polling_interval(POLLING_INTERVAL_S)
    reported = balloon.guest_stats()["stats"]
    first = [(StatTag.CACHES, 11), (StatTag.AVAIL, 12)]
    balloon.exchange(STATSQ, [encode_stats(first, balloon.driver.endian)], timeout=RETURN_TIMEOUT)
    wait_for_stats(balloon, expected_stats(reported, first))
    second = [(StatTag.AVAIL, 21), (StatTag.SWAP_OUT, 22), (StatTag.AVAIL, 23)]
    balloon.post(STATSQ, [encode_stats(second, balloon.driver.endian)])
    wait_for_stats(balloon, expected_stats(reported, second))


@pytest.mark.req("BAL-DEV-LEG-ST-FIRST")
@over(LEGACY_INTERFACES)
def test_legacy_first_buffer_values_are_ignored(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """On the legacy interface the device SHOULD ignore the values of the first stats buffer."""
    balloon.start()
    balloon.post(STATSQ, [encode_stats([(StatTag.MEMFREE, 1234)], balloon.driver.endian)])
    # The buffer is parsed, if at all, when QEMU handles the notify; the queue's last-avail-idx shows that.
    path = qtest_machine.host_balloon.virtio_path()
    wait_for(lambda: qtest_machine.qmp.command("x-query-virtio-queue-status", path=path,
                                               queue=STATSQ)["last-avail-idx"] == 1,
             STATS_TIMEOUT, "QEMU to take the first stats buffer")
    got = balloon.guest_stats()
    expect_conformance(got["last-update"] == 0 and got["stats"]["stat-free-memory"] == STAT_UNSET,
                       "BAL-DEV-LEG-ST-FIRST", qtest_machine.qemu,
                       f"the first buffer's MEMFREE=1234 reached guest-stats: {got}")


MODERN_INTERFACES = tuple(case for case in TRANSPORTS if not case.legacy_interface)
HELD_RETURN_TIMEOUT = 2.0  # well under any polling interval: the device returns the held buffer at once
NO_WHOLE_ENTRY = bytes(4)  # a stats buffer shorter than one 10-byte entry


@pytest.mark.req("BAL-DRV-ST-7", "BAL-DEV-ST-2")
@over(MODERN_INTERFACES)
def test_a_buffer_without_entries_clears_the_stats_and_updates_last_update(balloon: QtestBalloon) -> None:
    """An empty subset of statistics (BAL-DRV-ST-7 lets the driver send one): QEMU resets every value to unset
    and still stamps last-update. (A 0-byte buffer is a zero-length descriptor, a ring error, not a subset.)"""
    balloon.start()
    reported = balloon.guest_stats()["stats"]
    first = [(StatTag.MEMFREE, 5), (StatTag.MEMTOT, 6)]
    balloon.post(STATSQ, [encode_stats(first)])
    before = wait_for_stats(balloon, expected_stats(reported, first))["last-update"]
    balloon.post(STATSQ, [NO_WHOLE_ENTRY])
    got = wait_for_stats(balloon, expected_stats(reported, []))
    assert got["last-update"] >= before > 0, \
        f"BAL-DEV-ST-2: last-update should be stamped again (was {before}), got {got['last-update']}"


@pytest.mark.req("BAL-DRV-ST-1")
@over(MODERN_INTERFACES)
def test_a_second_buffer_returns_the_held_one_at_once(balloon: QtestBalloon) -> None:
    """A driver breaking BAL-DRV-ST-1 (two buffers available): QEMU hands the held buffer back at once,
    without waiting for a poll, parses the new one and holds it."""
    balloon.start()
    held = balloon.post(STATSQ, [encode_stats([(StatTag.MEMFREE, 1)])])
    balloon.post(STATSQ, [encode_stats([(StatTag.MEMFREE, 2)])])
    used = balloon.driver.wait_used(STATSQ, 1, HELD_RETURN_TIMEOUT)
    assert [u.id for u in used] == [held], f"BAL-DRV-ST-1: expected the held buffer {held} back, got {used}"
    reported = balloon.guest_stats()["stats"]
    wait_for_stats(balloon, expected_stats(reported, [(StatTag.MEMFREE, 2)]))
    assert balloon.driver.queues[STATSQ].collect_used() == [], "the second buffer must stay held"


@pytest.mark.req("BAL-DRV-ST-2", "BAL-DEV-ST-2")
@over(MODERN_INTERFACES)
def test_a_buffer_after_device_reset_is_taken(balloon: QtestBalloon) -> None:
    """After a device reset and a new initialisation the driver's first buffer (BAL-DRV-ST-2) is parsed;
    the buffer held before the reset is not used on the new rings."""
    balloon.start()
    balloon.post(STATSQ, [encode_stats([(StatTag.MEMFREE, 1)])])
    reported = balloon.guest_stats()["stats"]
    wait_for_stats(balloon, expected_stats(reported, [(StatTag.MEMFREE, 1)]))
    balloon.start()
    after_reset = [(StatTag.SWAP_IN, 3), (StatTag.CACHES, 4)]
    balloon.post(STATSQ, [encode_stats(after_reset)])
    wait_for_stats(balloon, expected_stats(reported, after_reset))
    assert balloon.driver.queues[STATSQ].collect_used() == [], "the new buffer is held; nothing else is used"


@pytest.mark.req("BAL-DRV-ST-3")
@pytest.mark.parametrize("seconds, refused", [(-1, True), (1 << 32, True), ((1 << 32) - 1, False), (0, False)])
@over(TRANSPORTS[:1])
def test_polling_interval_values(qtest_machine: QtestMachine, seconds: int, refused: bool) -> None:
    """guest-stats-polling-interval: negative and above 2^32-1 refused (whatever the words), accepted values
    read back. (No requirement covers the host's polling; it is what makes the device use a stats buffer,
    after which the driver must refill, BAL-DRV-ST-3.)"""
    ((_, error),) = qtest_machine.qmp.try_commands([polling_interval_command(seconds)])
    assert bool(error) == refused, \
        f"BAL-DRV-ST-3: interval {seconds}: expected {'a refusal' if refused else 'no error'}, got {error!r}"
    shown = qtest_machine.host_balloon.stats_polling_interval()
    expected = 0 if refused else seconds
    assert shown == expected, f"BAL-DRV-ST-3: interval {seconds}: expected {expected} to read back, got {shown}"


@pytest.mark.req("BAL-DRV-ST-3")
@over(MODERN_INTERFACES)
def test_polling_returns_the_held_buffer(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """Setting an interval starts the timer at once: the held buffer comes back for the driver to refill."""
    balloon.start()
    held = balloon.post(STATSQ, [encode_stats([(StatTag.MEMFREE, 1)])])
    qtest_machine.host_balloon.set_stats_polling_interval(POLLING_INTERVAL_S)
    used = balloon.driver.wait_used(STATSQ, 1, RETURN_TIMEOUT)
    assert [u.id for u in used] == [held], f"BAL-DRV-ST-3: expected held buffer {held} back, got {used}"


@pytest.mark.req("BAL-DEV-ST-1")
@over(TRANSPORTS[:1])
def test_guest_stats_shape_for_every_tag(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """qom-get guest-stats with a value for each of the 16 tags Linux knows answers (QEMU 9.2-rc aborted on
    names of tags 10-15): one key per tag QEMU recognises, last-update in wall-clock seconds."""
    balloon.start()
    before = balloon.guest_stats()
    assert before["last-update"] == 0, f"no buffer yet: last-update should be 0, got {before['last-update']}"
    shown = set(before["stats"])
    assert shown == {info.qom_key for info in STATS[:len(shown)]}, \
        f"guest-stats keys should be the QOM keys of tags 0..{len(shown) - 1}: {sorted(shown)}"
    entries = [(info.tag, 100 + info.tag) for info in STATS]
    started = int(time.time())
    balloon.post(STATSQ, [encode_stats(entries)])
    got = wait_for_stats(balloon, expected_stats(before["stats"], entries))
    assert started <= got["last-update"] <= int(time.time()), \
        f"last-update {got['last-update']} should be the wall-clock second of the report (from {started})"
    qtest_machine.assert_healthy()


@pytest.mark.req("BAL-DEV-ST-2", "BAL-DRV-ST-2")
@over(TRANSPORTS[:1])
def test_after_system_reset_the_first_buffer_replaces_stale_values(balloon: QtestBalloon,
                                                                   qtest_machine: QtestMachine,
                                                                   device_variant: DeviceVariant) -> None:
    """QEMU 7.2 keeps guest-stats across system_reset (reset_stats runs only at realize and per buffer), 10.0
    clears them (virtio_balloon_reset_enter); either way the driver's first buffer after re-initialisation must
    replace every stale value."""
    balloon.start()
    reported = balloon.guest_stats()["stats"]
    stale = [(StatTag.MEMFREE, 7), (StatTag.MAJFLT, 8)]
    balloon.post(STATSQ, [encode_stats(stale)])
    wait_for_stats(balloon, expected_stats(reported, stale))
    qtest_machine.qmp.command("system_reset")
    reopened = QtestBalloon(qtest_machine, device_variant.legacy_interface)
    reopened.start()
    fresh = [(StatTag.AVAIL, 9)]
    reopened.post(STATSQ, [encode_stats(fresh)])
    wait_for_stats(reopened, expected_stats(reported, fresh))
