"""What a driver MAY do, and the byte order a legacy driver uses: the device takes each (over qtest).

BAL-DRV-OP-3 (inflate while num_pages is not above actual), BAL-DRV-ACT-2 (actual written once after several
buffers), BAL-DRV-ST-6 (stats entries in any order), BAL-LEG-ST-END and BAL-LEG-FPH-END (guest-native byte
order over the legacy interface), BAL-DEV-LEG-FEAT-2 (pages used before the host is told).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from vballoon.qemu.qtest_machine import STATSQ, QtestBalloon, QtestMachine
from vballoon.spec import (CMD_ID_FIRST, Feature, PAGE_SIZE, PFN_SHIFT, STAT_UNSET, STATS, ConfigField, Status, StatTag,
                           encode_cmd_id, encode_stats)
from vballoon.virtqueue import Buffer
from vballoon.waiting import wait_for

LEGACY_INTERFACES = tuple(case for case in TRANSPORTS if case.legacy_interface)
QOM_KEYS = {info.qom_key: info.tag for info in STATS}
PATTERN = 0x5A
STATS_TIMEOUT = 5.0
POLLING_INTERVAL_S = 1
RETURN_TIMEOUT = 10.0  # one 1 s polling interval under TCG, with room for a loaded host
MIGRATION_TIMEOUT = 60.0


def _needs_reset(balloon: QtestBalloon) -> bool:
    return bool(balloon.driver.status & Status.DEVICE_NEEDS_RESET)


@pytest.mark.req("BAL-DRV-OP-3")
@over(TRANSPORTS)
def test_inflate_while_num_pages_equals_actual_is_used(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """num_pages = actual = 0, and the driver supplies pages anyway (it MAY): the device uses both buffers and
    reports no device error.
    (Broken on purpose: the second inflate posted without a notify is never used, and the wait fails.)"""
    balloon.start()
    num_pages, actual = balloon.config_field(ConfigField.NUM_PAGES), balloon.config_field(ConfigField.ACTUAL)
    assert (num_pages, actual) == (0, 0), f"a fresh device should show num_pages = actual = 0, got {num_pages}, {actual}"
    for _ in range(2):
        balloon.inflate([balloon.new_page(PATTERN) >> PFN_SHIFT])
    assert not _needs_reset(balloon), (f"BAL-DRV-OP-3: inflating while num_pages ({num_pages}) = actual ({actual}) "
                                       f"is allowed; the device set DEVICE_NEEDS_RESET (status "
                                       f"{balloon.driver.status:#x})")
    assert qtest_machine.device_errors() == [], f"BAL-DRV-OP-3: unexpected device error {qtest_machine.device_errors()}"


@pytest.mark.req("BAL-DRV-ACT-2")
@over(TRANSPORTS)
def test_actual_written_once_after_several_buffers(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """Three inflates and two deflates, then one write of actual (the net 4 pages): query-balloon reports RAM less
    those 4 pages, and nothing changed it before the write. (Broken on purpose: writing 5 fails the check.)"""
    balloon.start()
    ram = qtest_machine.ram_bytes
    qtest_machine.host_balloon.set_target(ram - 6 * PAGE_SIZE)
    pfns = [balloon.new_page(PATTERN) >> PFN_SHIFT for _ in range(6)]
    balloon.inflate(pfns[:3])
    balloon.deflate(pfns[:1])
    balloon.inflate(pfns[3:])
    balloon.deflate(pfns[1:2])
    before = qtest_machine.host_balloon.query_balloon()
    assert before == ram, f"BAL-DRV-ACT-2: actual is the driver's to write; before the write query-balloon says {before}"
    net = 4
    balloon.driver.config_write(ConfigField.ACTUAL, 4, net)
    wanted = ram - net * PAGE_SIZE
    wait_for(lambda: qtest_machine.host_balloon.query_balloon() == wanted, STATS_TIMEOUT,
             f"BAL-DRV-ACT-2: query-balloon actual {wanted} after one write of actual = {net}",
             describe_last=lambda: f"actual {qtest_machine.host_balloon.query_balloon()}")


def _expected(reported: dict[str, int], entries: list[tuple[int, int]]) -> dict[str, int]:
    values = dict(entries)
    return {key: values.get(QOM_KEYS[key], STAT_UNSET) for key in reported}


def _stats_round(balloon: QtestBalloon, qtest_machine: QtestMachine, data: bytes, wanted: dict[str, int],
                 requirement: str) -> None:
    """Hand the device one stats buffer, wait until guest-stats shows `wanted`, then have QEMU ask for stats at once
    and wait for the buffer to come back."""
    head = balloon.post(STATSQ, [data])
    wait_for(lambda: balloon.guest_stats()["stats"] == wanted, STATS_TIMEOUT,
             f"{requirement}: guest-stats to show {wanted}", describe_last=lambda: str(balloon.guest_stats()["stats"]))
    qtest_machine.host_balloon.request_stats_now(POLLING_INTERVAL_S)
    (used,) = balloon.driver.wait_used(STATSQ, 1, RETURN_TIMEOUT)
    assert used.id == head, f"device used head {used.id}, expected {head}"


def _start_stats(balloon: QtestBalloon, qtest_machine: QtestMachine) -> dict[str, int]:
    """DRIVER_OK, polling every second, a first buffer through (a legacy device may ignore the first's values);
    the stats QEMU reports."""
    balloon.start()
    qtest_machine.host_balloon.set_stats_polling_interval(POLLING_INTERVAL_S)
    balloon.exchange(STATSQ, [encode_stats([(StatTag.MEMFREE, 1)], balloon.driver.endian)], timeout=RETURN_TIMEOUT)
    return dict(balloon.guest_stats()["stats"])


@pytest.mark.req("BAL-DRV-ST-6")
@over(TRANSPORTS)
def test_stats_entries_in_any_order_give_the_same_values(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """The same six entries in three orders (tags ascending, descending, interleaved), each round with its own
    values: every round shows exactly its values. (Broken on purpose: expecting round 0's values in round 1.)"""
    reported = _start_stats(balloon, qtest_machine)
    tags = [StatTag.SWAP_IN, StatTag.SWAP_OUT, StatTag.MAJFLT, StatTag.MINFLT, StatTag.MEMFREE, StatTag.MEMTOT]
    orders = [sorted(tags), sorted(tags, reverse=True), tags[1::2] + tags[0::2]]
    for round_, order in enumerate(orders):
        entries = [(tag, 1000 * (round_ + 1) + tag) for tag in order]
        _stats_round(balloon, qtest_machine, encode_stats(entries, balloon.driver.endian), _expected(reported, entries),
                     f"BAL-DRV-ST-6 (order {[int(t) for t in order]})")


@pytest.mark.req("BAL-LEG-ST-END")
@over(LEGACY_INTERFACES)
def test_legacy_stats_are_read_in_guest_native_byte_order(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """Over the legacy interface on x86 (little endian) a buffer of little-endian tags and values reads back as
    written, values chosen so that any other byte order reads differently. (Broken on purpose: encoded big
    endian, no known tag is found and every stat stays unset.)"""
    reported = _start_stats(balloon, qtest_machine)
    entries = [(StatTag.MEMFREE, 0x0102030405060708), (StatTag.MEMTOT, 0x1122334455667788)]
    _stats_round(balloon, qtest_machine, encode_stats(entries, "little"), _expected(reported, entries),
                 "BAL-LEG-ST-END")


@pytest.mark.req("BAL-DEV-LEG-FEAT-2")
@over(LEGACY_INTERFACES)
def test_inflated_page_is_usable_before_the_deflate(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """MUST_TELL_HOST not negotiated (QEMU never offers it): after an inflate the driver writes a pattern into the
    page without deflating; it reads back intact (the host did not keep the page from the guest), and the deflate
    that follows is used. (Broken on purpose: reading back after a second inflate of the page finds zeros.)"""
    balloon.start()
    page = balloon.new_page(PATTERN)
    balloon.inflate([page >> PFN_SHIFT])
    qtest_machine.qtest.memset(page, PAGE_SIZE, PATTERN ^ 0xFF)
    data = qtest_machine.qtest.read(page, PAGE_SIZE)
    assert data == bytes([PATTERN ^ 0xFF]) * PAGE_SIZE, (
        f"BAL-DEV-LEG-FEAT-2: a page written after its inflate should read back {PATTERN ^ 0xFF:#04x}, "
        f"got {sorted(set(data))}")
    balloon.deflate([page >> PFN_SHIFT])
    assert not _needs_reset(balloon) and qtest_machine.device_errors() == []


HINTING_LEGACY = tuple(DeviceVariant(replace(case.variant, free_page_hint=True), case.legacy_interface)
                       for case in LEGACY_INTERFACES if case.variant.transport == "transitional")
HINTED_PAGES = 512
# Measured on QEMU 7.2: the migration sends 36 normal pages besides these (firmware stub, rings, buffers) when the
# hint started, 523 when it did not; the check allows a quarter of the hinted pages.
SLOW_MIGRATION_BYTES_PER_S = 1 << 20


def _normal_pages_migrated(balloon: QtestBalloon, qtest_machine: QtestMachine, cmd_id_bytes: bytes) -> int:
    """Fill HINTED_PAGES pages with a pattern, start a slow migration, answer the hint request with `cmd_id_bytes`
    and the pages as hints, let the migration finish; the pages it sent that were not zero."""
    balloon.start()
    region = balloon.driver.allocator.alloc(HINTED_PAGES * PAGE_SIZE, align=PAGE_SIZE)
    qtest_machine.qtest.memset(region, HINTED_PAGES * PAGE_SIZE, PATTERN)
    qmp = qtest_machine.qmp
    qmp.command("migrate-set-parameters", **{"max-bandwidth": SLOW_MIGRATION_BYTES_PER_S})
    qmp.command("migrate", uri="exec:cat > /dev/null")
    wait_for(lambda: balloon.config_field(ConfigField.FREE_PAGE_HINT_CMD_ID) == CMD_ID_FIRST, MIGRATION_TIMEOUT,
             "the first hint request", interval=0.005)
    balloon.exchange(balloon.queue_index(Feature.FREE_PAGE_HINT), [cmd_id_bytes], [Buffer(region, HINTED_PAGES * PAGE_SIZE)])
    qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    wait_for(lambda: qmp.command("query-migrate")["status"] in ("completed", "failed"), MIGRATION_TIMEOUT,
             "the migration to finish")
    status = qmp.command("query-migrate")
    assert status["status"] == "completed", f"migration ended {status}"
    return int(status["ram"]["normal"])


@pytest.mark.req("BAL-LEG-FPH-END")
@over(HINTING_LEGACY)
def test_legacy_command_id_in_guest_native_byte_order_starts_hinting(
        balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """Over the legacy interface on x86 the command id 0x80000001 written little endian starts hinting: the
    pattern pages given as hints are left out of the migration (at most a quarter of them sent, those that went
    before the hint). (Broken on purpose: the id written big endian is not the request's; all pages are sent.)"""
    sent = _normal_pages_migrated(balloon, qtest_machine, encode_cmd_id(CMD_ID_FIRST, "little"))
    assert sent < HINTED_PAGES // 4, (
        f"BAL-LEG-FPH-END: a little-endian command id should start hinting so that the {HINTED_PAGES} hinted pages "
        f"are not migrated; the migration sent {sent} normal pages")
