"""What a qemu-system-x86_64 says about itself, asked once per run.

Where QEMU versions differ in a way the spec allows, vballoon's expectations
come from here, never from a version constant: the statistics the balloon
names (`qom-get guest-stats`; 10 in QEMU 7.2, 16 in 10.0), the size of each
of its virtqueues (read from the device's registers), the QMP commands the
binary has (`query-commands`, for checks that need `x-query-virtio-status`),
the balloon device's properties (`device-list-properties`) and whether it has
the qtest accelerator. The probe is one guestless QEMU with every balloon
queue present, driven over qtest for about a second.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vballoon.errors import QemuError
from vballoon.matrix import Variant
from vballoon.qemu.process import QemuBinary
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.reference.device import DEFLATEQ, FREE_PAGE_VQ, INFLATEQ, REPORTING_VQ, STATSQ, DeviceShape
from vballoon.spec import STATS

PROBED_VARIANT = Variant(free_page_hint=True, free_page_reporting=True)
"""Every balloon queue exists: inflate, deflate, stats, free page hinting, reporting (in QEMU's index order)."""
PROBED_QUEUES = (INFLATEQ, DEFLATEQ, STATSQ, FREE_PAGE_VQ, REPORTING_VQ)


@dataclass(frozen=True)
class QemuProfile:
    """The version-dependent facts of one QEMU binary that vballoon's expectations are built from."""

    version: tuple[int, int, int]
    stat_names: tuple[str, ...]
    """The keys of `guest-stats`, in QEMU's order (tag order)."""
    queue_sizes: tuple[tuple[str, int], ...]
    """(queue, maximum size) for every balloon queue."""
    commands: frozenset[str]
    balloon_properties: frozenset[str]
    qtest_accelerator: bool

    @property
    def stat_count(self) -> int:
        """How many tags QEMU stores (tags 0..stat_count-1): the spec tags and the Linux ones it names."""
        known = [info.qom_key for info in STATS]
        count = 0
        while count < len(known) and known[count] in self.stat_names:
            count += 1
        return count

    @property
    def device_shape(self) -> DeviceShape:
        """The reference device's shape for this QEMU: its stats count and queue sizes."""
        return DeviceShape(self.stat_count, self.queue_sizes)

    def has_command(self, name: str) -> bool:
        return name in self.commands

    def describe(self) -> str:
        """One line for logs and JUnit properties."""
        sizes = ", ".join(f"{name} {size}" for name, size in self.queue_sizes)
        return (f"QEMU {'.'.join(map(str, self.version))}: {len(self.stat_names)} stats, queues {sizes}, "
                f"qtest accelerator {'yes' if self.qtest_accelerator else 'no'}")


@functools.cache
def qemu_profile(qemu: QemuBinary) -> QemuProfile:
    """Probe `qemu` once per process; a QEMU that cannot start is a QemuError naming its kept logs."""
    log_dir = Path(tempfile.mkdtemp(prefix="vballoon-profile-"))
    try:
        profile = _probe(qemu, log_dir)
    except QemuError as error:
        raise QemuError(f"probing {qemu.path} for its balloon's shape failed: {error}") from None
    shutil.rmtree(log_dir, ignore_errors=True)
    return profile


def _probe(qemu: QemuBinary, log_dir: Path) -> QemuProfile:
    with QtestMachine(qemu, PROBED_VARIANT, log_dir, keep_transcripts=False) as machine:
        balloon = QtestBalloon(machine, legacy_interface=False)
        sizes = tuple((name, balloon.driver.interface.queue_max_size(index))
                      for index, name in enumerate(PROBED_QUEUES))
        stats = balloon.guest_stats()["stats"]
        commands = frozenset(c["name"] for c in machine.qmp.command("query-commands"))
        properties = frozenset(p["name"] for p in machine.qmp.command("device-list-properties",
                                                                      typename="virtio-balloon-pci"))
        return QemuProfile(qemu.version, tuple(stats), sizes, commands, properties, machine.accel == "qtest")
