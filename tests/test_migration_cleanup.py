"""Migration plumbing leaves nothing behind: a missed deadline and a cancel stop the destination and clean up."""

from __future__ import annotations

from pathlib import Path

import pytest

from vballoon.matrix import Variant
from vballoon.qemu.machine import Machine, MachineSpec
from vballoon.qemu.migration import Migration, MigrationError
from vballoon.session import Session

CRAWL = {"max-bandwidth": 1 << 20}  # 1 MiB/s: a 512 MiB guest cannot converge within the deadline below
DEADLINE = 3.0


@pytest.fixture
def source(session: Session, tmp_path: Path):  # type: ignore[no-untyped-def]
    image = session.image_for(Variant())
    with Machine(MachineSpec(Variant(), image, session.qemu, session.accel(image).accel, tmp_path / "source")) as machine:
        yield machine


def test_missed_deadline_cancels_stops_destination_and_cleans_up(source: Machine, tmp_path: Path) -> None:
    with Migration(source, tmp_path / "destination", parameters=CRAWL) as migration:
        work_dir = migration.work_dir
        migration.start()
        with pytest.raises(MigrationError) as caught:
            migration.wait_completed(DEADLINE)
        destination = migration.destination
        assert destination is not None and destination.process is not None
    message = str(caught.value)
    assert "did not converge" in message and "source logs" in message and "destination logs" in message, message
    assert destination.process.poll() is not None, "the destination QEMU outlived its migration"
    assert not work_dir.exists(), f"migration temp dir {work_dir} was left behind"
    status = source.qmp.command("query-migrate")["status"]
    assert status == "cancelled", f"after the deadline the source's migration should be cancelled, got {status}"
    assert source.ssh.output("echo alive").strip() == "alive", "the source guest stopped answering"


def test_cancel_mid_way_leaves_the_source_running(source: Machine, tmp_path: Path) -> None:
    with Migration(source, tmp_path / "destination", parameters=CRAWL) as migration:
        migration.start()
        outcome = migration.cancel()
        destination = migration.destination
    assert outcome.status == "cancelled"
    assert destination is not None and destination.process is not None and destination.process.poll() is not None
    assert source.qmp.command("query-status")["status"] == "running"
    source.assert_healthy()
