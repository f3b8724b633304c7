"""A failing differential scenario's reproducer replays on `qemu-system-x86_64 ... -qtest stdio`."""

from __future__ import annotations

import select
import shlex
import subprocess
import time
from pathlib import Path

from vballoon.matrix import Variant
from vballoon.session import Session
from vballoon.spec import ConfigField, Feature, feature_mask
from vballoon.scenario.differential_run import DifferentialRun
from vballoon.scenario.operations import Negotiate, ReadConfig, WriteConfig

REPLAY_TIMEOUT = 60.0


def replay(reproducer: str) -> tuple[list[str], list[str]]:
    """Run the reproducer's command with its qtest lines on stdin: (the lines sent, QEMU's answers).

    QEMU keeps running after the last line (qtest does not quit at end of input), so it is killed once
    every line is answered or the deadline passes.
    """
    lines = reproducer.splitlines()
    command = shlex.split(lines[1].removeprefix("# "))
    requests = [line for line in lines if not line.startswith("#")]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    answers: list[str] = []
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("".join(f"{line}\n" for line in requests).encode("ascii"))
        process.stdin.flush()
        deadline = time.monotonic() + REPLAY_TIMEOUT
        received = b""
        while len(answers) < len(requests) and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            chunk = process.stdout.read1(65536) if ready else b""
            if ready and not chunk:
                break  # QEMU exited
            received += chunk
            answers = [line for line in received.decode("ascii", "replace").splitlines()
                       if line.startswith(("OK", "FAIL", "ERR"))]
    finally:
        process.kill()
        process.communicate()
    assert len(answers) == len(requests), f"{len(requests)} requests but {len(answers)} answers (exit {process.returncode})"
    return requests, answers


def test_legacy_actual_byte_write_reproducer_replays(session: Session, tmp_path: Path) -> None:
    """The legacy `actual` byte-write difference (BAL-DEV-LEG-ACT) replays: the config read answers what QEMU
    showed during the scenario, and every request is answered OK."""
    with DifferentialRun(session.qemu, Variant(transport="legacy"), True, tmp_path) as run:
        run.step(Negotiate(feature_mask(Feature.STATS_VQ)))
        run.step(WriteConfig(ConfigField.ACTUAL, 1, 0x03))
        step = run.step(ReadConfig(ConfigField.ACTUAL, 4))
        reproducer = run.reproducer()
    assert any(d.requirement == "BAL-DEV-LEG-ACT" for d in step.differences), \
        f"the scenario should differ from the reference on actual: {[str(d) for d in step.differences]}"
    assert step.got.read_value == 0x03, f"QEMU showed actual {step.got.read_value:#x} during the scenario"
    requests, answers = replay(reproducer)
    assert all(answer.startswith("OK") for answer in answers), [a for a in answers if not a.startswith("OK")]
    marker = reproducer.splitlines().index(f"# step 3: {ReadConfig(ConfigField.ACTUAL, 4)!r}")
    first_request_of_step = len([line for line in reproducer.splitlines()[:marker] if not line.startswith("#")])
    read = next(i for i in range(first_request_of_step, len(requests)) if requests[i].startswith("inl"))
    assert int(answers[read].split()[1], 16) == step.got.read_value, \
        f"replayed {requests[read]!r} answered {answers[read]!r}; the scenario observed {step.got.read_value:#x}"
