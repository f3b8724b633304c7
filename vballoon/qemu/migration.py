"""Migrating a running guest: to a second QEMU on this host, or to a file and back.

The destination is a `Machine` built from the source's `MachineSpec` (variant,
image, memory, trace events, extra arguments) with `-incoming defer` and a
log dir of its own; `migrate-incoming`
then opens a unix socket in a temp dir (or reads a file through `exec:cat`:
QEMU 7.2 has no `file:` URI). The source is polled with `query-migrate` until
the migration completes, fails or passes its deadline; at the deadline it is
cancelled and `MigrationError` names both machines' logs. Leaving the `with`
block stops the destination, cancels a migration still running on the source
and removes the temp dir, whatever ended the block.
"""

from __future__ import annotations

import hashlib
import mmap
import re
import shlex
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from vballoon.errors import QemuError
from vballoon.qemu.balloon import BALLOON_ID
from vballoon.qemu.machine import Machine
from vballoon.qemu.monitor import Monitor
from vballoon.spec import ConfigField
from vballoon.waiting import DeadlineExceeded, wait_for

FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
RUNNING_STATES = frozenset({"setup", "active", "pre-switchover", "device", "postcopy-active", "cancelling"})
CANCEL_TIMEOUT = 30.0
NO_RATE_LIMIT = 0
"""`max-bandwidth` for a migration sent as fast as QEMU can: a limit of 0 is none (QEMU 7.2's qemu_file_rate_limit,
10.0's RATE_LIMIT_DISABLED). Left unset, QEMU caps every migration at its default max-bandwidth."""
SSH_AFTER_MIGRATION_TIMEOUT = 30.0
LOADING_STATES = ("inmigrate", "prelaunch")
"""query-status of a destination that has not finished loading the guest."""

MODERN_CONFIG_BAR, MODERN_CONFIG_OFFSET = 4, 0x2000  # virtio-pci (QEMU 7.2, 10.0): device-specific region of BAR 4
LEGACY_CONFIG_BAR = 0  # the legacy I/O BAR: a 20-byte header, 24 when the device has MSI-X (a memory BAR)
LEGACY_HEADER, LEGACY_HEADER_MSIX = 20, 24
# The free page hint subsection of the balloon's vmstate (QEMU 7.2 names it "free-page-report"):
# QEMU_VM_SUBSECTION, name length, name, be32 version, then be32 cmd_id and be32 status.
HINT_SUBSECTION = b"\x05" + bytes([len(b"virtio-balloon-device/free-page-report")]) + \
    b"virtio-balloon-device/free-page-report"
HINT_STATUS_NAMES = {0: "STOP", 1: "REQUESTED", 2: "START", 3: "DONE"}  # QEMU's FREE_PAGE_HINT_S_*


class MigrationError(QemuError):
    """A migration failed, was cancelled unexpectedly, or did not converge before its deadline."""


@dataclass(frozen=True)
class MigrationOutcome:
    """The source's final `query-migrate` and how long the migration took."""

    status: str
    seconds: float
    info: dict[str, Any]

    @property
    def ram(self) -> dict[str, Any]:
        return dict(self.info.get("ram", {}))

    @property
    def transferred_bytes(self) -> int:
        """`ram.transferred`: the bytes of RAM pages the source sent (zero pages cost a few bytes each)."""
        return int(self.ram.get("transferred", 0))

    def describe(self) -> str:
        ram = self.ram
        return (f"migration {self.status} in {self.seconds:.1f} s: ram transferred {self.transferred_bytes} bytes, "
                f"normal pages {ram.get('normal')}, duplicate (zero) pages {ram.get('duplicate')}, "
                f"dirty-sync rounds {ram.get('dirty-sync-count')}")


class Migration:
    """One migration of `source` into a destination QEMU this object starts and stops.

    With `via_file` the source's state is saved to a file in the temp dir
    (exec:cat > FILE) and the destination is started from it afterwards
    (exec:cat FILE); otherwise the two QEMUs are connected live by a unix socket.
    """

    def __init__(self, source: Machine, destination_log_dir: Path, capabilities: dict[str, bool] | None = None,
                 parameters: dict[str, Any] | None = None, via_file: bool = False) -> None:
        self.source = source
        self.destination_log_dir = destination_log_dir
        self.capabilities = dict(capabilities or {})
        self.parameters = dict(parameters or {})
        self.via_file = via_file
        self.destination: Machine | None = None
        self.started_at = 0.0
        self.uri = ""
        self._temp_dir: Path | None = None

    # --- lifecycle -------------------------------------------------------

    def __enter__(self) -> "Migration":
        try:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="vballoon-migration-"))
            if self.capabilities:
                self.source.qmp.command("migrate-set-capabilities", capabilities=self._capability_list())
            if self.parameters:
                self.source.qmp.command("migrate-set-parameters", **self.parameters)
            if not self.via_file:
                self._start_destination(f"unix:{self._temp_dir / 'migration.sock'}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Cancel a migration still running on the source, stop the destination, remove the temp dir."""
        try:
            if self.status() in RUNNING_STATES:
                self.source.qmp.try_command("migrate_cancel")
                self._wait_final(CANCEL_TIMEOUT)
        except (QemuError, DeadlineExceeded):
            pass  # the source is stopped by its owner; nothing here must mask the original failure
        finally:
            if self.destination is not None:
                self.destination.stop()
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
                self._temp_dir = None

    def _start_destination(self, uri: str) -> None:
        destination = Machine(replace(self.source.spec, log_dir=self.destination_log_dir, incoming="defer"))
        self.destination = destination
        destination.start()
        if self.capabilities:
            destination.qmp.command("migrate-set-capabilities", capabilities=self._capability_list())
        destination.qmp.command("migrate-incoming", uri=uri)
        self.uri = uri

    @property
    def work_dir(self) -> Path:
        """The migration's temp dir (socket, state file, RAM dumps); removed when the migration closes."""
        assert self._temp_dir is not None, "the migration is not open"
        return self._temp_dir

    @property
    def state_file(self) -> Path:
        """Where `via_file` keeps the guest's state."""
        return self.work_dir / "guest-state.bin"

    def _capability_list(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    # --- driving the migration --------------------------------------------

    def start(self) -> None:
        """Begin migrating; returns at once (the source keeps running while RAM is copied)."""
        uri = f"exec:cat > {shlex.quote(str(self.state_file))}" if self.via_file else self.uri
        self.started_at = time.monotonic()
        self.source.qmp.command("migrate", uri=uri)

    def status(self) -> str:
        return str(self.query().get("status", "none"))

    def query(self) -> dict[str, Any]:
        return dict(self.source.qmp.command("query-migrate"))

    def wait_completed(self, timeout: float) -> MigrationOutcome:
        """Wait until the migration completed; a failure, or no convergence by `timeout`, is MigrationError.

        At the deadline the migration is cancelled first, so no QEMU is left migrating.
        """
        try:
            info = self._wait_final(timeout)
        except DeadlineExceeded as error:
            self.source.qmp.try_command("migrate_cancel")
            raise MigrationError(f"the migration did not converge: {error}; {self.describe_logs()}") from None
        outcome = MigrationOutcome(str(info["status"]), time.monotonic() - self.started_at, info)
        if outcome.status != "completed":
            raise MigrationError(f"migration ended {outcome.status}: {info.get('error-desc', 'no error text')}; "
                                 f"{self.describe_logs()}")
        return outcome

    def cancel(self) -> MigrationOutcome:
        """`migrate_cancel` and wait until the source says cancelled."""
        # QEMU 10.0 reports the RAM save the cancel cut short ("failed to save SaveStateEntry with id(name):
        # 2(ram): -5"); 7.2 says nothing. Either way it is the cancel's doing, not a fault.
        self.source.expect_device_error("failed to save SaveStateEntry")
        self.source.qmp.command("migrate_cancel")
        info = self._wait_final(CANCEL_TIMEOUT)
        if info["status"] != "cancelled":
            raise MigrationError(f"after migrate_cancel the migration ended {info['status']}, expected cancelled; "
                                 f"{self.describe_logs()}")
        return MigrationOutcome("cancelled", time.monotonic() - self.started_at, info)

    def _wait_final(self, timeout: float) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            self.source.check_alive()
            info = self.query()
            return info if info.get("status") in FINAL_STATES else None

        return wait_for(final, timeout, "the migration to finish", interval=0.1,
                        describe_last=lambda: _summary(self.query()))

    def migrate(self, timeout: float) -> MigrationOutcome:
        """Start, wait until completed, then bring the destination up (see `resume_destination`)."""
        self.start()
        outcome = self.wait_completed(timeout)
        self.resume_destination(timeout)
        return outcome

    def resume_destination(self, timeout: float) -> Machine:
        """The destination running the guest, with SSH connected; from a state file it is started here."""
        destination = self.destination_running(timeout)
        destination.connect_ssh(SSH_AFTER_MIGRATION_TIMEOUT)
        return destination

    def destination_running(self, timeout: float) -> Machine:
        """The destination once it has loaded the guest and left the incoming state (running, or paused by a guest
        crash: its RAM can still be read); SSH not yet connected. From a state file it is started here."""
        if self.via_file and self.destination is None:
            self._start_destination(f"exec:cat {shlex.quote(str(self.state_file))}")
        destination = self.destination
        assert destination is not None

        def running() -> bool:
            destination.check_alive()
            return destination.qmp.command("query-status")["status"] not in LOADING_STATES

        try:
            wait_for(running, timeout, "the destination to run the guest", interval=0.1,
                     describe_last=lambda: str(destination.qmp.command("query-status")))
        except DeadlineExceeded as error:
            raise MigrationError(f"{error}; {self.describe_logs()}") from None
        return destination

    def describe_logs(self) -> str:
        where = f"source logs: {self.source.logs.describe()}"
        if self.destination is not None:
            where += f"; destination logs: {self.destination.logs.describe()}"
        return where


def _summary(info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    return (f"status {info.get('status')}, ram transferred {ram.get('transferred')} of {ram.get('total')}, "
            f"remaining {ram.get('remaining')}, dirty rate {ram.get('dirty-pages-rate')} pages/s, "
            f"dirty-sync rounds {ram.get('dirty-sync-count')}")


# --- the balloon's state as the host sees it -----------------------------------


def balloon_config_u32(machine: Machine, field: ConfigField) -> int:
    """A 32-bit config field of the balloon as the guest reads it, read by the host through HMP.

    `xp` (modern, transitional: memory BAR 4) or `i` (legacy: I/O BAR 0)
    access the device's config region like a vCPU would, so the value is
    exactly what the driver sees, with no guest involvement.
    """
    qmp = machine.qmp
    regions = {region["bar"]: region for region in _balloon_pci_regions(qmp)}
    if machine.variant.transport == "legacy":
        address = int(regions[LEGACY_CONFIG_BAR]["address"]) + legacy_config_offset(machine)
        command = f"i /w {address + int(field):#x}"  # HMP sizes: b, h, w (32 bits)
    else:
        address = int(regions[MODERN_CONFIG_BAR]["address"]) + MODERN_CONFIG_OFFSET
        command = f"xp /1wx {address + int(field):#x}"
    text = str(qmp.command("human-monitor-command", **{"command-line": command}))
    match = re.search(r"(?:=|:)\s*0x([0-9a-f]+)\s*$", text.strip())
    if match is None:
        raise QemuError(f"HMP {command!r} answered {text!r}; expected a 32-bit value")
    return int(match[1], 16)


def legacy_config_offset(machine: Machine) -> int:
    """Where the device config starts in the legacy I/O BAR: after a 20-byte header, or 24 bytes when the device
    has MSI-X (a memory BAR; QEMU 10.0 gives virtio-balloon-pci two vectors, 7.2 none) and Linux enables it."""
    has_msix = any(region["type"] == "memory" for region in _balloon_pci_regions(machine.qmp))
    return LEGACY_HEADER_MSIX if has_msix else LEGACY_HEADER


def _balloon_pci_regions(qmp: Monitor) -> list[dict[str, Any]]:
    for bus in qmp.command("query-pci"):
        for device in bus["devices"]:
            if device.get("qdev_id") == BALLOON_ID:
                return list(device["regions"])
    raise QemuError(f"query-pci lists no device {BALLOON_ID!r}")


@dataclass(frozen=True)
class SavedHintState:
    """The free page hint state the source saved in its migration stream."""

    cmd_id: int
    status: str


def saved_hint_state(state_file: Path) -> SavedHintState:
    """The balloon's last issued command id and hint status, read from a saved migration stream."""
    with state_file.open("rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.rfind(HINT_SUBSECTION)
        if at < 0:
            raise QemuError(f"{state_file}: no free page hint subsection; was free-page-hint negotiated?")
        fields = at + len(HINT_SUBSECTION) + 4  # skip the be32 version
        cmd_id, status = struct.unpack_from(">II", data, fields)
    return SavedHintState(cmd_id, HINT_STATUS_NAMES.get(status, f"unknown {status}"))


def pages_differing_after_migration(source: Machine, destination_log_dir: Path, timeout: float,
                                    parameters: dict[str, Any] | None = None) -> list[int]:
    """Save `source` to a file, load it into a destination that never runs, and compare their RAM.

    Returns the guest-physical addresses of the 4 KiB pages whose content differs between the stopped
    source and the loaded destination. Without free page hinting every difference is a guest write
    the migration lost (with hinting, hinted free pages legitimately differ).
    """
    with Migration(source, destination_log_dir, parameters=parameters, via_file=True) as migration:
        migration.start()
        migration.wait_completed(timeout)
        loaded = Machine(replace(source.spec, log_dir=destination_log_dir, incoming="defer", paused=True))
        with loaded:
            loaded.qmp.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(migration.state_file))}")
            wait_for(lambda: loaded.qmp.command("query-migrate").get("status") in FINAL_STATES, timeout,
                     "the destination to load the saved state", interval=0.1)
            dumps = []
            for name, machine in (("source", source), ("destination", loaded)):
                dump = migration.work_dir / f"{name}-ram.bin"
                machine.qmp.command("pmemsave", val=0, size=source.memory_mib << 20, filename=str(dump))
                dumps.append(dump)
        return _differing_pages(*dumps)


def pages_absent_from_ram(machine: Machine, expected: Path, work_dir: Path) -> int:
    """How many 4 KiB pages of the file `expected` appear nowhere in `machine`'s guest RAM (read by pmemsave).

    For a pattern the guest wrote before a migration and left alone, every page must be found byte for byte
    on the destination, wherever the guest kernel keeps it; the guest's health plays no part.
    """
    dump = work_dir / "ram.bin"
    machine.qmp.command("pmemsave", val=0, size=machine.memory_mib << 20, filename=str(dump))
    try:
        present = set(_page_digests(dump))
    finally:
        dump.unlink(missing_ok=True)
    return sum(digest not in present for digest in _page_digests(expected))


def _page_digests(path: Path, page: int = 4096) -> Iterator[bytes]:
    with path.open("rb") as data:
        while chunk := data.read(page):
            yield hashlib.blake2b(chunk, digest_size=16).digest()


def _differing_pages(first: Path, second: Path, page: int = 4096) -> list[int]:
    differing = []
    with first.open("rb") as a, second.open("rb") as b:
        address = 0
        while chunk := a.read(page):
            if chunk != b.read(page):
                differing.append(address)
            address += page
    return differing
