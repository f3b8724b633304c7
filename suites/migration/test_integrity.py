"""Guest memory survives live migration, with and without free page hinting and an inflated balloon.

A hinted page is one the driver said it does not need; QEMU may skip sending
it (BAL-DEV-FPH-4) but must not lose a page the guest wrote after hinting
(BAL-DEV-FPH-5), and the driver must treat hinted pages as uninitialised and
initialise any it takes back (BAL-DRV-FPH-8/9). So a pattern the guest keeps
(on tmpfs and in a process) must verify on the destination, memory the guest
allocates there (hinted pages given back at DONE) must hold a new pattern,
and the same must hold when the guest allocates, fills and frees memory
while the migration runs. Saving to a file and restoring from it is checked
the same way.
"""

from __future__ import annotations

import pytest

from fixtures.migration import (HINTING, MIGRATION_VARIANTS, MigrationLab, assert_guest_healthy, over,
                                start_background, touch_and_free, wait_for_line)
from vballoon.qemu.machine import Machine
from vballoon.qemu.migration import Migration, monitor

MIGRATION_TIMEOUT = 60.0
# 32 MiB/s keeps RAM being sent for about 3 s, long enough for the churn below to overlap it.
SLOW_BANDWIDTH = 32 << 20
PATTERN_FILE = "/dev/shm/pattern"
PATTERN_MIB = 64
HELD_MIB = 48
FRESH_MIB = 128
CHURN_MIB = 32
STALE_MIB = 160
INFLATED_RAM = 384 << 20
HOG_LOG = "/tmp/hog.log"
HOLD = f"memhog fill --mib {HELD_MIB} --seed 5 --hold-forever"
CHURN = f"for s in 11 12 13 14 15 16 17 18; do memhog fill --mib {CHURN_MIB} --seed $s; done; exec {HOLD}"


def inflate(machine: Machine, actual: int) -> None:
    """Set the balloon target and wait for the guest to reach it (BAL-DRV-ACT-1)."""
    monitor(machine).command("balloon", value=actual)
    monitor(machine).wait_event("BALLOON_CHANGE", 60, lambda e: e["data"]["actual"] == actual)


def prepare_patterns(source: Machine, holder: str) -> None:
    """A tmpfs pattern, stale free pages worth hinting, and `holder` started in the background."""
    source.ssh.output(f"memhog fill --mib {PATTERN_MIB} --seed 7 --file {PATTERN_FILE}")
    touch_and_free(source, STALE_MIB)
    start_background(source, holder, HOG_LOG)


def check_patterns(destination: Machine) -> None:
    """The held pattern (SIGUSR1), the tmpfs pattern and a fresh fill all verify on the destination."""
    held = wait_for_line(destination, HOG_LOG, r"memhog: holding", 60)
    destination.ssh.run(f"kill -USR1 {held.split('pid=')[1]}")
    result = wait_for_line(destination, HOG_LOG, r"memhog: verified", 30)
    assert result.endswith(" ok"), (
        f"pattern held by a process across the migration: expected 'ok', got {result!r} "
        f"(BAL-DRV-FPH-9, BAL-DEV-FPH-5)")
    check = destination.ssh.run(f"memhog verify --mib {PATTERN_MIB} --seed 7 --file {PATTERN_FILE}", check=False)
    assert check.status == 0, (
        f"tmpfs pattern after migration: expected ok, got {check.describe()} (BAL-DRV-FPH-8, BAL-DEV-FPH-5)")
    fresh = destination.ssh.run(f"memhog fill --mib {FRESH_MIB} --seed 9 --file /dev/shm/fresh && "
                                f"memhog verify --mib {FRESH_MIB} --seed 9 --file /dev/shm/fresh", check=False)
    assert fresh.status == 0, (
        f"memory allocated on the destination (hinted pages given back): expected ok, got {fresh.describe()} "
        f"(BAL-DRV-FPH-9, BAL-DRV-FPH-10)")
    assert_guest_healthy(destination)


def finish(migration: Migration, label: str) -> Machine:
    outcome = migration.wait_completed(MIGRATION_TIMEOUT)
    print(f"{label}: {outcome.describe()}")
    return migration.resume_destination(MIGRATION_TIMEOUT)


@pytest.mark.req("BAL-DRV-FPH-8", "BAL-DRV-FPH-9", "BAL-DRV-FPH-10", "BAL-DEV-FPH-5")
@pytest.mark.parametrize("balloon", ["empty", "inflated"])
@over(MIGRATION_VARIANTS)
def test_memory_survives_migration(migration_lab: MigrationLab, source: Machine, balloon: str) -> None:
    """Patterns written before migration verify on the destination; new memory there holds a new one."""
    if source.variant.free_page_hint:
        migration_lab.excuse_lost_writes()
    if balloon == "inflated":
        inflate(source, INFLATED_RAM)
    prepare_patterns(source, HOLD)
    wait_for_line(source, HOG_LOG, r"memhog: holding", 60)
    with migration_lab.migration(source, parameters={"max-bandwidth": SLOW_BANDWIDTH}) as migration:
        migration.start()
        check_patterns(finish(migration, f"{source.variant.name}, balloon {balloon}"))


@pytest.mark.req("BAL-DRV-FPH-7", "BAL-DRV-FPH-8", "BAL-DRV-FPH-9", "BAL-DEV-FPH-5")
@over(MIGRATION_VARIANTS)
def test_memory_survives_migration_while_the_guest_churns(migration_lab: MigrationLab, source: Machine) -> None:
    """Memory is allocated, filled and freed while RAM is sent (hinted pages taken back under pressure);
    the process holding a pattern is started during the migration; everything verifies afterwards."""
    migration_lab.excuse_lost_writes()
    with migration_lab.migration(source, parameters={"max-bandwidth": SLOW_BANDWIDTH}) as migration:
        # Started just before the migration, the churn runs while RAM is sent (about 3 s under TCG);
        # no SSH command may straddle the switchover: it would be left on the stopped source.
        prepare_patterns(source, CHURN)
        migration.start()
        check_patterns(finish(migration, f"{source.variant.name}, churning"))


@pytest.mark.req("BAL-DRV-FPH-8", "BAL-DEV-FPH-5", "BAL-DEV-FPH-6")
def test_memory_survives_save_to_file_and_restore(migration_lab: MigrationLab) -> None:
    """exec:cat > FILE, then a new QEMU restored with exec:cat FILE: the guest runs on with its patterns."""
    migration_lab.excuse_lost_writes()
    source = migration_lab.boot(HINTING)
    prepare_patterns(source, HOLD)
    wait_for_line(source, HOG_LOG, r"memhog: holding", 60)
    with migration_lab.migration(source, role="restored", via_file=True) as migration:
        migration.start()
        restored = finish(migration, "saved to a file")
        source.stop()
        check_patterns(restored)
