"""A real guest's lifecycle: boot failures explained, nothing left behind after Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vballoon.errors import GuestError
from vballoon.matrix import Variant
from vballoon.qemu.machine import Machine, MachineSpec
from vballoon.session import Session
from vballoon.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def machine_qemu(parent: int) -> tuple[int, Path] | None:
    """A guest's QEMU among the children of `parent` and its runtime dir (from the QMP socket path).

    Other children, such as the KVM probe, have no network for SSH.
    """
    for pid in children_of(parent):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        sockets = [arg for arg in args if arg.startswith(b"socket,id=qmp,path=")]
        if sockets and b"-netdev" in args:
            return pid, Path(sockets[0].decode().split("path=", 1)[1]).parent
    return None


def test_ctrl_c_leaves_no_qemu_and_no_temp_dir(session: Session, tmp_path: Path) -> None:
    """SIGINT during a guest test stops QEMU and removes its sockets (what a user's Ctrl-C sends)."""
    session.image_for(Variant())  # build before timing anything
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "suites/guest/test_boot.py", "--variant", "pci-modern",
         "-p", "no:cacheprovider", "-q", f"--basetemp={tmp_path / 'basetemp'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        # A user's shell gives pytest the default SIGINT disposition; a run started in the background of a
        # non-interactive shell (as CI scripts may) inherits SIG_IGN, which Python then keeps.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        qemu_pid, runtime_dir = wait_for(lambda: machine_qemu(run.pid), 120, "the run to start a guest's QEMU")
        os.kill(run.pid, signal.SIGINT)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    text = output.decode(errors="replace")
    assert not Path(f"/proc/{qemu_pid}").exists(), f"QEMU {qemu_pid} survived Ctrl-C; run output:\n{text[-2000:]}"
    assert not runtime_dir.exists(), f"runtime dir {runtime_dir} survived Ctrl-C"
    assert "KeyboardInterrupt" in text or "Interrupted" in text, f"the run did not see the interrupt:\n{text[-2000:]}"


def test_kernel_that_never_reaches_init_is_explained(session: Session, tmp_path: Path) -> None:
    """An initrd the kernel cannot use: a GuestError saying /init was never reached, with the last serial lines."""
    image = session.image_for(Variant())
    broken = tmp_path / "broken-initrd"
    broken.write_bytes(b"not a cpio archive\n" * 64)
    machine = Machine(MachineSpec(Variant(), dataclasses.replace(image, initrd=broken), session.qemu,
                                  session.accel(image).accel, tmp_path / "logs", boot_timeout=25))
    with pytest.raises(GuestError) as caught:
        machine.start()
    message = str(caught.value)
    assert "never reached /init" in message and "serial.log" in message, message
    assert machine.process is not None and machine.process.poll() is not None, "QEMU still runs after a failed start"
