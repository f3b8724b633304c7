"""Findings and where they are saved: `fuzz/crashes/<target>/<kind>-<sha1>` holding the input, and a JSON
sidecar beside it.

The input is the canonical encoding of the scenario that ran (`vballoon.fuzz.format`), so every crash
file replays the same way whatever target found it. Files are written to a temporary name in the same
directory and hard-linked to their final name: a reader never sees half a file, and an existing file is
never replaced (the same input found again keeps the first sidecar).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vballoon.errors import DecodeError

SIDECAR_SUFFIX = ".json"
VARYING = re.compile(r"==\d+==|0x[0-9a-f]+")
"""What differs between two QEMU processes' reports of one bug: the pid and the addresses."""


@dataclass(frozen=True)
class Finding:
    """What an input made QEMU (or the reference) do wrong, with the evidence for a crash file's sidecar."""

    kind: str
    """crash, hang, device-error, difference, reference-exception or reference-invariant."""
    summary: str
    differences: tuple[str, ...] = ()
    observed: dict[str, Any] = field(default_factory=dict)
    allowed: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""
    sanitizer_report: str = ""
    """The sanitizer reports QEMU printed (`vballoon.qemu.sanitizers.reports_text`), for a crash."""

    @property
    def signature(self) -> str:
        """What makes two findings the same bug: the kind and the first difference's requirement and subject
        (without the process ids and addresses a sanitizer's headline carries)."""
        return f"{self.kind}:{VARYING.sub('', self.summary.split(': expected')[0])}"


def crash_name(kind: str, data: bytes) -> str:
    return f"{kind}-{hashlib.sha1(data).hexdigest()}"


def write_new(path: Path, data: bytes) -> bool:
    """Create `path` with `data` atomically; False (and nothing written) if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def save_crash(directory: Path, kind: str, data: bytes, sidecar: dict[str, Any]) -> Path | None:
    """Save a finding's input and sidecar under `directory`; its path, or None if that input was saved before."""
    path = directory / crash_name(kind, data)
    if not write_new(path, data):
        return None
    write_new(sidecar_path(path), (json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n").encode())
    return path


def sidecar_path(crash: Path) -> Path:
    return crash.with_name(crash.name + SIDECAR_SUFFIX)


def read_sidecar(crash: Path) -> dict[str, Any]:
    """The sidecar of a crash file ({} when there is none); DecodeError naming the file when it is corrupt."""
    path = sidecar_path(crash)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DecodeError(f"{path}: unreadable sidecar ({error})") from None
    if not isinstance(data, dict):
        raise DecodeError(f"{path}: sidecar is not a JSON object")
    return data


def crash_files(root: Path) -> list[Path]:
    """Every saved input under `root` (sidecars and temporary files left out), sorted."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(SIDECAR_SUFFIX))
