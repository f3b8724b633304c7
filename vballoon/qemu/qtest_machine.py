"""A QEMU without a guest, driven over qtest: the host plays the balloon's driver.

`QtestMachine` starts `qemu-system-x86_64 -machine q35` with the balloon of
one `Variant`, a qtest socket and QMP. No kernel boots. Where the binary has
the qtest accelerator it runs under `-accel qtest` (virtual time moves only
with `clock_step`); elsewhere (Debian's 7.2) it runs under TCG on a firmware
stub that only halts, so that after `cont` timers (stats polling, migration)
run in real time while the CPU sleeps.

It is a context manager: whatever ends the block, QEMU is killed and the
runtime dir (sockets, firmware stub) removed; QEMU's stderr, the QMP
transcript, the qtest transcript and the command line stay in `log_dir`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from vballoon.errors import QemuError
from vballoon.matrix import Variant
from vballoon.qemu.machine import QEMU_TROUBLE, MachineLogs, QemuBinary, die_with_parent, tail
from vballoon.qemu.monitor import Monitor
from vballoon.qemu.qtest import QtestClient, has_qtest_accelerator
from vballoon.waiting import DeadlineExceeded, wait_for

FIRMWARE_SIZE = 64 * 1024
RESET_VECTOR_OFFSET = 0xFFF0
HALT_FOREVER = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
BALLOON_ID = "balloon0"
IOTHREAD_ID = "iothread0"
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 5.0
GLIB_ASSERTION = re.compile(r"^ERROR:.*(assertion failed|code should not be reached).*$", re.MULTILINE)


def halting_firmware() -> bytes:
    """A 64 KiB BIOS image whose reset vector disables interrupts and halts forever."""
    image = bytearray(FIRMWARE_SIZE)
    image[RESET_VECTOR_OFFSET:RESET_VECTOR_OFFSET + len(HALT_FOREVER)] = HALT_FOREVER
    return bytes(image)


class QtestMachine:
    """QEMU with one virtio-balloon-pci device, a qtest connection and QMP, but no guest."""

    def __init__(self, qemu: QemuBinary, variant: Variant, log_dir: Path, memory_mib: int = 128,
                 trace_events: tuple[str, ...] = (), qtest_timeout: float = 10.0) -> None:
        self.qemu = qemu
        self.variant = variant
        self.memory_mib = memory_mib
        self.trace_events = trace_events
        self.qtest_timeout = qtest_timeout
        self.logs = MachineLogs(log_dir)
        self.qtest_transcript = self.logs.directory / "qtest-transcript.txt"
        self.accel = "qtest" if has_qtest_accelerator(qemu.path) else "tcg"
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: Monitor | None = None
        self._qtest: QtestClient | None = None
        self._runtime_dir: Path | None = None

    @property
    def ram_bytes(self) -> int:
        return self.memory_mib << 20

    @property
    def qtest(self) -> QtestClient:
        if self._qtest is None:
            raise QemuError("the qtest machine is not running")
        return self._qtest

    @property
    def qmp(self) -> Monitor:
        if self._qmp is None:
            raise QemuError("the qtest machine is not running")
        return self._qmp

    # --- lifecycle -------------------------------------------------------

    def __enter__(self) -> "QtestMachine":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Launch QEMU stopped, connect qtest and QMP, then let virtual time run."""
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="vballoon-qtest-"))
        firmware = self._runtime_dir / "halt.bin"
        firmware.write_bytes(halting_firmware())
        qtest_socket = self._runtime_dir / "qtest.sock"
        qmp_socket = self._runtime_dir / "qmp.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(qtest_socket))
            listener.listen(1)
            self._qmp = Monitor(qmp_socket, self.logs.qmp)
            args = self.command_line(firmware, qtest_socket, qmp_socket)
            self.logs.command_line.write_text(" ".join(args) + "\n")
            with self.logs.stderr.open("ab") as stderr:
                self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                                preexec_fn=die_with_parent, start_new_session=True)
            connection = self._accept(listener)
        finally:
            listener.close()
        transcript = self.qtest_transcript.open("w", encoding="ascii")
        try:
            self._qtest = QtestClient(connection, self.exit_description, timeout=self.qtest_timeout,
                                      clock_step_supported=self.accel == "qtest", transcript=transcript)
        except BaseException:
            connection.close()
            transcript.close()
            raise
        try:
            self._qmp.accept(timeout=START_TIMEOUT)
        except QemuError as error:
            raise QemuError(f"{error}; {self.exit_description()}") from None
        self._qmp.command("cont")

    def _accept(self, listener: socket.socket) -> socket.socket:
        """QEMU's qtest connection; a QEMU that exits first is reported with its stderr."""
        listener.settimeout(0.0)

        def connected() -> socket.socket | None:
            self.check_alive()
            try:
                return listener.accept()[0]
            except BlockingIOError:
                return None

        try:
            connection = wait_for(connected, START_TIMEOUT, "QEMU to connect to the qtest socket", interval=0.01)
        except DeadlineExceeded as error:
            raise QemuError(f"{error}; {self.exit_description()}") from None
        connection.setblocking(True)
        return connection

    def command_line(self, firmware: Path, qtest_socket: Path, qmp_socket: Path) -> list[str]:
        """The QEMU command line: q35, the halting firmware, qtest, QMP, the balloon."""
        args = [
            str(self.qemu.path), "-machine", "q35", "-accel", self.accel,
            "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-m", f"{self.memory_mib}M", "-smp", "1", "-bios", str(firmware),
            "-qtest", f"unix:{qtest_socket}", "-qtest-log", "none",
            "-chardev", f"socket,id=qmp,path={qmp_socket}", "-mon", "chardev=qmp,mode=control",
        ]
        if self.variant.free_page_hint:
            args += ["-object", f"iothread,id={IOTHREAD_ID}"]
        props = ",".join(f"{k}={v}" for k, v in self.variant.device_properties(IOTHREAD_ID).items())
        args += ["-device", f"virtio-balloon-pci,id={BALLOON_ID},{props}"]
        for event in self.trace_events:
            args += ["-trace", event]
        return args

    def stop(self) -> None:
        """Close qtest and QMP, SIGTERM QEMU, SIGKILL what is left; the runtime dir goes whatever happens."""
        try:
            if self._qtest is not None:
                self._qtest.close()
                self._qtest = None
            if self._qmp is not None:
                monitor, self._qmp = self._qmp, None
                try:
                    monitor.close()
                except EOFError:
                    pass  # QEMU went away while the QMP connection was being closed
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(EXIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        finally:
            if self._runtime_dir is not None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
                self._runtime_dir = None

    # --- health ----------------------------------------------------------

    def describe_logs(self) -> str:
        return (f"QEMU stderr {self.logs.stderr}, QMP transcript {self.logs.qmp}, "
                f"qtest transcript {self.qtest_transcript}, command line {self.logs.command_line}")

    def check_alive(self) -> None:
        """Raise QemuError if QEMU has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise QemuError(self.exit_description())

    def exit_description(self) -> str:
        """How QEMU ended (or that it still runs), its last stderr lines and where the logs are."""
        if self.process is None:
            return f"QEMU was not started ({self.describe_logs()})"
        try:
            code = self.process.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"QEMU is still running but not answering ({self.describe_logs()})"
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"QEMU {how}; stderr tail: {tail(self.logs.stderr, 5)!r} ({self.describe_logs()})"

    def problems(self) -> list[str]:
        """Evidence of a QEMU crash: exit by signal or failure status, assertion or error lines on stderr."""
        found: list[str] = []
        if self.process is not None and self.process.poll() not in (None, 0):
            found.append(self.exit_description())
        stderr = self.logs.stderr.read_text(errors="replace") if self.logs.stderr.exists() else ""
        found += [f"QEMU stderr: {m.group(0).strip()}" for pattern in (QEMU_TROUBLE, GLIB_ASSERTION)
                  for m in pattern.finditer(stderr)]
        return found

    def assert_healthy(self) -> None:
        """Raise QemuError with the evidence and the log paths if QEMU crashed."""
        found = self.problems()
        if found:
            raise QemuError("; ".join(found[:5]) + f" ({self.describe_logs()})")

    def balloon_qom_path(self) -> str:
        return f"/machine/peripheral/{BALLOON_ID}"
