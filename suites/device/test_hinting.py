"""Free page hinting: command ids around a migration, stale and short command buffers, DONE, postcopy."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.spec import CMD_ID_DONE, CMD_ID_FIRST, CMD_ID_STOP, PAGE_SIZE, ConfigField, Status, encode_cmd_id
from vballoon.virtqueue import Buffer
from vballoon.waiting import wait_for

MIGRATION_TIMEOUT = 30.0
SLOW_MIGRATION_BYTES_PER_S = 1 << 20  # keeps the first pass (and so the hinting request) open for a while
HINTING = tuple(DeviceVariant(replace(case.variant, free_page_hint=True), case.legacy_interface)
                for case in TRANSPORTS)


@pytest.mark.req("BAL-DEV-FPH-1", "BAL-DEV-FPH-6")
@over(HINTING)
def test_command_id_goes_stop_requested_done_across_a_migration(balloon: QtestBalloon,
                                                                qtest_machine: QtestMachine) -> None:
    """STOP while nothing migrates, the first id (0x80000001) while RAM is sent, DONE once migration completed."""
    balloon.start()
    qmp = qtest_machine.qmp

    def cmd_id() -> int:
        return balloon.config_field(ConfigField.FREE_PAGE_HINT_CMD_ID)

    before = cmd_id()
    assert before == CMD_ID_STOP, f"BAL-DEV-FPH-1: no migration, so cmd_id should be STOP (0), got {before:#x}"
    qmp.command("migrate-set-parameters", **{"max-bandwidth": SLOW_MIGRATION_BYTES_PER_S})
    qmp.command("migrate", uri="exec:cat > /dev/null")
    wait_for(lambda: cmd_id() == CMD_ID_FIRST, MIGRATION_TIMEOUT, f"cmd_id {CMD_ID_FIRST:#x} during migration",
             interval=0.005, describe_last=lambda: f"cmd_id {cmd_id():#x}, migration {qmp.command('query-migrate')}")
    wait_for(lambda: qmp.command("query-migrate")["status"] in ("completed", "failed"), MIGRATION_TIMEOUT,
             "the migration to finish")
    assert qmp.command("query-migrate")["status"] == "completed"
    after = cmd_id()
    assert after == CMD_ID_DONE, f"BAL-DEV-FPH-6: after migration cmd_id should be DONE (1), got {after:#x}"


FREE_PAGE_VQ = 3  # QEMU 7.2 and 10.0: after statsq when free-page-hint is on
PATTERN = 0xA5
HINTING_MODERN = HINTING[:1]


def start_slow_migration(machine: QtestMachine) -> None:
    machine.qmp.command("migrate-set-parameters", **{"max-bandwidth": SLOW_MIGRATION_BYTES_PER_S})
    machine.qmp.command("migrate", uri="exec:cat > /dev/null")


def wait_migration_end(machine: QtestMachine) -> str:
    qmp = machine.qmp
    wait_for(lambda: qmp.command("query-migrate")["status"] in ("completed", "failed"), MIGRATION_TIMEOUT,
             "the migration to finish")
    return str(qmp.command("query-migrate")["status"])


@pytest.mark.req("BAL-DEV-FPH-3")
@over(HINTING_MODERN)
def test_a_wrong_command_id_is_ignored(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """While QEMU requests hints under 0x80000001, a buffer naming another id (with a page) is used but does not
    start hinting: cmd_id still shows the request."""
    balloon.start()
    start_slow_migration(qtest_machine)
    wait_for(lambda: balloon.config_field(ConfigField.FREE_PAGE_HINT_CMD_ID) == CMD_ID_FIRST, MIGRATION_TIMEOUT,
             "the first hint request", interval=0.005)
    page = balloon.new_page(PATTERN)
    balloon.exchange(FREE_PAGE_VQ, [encode_cmd_id(CMD_ID_FIRST + 1)], [Buffer(page, PAGE_SIZE)])
    shown = balloon.config_field(ConfigField.FREE_PAGE_HINT_CMD_ID)
    assert shown in (CMD_ID_FIRST, CMD_ID_DONE), \
        f"BAL-DEV-FPH-3: a stale id must not start hinting; cmd_id shows {shown:#x} (0 would mean started)"
    assert wait_migration_end(qtest_machine) == "completed"


@pytest.mark.req("BAL-DRV-FPH-1")
@over(HINTING)
def test_a_short_command_buffer_is_a_device_error(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                  device_variant: DeviceVariant) -> None:
    """A command buffer shorter than 4 bytes (the driver breaks BAL-DRV-FPH-1): QEMU reports "received an
    incorrect cmd id" and, with VERSION_1, sets DEVICE_NEEDS_RESET; QEMU itself keeps running."""
    qtest_machine.expect_device_error("received an incorrect cmd id")
    balloon.start()
    balloon.post(FREE_PAGE_VQ, [b"\x01\x00"])
    wait_for(lambda: "received an incorrect cmd id" in qtest_machine.device_errors(), 5.0,
             "QEMU's device error", describe_last=lambda: str(qtest_machine.device_errors()))
    needs_reset = bool(balloon.driver.status & Status.DEVICE_NEEDS_RESET)
    assert needs_reset == (not device_variant.legacy_interface), \
        f"DEVICE_NEEDS_RESET {'missing' if not needs_reset else 'set'} after the error; " \
        f"status {balloon.driver.status:#x}"
    assert qtest_machine.crash_evidence() == [], "a device error must not crash QEMU"


@pytest.mark.req("BAL-DEV-FPH-5", "BAL-DEV-FPH-6")
@over(HINTING_MODERN)
def test_after_done_hints_change_nothing(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """After DONE a page hinted under the finished id keeps its content and cmd_id stays DONE; a driver STOP
    is taken without error."""
    balloon.start()
    start_slow_migration(qtest_machine)
    wait_for(lambda: balloon.config_field(ConfigField.FREE_PAGE_HINT_CMD_ID) == CMD_ID_FIRST, MIGRATION_TIMEOUT,
             "the first hint request", interval=0.005)
    assert wait_migration_end(qtest_machine) == "completed"
    qtest_machine.qmp.command("cont")  # QEMU holds free page hints while the VM is stopped
    page = balloon.new_page(PATTERN)
    balloon.exchange(FREE_PAGE_VQ, [encode_cmd_id(CMD_ID_FIRST)], [Buffer(page, PAGE_SIZE)])
    balloon.exchange(FREE_PAGE_VQ, [encode_cmd_id(CMD_ID_STOP)])
    assert qtest_machine.qtest.read(page, PAGE_SIZE) == bytes([PATTERN]) * PAGE_SIZE, \
        f"BAL-DEV-FPH-5: page {page:#x} hinted after DONE changed"
    shown = balloon.config_field(ConfigField.FREE_PAGE_HINT_CMD_ID)
    assert shown == CMD_ID_DONE, f"BAL-DEV-FPH-6: cmd_id should stay DONE (1), got {shown:#x}"


@pytest.mark.req("BAL-DEV-FPH-1")
@over(HINTING_MODERN)
def test_postcopy_ram_disables_hinting(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """With the postcopy-ram capability QEMU cannot use hints (hinted pages would never be sent): cmd_id stays
    STOP through the whole first RAM pass, during which it shows 0x80000001 without postcopy-ram. (Without a
    destination's return path this migration neither completes nor cancels; QEMU is stopped at teardown.)"""
    balloon.start()
    qmp = qtest_machine.qmp
    qmp.command("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    qmp.command("migrate", uri="exec:cat > /dev/null")
    seen: set[int] = set()

    def first_pass_done() -> bool:
        seen.add(balloon.config_field(ConfigField.FREE_PAGE_HINT_CMD_ID))
        ram = qmp.command("query-migrate").get("ram", {})
        return ram.get("transferred", 0) > 0 and ram.get("remaining", 1) == 0

    wait_for(first_pass_done, MIGRATION_TIMEOUT, "the first RAM pass", interval=0.005)
    assert seen == {CMD_ID_STOP}, f"BAL-DEV-FPH-1: cmd_id should stay STOP, showed {sorted(map(hex, seen))}"
