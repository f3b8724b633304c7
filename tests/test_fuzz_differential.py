"""The differential fuzzer against real QEMU: a deliberately broken reference rule is found, saved and
replayed; the standalone reproducer runs with plain `qemu-system-x86_64 -qtest stdio`."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vballoon.cli import main
from vballoon.fuzz.differential import QemuDifferential
from vballoon.fuzz.format import load
from vballoon.matrix import Variant
from vballoon.spec import ConfigField
from vballoon.fuzz.crashes import crash_files, read_sidecar
from vballoon.fuzz.harness import FUZZ_DIR
from vballoon.qemu.process import QemuBinary
from vballoon.reference import device as reference_device
from vballoon.reference.ram import PageOutcome
from vballoon.scenario.qemu_executor import QemuExecutor


@pytest.fixture(scope="module")
def qemu() -> QemuBinary:
    return QemuBinary.find(os.environ.get("VBALLOON_QEMU"))


def test_broken_reference_rule_is_found_saved_and_reproduced(tmp_path: Path, qemu: QemuBinary,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With the reference told that inflated pages must stay unchanged (QEMU zeroes them: BAL-DEV-OP-1 allows
    it), the differential target finds the difference within seconds (an inflate of written pool pages is a
    seed), saves it, and reproduce replays it. libFuzzer prints the uncaught finding on stdout."""
    crashes = tmp_path / "crashes"
    broken = ("from vballoon.reference import device; from vballoon.reference.ram import PageOutcome; "
              "device.INFLATED = frozenset({PageOutcome.UNCHANGED}); "
              f"import runpy, sys; sys.argv = {['fuzz_qemu_differential', '-max_total_time=20', '-runs=2000']!r}"
              f" + [sys.argv[1]]; runpy.run_path({str(FUZZ_DIR / 'fuzz_qemu_differential.py')!r}, "
              "run_name='__main__')")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in (FUZZ_DIR / "corpora" / "qemu_differential").iterdir():
        (corpus / seed.name).write_bytes(seed.read_bytes())
    env = dict(os.environ, VBALLOON_FUZZ_CRASHES=str(crashes), VBALLOON_QEMU=str(qemu.path), TMPDIR=str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", broken, str(corpus)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert "FindingRaised: difference: BAL-DEV-OP-1" in finished.stdout, (finished.stdout + finished.stderr)[-2000:]
    (saved,) = crash_files(crashes)
    sidecar = read_sidecar(saved)
    assert sidecar["kind"] == "difference" and "BAL-DEV-OP-1" in sidecar["summary"]
    assert sidecar["qemu_version"] == qemu.version_text and "-device virtio-balloon-pci" in sidecar["qemu_command_line"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference_device, "INFLATED", frozenset({PageOutcome.UNCHANGED}))
        assert main(["reproduce", str(saved), "--qemu", str(qemu.path)]) == 1
    assert "reproduces" in capsys.readouterr().out
    assert main(["reproduce", str(saved), "--qemu", str(qemu.path)]) == 0  # the rule restored: QEMU conforms
    assert "no longer reproduces" in capsys.readouterr().out


def test_emitted_qtest_replays_with_plain_qemu(qemu: QemuBinary, capsys: pytest.CaptureFixture[str]) -> None:
    seed = FUZZ_DIR / "corpora" / "qemu_differential" / "inflate-deflate-pool"
    assert main(["reproduce", "--emit-qtest", str(seed), "--qemu", str(qemu.path)]) == 0
    text = capsys.readouterr().out
    command = shlex.split(text.splitlines()[1].removeprefix("# "))
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert any(line.startswith("b64write") for line in lines) and any(line.startswith("writew") for line in lines)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("\n".join(lines) + "\n")
        process.stdin.flush()
        answers: list[str] = []
        while len(answers) < len(lines):  # QEMU answers every line, then waits for more
            line = process.stdout.readline()
            assert line, f"QEMU ended after {len(answers)} of {len(lines)} answers"
            answers += [] if line.startswith("IRQ") else [line.strip()]
    finally:
        process.kill()
        process.wait(30)
    assert all(a.startswith("OK") for a in answers), answers


def test_bad_inputs_give_one_line_each_and_the_rest_still_replays(tmp_path: Path, qemu: QemuBinary,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    crashes = tmp_path / "scenario"
    crashes.mkdir()
    (crashes / "truncated").write_bytes(bytes([1, 0, 0x10, 2]))
    (crashes / "newer").write_bytes(bytes([1, 0]))
    (crashes / "newer.json").write_text('{"target": "scenario", "format_version": 99}')
    good = FUZZ_DIR / "corpora" / "scenario" / "negotiate-every-feature"
    assert main(["reproduce", str(crashes / "truncated"), str(crashes / "newer"), str(good)]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 2 and "format version 99, newer" in err and "short" in err
    assert "no longer reproduces" in out


def test_qemu_that_dies_at_start_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'QEMU emulator version 7.2.0'; exit 0; fi\n"
                    "echo 'qemu: cannot start' >&2; exit 1\n")
    fake.chmod(0o755)
    seed = FUZZ_DIR / "corpora" / "qemu_differential" / "negotiate-every-feature"
    assert main(["reproduce", str(seed), "--qemu", str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vballoon: error: ") and len(err.splitlines()) == 1 and "cannot start" in err


SEEDS = FUZZ_DIR / "corpora" / "qemu_differential"


def test_one_qemu_runs_every_seed_back_to_back_without_findings(tmp_path: Path, qemu: QemuBinary) -> None:
    """The long-lived QEMU, restored between inputs, judges like a fresh one: a hint held while the VM was
    stopped does not turn into a late device error in the next input, and poison_val bytes a driver left
    behind (BAL-DRV-PP-2 unmet) are not a difference."""
    first = ["hint-short-command-id-while-stopped", "poison-val-written-without-page-poison"]
    paths = [SEEDS / name for name in first] + sorted(p for p in SEEDS.iterdir() if p.name not in first)
    paths = [path for path in paths if load(path).variant == load(paths[0]).variant]  # one QEMU, one device
    scenarios = [load(path) for path in paths]
    with QemuDifferential(qemu, scenarios[0].variant, False, tmp_path, record=False) as differential:
        findings = {path.name: differential.run(scenario) for path, scenario in zip(paths, scenarios, strict=True)}
        assert differential.starts == 1
    assert {name: finding.summary for name, finding in findings.items() if finding} == {}


def test_batched_and_snapshot_reads_answer_as_single_reads(tmp_path: Path, qemu: QemuBinary) -> None:
    with QemuExecutor(qemu, Variant(), False, tmp_path) as executor:
        driver, qtest = executor.balloon.driver, executor.machine.qtest
        executor.balloon.start(poison_val=0x12345678)
        qtest.write(0x900000, bytes(range(256)))
        single = [driver.status] + [driver.config_read(offset, 4) for offset in range(0, 16, 4)]
        trips = qtest.round_trips
        assert qtest.batched(lambda: [driver.status] + [driver.config_read(o, 4) for o in range(0, 16, 4)]) == single
        assert single[1 + ConfigField.POISON_VAL // 4] == 0x12345678
        with qtest.snapshot([(0x900000, 256), (0x900400, 8)]):
            assert qtest.read(0x900010, 16) == bytes(range(16, 32)) and qtest.read(0x900400, 8) == bytes(8)
        assert qtest.round_trips == trips + 2
        assert qtest.read(0x900010, 16) == bytes(range(16, 32))
