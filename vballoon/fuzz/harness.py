"""The atheris side of a target: instrumentation, the TestOneInput function, and what a finding does.

`fuzz/fuzz_<name>.py` calls `main("<name>")`. Each input becomes a scenario (`vballoon.fuzz.targets`);
reference targets run it with `run_reference`, the differential target with a `QemuDifferential` kept for
the whole process. A finding is saved to `fuzz/crashes/<target>/` (see `vballoon.fuzz.crashes`) and then,
as OSS-Fuzz expects, raised so libFuzzer stops and writes its own artifact; with VBALLOON_FUZZ_KEEP_GOING=1
(what `vballoon fuzz` sets) one line `vballoon-finding: KIND PATH SUMMARY` is printed instead and fuzzing
goes on.

Environment: VBALLOON_QEMU (the QEMU under test; a frozen target falls back to the QEMU bundled beside it, see
`vballoon.fuzz.frozen`), VBALLOON_FUZZ_CRASHES (where findings go), VBALLOON_FUZZ_VARIANT and
VBALLOON_FUZZ_LEGACY=1 (the differential target's device).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import pkgutil
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from vballoon.fuzz.crashes import Finding
    from vballoon.scenario.operations import Scenario

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
DEVICE, STATS, HINTING, SPEC = ("vballoon.reference.device", "vballoon.reference.stats", "vballoon.reference.hinting",
                                "vballoon.spec")
DECODER = "vballoon.fuzz.format"
INSTRUMENTED: dict[str, tuple[str, ...]] = {
    "stats": (DEVICE, STATS, SPEC),
    "pfn": (DEVICE, SPEC),
    "hint": (DEVICE, HINTING, SPEC),
    "report": (DEVICE,),
    "config": (DEVICE,),
    "scenario": (DEVICE, STATS, HINTING, SPEC),
    "qemu_differential": (DEVICE, STATS, HINTING, SPEC, DECODER),
}
"""The modules whose coverage guides each target: the parts of the device model and the wire codecs (spec) its
input reaches. The in-memory driver, the rings, guest RAM, the reference's invariants (the oracle) and the QEMU
side run uninstrumented: every input builds rings and moves pages the same way, and their branches (bounds checks)
are seen again in the device model that catches their errors. Each instrumented module costs every execution: the
report target runs 7% faster on the device alone, and instrumenting the scenario decoder cost the config target a
third of its executions. The decoder guides only the differential target, where an execution is QEMU's to pay for
and operations the reference model does not see (stop, cont, page fills) still differ on QEMU. Named here, not
read from `vballoon.fuzz.targets`: importing that before instrumenting would leave the device model
uninstrumented."""


class FindingRaised(Exception):
    """A finding, raised into libFuzzer so it records a crash."""


def crashes_dir(target: str) -> Path:
    return Path(os.environ.get("VBALLOON_FUZZ_CRASHES", FUZZ_DIR / "crashes")) / target


def _at_process_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` when libFuzzer ends the process with exit(), which skips Python's atexit."""
    handler = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: callback())
    ctypes.CDLL(None).__cxa_atexit(handler, None, None)
    return handler  # the caller keeps it alive


class FindingSink:
    """Saves findings once per signature per process; raises or reports them."""

    def __init__(self, target: str, context: Callable[[], dict[str, object]] = dict) -> None:
        self.target = target
        self.context = context
        self.keep_going = os.environ.get("VBALLOON_FUZZ_KEEP_GOING") == "1"
        self.signatures: set[str] = set()

    def __call__(self, finding: Finding, scenario: Scenario, data: bytes) -> None:
        from vballoon.fuzz.crashes import save_crash
        from vballoon.fuzz.format import VERSION, encode
        from vballoon.scenario.operations import scenario_to_json

        if finding.signature in self.signatures:
            return
        self.signatures.add(finding.signature)
        sidecar = {"target": self.target, "kind": finding.kind, "summary": finding.summary,
                   "differences": list(finding.differences), "observed": finding.observed,
                   "allowed": finding.allowed, "stderr_tail": finding.stderr_tail,
                   "sanitizer_report": finding.sanitizer_report, "format_version": VERSION,
                   "scenario": scenario_to_json(scenario), "fuzzer_input": data.hex(),
                   "found": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   **self.context()}
        path = save_crash(crashes_dir(self.target), finding.kind, encode(scenario), sidecar)
        where = str(path) if path else "(saved before)"
        if not self.keep_going:
            raise FindingRaised(f"{finding.kind}: {finding.summary} -> {where}")
        print(f"vballoon-finding: {finding.kind} {where} {finding.summary}", file=sys.stderr, flush=True)


def reference_input(target_name: str) -> Callable[[bytes], None]:
    """TestOneInput of a reference-only target."""
    from vballoon.fuzz.crashes import Finding
    from vballoon.fuzz.reference_run import ReferenceFault, run_reference
    from vballoon.fuzz.targets import target_named

    target, sink = target_named(target_name), FindingSink(target_name)

    def one_input(data: bytes) -> None:
        scenario = target.scenario_for(data)
        try:
            run_reference(scenario)
        except ReferenceFault as fault:
            sink(Finding(fault.kind, str(fault)), scenario, data)

    return one_input


def differential_input(target_name: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """TestOneInput of the QEMU differential target, and the cleanup to run at exit."""
    from vballoon.errors import QemuError
    from vballoon.fuzz.differential import QemuDifferential
    from vballoon.fuzz.format import device_byte
    from vballoon.fuzz.frozen import qemu_to_test, restore_library_path
    from vballoon.fuzz.targets import DIFFERENTIAL_VARIANT, differential_scenario, target_named
    from vballoon.matrix import Variant
    from vballoon.qemu.process import QemuBinary

    target_named(target_name)
    restore_library_path()
    qemu = QemuBinary.find(qemu_to_test(os.environ.get("VBALLOON_QEMU")))
    name = os.environ.get("VBALLOON_FUZZ_VARIANT")
    variant = Variant.from_name(name) if name else DIFFERENTIAL_VARIANT
    legacy = os.environ.get("VBALLOON_FUZZ_LEGACY") == "1"
    scenario_for = differential_scenario(device_byte(variant, legacy))
    log_dir = Path(tempfile.mkdtemp(prefix="vballoon-fuzz-qemu-"))
    differential = QemuDifferential(qemu, variant, legacy, log_dir, record=False)
    sink = FindingSink(target_name, lambda: {"qemu_version": qemu.version_text, "qemu_path": str(qemu.path),
                                             "qemu_command_line": differential.command_line(),
                                             "variant": variant.name, "legacy_interface": legacy})

    def one_input(data: bytes) -> None:
        scenario = scenario_for(data)
        try:
            finding = differential.run(scenario)
        except QemuError as error:  # QEMU did not start: nothing else can run
            print(f"vballoon: error: {error}", file=sys.stderr, flush=True)
            os._exit(2)
        if finding is not None:
            sink(finding, scenario, data)

    def cleanup() -> None:
        differential.close()
        shutil.rmtree(log_dir, ignore_errors=True)

    return one_input, cleanup


def _submodules(path: list[str], prefix: str) -> list[str]:
    """The modules and packages under the package folders `path`, listed without importing them. pkgutil also lists
    what a frozen binary (PyInstaller) holds in its archive, where there are no .py files to walk."""
    names = []
    for module in pkgutil.iter_modules(path, prefix):
        names.append(module.name)
        if module.ispkg:
            leaf = module.name.rpartition(".")[2]
            names += _submodules([os.path.join(folder, leaf) for folder in path], module.name + ".")
    return names


def _uninstrumented(target_name: str) -> list[str]:
    """Every vballoon module outside `INSTRUMENTED[target_name]` (atheris includes whole top-level packages),
    found without importing any of them (an imported module is no longer instrumented)."""
    import vballoon

    names = {"vballoon", *_submodules(list(vballoon.__path__), "vballoon.")}
    return sorted(names - set(INSTRUMENTED[target_name]))


def main(target_name: str) -> None:
    """Run one target under libFuzzer with the command line's options (-runs, -max_total_time, corpus dirs;
    -max_len defaults to the target's)."""
    import atheris

    with atheris.instrument_imports(include=["vballoon"], exclude=_uninstrumented(target_name.removeprefix("fuzz_"))):
        from vballoon.fuzz.targets import target_named
        target = target_named(target_name)
        if target.on_qemu:
            one_input, cleanup = differential_input(target_name)
        else:
            one_input, cleanup = reference_input(target_name), lambda: None
    keep_alive = _at_process_exit(cleanup)
    options = [] if any(arg.startswith("-max_len=") for arg in sys.argv) else [f"-max_len={target.max_len}"]
    atheris.Setup([*sys.argv[:1], *options, *sys.argv[1:]], one_input)
    try:
        atheris.Fuzz()
    finally:
        cleanup()
        del keep_alive
