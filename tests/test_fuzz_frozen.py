"""A frozen fuzz target (ClusterFuzzLite's PyInstaller binary) tests the QEMU bundled beside it unless VBALLOON_QEMU
names one, and starts QEMU with the library path it was started with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vballoon.fuzz.frozen import qemu_to_test, restore_library_path


@pytest.fixture
def frozen_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pretend to be $OUT/fuzz_qemu_differential.pkg, frozen; the folder it is in."""
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "fuzz_qemu_differential.pkg"))
    return tmp_path


def test_a_frozen_target_finds_the_bundled_qemu_beside_it(frozen_in: Path) -> None:
    assert qemu_to_test(None) is None, "without a bundle, the QEMU on PATH"
    launcher = frozen_in / "qemu" / "qemu-system-x86_64"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\n")
    assert qemu_to_test(None) == str(launcher)
    assert qemu_to_test("/opt/qemu/bin/qemu-system-x86_64") == "/opt/qemu/bin/qemu-system-x86_64", (
        "VBALLOON_QEMU wins over the bundle")


def test_outside_a_frozen_binary_nothing_is_bundled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qemu").mkdir()
    (tmp_path / "qemu" / "qemu-system-x86_64").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere")
    assert qemu_to_test(None) is None
    restore_library_path()
    assert os.environ["LD_LIBRARY_PATH"] == "/somewhere"


@pytest.mark.parametrize("original", ["/usr/local/lib", None])
def test_qemu_gets_the_library_path_the_fuzzer_was_started_with(frozen_in: Path, original: str | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEI1234")
    if original is None:
        monkeypatch.delenv("LD_LIBRARY_PATH_ORIG", raising=False)
    else:
        monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", original)
    restore_library_path()
    assert os.environ.get("LD_LIBRARY_PATH") == original and "LD_LIBRARY_PATH_ORIG" not in os.environ
