"""Free page hinting: the command ids QEMU's balloon shows in config space around a migration."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.spec import CMD_ID_DONE, CMD_ID_FIRST, CMD_ID_STOP, ConfigField
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
