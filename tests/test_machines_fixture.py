"""The `machines` fixture, run on a small test file by a pytest of its own: what a test leaves behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = '''
import os
import pytest
from fixtures.qtest_device import TRANSPORTS, over

def note(machine):
    print(f"qemu-pid {machine.pid} runtime-dir {machine.runtime_dir}", flush=True)

@over(TRANSPORTS[:1])
def test_fails(qtest_machine):
    note(qtest_machine)
    assert False, "fails on purpose"

@over(TRANSPORTS[:1])
def test_passes(qtest_machine):
    note(qtest_machine)

@over(TRANSPORTS[:1])
def test_crashes_qemu(qtest_machine):
    note(qtest_machine)
    with pytest.raises(Exception):
        qtest_machine.qtest.command("read 0x0 0")  # QEMU's qtest server asserts len > 0
'''


def test_machines_are_stopped_and_only_failed_tests_keep_their_logs(tmp_path: Path) -> None:
    (tmp_path / "test_subject.py").write_text(TESTS)
    junit = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-s", "-q",
         f"--junitxml={junit}", "-o", "junit_family=xunit1", "test_subject.py"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    started = re.findall(r"qemu-pid (\d+) runtime-dir (\S+)", output)
    assert len(started) == 3, output[-3000:]
    for pid, runtime_dir in started:
        assert not Path(f"/proc/{pid}").exists(), f"QEMU {pid} outlived its test:\n{output[-3000:]}"
        assert not Path(runtime_dir).exists(), f"runtime dir {runtime_dir} outlived its test"

    logs = {path.name: path for path in (tmp_path / "reports" / "logs").iterdir()}
    assert sorted(logs) == ["test_subject.py_test_crashes_qemu_pci-modern_", "test_subject.py_test_fails_pci-modern_"], \
        f"expected the logs of the failed tests only, got {sorted(logs)}"
    for folder in logs.values():
        assert (folder / "qemu-stderr.log").exists() and (folder / "qtest-transcript.txt").exists()
    assert output.count("vballoon logs kept") == 2, output[-3000:]
    assert "SIGABRT" in output and "assertion failed" in output, "the crash was not reported at teardown"

    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    names = [prop.get("name") for prop in cases["test_passes[pci-modern]"].iter("property")]
    assert sorted(names) == ["accelerator", "qemu_version", "variant"], names
