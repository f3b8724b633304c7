"""Statistics buffers sent to QEMU's balloon over qtest, read back through `qom-get guest-stats`."""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, expect_conformance, over
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
    qtest_machine.qmp.command("qom-set", path=qtest_machine.balloon_qom_path(),
                              property="guest-stats-polling-interval", value=POLLING_INTERVAL_S)
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
    qtest_machine.qmp.command("qom-set", path=qtest_machine.balloon_qom_path(),
                              property="guest-stats-polling-interval", value=POLLING_INTERVAL_S)
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
    (device,) = [d for d in qtest_machine.qmp.command("x-query-virtio") if d["name"] == "virtio-balloon"]
    wait_for(lambda: qtest_machine.qmp.command("x-query-virtio-queue-status", path=device["path"],
                                               queue=STATSQ)["last-avail-idx"] == 1,
             STATS_TIMEOUT, "QEMU to take the first stats buffer")
    got = balloon.guest_stats()
    expect_conformance(got["last-update"] == 0 and got["stats"]["stat-free-memory"] == STAT_UNSET,
                       "BAL-DEV-LEG-ST-FIRST", qtest_machine.qemu,
                       f"the first buffer's MEMFREE=1234 reached guest-stats: {got}")
