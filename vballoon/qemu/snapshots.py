"""Warm starts: a variant's guest is booted once, saved, and later guests of it load the save instead of booting.

Right after a cold boot reaches SSH, the guest is saved: SSH closed, the
guest stopped, migrated to a file (`exec:cat >`, which QEMU 7.2 has; its
`file:` URI came later), continued, SSH reconnected. A later guest with the
same key starts with `-incoming exec:cat <file>` (`MachineSpec.snapshot`):
well under a second to SSH under TCG, against seconds for a boot.

The key is everything that shapes the saved guest: the image key, the QEMU
binary's sha256, the accelerator and the guest's command line with the SSH
port and log path fixed (`guest_arguments`). Each snapshot keeps its key's
inputs beside it, so a guest whose key has no snapshot but whose variant has
one says which input changed. A snapshot QEMU cannot load is deleted and the
guest boots cold, saying why in one line. The cache stays under a size cap
(least recently used snapshots go first); `vballoon image clean` empties it.

What a warm guest cannot show is its own boot: tests of the boot itself
(probe, negotiation at probe, the boot log) ask for a cold boot. Saving also
ends a round of free page hinting on a variant that has it (QEMU sends DONE
when it migrates a stopped guest), so the migration tests that need hinting as
a boot leaves it (the command id STOP) boot cold too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vballoon.digests import file_sha256
from vballoon.errors import VballoonError
from vballoon.guest.image import default_cache_dir
from vballoon.qemu.machine import Machine, MachineSpec, guest_arguments
from vballoon.waiting import DeadlineExceeded, wait_for

logger = logging.getLogger(__name__)

DEFAULT_CAP_MIB = 4096
"""The cache's size cap: a 512 MiB guest saves as 90 MiB after a plain boot, 512 MiB with page_poison=1 (free memory
is poisoned, not zero); 4 GiB keeps the quick tier's snapshots and a good part of the standard tier's."""
SAVE_TIMEOUT = 60.0
SAVE_BANDWIDTH = 1 << 40
"""Bytes/s for the save: the guest is stopped, so nothing is gained by throttling it."""
SUFFIX = ".vmstate"


@dataclass(frozen=True)
class SnapshotKey:
    """What shapes a saved guest; `digest` names its file."""

    variant: str
    inputs: dict[str, Any]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs, sort_keys=True).encode()).hexdigest()[:16]

    def changed_inputs(self, other: "SnapshotKey") -> list[str]:
        """The names of the inputs that differ from `other`'s."""
        return sorted(name for name in self.inputs.keys() | other.inputs.keys()
                      if self.inputs.get(name) != other.inputs.get(name))


class SnapshotCache:
    """The saved guests of every variant, under `directory`, at most `cap_bytes` in all."""

    def __init__(self, directory: Path, cap_bytes: int = DEFAULT_CAP_MIB << 20) -> None:
        self.directory = directory
        self.cap_bytes = cap_bytes
        self._qemu_digests: dict[Path, str] = {}

    @classmethod
    def in_cache(cls) -> "SnapshotCache":
        """The cache under the vballoon cache dir; VBALLOON_SNAPSHOT_CACHE_MIB sets the cap."""
        cap = os.environ.get("VBALLOON_SNAPSHOT_CACHE_MIB", str(DEFAULT_CAP_MIB))
        if not cap.isdigit():
            raise VballoonError(f"VBALLOON_SNAPSHOT_CACHE_MIB={cap}: not a number of MiB; set a whole number "
                                f"(default {DEFAULT_CAP_MIB}) or unset it")
        return cls(default_cache_dir() / "snapshots", int(cap) << 20)

    # --- keys and files -------------------------------------------------------------------

    def key(self, spec: MachineSpec) -> SnapshotKey:
        qemu = spec.qemu.path
        if qemu not in self._qemu_digests:
            self._qemu_digests[qemu] = file_sha256(qemu)
        arguments = guest_arguments(replace(spec, snapshot=None), 0, Path("serial.log"))
        return SnapshotKey(spec.variant.name, {
            "image": spec.image.key, "qemu": self._qemu_digests[qemu], "accel": spec.accel,
            "command line": arguments})

    def path(self, key: SnapshotKey) -> Path:
        return self.directory / f"{key.variant}-{key.digest}{SUFFIX}"

    def why_missing(self, key: SnapshotKey) -> str:
        """Why no snapshot matches `key`: none of the variant yet, or which inputs changed since one was saved."""
        changed: set[str] = set()
        for inputs_file in self.directory.glob(f"{key.variant}-*.json"):
            try:
                other = SnapshotKey(key.variant, json.loads(inputs_file.read_text()))
            except (OSError, ValueError):
                continue
            changed.update(key.changed_inputs(other))
        if not changed:
            return f"no snapshot of {key.variant} yet"
        return f"the snapshot of {key.variant} was saved with another {' and '.join(sorted(changed))}"

    # --- starting guests ------------------------------------------------------------------

    def start(self, spec: MachineSpec) -> Machine:
        """A running guest of `spec` with SSH connected: loaded from its snapshot when there is one, else booted
        and saved for the next time. A snapshot that does not load is deleted and the guest boots cold."""
        key = self.key(spec)
        snapshot = self.path(key)
        if snapshot.exists():
            machine = Machine(replace(spec, snapshot=snapshot))
            try:
                machine.start()
                os.utime(snapshot)  # recently used: trimmed last
                return machine
            except VballoonError as error:
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                logger.warning(f"vballoon: warm start of {key.variant} failed ({first_line}); booting cold and "
                               f"saving it again")
                self.remove(snapshot)
                set_aside_logs(machine, "warm-start-failed")
        else:
            logger.info(f"vballoon: booting {key.variant} cold: {self.why_missing(key)}")
        return self.boot(spec)

    def boot(self, spec: MachineSpec) -> Machine:
        """A booted guest of `spec` with SSH connected, saved first if its key has no snapshot yet."""
        machine = Machine(spec)
        machine.start()
        key = self.key(spec)
        if not self.path(key).exists():
            try:
                self.save(machine, key)
            except BaseException:
                machine.stop()
                raise
        return machine

    def save(self, machine: Machine, key: SnapshotKey) -> None:
        """Save the booted `machine` under `key` and continue it; a save that fails is logged, the guest goes on."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        started = time.time()
        machine.disconnect_ssh()
        qmp = machine.qmp
        bandwidth = qmp.command("query-migrate-parameters").get("max-bandwidth")
        qmp.command("stop")
        try:
            qmp.command("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
            qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(partial))}")
            status = wait_for(lambda: _final_status(machine), SAVE_TIMEOUT, f"QEMU to save {key.variant}")
            if status != "completed":
                raise VballoonError(f"the migration to {partial} ended {status}")
            partial.replace(target)
            target.with_suffix(".json").write_text(json.dumps(key.inputs, indent=1, sort_keys=True) + "\n")
        except (VballoonError, DeadlineExceeded) as error:
            qmp.try_command("migrate_cancel")
            logger.warning(f"vballoon: could not save a snapshot of {key.variant} ({error}); its guests boot cold")
        finally:
            partial.unlink(missing_ok=True)
            if bandwidth is not None:
                qmp.command("migrate-set-parameters", **{"max-bandwidth": bandwidth})
            qmp.command("cont")
            machine.connect_ssh(SAVE_TIMEOUT)
            machine.timeline_record("snapshot-save", started, time.time())
        self.trim()

    # --- keeping the cache bounded ----------------------------------------------------------

    def snapshots(self) -> list[Path]:
        """The snapshots, least recently used first."""
        return sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)

    def trim(self) -> None:
        """Delete the least recently used snapshots until the cache is within its cap."""
        files = self.snapshots()
        total = sum(p.stat().st_size for p in files)
        for oldest in files:
            if total <= self.cap_bytes:
                break
            total -= oldest.stat().st_size
            self.remove(oldest)

    def remove(self, snapshot: Path) -> None:
        snapshot.unlink(missing_ok=True)
        snapshot.with_suffix(".json").unlink(missing_ok=True)

    def clean(self) -> int:
        """Delete every snapshot; the bytes freed."""
        freed = sum(p.stat().st_size for p in self.snapshots())
        shutil.rmtree(self.directory, ignore_errors=True)
        return freed


def _final_status(machine: Machine) -> str | None:
    machine.check_alive()
    status = str(machine.qmp.command("query-migrate").get("status", ""))
    return status if status in ("completed", "failed", "cancelled") else None


def set_aside_logs(machine: Machine, tag: str) -> None:
    """Rename the machine's stderr and serial log with `tag`, so the next QEMU in its log dir starts clean."""
    for log in (machine.logs.stderr, machine.logs.serial):
        if log.exists():
            log.rename(log.with_name(f"{log.stem}-{tag}{log.suffix}"))
