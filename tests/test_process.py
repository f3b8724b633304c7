"""The QEMU process core's stop policy and launch, against a stand-in QEMU that only speaks QMP.

The stand-in connects to the QMP socket on its command line and answers every
command; what it does with `quit` and SIGTERM is its `-fake-mode`: `obey`
exits on quit, `ignore-quit` stays (SIGTERM ends it), `ignore-term` also
ignores SIGTERM (SIGKILL ends it), `exit-early` prints an error and exits
before connecting.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vballoon.errors import QemuError
from vballoon.qemu.process import QemuBinary, QemuMachine
from vballoon.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
STAND_IN = f"""#!{sys.executable}
import json, signal, socket, sys, time
args = sys.argv[1:]
mode = args[args.index("-fake-mode") + 1]
if mode == "exit-early":
    sys.exit("qemu-system-x86_64: -fake-mode exit-early: refusing to start")
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
qmp = socket.socket(socket.AF_UNIX)
qmp.connect(next(a.split("path=", 1)[1] for a in args if a.startswith("socket,id=qmp,path=")))
def send(message):
    qmp.sendall(json.dumps(message).encode() + b"\\n")
send({{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}}, "package": ""}}, "capabilities": []}}}})
received, decoder = "", json.JSONDecoder()
while chunk := qmp.recv(4096).decode():  # requests come as JSON objects without separators
    received = (received + chunk).lstrip()
    while received:
        try:
            request, end = decoder.raw_decode(received)
        except ValueError:
            break
        received = received[end:].lstrip()
        send({{"return": {{}}, **({{"id": request["id"]}} if "id" in request else {{}})}})
        if request["execute"] == "quit" and mode == "obey":
            sys.exit(0)
while True:
    time.sleep(60)
"""


class StandIn(QemuMachine):
    """A machine whose QEMU is the stand-in, with short stop deadlines."""

    stop_timeout = 0.5

    def __init__(self, qemu: QemuBinary, log_dir: Path, mode: str) -> None:
        super().__init__(qemu, log_dir)
        self.mode = mode

    def _arguments(self) -> list[str]:
        return ["-fake-mode", self.mode]


@pytest.fixture
def stand_in(tmp_path: Path) -> QemuBinary:
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(STAND_IN)
    path.chmod(0o755)
    return QemuBinary(path, (7, 2, 0), "stand-in QEMU")


@pytest.mark.parametrize("mode, ended_by", [("obey", 0), ("ignore-quit", -signal.SIGTERM),
                                             ("ignore-term", -signal.SIGKILL)])
def test_stop_quits_then_terms_then_kills_and_removes_the_runtime_dir(stand_in: QemuBinary, tmp_path: Path,
                                                                      mode: str, ended_by: int) -> None:
    with StandIn(stand_in, tmp_path / "logs", mode) as machine:
        runtime_dir, process = machine.runtime_dir, machine.process
        assert machine.qmp.command("query-status") == {}
    assert process is not None and process.returncode == ended_by, \
        f"{mode}: expected exit {ended_by}, got {process.returncode if process else None}"
    assert not runtime_dir.exists(), f"{runtime_dir} survived the stop"
    assert '"execute": "quit"' in machine.logs.qmp.read_text(), "quit was not asked over QMP first"


def test_a_stopped_machine_has_no_qmp(stand_in: QemuBinary, tmp_path: Path) -> None:
    machine = StandIn(stand_in, tmp_path / "logs", "obey")
    with pytest.raises(QemuError, match="not running"):
        machine.qmp.command("query-status")
    with machine:
        pass
    with pytest.raises(QemuError, match="not running"):
        machine.qmp.command("query-status")


def test_qemu_exiting_before_qmp_is_reported_at_once_and_cleaned_up(stand_in: QemuBinary, tmp_path: Path) -> None:
    machine = StandIn(stand_in, tmp_path / "logs", "exit-early")
    started = time.monotonic()
    with pytest.raises(QemuError) as caught:
        machine.start()
    message = str(caught.value)
    assert time.monotonic() - started < 10, "the launch waited for QMP after QEMU had exited"
    assert "exited with status 1" in message and "refusing to start" in message, message
    assert "\n" not in message and str(machine.logs.stderr) in message, message
    assert machine.problems() and "refusing to start" in machine.device_errors()[0]
    with pytest.raises(QemuError, match="not running"):
        machine.runtime_dir  # noqa: B018 (removed with the failed start)


def test_qemu_dies_with_vballoon(stand_in: QemuBinary, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a vballoon killed outright (no cleanup runs) takes its QEMU with it."""
    script = (f"import sys, time; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n"
              "from pathlib import Path\n"
              "from test_process import StandIn\n"
              "from vballoon.qemu.process import QemuBinary\n"
              f"machine = StandIn(QemuBinary(Path({str(stand_in.path)!r}), (7, 2, 0), 'stand-in'), "
              f"Path({str(tmp_path / 'logs')!r}), 'ignore-term')\n"
              "machine.start()\n"
              "print(machine.pid, machine.runtime_dir, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid, runtime_dir = parent.stdout.readline().split()
    finally:
        parent.kill()
        parent.wait()
    shutil.rmtree(runtime_dir)  # what the killed vballoon could not clean up
    wait_for(lambda: gone(int(pid)), 10, f"QEMU {pid} to die with its parent")


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
