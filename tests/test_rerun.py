"""The rerun command a failed test prints: it runs that test alone, with the run's options."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys
from pathlib import Path

from vballoon.rerun import rerun_command

ROOT = Path(__file__).resolve().parents[1]
SUITE_TEST = "suites/device/test_features.py::test_offered_features_follow_the_properties[pci-transitional@legacy]"


def _run(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VBALLOON_")}
    env.update(PYTHONPATH=str(ROOT), **(extra_env or {}))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_suite_test_reruns_through_make_conformance_with_the_options_given() -> None:
    command = rerun_command(SUITE_TEST, "standard", {"--qemu": "/opt/q m/qemu", "--kernel": None, "--modules": None,
                                                     "--accel": "tcg"})
    words = shlex.split(command)
    assert words[:6] == ["make", "conformance", "MATRIX=standard", "JOBS=1", f"TESTS={SUITE_TEST}",
                         "PYTEST_ARGS=--qemu '/opt/q m/qemu' --accel tcg"], command


def test_make_conformance_runs_only_the_tests_named() -> None:
    """`make conformance TESTS=...` hands the node id to the tox command in place of `suites` (tox's
    {env:KEY:DEFAULT}), and pytest given it collects that one test. (Broken on purpose: the Makefile without
    VBALLOON_TESTS fails the first check.)"""
    done = _run(["make", "-n", "conformance", f"TESTS={SUITE_TEST}"])
    line = next(line for line in done.stdout.splitlines() if "tox -e conformance" in line)
    assert f"VBALLOON_TESTS='{SUITE_TEST}'" in line, line
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    pytest_line = next(line.strip() for line in tox["testenv:conformance"]["commands"].splitlines()
                       if line.strip().startswith("pytest "))
    assert pytest_line.startswith("pytest {env:VBALLOON_TESTS:suites} "), pytest_line
    collect = _run([sys.executable, "-m", "pytest", SUITE_TEST, "-p", "no:cacheprovider", "--matrix", "quick",
                    "--collect-only", "-q"])
    collected = [line for line in collect.stdout.splitlines() if "::" in line]
    assert collected == [SUITE_TEST], (f"expected TESTS={SUITE_TEST} to run that test alone, got {len(collected)} "
                                       f"tests: {collected[:3]}")


def test_a_failed_test_prints_the_command_that_reruns_it() -> None:
    done = _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/rerun_failure.py", "--accel", "tcg"])
    assert done.returncode == 1, done.stdout[-2000:]
    command = next((line for line in done.stdout.splitlines() if line.startswith("python3 -m pytest ")), None)
    assert command == "python3 -m pytest tests/rerun_failure.py::test_planted_failure --accel tcg", done.stdout[-2000:]
    again = _run([sys.executable, *shlex.split(command)[1:], "-p", "no:cacheprovider"])
    assert "1 failed" in again.stdout and "planted failure" in again.stdout, again.stdout[-2000:]
