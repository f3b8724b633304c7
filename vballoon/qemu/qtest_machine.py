"""A QEMU without a guest, driven over qtest: the host plays the balloon's driver.

`QtestMachine` starts `qemu-system-x86_64 -machine q35` with the balloon of
one `Variant`, a qtest socket and QMP. No kernel boots. Where the binary has
the qtest accelerator it runs under `-accel qtest` (virtual time moves only
with `clock_step`); elsewhere (Debian's 7.2) it runs under TCG on a firmware
stub that only halts, so that after `cont` timers (stats polling, migration)
run in real time while the CPU sleeps.

Starting, stopping and QEMU's health are the process core's
(`vballoon.qemu.process`); this kind of machine adds the firmware stub and
the qtest connection (its transcript: qtest-transcript.txt).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Collection, Sequence

from vballoon.errors import QemuError, UsageError
from vballoon.matrix import Variant
from vballoon.qemu.balloon import HostBalloon, device_args
from vballoon.qemu.process import START_TIMEOUT, QemuBinary, QemuMachine
from vballoon.qemu.qtest import QtestClient, has_qtest_accelerator
from vballoon.qemu.virtio_pci import BALLOON_DEVICE_ID_MODERN, BALLOON_DEVICE_ID_TRANSITIONAL, VirtioPciDriver
from vballoon.spec import BALLOON_FEATURES, PAGE_SIZE, BalloonConfig, ConfigField, Feature, Status, encode_pfns, \
    feature_mask, has_feature
from vballoon.virtqueue import DESC_SIZE, Buffer, UsedElement
from vballoon.waiting import DeadlineExceeded, wait_for

FIRMWARE_SIZE = 64 * 1024
RESET_VECTOR_OFFSET = 0xFFF0
HALT_FOREVER = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
INFLATEQ = 0
DEFLATEQ = 1
STATSQ = 2


def halting_firmware() -> bytes:
    """A 64 KiB BIOS image whose reset vector disables interrupts and halts forever."""
    image = bytearray(FIRMWARE_SIZE)
    image[RESET_VECTOR_OFFSET:RESET_VECTOR_OFFSET + len(HALT_FOREVER)] = HALT_FOREVER
    return bytes(image)


class QtestMachine(QemuMachine):
    """QEMU with one virtio-balloon-pci device, a qtest connection and QMP, but no guest."""

    def __init__(self, qemu: QemuBinary, variant: Variant, log_dir: Path, memory_mib: int = 128,
                 trace_events: tuple[str, ...] = (), qtest_timeout: float = 10.0, keep_transcripts: bool = True
                 ) -> None:
        super().__init__(qemu, log_dir, trace_events, keep_transcripts=keep_transcripts)
        self.variant = variant
        self.memory_mib = memory_mib
        self.qtest_timeout = qtest_timeout
        self.accel = "qtest" if has_qtest_accelerator(qemu.path) else "tcg"
        self._listener: socket.socket | None = None
        self._qtest: QtestClient | None = None

    @property
    def ram_bytes(self) -> int:
        return self.memory_mib << 20

    @property
    def qtest(self) -> QtestClient:
        if self._qtest is None:
            raise QemuError("the qtest machine is not running")
        return self._qtest

    # --- what this kind of machine adds to the core ---------------------------------

    def _before_launch(self) -> None:
        """The firmware stub, and the qtest socket listening before QEMU connects to it."""
        (self.runtime_dir / "halt.bin").write_bytes(halting_firmware())
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.runtime_dir / "qtest.sock"))
        self._listener.listen(1)

    def _arguments(self) -> list[str]:
        """q35 stopped (-S), the balloon, the halting firmware and qtest."""
        return [*self._machine_args(), "-bios", str(self.runtime_dir / "halt.bin"),
                "-qtest", f"unix:{self.runtime_dir / 'qtest.sock'}", "-qtest-log", "none"]

    def _after_launch(self) -> None:
        """Connect qtest, then let (virtual) time run."""
        assert self._listener is not None
        connection = self._accept(self._listener)
        self._listener.close()
        self._listener = None
        transcript = self.logs.qtest.open("w", encoding="ascii") if self.keep_transcripts else None
        try:
            self._qtest = QtestClient(connection, self.exit_description, timeout=self.qtest_timeout,
                                      clock_step_supported=self.accel == "qtest", transcript=transcript)
        except BaseException:
            connection.close()
            if transcript is not None:
                transcript.close()
            raise
        self.qmp.command("cont")

    def _before_stop(self) -> None:
        for connection in (self._qtest, self._listener):
            if connection is not None:
                connection.close()
        self._qtest, self._listener = None, None

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

    def standalone_command_line(self) -> list[str]:
        """The same machine with qtest on stdin/stdout, for a reproducer pasted into a shell.

        No QMP and no firmware stub: the machine stays stopped (-S), which the
        device's registers and queues do not need.
        """
        return self.qemu.command_line(*self._machine_args(), "-qtest", "stdio", "-qtest-log", "none")

    def _machine_args(self) -> list[str]:
        return ["-machine", "q35", "-accel", self.accel, "-S", "-m", f"{self.memory_mib}M", "-smp", "1",
                *device_args(self.variant)]

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
        """Every offered balloon feature, plus VERSION_1 and RING_PACKED when offered: like Linux, the driver takes
        the packed layout whenever the device offers it (packed=on)."""
        return self.offered & feature_mask(*BALLOON_FEATURES, Feature.VERSION_1, Feature.RING_PACKED)

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
                self.driver.create_queue(index, self._queue_sizes[index])
            accepted = Status.ACKNOWLEDGE | Status.DRIVER | (0 if self.driver.interface.is_legacy else
                                                             Status.FEATURES_OK)
            self.driver.set_status(accepted | Status.DRIVER_OK)
        return features

    # --- buffers ---------------------------------------------------------

    def new_page(self, fill: int | None = None) -> int:
        """A fresh 4 KiB page of guest RAM, optionally filled with one byte value."""
        page = self.driver.allocator.alloc(PAGE_SIZE, align=PAGE_SIZE)
        if fill is not None:
            self.qtest.memset(page, PAGE_SIZE, fill)
        return page

    def post(self, queue: int, out: Sequence[bytes], writable: Sequence[Buffer] = (), *, indirect: bool = False) -> int:
        """Put `out` buffers in guest RAM, publish one chain of them and `writable`, and notify; its head (split) or
        buffer id (packed).

        With `indirect` the chain goes through an indirect table, which needs
        VIRTIO_F_INDIRECT_DESC negotiated; a test that breaks that rule on
        purpose adds its chain through `driver.queues[queue]` itself.
        """
        if indirect and not has_feature(self.driver.features, Feature.INDIRECT_DESC):
            raise UsageError(f"indirect=True on queue {queue}: VIRTIO_F_INDIRECT_DESC is not negotiated "
                             f"(features {self.driver.features:#x}); negotiate it or post without indirect")
        buffers = [self._place(data) for data in out]
        table = self.driver.allocator.alloc(DESC_SIZE * (len(buffers) + len(writable))) if indirect else None
        with self.qtest.pipeline():
            head = self.driver.queues[queue].add_and_publish(buffers, writable, indirect_table=table)
            self.driver.notify(queue)
        return head

    def _place(self, data: bytes) -> Buffer:
        address = self.driver.allocator.alloc(max(len(data), 1))
        self.qtest.write(address, data)
        return Buffer(address, len(data))

    def exchange(self, queue: int, out: Sequence[bytes], writable: Sequence[Buffer] = (),
                 timeout: float = 5.0, *, indirect: bool = False) -> UsedElement:
        """Post one chain (through an indirect table with `indirect`) and wait for the device to use it."""
        head = self.post(queue, out, writable, indirect=indirect)
        (used,) = self.driver.wait_used(queue, 1, timeout)
        assert used.id == head, f"device used head {used.id}, expected {head}"
        return used

    def inflate(self, pfns: Sequence[int], *, indirect: bool = False) -> UsedElement:
        return self.exchange(INFLATEQ, [encode_pfns(pfns, self.driver.endian)], indirect=indirect)

    def deflate(self, pfns: Sequence[int], *, indirect: bool = False) -> UsedElement:
        return self.exchange(DEFLATEQ, [encode_pfns(pfns, self.driver.endian)], indirect=indirect)

    # --- configuration and QMP -----------------------------------------------

    def config_field(self, field: ConfigField) -> int:
        return self.driver.config_read(int(field), 4)

    def read_config(self, size: int) -> BalloonConfig:
        """The first `size` bytes of the config space, read one byte at a time."""
        return BalloonConfig.decode(bytes(self.driver.config_read(i, 1) for i in range(size)))

    def guest_stats(self) -> dict[str, Any]:
        return self.machine.host_balloon.guest_stats()
