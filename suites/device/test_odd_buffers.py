"""Buffers the device handles on paths of their own: a report that is not a whole number of pages, and a stats
notification with no buffer in the queue (both found unrun by `vballoon bench qemu-coverage`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from suites.device.test_stats import expected_stats, start_with_stats, wait_for_stats
from vballoon.qemu.qtest_machine import STATSQ, QtestBalloon, QtestMachine
from vballoon.spec import PAGE_SIZE, Feature, Status, StatTag, encode_stats
from vballoon.virtqueue import Buffer

FILL = 0xAA
REPORTING = tuple(DeviceVariant(replace(case.variant, free_page_reporting=True, page_poison=False),
                                case.legacy_interface) for case in TRANSPORTS)


@pytest.mark.req("BAL-DEV-FPR-1")
@over(REPORTING)
def test_a_report_ending_mid_page_leaves_the_rest_of_the_page_alone(balloon: QtestBalloon,
                                                                    qtest_machine: QtestMachine) -> None:
    """The device may modify reported pages only: of a report of one and a half pages, the unreported half page
    keeps its bytes. Broken once on purpose: reporting the two whole pages made QEMU discard the half, and this
    failed."""
    balloon.start()
    block = balloon.new_page(FILL)
    balloon.new_page(FILL)
    reported = PAGE_SIZE + PAGE_SIZE // 2
    used = balloon.exchange(balloon.queue_index(Feature.REPORTING), [], [Buffer(block, reported)])
    assert used.length == 0, f"expected used length 0 for a reporting buffer, got {used.length}"
    rest = qtest_machine.qtest.read(block + reported, PAGE_SIZE // 2)
    assert rest == bytes([FILL]) * len(rest), \
        f"BAL-DEV-FPR-1: the unreported half page at {block + reported:#x} changed ({rest.count(FILL)} bytes kept)"
    assert not balloon.driver.status & Status.DEVICE_NEEDS_RESET, f"device failed: status {balloon.driver.status:#x}"


@pytest.mark.req("BAL-DEV-ST-1", "BAL-DRV-ST-2")
@over(TRANSPORTS)
def test_a_stats_notification_without_a_buffer_changes_nothing(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                               device_variant: DeviceVariant) -> None:
    """A notification of an empty statsq is ignored: the next buffer's entries are the stats. Broken once on
    purpose: posting the first entry only and waiting for both, this failed."""
    start_with_stats(balloon, qtest_machine, device_variant.legacy_interface)
    balloon.driver.notify(STATSQ)
    assert not balloon.driver.status & Status.DEVICE_NEEDS_RESET, f"device failed: status {balloon.driver.status:#x}"
    entries = [(StatTag.MEMFREE, 1 << 28), (StatTag.MEMTOT, 1 << 30)]
    balloon.post(STATSQ, [encode_stats(entries, balloon.driver.endian)])
    wait_for_stats(balloon, expected_stats(balloon.guest_stats()["stats"], entries))
