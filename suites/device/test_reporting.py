"""Free page reporting: what QEMU's balloon does to the pages a driver reports, with and without page poisoning."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.spec import PAGE_SIZE, Feature, feature_mask
from vballoon.virtqueue import Buffer

FILL = 0xAA
SENTINEL = 0x55
POISON_VAL = 0xAAAAAAAA  # every byte FILL: pages holding poison_val
REPORTED_PAGES = 2

REPORTING_WITHOUT_POISON = tuple(
    DeviceVariant(replace(case.variant, free_page_reporting=True, page_poison=False), case.legacy_interface)
    for case in TRANSPORTS)
REPORTING_WITH_POISON = tuple(
    DeviceVariant(replace(case.variant, free_page_reporting=True), case.legacy_interface) for case in TRANSPORTS)


def report_block(balloon: QtestBalloon) -> tuple[int, int, int]:
    """Sentinel page, a block of REPORTED_PAGES pages filled with FILL, sentinel page; reports the block.

    Returns (first sentinel, block, last sentinel) addresses.
    """
    before = balloon.new_page(SENTINEL)
    block = balloon.new_page(FILL)
    for _ in range(REPORTED_PAGES - 1):
        balloon.new_page(FILL)
    after = balloon.new_page(SENTINEL)
    used = balloon.exchange(balloon.queue_index(Feature.REPORTING), [], [Buffer(block, REPORTED_PAGES * PAGE_SIZE)])
    assert used.length == 0, f"QEMU writes used length 0 for reporting buffers, got {used.length}"
    return before, block, after


def assert_sentinels_intact(machine: QtestMachine, *pages: int) -> None:
    for page in pages:
        assert machine.qtest.read(page, PAGE_SIZE) == bytes([SENTINEL]) * PAGE_SIZE, \
            f"page {page:#x} next to the reported block changed"


@pytest.mark.req("BAL-DEV-FPR-1")
@over(REPORTING_WITHOUT_POISON)
def test_reported_pages_without_page_poison_read_zero(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """Without PAGE_POISON the device MAY modify reported pages; QEMU 7.2 and 10.0 discard them, so they read zero."""
    balloon.start()
    before, block, after = report_block(balloon)
    content = qtest_machine.qtest.read(block, REPORTED_PAGES * PAGE_SIZE)
    assert content == bytes(len(content)), \
        f"BAL-DEV-FPR-1: reported block {block:#x} should read zero after QEMU discarded it"
    assert_sentinels_intact(qtest_machine, before, after)


@pytest.mark.req("BAL-DEV-FPR-2", "BAL-DEV-PP-1", "BAL-DRV-PP-2")
@over(REPORTING_WITH_POISON)
def test_reported_pages_keep_poison_val(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """With PAGE_POISON and poison_val written before DRIVER_OK, reported pages hold only poison_val."""
    balloon.start(balloon.default_features | feature_mask(Feature.PAGE_POISON), poison_val=POISON_VAL)
    before, block, after = report_block(balloon)
    content = qtest_machine.qtest.read(block, REPORTED_PAGES * PAGE_SIZE)
    assert content == POISON_VAL.to_bytes(4, "little") * (len(content) // 4), \
        f"BAL-DEV-FPR-2: reported block {block:#x} must hold poison_val {POISON_VAL:#x} only; " \
        f"{len(content) - content.count(FILL)} bytes differ"
    assert_sentinels_intact(qtest_machine, before, after)
