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
from typing import Any, Collection, Sequence

from vballoon.errors import QemuError
from vballoon.matrix import Variant
from vballoon.qemu.balloon import HostBalloon, device_option
from vballoon.qemu.machine import MachineLogs, QemuBinary, die_with_parent, tail
from vballoon.qemu.monitor import Monitor
from vballoon.qemu.qtest import QtestClient, has_qtest_accelerator
from vballoon.qemu.virtio_pci import BALLOON_DEVICE_ID_MODERN, BALLOON_DEVICE_ID_TRANSITIONAL, VirtioPciDriver
from vballoon.spec import BALLOON_FEATURES, PAGE_SIZE, BalloonConfig, ConfigField, Feature, Status, encode_pfns, \
    feature_mask, has_feature
from vballoon.virtqueue import Buffer, SplitDriverQueue, UsedElement
from vballoon.waiting import DeadlineExceeded, wait_for

FIRMWARE_SIZE = 64 * 1024
RESET_VECTOR_OFFSET = 0xFFF0
HALT_FOREVER = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
IOTHREAD_ID = "iothread0"
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 5.0
CRASH_LINE = re.compile(r"^(ERROR:.*(assertion failed|code should not be reached).*|.*Assertion .* failed.*|"
                        r".*Segmentation fault.*|.*Aborted.*)$", re.MULTILINE)
DEVICE_ERROR_LINE = re.compile(r"^qemu-system-[^:]+: (?!warning:|terminating on signal|.*Assertion .* failed)(.*)$",
                               re.MULTILINE)
INFLATEQ = 0
DEFLATEQ = 1
STATSQ = 2


def halting_firmware() -> bytes:
    """A 64 KiB BIOS image whose reset vector disables interrupts and halts forever."""
    image = bytearray(FIRMWARE_SIZE)
    image[RESET_VECTOR_OFFSET:RESET_VECTOR_OFFSET + len(HALT_FOREVER)] = HALT_FOREVER
    return bytes(image)


class QtestMachine:
    """QEMU with one virtio-balloon-pci device, a qtest connection and QMP, but no guest."""

    def __init__(self, qemu: QemuBinary, variant: Variant, log_dir: Path, memory_mib: int = 128,
                 trace_events: tuple[str, ...] = (), qtest_timeout: float = 10.0, keep_transcripts: bool = True
                 ) -> None:
        self.qemu = qemu
        self.keep_transcripts = keep_transcripts
        """The qtest and QMP transcripts; off for long runs of many inputs (a fuzzer's QEMU): they would grow
        without end, and writing them costs more than a qtest round trip per input."""
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
        self._expected_device_errors: list[str] = []

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
            self._qmp = Monitor(qmp_socket, self.logs.qmp if self.keep_transcripts else None)
            args = self.command_line(firmware, qtest_socket, qmp_socket)
            self.logs.command_line.write_text(" ".join(args) + "\n")
            with self.logs.stderr.open("ab") as stderr:
                self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                                preexec_fn=die_with_parent, start_new_session=True)
            connection = self._accept(listener)
        finally:
            listener.close()
        transcript = self.qtest_transcript.open("w", encoding="ascii") if self.keep_transcripts else None
        try:
            self._qtest = QtestClient(connection, self.exit_description, timeout=self.qtest_timeout,
                                      clock_step_supported=self.accel == "qtest", transcript=transcript)
        except BaseException:
            connection.close()
            if transcript is not None:
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
        args = self._machine_args() + [
            "-bios", str(firmware), "-qtest", f"unix:{qtest_socket}", "-qtest-log", "none",
            "-chardev", f"socket,id=qmp,path={qmp_socket}", "-mon", "chardev=qmp,mode=control",
        ]
        for event in self.trace_events:
            args += ["-trace", event]
        return args

    def standalone_command_line(self) -> list[str]:
        """The same machine with qtest on stdin/stdout, for a reproducer pasted into a shell.

        No QMP and no firmware stub: the machine stays stopped (-S), which the
        device's registers and queues do not need.
        """
        return self._machine_args() + ["-qtest", "stdio", "-qtest-log", "none"]

    def _machine_args(self) -> list[str]:
        args = [
            str(self.qemu.path), "-machine", "q35", "-accel", self.accel,
            "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-m", f"{self.memory_mib}M", "-smp", "1",
        ]
        if self.variant.free_page_hint:
            args += ["-object", f"iothread,id={IOTHREAD_ID}"]
        return args + ["-device", device_option(self.variant.device_properties(IOTHREAD_ID))]

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
        transcripts = (f", QMP transcript {self.logs.qmp}, qtest transcript {self.qtest_transcript}"
                       if self.keep_transcripts else "")
        return f"QEMU stderr {self.logs.stderr}{transcripts}, command line {self.logs.command_line}"

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

    def _stderr_text(self) -> str:
        return self.logs.stderr.read_text(errors="replace") if self.logs.stderr.exists() else ""

    def crash_evidence(self) -> list[str]:
        """Exit by a signal or a failure status, assertion, segfault or abort lines on stderr."""
        found: list[str] = []
        if self.process is not None and self.process.poll() not in (None, 0):
            found.append(self.exit_description())
        found += [f"QEMU stderr: {m.group(0).strip()}" for m in CRASH_LINE.finditer(self._stderr_text())]
        return found

    def device_errors(self) -> list[str]:
        """The texts QEMU printed as `qemu-system-x86_64: <text>` (virtio_error and other errors), in order."""
        return [m.group(1).strip() for m in DEVICE_ERROR_LINE.finditer(self._stderr_text())]

    def expect_device_error(self, text: str) -> None:
        """A device error containing `text` is what the test provokes: not a problem."""
        self._expected_device_errors.append(text)

    def problems(self) -> list[str]:
        """Crash evidence, and device errors nobody said to expect."""
        unexpected = [f"QEMU stderr: qemu-system-x86_64: {line}" for line in self.device_errors()
                      if not any(text in line for text in self._expected_device_errors)]
        return self.crash_evidence() + unexpected

    def assert_healthy(self) -> None:
        """Raise QemuError with the evidence and the log paths if QEMU crashed."""
        found = self.problems()
        if found:
            raise QemuError("; ".join(found[:5]) + f" ({self.describe_logs()})")

    @property
    def host_balloon(self) -> HostBalloon:
        """The balloon over this QEMU's QMP."""
        return HostBalloon(self.qmp)


class QtestBalloon:
    """The balloon as a driver on the host sees it: queues by role, PFN and stats buffers, config fields."""

    def __init__(self, machine: QtestMachine, legacy_interface: bool) -> None:
        self.machine = machine
        self.qtest = machine.qtest
        self.driver = VirtioPciDriver.open(machine.qtest, machine.ram_bytes,
                                           (BALLOON_DEVICE_ID_MODERN, BALLOON_DEVICE_ID_TRANSITIONAL),
                                           legacy_interface)
        self.offered = self.driver.interface.device_features()
        self._queue_sizes: dict[int, int] = {}
        """Queue sizes, fixed when QEMU created the device: read once, not once per queue per negotiation."""

    @property
    def default_features(self) -> int:
        """Every offered balloon feature, plus VERSION_1 when offered."""
        return self.offered & feature_mask(*BALLOON_FEATURES, Feature.VERSION_1)

    def queue_index(self, feature: Feature) -> int:
        """Where QEMU 7.2 and 10.0 put the hinting and reporting queues: after statsq, in that order, when offered."""
        index = STATSQ + 1
        if feature == Feature.REPORTING and has_feature(self.offered, Feature.FREE_PAGE_HINT):
            index += 1
        return index

    def start(self, features: int | None = None, poison_val: int | None = None,
              queues: Collection[int] | None = None) -> int:
        """Negotiate (default: `default_features`), write `poison_val` if given (before DRIVER_OK, as
        BAL-DRV-PP-2 asks), set up the queues (default: every queue QEMU created; a driver configures the
        virtqueues it uses, virtio 4.1.5.1.3), DRIVER_OK; the features."""
        features = self.default_features if features is None else features
        if not self.driver.negotiate(features):
            raise QemuError(f"the device refused FEATURES_OK for {features:#x}; status {self.driver.status:#x}")
        indices = [INFLATEQ, DEFLATEQ, STATSQ] + [self.queue_index(f) for f in (Feature.FREE_PAGE_HINT,
                                                                                Feature.REPORTING)
                                                  if has_feature(self.offered, f)]
        if queues is not None:
            indices = [index for index in indices if index in queues]
        for index in indices:
            if index not in self._queue_sizes:
                self._queue_sizes[index] = self.driver.interface.queue_max_size(index)
        with self.qtest.pipeline():  # no read from here on: one round trip
            if poison_val is not None:
                self.driver.config_write(ConfigField.POISON_VAL, 4, poison_val)
            for index in indices:
                self._setup_queue(index, self._queue_sizes[index])
            accepted = Status.ACKNOWLEDGE | Status.DRIVER | (0 if self.driver.interface.is_legacy else
                                                             Status.FEATURES_OK)
            self.driver.set_status(accepted | Status.DRIVER_OK)
        return features

    def _setup_queue(self, index: int, size: int) -> None:
        """`VirtioPciDriver.setup_queue` with the size known: lay the ring out and enable it, without a read."""
        driver = self.driver
        base = driver.allocator.alloc(driver.interface.ring_bytes(size), align=PAGE_SIZE)
        layout = driver.interface.ring_layout(size, base)
        driver.queues[index] = SplitDriverQueue(self.qtest, layout, event_idx=has_feature(driver.features,
                                                                                          Feature.EVENT_IDX),
                                                endian=driver.endian)
        driver.interface.enable_queue(index, layout)

    # --- buffers ---------------------------------------------------------

    def new_page(self, fill: int | None = None) -> int:
        """A fresh 4 KiB page of guest RAM, optionally filled with one byte value."""
        page = self.driver.allocator.alloc(PAGE_SIZE, align=PAGE_SIZE)
        if fill is not None:
            self.qtest.memset(page, PAGE_SIZE, fill)
        return page

    def post(self, queue: int, out: Sequence[bytes], writable: Sequence[Buffer] = ()) -> int:
        """Put `out` buffers in guest RAM, publish one chain of them and `writable`, and notify; its head."""
        buffers = [self._place(data) for data in out]
        with self.qtest.pipeline():
            head = self.driver.queues[queue].add_and_publish(buffers, writable)
            self.driver.notify(queue)
        return head

    def _place(self, data: bytes) -> Buffer:
        address = self.driver.allocator.alloc(max(len(data), 1))
        self.qtest.write(address, data)
        return Buffer(address, len(data))

    def exchange(self, queue: int, out: Sequence[bytes], writable: Sequence[Buffer] = (),
                 timeout: float = 5.0) -> UsedElement:
        """Post one chain and wait for the device to use it."""
        head = self.post(queue, out, writable)
        (used,) = self.driver.wait_used(queue, 1, timeout)
        assert used.id == head, f"device used head {used.id}, expected {head}"
        return used

    def inflate(self, pfns: Sequence[int]) -> UsedElement:
        return self.exchange(INFLATEQ, [encode_pfns(pfns, self.driver.endian)])

    def deflate(self, pfns: Sequence[int]) -> UsedElement:
        return self.exchange(DEFLATEQ, [encode_pfns(pfns, self.driver.endian)])

    # --- configuration and QMP -----------------------------------------------

    def config_field(self, field: ConfigField) -> int:
        return self.driver.config_read(int(field), 4)

    def read_config(self, size: int) -> BalloonConfig:
        """The first `size` bytes of the config space, read one byte at a time."""
        return BalloonConfig.decode(bytes(self.driver.config_read(i, 1) for i in range(size)))

    def guest_stats(self) -> dict[str, Any]:
        return self.machine.host_balloon.guest_stats()
