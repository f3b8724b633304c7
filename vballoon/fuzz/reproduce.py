"""Replaying a saved input: does the finding still happen, and the standalone qtest reproducer for QEMU.

A crash file is decoded strictly (`vballoon.fuzz.format.load`); its target comes from the sidecar, else from
the directory it lies in (`fuzz/crashes/<target>/`, `fuzz/corpora/<target>/`). A seed of a buffer target is
in that target's own format and goes through the target's decoder.
Inputs of the reference-only targets replay on the reference; those of the differential target on a
fresh QEMU and the reference, judged exactly as the fuzzer judged them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from vballoon.errors import DecodeError
from vballoon.fuzz.crashes import Finding, read_sidecar
from vballoon.fuzz.differential import QemuDifferential
from vballoon.fuzz.format import VERSION, load
from vballoon.fuzz.reference_run import ReferenceFault, run_reference
from vballoon.fuzz.targets import SCENARIO_FORMAT_TARGETS, TARGETS, Target
from vballoon.qemu.process import QemuBinary
from vballoon.scenario.operations import Scenario


@dataclass(frozen=True)
class Replay:
    """The outcome of replaying one saved input."""

    path: Path
    target: Target
    finding: Finding | None
    reproducer: str = ""
    """For QEMU targets: the QEMU command line and qtest lines of the replay."""

    @property
    def reproduced(self) -> bool:
        return self.finding is not None


def saved_input(path: Path) -> tuple[Scenario, Target]:
    """The scenario in `path` and the target that found it; DecodeError (one line naming the file) otherwise."""
    if not path.is_file():
        raise DecodeError(f"{path}: no such file; pass a file from fuzz/crashes/<target>/ or fuzz/corpora/<target>/")
    sidecar = read_sidecar(path)
    version = sidecar.get("format_version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise DecodeError(f"{path}: written by format version {version}, newer than this vballoon reads "
                          f"(up to {VERSION}); replay it with a newer vballoon")
    name = str(sidecar.get("target", path.parent.name))
    if name not in TARGETS:
        raise DecodeError(f"{path}: unknown target {name!r} (known: {', '.join(TARGETS)}); name it in the sidecar")
    if not sidecar and name not in SCENARIO_FORMAT_TARGETS:
        try:
            return TARGETS[name].scenario_for(path.read_bytes()), TARGETS[name]  # a seed in its target's own format
        except OSError as error:
            raise DecodeError(f"{path}: cannot read ({error.strerror})") from None
    return load(path), TARGETS[name]


def replay_scenario(scenario: Scenario, on_qemu: bool, qemu: QemuBinary | None) -> tuple[Finding | None, str]:
    """Run a scenario as its target does: (the finding or None, the qtest reproducer when QEMU ran)."""
    if not on_qemu:
        try:
            run_reference(scenario)
        except ReferenceFault as fault:
            return Finding(fault.kind, str(fault)), ""
        return None, ""
    assert qemu is not None, "a QEMU target needs a QEMU"
    with tempfile.TemporaryDirectory(prefix="vballoon-reproduce-") as logs:
        with QemuDifferential(qemu, scenario.variant, scenario.legacy_interface, Path(logs)) as differential:
            finding = differential.run(scenario)
            executor = differential.last_executor
            return finding, executor.reproducer(scenario) if executor is not None else ""


def replay(path: Path, qemu: QemuBinary | None) -> Replay:
    """Replay one saved input (see the module docstring)."""
    scenario, target = saved_input(path)
    finding, reproducer = replay_scenario(scenario, target.on_qemu, qemu)
    return Replay(path, target, finding, reproducer)


def emit_qtest(path: Path, qemu: QemuBinary) -> str:
    """The standalone reproducer of a saved input, whatever its target: run on a fresh QEMU, recorded."""
    scenario, _ = saved_input(path)
    return replay_scenario(scenario, True, qemu)[1]
