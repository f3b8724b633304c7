"""A fuzz target frozen into one binary (PyInstaller, as ClusterFuzzLite and OSS-Fuzz build them): which QEMU it
tests, and the environment QEMU starts in.

`.clusterfuzzlite/bundle_qemu.sh` puts qemu-system-x86_64 in `$OUT/qemu/` beside the fuzzer binaries, with
the shared libraries, modules and firmware it needs, behind a launcher `$OUT/qemu/qemu-system-x86_64` that
runs it on those (LD_LIBRARY_PATH, QEMU_MODULE_DIR and one `-L` per firmware folder). A frozen fuzzer tests
that QEMU when VBALLOON_QEMU is unset. Outside a frozen binary nothing changes: VBALLOON_QEMU, else PATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BUNDLE_DIR = "qemu"
"""The folder beside the fuzzer binaries that holds the bundled QEMU."""
LAUNCHER = "qemu-system-x86_64"


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def qemu_to_test(given: str | None) -> str | None:
    """`given` (VBALLOON_QEMU) if set; else, in a frozen fuzzer, the bundled launcher beside it when there is one;
    else None (the one on PATH)."""
    if given or not is_frozen():
        return given
    launcher = Path(sys.executable).resolve().parent / BUNDLE_DIR / LAUNCHER
    return str(launcher) if launcher.is_file() else None


def restore_library_path() -> None:
    """Give the processes a frozen fuzzer starts (QEMU) the LD_LIBRARY_PATH it was started with: the PyInstaller
    bootloader points it at the unpacked bundle, whose libraries are the fuzzer's, not QEMU's."""
    if not is_frozen():
        return
    original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is None:
        os.environ.pop("LD_LIBRARY_PATH", None)
    else:
        os.environ["LD_LIBRARY_PATH"] = original
