"""The balloon's target (num_pages, set over QMP) and the driver's `actual`, seen through config space and QMP."""

from __future__ import annotations

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, expect_conformance, over
from vballoon.qemu.balloon import target_command
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.spec import PAGE_SIZE, ConfigField

ISR_CONFIG_CHANGED = 0x2
EVENT_TIMEOUT = 5.0

LEGACY_INTERFACES = tuple(case for case in TRANSPORTS if case.legacy_interface)


@pytest.mark.req("BAL-CFG-LEG-LE")
@pytest.mark.parametrize("below_ram, expected_pages", [
    (5 * PAGE_SIZE, 5),
    (5 * PAGE_SIZE + 1, 5),
    (5 * PAGE_SIZE - 1, 4),
    (0, 0),
    (-(1 << 30), 0),
], ids=["aligned", "one-byte-more", "one-byte-less", "equal-to-ram", "above-ram-clamped"])
@over(TRANSPORTS)
def test_qmp_balloon_sets_num_pages(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                    below_ram: int, expected_pages: int) -> None:
    """num_pages = (RAM - target) >> 12, a target above RAM clamped to RAM; the device signals a config change."""
    balloon.start()
    balloon.driver.read_isr()
    qtest_machine.host_balloon.set_target(qtest_machine.ram_bytes - below_ram)
    got = balloon.config_field(ConfigField.NUM_PAGES)
    assert got == expected_pages, \
        f"BAL-CFG-LEG-LE: target RAM-{below_ram}: expected num_pages {expected_pages}, read {got}"
    assert balloon.driver.read_isr() & ISR_CONFIG_CHANGED, "a new target must raise the config-change ISR bit"


@pytest.mark.req("BAL-CFG-LEG-LE")
@pytest.mark.parametrize("target", [0, -1, -(1 << 62)])
@over(TRANSPORTS[:1])
def test_qmp_balloon_refuses_non_positive_targets(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                  target: int) -> None:
    """QEMU refuses a target <= 0 and leaves num_pages alone. The refusal's meaning is checked, not its words:
    7.2 names the parameter 'target', 10.0 'value' (qmp_balloon's QERR_INVALID_PARAMETER_VALUE)."""
    balloon.start()
    qtest_machine.host_balloon.set_target(qtest_machine.ram_bytes - 3 * PAGE_SIZE)
    ((_, error),) = qtest_machine.qmp.try_commands([target_command(target)])
    assert error, f"BAL-CFG-LEG-LE: balloon target {target}: expected QEMU to refuse it, got no error"
    num_pages = balloon.config_field(ConfigField.NUM_PAGES)
    assert num_pages == 3, \
        f"BAL-CFG-LEG-LE: after the refused target {target} ({error!r}): expected num_pages 3 kept, got {num_pages}"


@pytest.mark.req("BAL-DRV-ACT-1", "BAL-CFG-LEG-LE")
@pytest.mark.parametrize("width", [1, 2, 4])
@over(TRANSPORTS)
def test_actual_reaches_qmp_at_every_width(balloon: QtestBalloon, qtest_machine: QtestMachine, width: int) -> None:
    """A write of `actual` emits BALLOON_CHANGE and moves query-balloon to RAM - actual pages."""
    balloon.start()
    qmp = qtest_machine.qmp
    qmp.take_events()
    actual = {1: 0xA5, 2: 0x1234, 4: 0x5678}[width]
    balloon.driver.config_write(ConfigField.ACTUAL, width, actual)
    expected = qtest_machine.ram_bytes - actual * PAGE_SIZE
    event = qmp.wait_event("BALLOON_CHANGE", EVENT_TIMEOUT)
    assert event["data"]["actual"] == expected, \
        f"BAL-DRV-ACT-1: BALLOON_CHANGE after actual={actual:#x}: expected {expected}, got {event['data']}"
    queried = qtest_machine.host_balloon.query_balloon()
    assert queried == expected, f"query-balloon: expected {expected}, got {queried}"


@pytest.mark.req("BAL-DEV-LEG-ACT", "BAL-DRV-LEG-ACT")
@over(LEGACY_INTERFACES)
def test_legacy_actual_is_used_only_after_its_last_byte(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                        device_variant: DeviceVariant) -> None:
    """Written a byte at a time, `actual` should not reach QMP before its most significant byte."""
    balloon.start()
    full = 0x00000101
    before = qtest_machine.host_balloon.query_balloon()
    balloon.driver.config_write(ConfigField.ACTUAL, 1, full & 0xFF)
    after_first_byte = qtest_machine.host_balloon.query_balloon()
    for index in range(1, 4):
        balloon.driver.config_write(ConfigField.ACTUAL + index, 1, full >> 8 * index & 0xFF)
    final = qtest_machine.host_balloon.query_balloon()
    assert final == qtest_machine.ram_bytes - full * PAGE_SIZE, f"after all four bytes query-balloon says {final}"
    expect_conformance(after_first_byte == before, "BAL-DEV-LEG-ACT", qtest_machine.qemu,
                       f"query-balloon moved from {before} to {after_first_byte} after the first of four bytes")
