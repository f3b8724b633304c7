"""One QEMU guest for one variant: start, talk QMP, reach SSH, notice crashes, clean up.

`Machine` is a context manager. Whatever ends the `with` block (success, a
failed assertion, a timeout, Ctrl-C) QEMU is stopped and its sockets and
temp files removed; the serial log, QEMU's stderr and the QMP transcript stay
in `log_dir` for the caller to keep or delete. QEMU is also started with
PR_SET_PDEATHSIG so it dies if vballoon itself is killed.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vballoon.errors import GuestError, QemuError, UsageError
from vballoon.guest.image import GuestImage
from vballoon.guest.ssh import GuestShell
from vballoon.matrix import Variant
from vballoon.qemu.balloon import HostBalloon, device_option
from vballoon.qemu.monitor import Monitor
from vballoon.waiting import DeadlineExceeded, wait_for

PR_SET_PDEATHSIG = 1
HOSTFWD_RETRIES = 5

# Guest console lines that mean the kernel is unwell.
GUEST_TROUBLE = re.compile(r"(Oops|BUG:|WARNING:|Call Trace|Kernel panic|general protection fault)")
# QEMU stderr lines that mean QEMU is unwell (warnings and trace lines are not).
QEMU_TROUBLE = re.compile(
    r"(Assertion .* failed"
    r"|ERROR:.*assertion failed.*"
    r"|^qemu-system-[^:]+: (?!warning:|terminating on signal|Unable to write to socket).*$"
    r"|Segmentation fault|Aborted)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class QemuBinary:
    """A qemu-system-x86_64 to test, checked once."""

    path: Path
    version: tuple[int, int, int]
    version_text: str

    @classmethod
    def find(cls, given: str | None) -> "QemuBinary":
        """Resolve `--qemu`; a missing or non-executable binary is a one-line UsageError."""
        candidate = given or shutil.which("qemu-system-x86_64")
        if candidate is None:
            raise UsageError("--qemu: qemu-system-x86_64 is not on PATH; install qemu-system-x86 "
                             "(make does) or pass --qemu PATH to your build")
        path = Path(candidate).resolve()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise UsageError(f"--qemu {candidate}: not an executable file; pass the path of qemu-system-x86_64")
        try:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as error:
            raise UsageError(f"--qemu {candidate}: does not run ({error}); pass a working qemu-system-x86_64") from None
        match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
        if not match:
            raise UsageError(f"--qemu {candidate}: '--version' printed no QEMU version; is it qemu-system-x86_64?")
        return cls(path, (int(match[1]), int(match[2]), int(match[3])), out.splitlines()[0])


@dataclass
class MachineLogs:
    """Where a machine's evidence is written."""

    directory: Path
    serial: Path = field(init=False)
    stderr: Path = field(init=False)
    qmp: Path = field(init=False)
    command_line: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.serial = self.directory / "serial.log"
        self.stderr = self.directory / "qemu-stderr.log"
        self.qmp = self.directory / "qmp-transcript.jsonl"
        self.command_line = self.directory / "qemu-command-line.txt"

    def describe(self) -> str:
        return f"serial log {self.serial}, QEMU stderr {self.stderr}, QMP transcript {self.qmp}"


def die_with_parent() -> None:
    """Runs in the child before exec: QEMU gets SIGKILL when vballoon dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Machine:
    """A QEMU guest booted for one variant, reachable over QMP and SSH."""

    def __init__(
        self,
        variant: Variant,
        image: GuestImage,
        qemu: QemuBinary,
        accel: str,
        log_dir: Path,
        memory_mib: int = 512,
        trace_events: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
        incoming: str | None = None,
    ) -> None:
        self.variant = variant
        self.image = image
        self.qemu = qemu
        self.accel = accel
        self.memory_mib = memory_mib
        self.trace_events = trace_events
        self.extra_args = extra_args
        self.incoming = incoming
        self.logs = MachineLogs(log_dir)
        self.expected_errors: list[str] = []
        """Texts of QEMU error lines a test provoked on purpose (`problems` leaves those lines out)."""
        self.ssh_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: Monitor | None = None
        self._shell: GuestShell | None = None
        self._runtime_dir: Path | None = None

    # --- lifecycle -------------------------------------------------------

    def __enter__(self) -> "Machine":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self, boot_timeout: float = 90.0) -> None:
        """Start QEMU and, unless it waits for an incoming migration, wait until the guest answers SSH.

        With `incoming`, QEMU waits paused for the migration stream; once the
        migration has completed call `connect_ssh` (not `wait_ready`).
        """
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="vballoon-qemu-"))
        for _ in range(HOSTFWD_RETRIES):
            self.ssh_port = free_local_port()
            self._launch()
            if self._hostfwd_failed():
                self._kill()
                continue
            break
        else:
            raise QemuError(f"no free port on 127.0.0.1 for the guest's SSH after {HOSTFWD_RETRIES} tries; "
                            "free some ports or stop other guests")
        if self.incoming is None:
            self.wait_ready(boot_timeout)

    def _launch(self) -> None:
        assert self._runtime_dir is not None
        qmp_socket = self._runtime_dir / f"qmp-{self.ssh_port}.sock"
        self.qmp = Monitor(qmp_socket, self.logs.qmp)
        args = self.command_line(qmp_socket)
        self.logs.command_line.write_text(" ".join(args) + "\n")
        with self.logs.stderr.open("ab") as stderr:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                preexec_fn=die_with_parent, start_new_session=True,
            )
        try:
            self.qmp.accept(timeout=30)
        except QemuError as error:
            raise QemuError(f"{error}; QEMU stderr: {tail(self.logs.stderr, 5)!r} ({self.logs.describe()})") from None

    def _hostfwd_failed(self) -> bool:
        return "Could not set up host forwarding rule" in self.logs.stderr.read_text(errors="replace")

    def command_line(self, qmp_socket: Path) -> list[str]:
        """The full QEMU command line for this variant."""
        variant, image = self.variant, self.image
        machine_opts = f"q35,accel={self.accel}"
        args = [
            str(self.qemu.path), "-nodefaults", "-no-user-config", "-display", "none",
            "-cpu", "max" if self.accel == "tcg" else "host",
            "-smp", "1", "-m", f"{self.memory_mib}M",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", " ".join([image.kernel_cmdline, *variant.kernel_args]),
            "-chardev", f"socket,id=qmp,path={qmp_socket}", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"file,id=serial0,path={self.logs.serial}", "-serial", "chardev:serial0",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=net0,romfile=",
        ]
        backend = self._memory_backend()
        if backend:
            args += ["-object", backend]
            machine_opts += ",memory-backend=mem0"
        args[args.index("-nodefaults"):args.index("-nodefaults")] = ["-machine", machine_opts]
        if variant.free_page_hint:
            args += ["-object", "iothread,id=iothread0"]
        args += ["-device", device_option(variant.device_properties())]
        for event in self.trace_events:
            args += ["-trace", event]
        if self.incoming:
            args += ["-incoming", self.incoming]
        return args + list(self.extra_args)

    def _memory_backend(self) -> str | None:
        size = f"size={self.memory_mib}M"
        return {
            "anon": None,
            "shm": f"memory-backend-ram,id=mem0,{size},share=on",
            "memfd": f"memory-backend-memfd,id=mem0,{size}",
            "hugetlb": f"memory-backend-file,id=mem0,{size},mem-path={hugetlbfs_mount()},share=on",
        }[self.variant.backend]

    def wait_ready(self, timeout: float) -> None:
        """Wait for the init's ready line on the serial console, then connect SSH."""

        def ready() -> bool:
            self.check_alive()
            return self.image.ready_marker in self.serial_text()

        try:
            wait_for(ready, timeout, "the guest to start sshd", interval=0.1,
                     describe_last=lambda: repr(tail(self.logs.serial, 3)))
        except DeadlineExceeded as error:
            reached_init = self.image.init_marker in self.serial_text()
            where = "the kernel reached /init but sshd never started" if reached_init else \
                "the kernel never reached /init; check --kernel (a bzImage with virtio drivers) and the serial log"
            raise GuestError(f"{error}: {where}; last serial lines: {tail(self.logs.serial, 5)!r} "
                             f"({self.logs.describe()})") from None
        self.connect_ssh(timeout=30)

    def connect_ssh(self, timeout: float) -> None:
        """Connect SSH to this QEMU's forwarded port without reading the serial log.

        A migration destination needs this: its guest booted on the source, so
        its own serial log never shows the ready line.
        """
        self.check_alive()
        shell = GuestShell(self.ssh_port, self.image.ssh_key, self.image.ssh_user)
        shell.connect(timeout)
        self._shell = shell

    @property
    def ssh(self) -> GuestShell:
        if self._shell is None:
            raise GuestError("the guest has not booted yet; SSH is not available")
        return self._shell

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """End QEMU (QMP quit, then SIGKILL) and remove sockets and the runtime dir."""
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        if self.process is not None and self.process.poll() is None and self.qmp is not None:
            self.qmp.try_command("quit")
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    # --- health ----------------------------------------------------------

    def serial_text(self) -> str:
        try:
            return self.logs.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        """Raise QemuError if QEMU has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise QemuError(self._exit_description())

    def _exit_description(self) -> str:
        assert self.process is not None
        code = self.process.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"QEMU {how}; stderr tail: {tail(self.logs.stderr, 5)!r} ({self.logs.describe()})"

    def problems(self) -> list[str]:
        """Evidence of a QEMU crash or a guest oops/BUG/WARNING, one line each."""
        found: list[str] = []
        if self.process is not None and self.process.poll() not in (None, 0):
            found.append(self._exit_description())
        stderr = self.logs.stderr.read_text(errors="replace") if self.logs.stderr.exists() else ""
        found += [f"QEMU stderr: {m.group(0).strip()}" for m in QEMU_TROUBLE.finditer(stderr)
                  if not any(text in m.group(0) for text in self.expected_errors)]
        found += [f"guest console: {line.strip()}" for line in self.serial_text().splitlines()
                  if GUEST_TROUBLE.search(line)]
        return found

    def assert_healthy(self) -> None:
        """Fail with the evidence and the log paths if QEMU crashed or the guest oopsed."""
        found = self.problems()
        if found:
            raise QemuError("; ".join(found[:5]) + f" ({self.logs.describe()})")

    # --- conveniences used by every suite ---------------------------------

    @property
    def host_balloon(self) -> HostBalloon:
        """The balloon over this QEMU's QMP; QemuError once QEMU was stopped."""
        if self.qmp is None:
            raise QemuError(f"QEMU is not running; {self.logs.describe()}")
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
