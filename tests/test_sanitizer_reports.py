"""Sanitizer reports are crashes: proven with programs of our own built with gcc's sanitizers, run under the
environment vballoon gives QEMU, and with a library planted in a real QEMU that misbehaves when the balloon
discards an inflated page.

These tests check vballoon's crash recognition, not a statement of the virtio specification: no requirement
IDs. Deliberate breaks, each seen failing: `RUNTIME_ERROR` matching nothing (the UBSan cases, in programs and
in QEMU, went unnoticed), `sanitizer_options` putting the user's value first (the user's halt_on_error=0,
detect_leaks=0 and print_stacktrace=0 lost), `exit_problems` reading from the start of stderr (the second
run found the first run's report too), and the `machines` fixture not reading exit problems (the device test
with a report at QEMU's exit passed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vballoon.errors import QemuError
from vballoon.fuzz.crashes import crash_files, read_sidecar
from vballoon.fuzz.differential import QemuDifferential
from vballoon.fuzz.format import load
from vballoon.fuzz.harness import FUZZ_DIR
from vballoon.matrix import Variant
from vballoon.qemu.balloon import device_args
from vballoon.qemu.process import QemuBinary, QemuMachine, crash_lines
from vballoon.qemu.sanitizers import (OPTION_VARIABLES, reports_text, sanitizer_environment,
                                      sanitizer_reports)

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed (make deps installs it)")
REPO = Path(__file__).resolve().parent.parent
INFLATE_SEED = FUZZ_DIR / "corpora" / "qemu_differential" / "inflate-deflate-pool"

PROGRAMS = {
    "heap-buffer-overflow": ("address", "int *p = malloc(10 * sizeof *p); int v = p[argc + 9]; free(p); return v;"),
    "heap-use-after-free": ("address", "int *p = malloc(10 * sizeof *p); free(p); return p[argc];"),
    "signed integer overflow": ("undefined", "int x = INT_MAX - 1 + argc; x += argc; printf(\"%d\\n\", x); "
                                             "puts(\"went on\"); return 0;"),
    "misaligned address": ("undefined", "char b[16] = {0}; int *p = (int *)(b + argc); printf(\"%d\\n\", *p); "
                                        "puts(\"went on\"); return 0;"),
    "detected memory leaks": ("leak", "char *p = malloc(40 * argc); p[0] = 1; printf(\"%p\\n\", p); p = 0; "
                                      "return 0;"),
}
"""What the report's headline says -> the gcc sanitizer that reports it, and the body of main()."""
SANITIZER_NAMES = {"address": "AddressSanitizer", "undefined": "UndefinedBehaviorSanitizer",
                   "leak": "LeakSanitizer"}
HEADER = "#include <limits.h>\n#include <stdio.h>\n#include <stdlib.h>\n"


def compile_program(directory: Path, name: str, sanitizer: str, body: str) -> Path:
    """`int main` with `body`, built with -fsanitize=`sanitizer` and debug information."""
    source = directory / f"{name.replace(' ', '-')}.c"
    source.write_text(f"{HEADER}int main(int argc, char **argv) {{ {body} }}\n")
    binary = source.with_suffix("")
    subprocess.run([str(GCC), "-g", "-O0", f"-fsanitize={sanitizer}", str(source), "-o", str(binary)], check=True,
                   capture_output=True)
    return binary


def run_as_qemu(binary: Path, **user_options: str) -> subprocess.CompletedProcess[str]:
    """Run `binary` in the environment a QEMU gets from vballoon, with the user's `user_options` set."""
    environ = {name: value for name, value in os.environ.items() if name not in OPTION_VARIABLES}
    return subprocess.run([str(binary)], env=sanitizer_environment({**environ, **user_options}),
                          capture_output=True, text=True, timeout=60)


@needs_gcc
@pytest.mark.parametrize("headline", PROGRAMS)
def test_each_report_class_is_a_crash_with_its_headline_and_first_frame(tmp_path: Path, headline: str) -> None:
    sanitizer, body = PROGRAMS[headline]
    done = run_as_qemu(compile_program(tmp_path, headline, sanitizer, body))
    (report,) = sanitizer_reports(done.stderr)
    assert report.sanitizer == SANITIZER_NAMES[sanitizer], \
        f"expected a {SANITIZER_NAMES[sanitizer]} report, got {report.sanitizer}: {done.stderr[:500]}"
    assert headline in report.headline, f"expected {headline!r} in the headline, got {report.headline!r}"
    first = "malloc" if sanitizer == "leak" else " in main "  # a leak's stack is where it was allocated
    assert report.first_frame.startswith("#0 ") and first in report.first_frame, \
        f"expected {first!r} in the first frame, got {report.first_frame!r}"
    assert crash_lines(done.stderr) == [f"{report.headline} | {report.first_frame}"], crash_lines(done.stderr)
    assert done.returncode != 0, f"expected a failure status (halt_on_error, a leak), got {done.returncode}"
    assert "went on" not in done.stdout, "halt_on_error=1: expected the program to stop at its first report"
    frames = [line for line in done.stderr.splitlines() if line.lstrip().startswith("#")]
    kept = report.text.splitlines()
    assert kept[0] == report.headline and all(frame in kept for frame in frames), \
        f"expected the whole report from its headline, with its {len(frames)} frames, got {report.text!r}"
    last = {"address": "==ABORTING", "leak": "SUMMARY: LeakSanitizer:", "undefined": " in _start "}[sanitizer]
    assert last in kept[-1], f"expected the report to end with {last!r}, got {kept[-1]!r}"


@needs_gcc
def test_a_clean_program_under_every_sanitizer_shows_no_crash(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "clean", "address,undefined", 'char *p = malloc(4); free(p); puts("ok");')
    done = run_as_qemu(binary)
    assert (done.returncode, done.stdout, crash_lines(done.stderr)) == (0, "ok\n", []), done.stderr


@needs_gcc
def test_ubsan_told_to_go_on_still_counts(tmp_path: Path) -> None:
    """The user's UBSAN_OPTIONS win over vballoon's halt_on_error=1: the program goes on, the report counts."""
    sanitizer, body = PROGRAMS["signed integer overflow"]
    done = run_as_qemu(compile_program(tmp_path, "overflow", sanitizer, body), UBSAN_OPTIONS="halt_on_error=0")
    assert (done.returncode, "went on" in done.stdout) == (0, True), \
        f"expected the user's halt_on_error=0 to win, got status {done.returncode}: {done.stdout!r}"
    assert len(crash_lines(done.stderr)) == 1 and "runtime error: signed integer overflow" in crash_lines(done.stderr)[0]


@needs_gcc
def test_the_users_sanitizer_options_win(tmp_path: Path) -> None:
    """vballoon sets detect_leaks=1 in ASAN_OPTIONS; the user's detect_leaks=0 there wins."""
    done = run_as_qemu(compile_program(tmp_path, "leak", "address", PROGRAMS["detected memory leaks"][1]),
                       ASAN_OPTIONS="detect_leaks=0")
    assert (done.returncode, crash_lines(done.stderr)) == (0, []), \
        f"expected the user's detect_leaks=0 to win, got status {done.returncode}: {done.stderr[:300]}"


def test_environment_merges_options_and_finds_the_symbolizer(tmp_path: Path) -> None:
    environ = {"PATH": str(tmp_path), "ASAN_OPTIONS": "halt_on_error=0:detect_leaks=0", "OTHER": "kept"}
    merged = sanitizer_environment(environ)
    assert merged["OTHER"] == "kept" and merged["PATH"] == str(tmp_path)
    assert merged["ASAN_OPTIONS"].endswith(":halt_on_error=0:detect_leaks=0"), merged["ASAN_OPTIONS"]
    assert "halt_on_error=1" in merged["ASAN_OPTIONS"] and "print_stacktrace=1" in merged["UBSAN_OPTIONS"]
    assert "external_symbolizer_path" not in merged["UBSAN_OPTIONS"], "no llvm-symbolizer on PATH, none named"
    symbolizer = tmp_path / "llvm-symbolizer"
    symbolizer.write_text("#!/bin/sh\n")
    symbolizer.chmod(0o755)
    merged = sanitizer_environment(environ)
    assert all(f"external_symbolizer_path={symbolizer}" in merged[name] for name in OPTION_VARIABLES), merged


# --- a real QEMU --------------------------------------------------------------------------------------------

PLANT_HEADER = "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <limits.h>\n#include <stdlib.h>\n#include <sys/mman.h>\n" \
               "volatile int big = INT_MAX;\n"
AT_DISCARD = """int madvise(void *addr, size_t length, int advice) {
    static int (*real)(void *, size_t, int);
    if (!real) real = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "madvise");
    if (advice == MADV_DONTNEED && length == 4096) { %s }
    return real(addr, length, advice);
}
"""
"""Runs the planted bug when the balloon discards one inflated page (ram_block_discard_range)."""
AT_EXIT = "__attribute__((destructor)) static void at_exit(void) { %s }\n"
"""Runs the planted bug as QEMU exits."""
PLANTED_BUGS = {"undefined": ("UndefinedBehaviorSanitizer", "big += 4096;"),
                "address": ("AddressSanitizer", "char *p = malloc(8); p[8 + (big & 1) - 1] = 1; free(p);")}


@dataclass(frozen=True)
class Planted:
    sanitizer: str
    preload: str
    """LD_PRELOAD for QEMU: the sanitizer's runtime (AddressSanitizer's must come first), then the library."""


def plant(directory: Path, sanitizer: str, where: str) -> Planted:
    """A library for QEMU's LD_PRELOAD that runs `sanitizer`'s planted bug `where` (AT_DISCARD, AT_EXIT)."""
    name, bug = PLANTED_BUGS[sanitizer]
    source = directory / f"plant-{sanitizer}.c"
    source.write_text(PLANT_HEADER + where % bug)
    library = source.with_suffix(".so")
    subprocess.run([str(GCC), "-shared", "-fPIC", "-g", f"-fsanitize={sanitizer}", str(source), "-o", str(library),
                    "-ldl"], check=True, capture_output=True)
    runtime = subprocess.run([str(GCC), f"-print-file-name=lib{'asan' if sanitizer == 'address' else 'ubsan'}.so"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return Planted(name, f"{runtime}:{library}")


@pytest.fixture(scope="module")
def qemu() -> QemuBinary:
    return QemuBinary.find(os.environ.get("VBALLOON_QEMU"))


@pytest.fixture
def uninstrumented_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The QEMU under test is not built with AddressSanitizer: the leaks at its exit are not the planted bug's."""
    monkeypatch.setenv("ASAN_OPTIONS", "detect_leaks=0")
    if GCC is None:
        pytest.skip("gcc is not installed (make deps installs it)")


@pytest.mark.usefixtures("uninstrumented_qemu")
@pytest.mark.parametrize("sanitizer", PLANTED_BUGS)
def test_a_report_in_qemu_fails_its_health_check_and_stderr_keeps_it_whole(
        tmp_path: Path, qemu: QemuBinary, sanitizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = plant(tmp_path, sanitizer, AT_DISCARD)
    monkeypatch.setenv("LD_PRELOAD", planted.preload)
    scenario = load(INFLATE_SEED)
    with QemuDifferential(qemu, scenario.variant, scenario.legacy_interface, tmp_path / "logs") as differential:
        finding = differential.run(scenario)
        assert differential.last_executor is not None
        machine = differential.last_executor.machine
    assert finding is not None and finding.kind == "crash", f"expected a crash finding, got {finding}"
    with pytest.raises(QemuError) as caught:
        machine.assert_healthy()
    stderr = machine.logs.stderr.read_text()
    (report,) = sanitizer_reports(stderr)
    assert report.sanitizer == planted.sanitizer and f"{report.headline} | {report.first_frame}" in str(caught.value), \
        f"expected the {planted.sanitizer} headline and first frame in the failure, got {caught.value}"
    assert "in madvise" in report.first_frame, f"expected the planted frame first, got {report.first_frame!r}"
    assert "ram_block_discard_range" in report.text and " in _start " in report.text, \
        f"expected QEMU's whole stack in the report, got {report.text!r}"
    assert finding.sanitizer_report == reports_text(stderr) == report.text, "expected the whole report in the finding"


@pytest.mark.usefixtures("uninstrumented_qemu")
def test_a_report_in_qemu_is_a_fuzz_crash_with_the_report_in_its_sidecar(tmp_path: Path, qemu: QemuBinary) -> None:
    """The differential fuzz target replays an inflate seed on a QEMU whose page discard misbehaves."""
    planted = plant(tmp_path, "address", AT_DISCARD)
    crashes = tmp_path / "crashes"
    env = dict(os.environ, VBALLOON_FUZZ_CRASHES=str(crashes), VBALLOON_QEMU=str(qemu.path), TMPDIR=str(tmp_path))
    script = (f"import os, runpy, sys; os.environ['LD_PRELOAD'] = {planted.preload!r}; "  # for QEMU, not python
              f"sys.argv = ['fuzz_qemu_differential', {str(INFLATE_SEED)!r}]; "
              f"runpy.run_path({str(FUZZ_DIR / 'fuzz_qemu_differential.py')!r}, run_name='__main__')")
    finished = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
    assert "FindingRaised: crash" in finished.stdout, (finished.stdout + finished.stderr)[-2000:]
    (saved,) = crash_files(crashes)
    sidecar = read_sidecar(saved)
    assert sidecar["kind"] == "crash" and "in madvise" in sidecar["summary"], \
        f"expected a crash in the planted madvise, got {json.dumps(sidecar)[:1500]}"
    (report,) = sanitizer_reports(sidecar["sanitizer_report"])
    assert report.sanitizer == "AddressSanitizer" and "ram_block_discard_range" in report.text, \
        f"expected the whole AddressSanitizer report in the sidecar, got {sidecar['sanitizer_report'][:1500]!r}"
    assert load(saved) == load(INFLATE_SEED), "expected the input saved as it replays"


class BareQemu(QemuMachine):
    """QEMU with the balloon and nothing to run: it answers QMP until asked to quit."""

    def _arguments(self) -> list[str]:
        return ["-machine", "q35", "-accel", "tcg", "-S", *device_args(Variant())]


def test_qemu_runs_with_the_merged_options(tmp_path: Path, qemu: QemuBinary, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UBSAN_OPTIONS", "print_stacktrace=0")
    with BareQemu(qemu, tmp_path / "logs") as machine:
        environ = dict(entry.split("=", 1) for entry in
                       Path(f"/proc/{machine.pid}/environ").read_text().split("\0") if "=" in entry)
    assert environ["UBSAN_OPTIONS"].endswith(":print_stacktrace=0") and "halt_on_error=1" in environ["UBSAN_OPTIONS"], \
        f"expected vballoon's options then the user's, got {environ['UBSAN_OPTIONS']!r}"


@pytest.mark.usefixtures("uninstrumented_qemu")
def test_a_report_as_qemu_exits_is_an_exit_problem_once(tmp_path: Path, qemu: QemuBinary,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A report QEMU prints as it quits (as a leak report comes) is not crash evidence while it runs, and is
    found after `stop`; a second run of the machine, appending to the same stderr, finds its own report only."""
    monkeypatch.setenv("LD_PRELOAD", plant(tmp_path, "undefined", AT_EXIT).preload)
    machine = BareQemu(qemu, tmp_path / "logs")
    for run in (1, 2):
        before = machine.mark().stderr
        with machine:
            assert machine.crash_evidence(before) == [], f"run {run}: expected no report while QEMU runs"
        problems = machine.exit_problems()
        assert len(problems) == 1 and "runtime error: signed integer overflow" in problems[0], \
            f"run {run}: expected the report printed at exit, once, got {problems}"


DEVICE_TEST = '''
import os
os.environ["LD_PRELOAD"] = {preload!r}  # for the QEMU the test starts, not for this python
os.environ["ASAN_OPTIONS"] = "detect_leaks=0"
from fixtures.qtest_device import TRANSPORTS, over

@over(TRANSPORTS[:1])
def test_device(qtest_machine):
    assert qtest_machine.crash_evidence() == []
'''


@pytest.mark.usefixtures("uninstrumented_qemu")
def test_a_device_test_fails_on_a_report_at_qemu_exit_and_keeps_it(tmp_path: Path) -> None:
    """The `machines` fixture reads what its machines printed after stopping them (a leak report comes then)."""
    (tmp_path / "test_subject.py").write_text(DEVICE_TEST.format(preload=plant(tmp_path, "undefined", AT_EXIT).preload))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                          "test_subject.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 1 and "1 passed, 1 error" in output, f"expected an error at teardown, got {output[-2000:]}"
    assert "QEMU stderr at exit: " in output and "runtime error: signed integer overflow" in output \
        and "in at_exit" in output, f"expected the report's headline and first frame, got {output[-2000:]}"
    (folder,) = (tmp_path / "reports" / "logs").iterdir()
    (report,) = sanitizer_reports((folder / "qemu-stderr.log").read_text())
    assert " in _start " in report.text or " in exit " in report.text, f"expected the whole stack, got {report.text!r}"


@needs_gcc
def test_leaks_of_suppressed_qemu_functions_do_not_count(tmp_path: Path) -> None:
    """A leak allocated in a function named in vballoon's suppressions (QEMU 7.2's qmp_x_query_virtio), below a
    library without frame pointers as glib is, is not reported; the same leak elsewhere is."""
    source = tmp_path / "suppressed.c"
    source.write_text(HEADER + "void *keep;\n"
                      "__attribute__((noinline)) void *qmp_x_query_virtio(int n) { return calloc(1, 16 * n); }\n"
                      "__attribute__((noinline)) void *elsewhere(int n) { return calloc(1, 16 * n); }\n"
                      "int main(int argc, char **argv) { keep = qmp_x_query_virtio(argc); keep = 0;\n"
                      "  if (argc > 1) keep = elsewhere(argc); keep = 0; return 0; }\n")
    binary = tmp_path / "suppressed"
    subprocess.run([str(GCC), "-g", "-O0", "-fsanitize=address", str(source), "-o", str(binary)], check=True,
                   capture_output=True)
    assert crash_lines(run_as_qemu(binary).stderr) == [], "expected the suppressed function's leak not reported"
    environ = sanitizer_environment({name: value for name, value in os.environ.items() if name not in OPTION_VARIABLES})
    done = subprocess.run([str(binary), "again"], env=environ, capture_output=True, text=True, timeout=60)
    (report,) = sanitizer_reports(done.stderr)
    leaked_in = {name for name in ("elsewhere", "qmp_x_query_virtio") if f" in {name} " in report.text}
    assert report.sanitizer == "LeakSanitizer" and leaked_in == {"elsewhere"}, \
        f"expected only the other function's leak, got {report.text!r}"
