"""Machine plumbing that needs no guest: finding QEMU, ports, crash evidence."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vballoon.errors import UsageError
from vballoon.guest.health import GUEST_TROUBLE
from vballoon.qemu.machine import free_local_port
from vballoon.qemu.process import QemuBinary, crash_lines, error_lines


def test_missing_qemu_is_one_line_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        QemuBinary.find(str(tmp_path / "qemu-system-x86_64"))
    assert str(caught.value).startswith("--qemu ") and "\n" not in str(caught.value), str(caught.value)


def test_non_executable_qemu_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho hello\n")
    with pytest.raises(UsageError, match="not an executable file"):
        QemuBinary.find(str(fake))


def test_a_program_that_is_not_qemu_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'not an emulator'\n")
    fake.chmod(0o755)
    with pytest.raises(UsageError, match="printed no QEMU version"):
        QemuBinary.find(str(fake))


def test_installed_qemu_reports_its_version(session) -> None:  # type: ignore[no-untyped-def]
    assert session.qemu.version >= (7, 0, 0), f"expected QEMU 7.0 or later, got {session.qemu.version_text}"
    assert os.access(session.qemu.path, os.X_OK)


def test_free_local_port_is_bindable_on_loopback() -> None:
    port = free_local_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("line", [
    "qemu-system-x86_64: ../hw/virtio/virtio.c:123: virtqueue_pop: Assertion `x' failed.",
    "ERROR:../util/qemu-thread-posix.c:92:qemu_mutex_lock_impl: assertion failed: (x)",
    "ERROR:../hw/virtio/virtio.c:42:virtqueue_fill: code should not be reached",
    "Segmentation fault (core dumped)",
])
def test_a_crash_is_recognised_and_is_not_an_error_line(line: str) -> None:
    assert crash_lines(line) == [line], f"not recognised as a crash: {line!r}"
    assert error_lines(line) == [], f"a crash also counted as an error QEMU printed: {line!r}"


def test_an_error_qemu_printed_is_recognised_with_its_text() -> None:
    stderr = "12@1.5:virtio_balloon_set_config actual: 0\nqemu-system-x86_64: received an incorrect cmd id\n"
    assert error_lines(stderr) == ["received an incorrect cmd id"]
    assert crash_lines(stderr) == []


@pytest.mark.parametrize("line", [
    "qemu-system-x86_64: warning: host doesn't support requested feature",
    "qemu-system-x86_64: terminating on signal 15 from pid 4242",
    "qemu-system-x86_64: Unable to write to socket: Broken pipe",  # a cancelled migration's closed stream
    "12345@1700000000.000001:virtio_balloon_handle_output section name: pc.ram gpa: 0x1000",
])
def test_warnings_and_trace_lines_are_not_trouble(line: str) -> None:
    assert crash_lines(line) == [] and error_lines(line) == [], f"wrongly taken for QEMU trouble: {line!r}"


@pytest.mark.parametrize("line", [
    "[   12.3] WARNING: CPU: 0 PID: 1 at mm/balloon_compaction.c:42 balloon_page_enqueue+0x1/0x2",
    "[    3.1] BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "[    3.2] Kernel panic - not syncing: Out of memory and no killable processes...",
])
def test_guest_trouble_is_recognised(line: str) -> None:
    assert GUEST_TROUBLE.search(line)
