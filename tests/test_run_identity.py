"""The run identity in JUnit files: vballoon's version, the QEMU binary and the guest kernel, as testsuite properties."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from fixtures.run_identity import kernel_identity, qemu_identity, vballoon_version
from vballoon.run_identity import COLLECTED, IDENTITY, KERNEL, QEMU, SHARD, VERSION

REPO = Path(__file__).resolve().parent.parent
RELEASE = "6.99.0-vballoon-test"
TINY_TESTS = '''
import pytest

def test_passes():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_more(n):
    pass
'''


def fake_bzimage(path: Path) -> Path:
    """Enough of a bzImage for its header's kernel version string: the offset at 0x20E, the text at offset+0x200."""
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x400)
    text = f"{RELEASE} (builder@host) #1 SMP PREEMPT_DYNAMIC".encode()
    data[0x600:0x600 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


def fake_qemu(path: Path) -> Path:
    path.write_text('#!/bin/sh\necho "QEMU emulator version 9.8.7 (vballoon test)"\n')
    path.chmod(0o755)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_property_names_are_the_shared_ones() -> None:
    assert (SHARD, COLLECTED, VERSION, QEMU, KERNEL) == (
        "vballoon.shard", "vballoon.collected", "vballoon.version", "vballoon.qemu", "vballoon.kernel")
    assert IDENTITY == (VERSION, QEMU, KERNEL), f"expected shards to agree on version, QEMU and kernel, got {IDENTITY}"


def test_qemu_is_its_version_line_and_digest_or_none_with_the_reason(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path / "qemu-system-x86_64")
    assert qemu_identity(str(qemu)) == f"QEMU emulator version 9.8.7 (vballoon test) sha256:{sha256(qemu)}"
    missing = qemu_identity(str(tmp_path / "nowhere"))
    assert missing.startswith(f"none (--qemu {tmp_path / 'nowhere'}: not an executable file"), missing


def test_kernel_is_a_bzimage_release_and_digest_else_the_debian_packages(tmp_path: Path) -> None:
    bzimage = fake_bzimage(tmp_path / "bzImage")
    assert kernel_identity(str(bzimage), None, []) == f"{RELEASE} sha256:{sha256(bzimage)}"
    modules = tmp_path / "modules"
    assert kernel_identity(None, str(modules), ["linux-image-cloud-amd64", "linux-image-amd64",
                                                "linux-image-cloud-amd64"]) == \
        f"Debian linux-image-amd64, linux-image-cloud-amd64, modules {modules}"
    assert kernel_identity(None, None, []) == "Debian linux-image-cloud-amd64"
    unreadable = kernel_identity(str(tmp_path / "gone"), None, [])
    assert unreadable.startswith(f"--kernel {tmp_path / 'gone'} (unreadable: "), unreadable


def test_the_version_is_the_package_version_and_the_checkout_commit() -> None:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    expected = importlib.metadata.version("vballoon") + (f" (git {commit})" if commit else "")
    assert vballoon_version() == expected


def test_a_pytest_run_under_xdist_writes_the_identity_into_its_junit_file(tmp_path: Path) -> None:
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    qemu, bzimage = fake_qemu(tmp_path / "qemu"), fake_bzimage(tmp_path / "bzImage")
    junit = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-n", "2",
         f"--junitxml={junit}", "--qemu", str(qemu), "--kernel", str(bzimage), "test_tiny.py"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "3", f"expected the 3 tests, got {ET.tostring(suite)!r}"
    properties = [(prop.get("name"), prop.get("value")) for prop in suite.iterfind("properties/property")]
    expected = [(VERSION, vballoon_version()),
                (QEMU, f"QEMU emulator version 9.8.7 (vballoon test) sha256:{sha256(qemu)}"),
                (KERNEL, f"{RELEASE} sha256:{sha256(bzimage)}")]
    assert properties == expected, f"expected each identity property once (from the controller), got {properties}"

    without = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "--qemu", str(qemu),
         "test_tiny.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300)
    assert without.returncode == 0, (without.stdout + without.stderr)[-3000:]
