"""One QEMU guest for one variant: boot it, reach SSH, notice a crash or an unwell kernel.

A `Machine` is built from a `MachineSpec`, the frozen description of what
the guest is; a migration destination is the source's spec with `incoming`
(and its own log dir). Starting, stopping and QEMU's health are the process
core's (`vballoon.qemu.process`); this kind of machine adds the kernel, the
serial console, user networking with the SSH port forwarded on 127.0.0.1,
the RAM backend and the balloon, and reads the console for kernel trouble.
Its boot's stages after QMP is ready (`kernel` to /init, `init` to sshd,
`ssh` to SSH connected) go on the run's timeline (vballoon.timeline).
"""

from __future__ import annotations

import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vballoon.errors import GuestError, QemuError
from vballoon.guest.health import kernel_trouble
from vballoon.guest.image import GuestImage
from vballoon.guest.ssh import GuestShell
from vballoon.matrix import Variant
from vballoon.qemu.balloon import HostBalloon, device_args
from vballoon.qemu.process import FROM_START, LogMark, QemuBinary, QemuMachine, log_since, tail
from vballoon.waiting import DeadlineExceeded, wait_for

HOSTFWD_RETRIES = 5
HOSTFWD_FAILED = "Could not set up host forwarding rule"
BOOT_TIMEOUT = 90.0
SSH_TIMEOUT = 30.0
SNAPSHOT_LOAD_TIMEOUT = 60.0
LOADING_STATES = ("inmigrate", "prelaunch")
"""query-status of a machine that has not finished loading an incoming guest."""
SERIAL_POLL_S = 0.1
"""How often the serial console is read while booting: the ready line is noticed (and timed) within this."""


TCG_CPU = "max,erms=off,fsrm=off"
"""The guest CPU under TCG. TCG runs a REP string instruction one iteration at a time, so a kernel that sees ERMS
or FSRM clears and copies pages with `rep stosb`/`rep movsb`, byte by byte; without them it uses `rep stosq` or
unrolled stores. Measured (256 MiB memhog fill in the guest, page faults included): QEMU 7.2 / Linux 6.1
2.6 -> 1.1 s, QEMU 10.0 / Linux 6.12 2.8 -> 1.5 s. The balloon's behaviour does not depend on either bit."""


@dataclass(frozen=True)
class MachineSpec:
    """What a guest machine is and where it writes its logs; a destination shares all but `log_dir`,
    `incoming` and `paused` with its source."""

    variant: Variant
    image: GuestImage
    qemu: QemuBinary
    accel: str
    log_dir: Path
    memory_mib: int = 512
    trace_events: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()
    """Kernel command-line words after the image's and the variant's (e.g. vballoon.resume=vda)."""
    incoming: str | None = None
    """A migration source to wait for (`-incoming`) instead of booting; SSH is connected after the migration."""
    paused: bool = False
    """Stay stopped (-S) once started (after the incoming stream is loaded)."""
    resumes: bool = False
    """The kernel resumes a hibernated guest from its disk instead of booting to sshd: the start waits for no
    console line, and the caller connects SSH once the resumed guest answers."""
    pvh: bool = True
    """Boot the image's kernel through its PVH entry when it has one (GuestImage.booted), else its bzImage. A guest
    that suspends to RAM boots the bzImage: after a PVH boot, the wake from S3 started the kernel afresh (QEMU 7.2
    with Linux 6.1, and 10.0 with 6.12, under SeaBIOS)."""
    boot_timeout: float = BOOT_TIMEOUT
    snapshot: Path | None = None
    """A saved guest of this spec to load and continue instead of booting (a warm start); SSH is connected after.
    A migration destination, built from its source's spec, has `incoming` and ignores it."""


def guest_arguments(spec: MachineSpec, ssh_port: int, serial: Path) -> list[str]:
    """What QEMU runs for `spec`'s guest, the SSH port and serial log given: everything but how it starts
    (`-incoming`, `-S`), trace events and QMP. With the port and the log path fixed, it says which saved guests
    this one can load."""
    image = spec.image
    machine = f"q35,accel={spec.accel}"
    backend = memory_backend(spec)
    args = [
        "-cpu", TCG_CPU if spec.accel == "tcg" else "host", "-smp", "1", "-m", f"{spec.memory_mib}M",
        "-kernel", str(image.booted if spec.pvh else image.kernel), "-initrd", str(image.initrd),
        "-append", " ".join([image.kernel_cmdline, *spec.variant.kernel_args, *spec.kernel_args]),
        "-chardev", f"file,id=serial0,path={serial}", "-serial", "chardev:serial0",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
    ]
    if backend:
        args += ["-object", backend]
        machine += ",memory-backend=mem0"
    return ["-machine", machine, *args, *device_args(spec.variant), *spec.extra_args]


def memory_backend(spec: MachineSpec) -> str | None:
    """The -object of the variant's RAM backend; None for plain anonymous memory."""
    size = f"size={spec.memory_mib}M"
    return {
        "anon": None,
        "shm": f"memory-backend-ram,id=mem0,{size},share=on",
        "memfd": f"memory-backend-memfd,id=mem0,{size}",
        "hugetlb": f"memory-backend-file,id=mem0,{size},mem-path={hugetlbfs_mount()},share=on",
    }[spec.variant.backend]


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Machine(QemuMachine):
    """A QEMU guest booted for one variant, reachable over QMP and SSH."""

    def __init__(self, spec: MachineSpec) -> None:
        super().__init__(spec.qemu, spec.log_dir, spec.trace_events)
        self.spec = spec
        self._expected_console_trouble: list[str] = []
        self.ssh_port = 0
        self._shell: GuestShell | None = None

    @property
    def variant(self) -> Variant:
        return self.spec.variant

    @property
    def image(self) -> GuestImage:
        return self.spec.image

    @property
    def memory_mib(self) -> int:
        return self.spec.memory_mib

    # --- what this kind of machine adds to the core ---------------------------------

    def _launch(self) -> None:
        """Launch on a free port for SSH; another port when QEMU found it taken after all."""
        for _ in range(HOSTFWD_RETRIES):
            self.ssh_port = free_local_port()
            mark = self.mark()
            try:
                super()._launch()
                return
            except QemuError:
                if HOSTFWD_FAILED not in self.stderr_since(mark.stderr):
                    raise
                self._end_process()
        raise QemuError(f"no free port on 127.0.0.1 for the guest's SSH after {HOSTFWD_RETRIES} tries; "
                        "free some ports or stop other guests")

    def _after_launch(self) -> None:
        if self.warm:
            self.continue_snapshot(self.spec.boot_timeout)
        elif self.spec.incoming is None and not self.spec.resumes:
            self.wait_ready(self.spec.boot_timeout)

    def _before_stop(self) -> None:
        self.disconnect_ssh()

    def _arguments(self) -> list[str]:
        spec = self.spec
        incoming = f"exec:cat {shlex.quote(str(spec.snapshot))}" if self.warm else spec.incoming
        args = guest_arguments(spec, self.ssh_port, self.logs.serial)
        if incoming:
            args += ["-incoming", incoming]
        return args + (["-S"] if spec.paused else [])

    # --- the guest ----------------------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Wait for the init's ready line on the serial console, then connect SSH; time the stages."""
        waiting_since = time.time()
        seen: dict[str, float] = {}

        def ready() -> bool:
            self.check_alive()
            text = self.serial_text()
            for marker in (self.image.init_marker, self.image.ready_marker):
                if marker in text:
                    seen.setdefault(marker, time.time())
            return self.image.ready_marker in seen

        try:
            wait_for(ready, timeout, "the guest to start sshd", interval=SERIAL_POLL_S, max_interval=SERIAL_POLL_S,
                     describe_last=lambda: repr(tail(self.logs.serial, 3)))
        except DeadlineExceeded as error:
            reached_init = self.image.init_marker in self.serial_text()
            where = "the kernel reached /init but sshd never started" if reached_init else \
                "the kernel never reached /init; check --kernel (a bzImage with virtio drivers) and the serial log"
            raise GuestError(f"{error}: {where}; last serial lines: {tail(self.logs.serial, 5)!r} "
                             f"({self.logs.describe()})") from None
        sshd_at = seen[self.image.ready_marker]
        init_at = seen.get(self.image.init_marker, sshd_at)
        self.connect_ssh(SSH_TIMEOUT)
        self.timeline_record("kernel", waiting_since, init_at)
        self.timeline_record("init", init_at, sshd_at)
        self.timeline_record("ssh", sshd_at, time.time())

    @property
    def warm(self) -> bool:
        """Whether this guest starts from a snapshot rather than booting (or loading a migration)."""
        return self.spec.snapshot is not None and self.spec.incoming is None

    def continue_snapshot(self, timeout: float) -> None:
        """Wait until the saved guest is loaded (it was saved stopped, so it stays paused), continue it, connect
        SSH; time the stages. A snapshot QEMU cannot load ends QEMU: QemuError with its stderr."""
        loading_since = time.time()

        def loaded() -> bool:
            self.check_alive()
            return str(self.qmp.command("query-status")["status"]) not in LOADING_STATES

        try:
            wait_for(loaded, min(timeout, SNAPSHOT_LOAD_TIMEOUT), f"QEMU to load the snapshot {self.spec.snapshot}",
                     interval=SERIAL_POLL_S / 5, max_interval=SERIAL_POLL_S)
        except DeadlineExceeded as error:
            raise GuestError(f"{error} ({self.logs.describe()})") from None
        self.qmp.command("cont")
        loaded_at = time.time()
        self.connect_ssh(SSH_TIMEOUT)
        self.timeline_record("snapshot-load", loading_since, loaded_at)
        self.timeline_record("ssh", loaded_at, time.time())

    def connect_ssh(self, timeout: float) -> None:
        """Connect SSH to this QEMU's forwarded port without reading the serial log.

        A migration destination needs this: its guest booted on the source, so
        its own serial log never shows the ready line.
        """
        self.check_alive()
        shell = GuestShell(self.ssh_port, self.image.ssh_key, self.image.ssh_user)
        shell.connect(timeout)
        self._shell = shell

    def disconnect_ssh(self) -> None:
        """Close SSH (before the guest is saved, or QEMU stopped); `connect_ssh` reconnects."""
        if self._shell is not None:
            self._shell.close()
            self._shell = None

    @property
    def ssh(self) -> GuestShell:
        if self._shell is None:
            raise GuestError("the guest has not booted yet; SSH is not available")
        return self._shell

    def serial_text(self, since: int = 0) -> str:
        return log_since(self.logs.serial, since)

    def expect_console_trouble(self, text: str) -> None:
        """Kernel trouble lines containing `text` are the consequence of a deviation the test met: not a problem."""
        self._expected_console_trouble.append(text)

    def problems(self, since: LogMark = FROM_START, allow_memory_reports: bool = False) -> list[str]:
        """QEMU's problems, and kernel trouble on the guest console (memory-exhaustion reports only if allowed)."""
        console = [line for line in kernel_trouble(self.serial_text(since.serial), allow_memory_reports)
                   if not any(text in line for text in self._expected_console_trouble)]
        return super().problems(since) + [f"guest console: {line}" for line in console]

    @property
    def host_balloon(self) -> HostBalloon:
        """The balloon over this QEMU's QMP; QemuError once QEMU was stopped."""
        return HostBalloon(self.qmp)


def hugetlbfs_mount() -> str:
    """The host's hugetlbfs mount point, '' when there is none."""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if parts[2] == "hugetlbfs":
                return parts[1]
    except OSError:
        pass
    return ""
