"""The qtest client and the guestless launcher, against the QEMU under test (--qemu)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import pytest

from vballoon.errors import QemuError
from vballoon.matrix import Variant
from vballoon.qemu.qtest import QtestClient, QtestCommandError, has_qtest_accelerator
from vballoon.qemu.qtest_machine import FIRMWARE_SIZE, HALT_FOREVER, RESET_VECTOR_OFFSET, QtestMachine
from vballoon.session import Session

SCRATCH = 0x200000  # guest RAM nobody else uses in these tests
HOST_BRIDGE_VENDOR_DEVICE = 0x29C08086  # q35's MCH at 00:00.0


@pytest.fixture
def machine(session: Session, tmp_path: Path) -> Iterator[QtestMachine]:
    with QtestMachine(session.qemu, Variant(), tmp_path / "logs") as running:
        yield running


@pytest.fixture
def qtest(machine: QtestMachine) -> QtestClient:
    return machine.qtest


def test_round_trip_answers_in_order(qtest: QtestClient) -> None:
    assert qtest.command("endianness") == "little"
    with pytest.raises(QtestCommandError, match="Unknown command 'no_such_command'"):
        qtest.command("no_such_command")
    assert qtest.command("endianness") == "little", "the connection stays usable after a FAIL"


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_write_then_read_each_width(qtest: QtestClient, width: int) -> None:
    value = int.from_bytes(bytes(range(0xA1, 0xA1 + width)), "little")
    qtest.write_int(SCRATCH, width, value)
    assert qtest.read_int(SCRATCH, width) == value
    assert qtest.read(SCRATCH, width) == value.to_bytes(width, "little"), "x86 qtest accesses are little endian"


def test_named_accessors_agree_with_bulk_memory(qtest: QtestClient) -> None:
    qtest.write(SCRATCH, bytes.fromhex("0102030405060708"))
    assert (qtest.readb(SCRATCH), qtest.readw(SCRATCH), qtest.readl(SCRATCH), qtest.readq(SCRATCH)) == \
        (0x01, 0x0201, 0x04030201, 0x0807060504030201)
    qtest.writeb(SCRATCH, 0xF1)
    qtest.writew(SCRATCH + 2, 0xF3F2)
    qtest.writel(SCRATCH + 4, 0xF7F6F5F4)
    assert qtest.read(SCRATCH, 8) == bytes.fromhex("f102f2f3f4f5f6f7")
    qtest.writeq(SCRATCH, 0x1122334455667788)
    assert qtest.read(SCRATCH, 8) == bytes.fromhex("8877665544332211")


@pytest.mark.parametrize("encoding", ["base64", "hex"])
def test_bulk_memory_round_trip(qtest: QtestClient, encoding: str) -> None:
    assert qtest.base64, "QEMU 7.2 has b64read/b64write; the probe should find them"
    qtest.base64 = encoding == "base64"
    data = os.urandom(64 * 1024 + 3)
    qtest.write(SCRATCH + 1, data)
    assert qtest.read(SCRATCH + 1, len(data)) == data
    assert qtest.read(SCRATCH, 0) == b""
    qtest.memset(SCRATCH, 16, 0x5A)
    assert qtest.read(SCRATCH, 17) == b"\x5a" * 16 + data[15:16]


def test_pipelined_writes_cost_one_round_trip(qtest: QtestClient) -> None:
    before = qtest.round_trips
    with qtest.pipeline():
        for i in range(256):
            qtest.writel(SCRATCH + 4 * i, i * 0x01010101)
        assert qtest.round_trips == before, "writes inside a pipeline must wait for the next read"
        assert qtest.readl(SCRATCH + 4 * 255) == 255 * 0x01010101
        qtest.writeb(SCRATCH, 0xEE)
    assert qtest.round_trips == before + 2, "the read and the end of the block are one round trip each"
    assert qtest.readb(SCRATCH) == 0xEE


def test_zero_fill_is_written_as_memset_and_reads_back_zero(qtest: QtestClient) -> None:
    qtest.memset(SCRATCH, 8192, 0xFF)
    qtest.recording = sent = []
    qtest.write(SCRATCH + 1, bytes(8190))
    qtest.recording = None
    assert sent == [f"memset {SCRATCH + 1:#x} 0x1ffe 0x0"], f"expected one memset line for zeros, got {sent}"
    assert qtest.read(SCRATCH, 8192) == b"\xff" + bytes(8190) + b"\xff"


def test_expected_read_rides_the_pipeline_and_is_checked_when_it_goes_out(qtest: QtestClient) -> None:
    qtest.writel(SCRATCH, 0x1234)
    before = qtest.round_trips
    with qtest.pipeline():
        qtest.expect(lambda: qtest.readl(SCRATCH), lambda value: value == 0x1234, "scratch word")
        qtest.writel(SCRATCH, 0x5678)
        assert qtest.round_trips == before, "an expected read waits for the pipeline like a write"
    assert qtest.round_trips == before + 1, "the read and the writes went out in one round trip"
    with pytest.raises(QemuError, match=r"scratch word: read 0x5678"):
        with qtest.pipeline():
            qtest.expect(lambda: qtest.readl(SCRATCH), lambda value: value == 0x1234, "scratch word")
    with pytest.raises(QemuError, match=r"scratch word: read 0x5678"):
        qtest.expect(lambda: qtest.readl(SCRATCH), lambda value: value == 0x1234, "scratch word")


def test_failure_inside_a_pipeline_names_the_request(qtest: QtestClient) -> None:
    with pytest.raises(QtestCommandError, match="irq_intercept_in /no/such/device"):
        with qtest.pipeline():
            qtest.writeb(SCRATCH, 1)
            qtest.irq_intercept_in("/no/such/device")


def test_port_io_reaches_pci_configuration(qtest: QtestClient) -> None:
    qtest.outl(0xCF8, 0x80000000)
    assert qtest.inl(0xCFC) == HOST_BRIDGE_VENDOR_DEVICE
    assert qtest.inw(0xCFC + 2) == HOST_BRIDGE_VENDOR_DEVICE >> 16
    assert qtest.inb(0xCFC + 1) == 0x80
    qtest.outb(0x80, 0)  # the POST port takes writes of any width
    qtest.outw(0x80, 0)


def test_halting_firmware_sits_at_the_reset_vector(machine: QtestMachine) -> None:
    reset_vector = 0x1_0000_0000 - FIRMWARE_SIZE + RESET_VECTOR_OFFSET
    assert machine.qtest.read(reset_vector, len(HALT_FOREVER)) == HALT_FOREVER
    status = machine.qmp.command("query-status")
    assert status["running"], f"the machine must run so timers fire; query-status says {status}"


def test_clock_step_matches_the_accelerator(machine: QtestMachine) -> None:
    if has_qtest_accelerator(machine.qemu.path):
        assert machine.accel == "qtest"
        start = machine.qtest.clock_step(0)
        assert machine.qtest.clock_step(1_000_000) == start + 1_000_000
    else:
        assert machine.accel == "tcg"
        with pytest.raises(QemuError, match="-accel qtest"):
            machine.qtest.clock_step(1_000_000)


def test_irq_intercept_accepts_the_ioapic(qtest: QtestClient) -> None:
    qtest.irq_intercept_in("ioapic")
    assert qtest.poll_irqs() == {}, "no line changes while the machine only halts"


def test_dead_qemu_is_a_clear_error(machine: QtestMachine) -> None:
    assert machine.process is not None
    os.kill(machine.process.pid, signal.SIGKILL)
    with pytest.raises(QemuError) as caught:
        machine.qtest.readl(SCRATCH)
    message = str(caught.value)
    assert "killed by SIGKILL" in message and str(machine.logs.stderr) in message, message


def test_qemu_assertion_is_reported_as_a_problem(machine: QtestMachine) -> None:
    with pytest.raises(QemuError, match="SIGABRT"):
        machine.qtest.command("read 0x0 0")  # QEMU's qtest server asserts len > 0
    problems = " ".join(machine.problems())
    assert "SIGABRT" in problems and "assertion failed" in problems, problems


def test_nothing_survives_the_machine(session: Session, tmp_path: Path) -> None:
    with QtestMachine(session.qemu, Variant(free_page_hint=True), tmp_path / "logs") as machine:
        runtime_dir = machine.runtime_dir
        process = machine.process
        assert process is not None
        assert "iothread" in machine.logs.command_line.read_text()
    assert process.poll() is not None, "QEMU still runs after the machine was left"
    assert not runtime_dir.exists(), f"{runtime_dir} (sockets, firmware) was not removed"
    assert machine.problems() == []


def test_start_failure_names_qemu_error_and_cleans_up(session: Session, tmp_path: Path) -> None:
    machine = QtestMachine(session.qemu, Variant(), tmp_path / "logs", memory_mib=-1)
    with pytest.raises(QemuError, match="exited with status 1.*expects a non-negative number") as caught:
        with machine:
            pass
    assert str(machine.logs.stderr) in str(caught.value)
    assert machine.process is not None and machine.process.poll() is not None
    with pytest.raises(QemuError, match="not running"):
        machine.runtime_dir  # noqa: B018 (removed with the failed start)
