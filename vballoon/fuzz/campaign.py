"""`vballoon fuzz`: run targets as libFuzzer processes, show progress, collect findings, write JUnit.

Each target runs as `python fuzz/fuzz_<target>.py` (N jobs sharing one working corpus seeded from
`fuzz/corpora/<target>/`) for a fixed time, with VBALLOON_FUZZ_KEEP_GOING=1 so a finding is saved and
fuzzing goes on. libFuzzer's status lines give executions, exec/s and coverage; `vballoon-finding:` lines
give the findings. Seeds that cannot be read (or, for the scenario-format targets, do not decode strictly)
are named on one line each and left out; a QEMU that dies at start ends that target with one line. With
`merge`, the jobs' working corpus is merged into `fuzz/corpora/<target>/` at the end the way `vballoon fuzz
merge` does (`vballoon.fuzz.merge`): only the inputs that add coverage are kept.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vballoon.errors import DecodeError, UsageError, VballoonError
from vballoon.fuzz.format import decode
from vballoon.fuzz.harness import FUZZ_DIR
from vballoon.fuzz.merge import merge_corpus
from vballoon.fuzz.targets import SCENARIO_FORMAT_TARGETS, TARGETS

STATUS_LINE = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+).*?exec/s: (\d+)")
FINAL_STAT = re.compile(r"^stat::(number_of_executed_units|average_exec_per_sec):\s+(\d+)")
FINDING_LINE = re.compile(r"^vballoon-finding: (\S+) (\S+) (.*)$")
ERROR_LINE = re.compile(r"^vballoon: error: .*$")
PROGRESS_EVERY = 2.0
EXIT_GRACE = 30.0
"""Past its -max_total_time, how long a job may take to stop before it is killed."""


@dataclass
class JobStats:
    executions: int = 0
    exec_per_s: int = 0
    coverage: int = 0
    final: bool = False
    """libFuzzer printed its final statistics (later status lines no longer count)."""


@dataclass
class TargetRun:
    """What a campaign of one target did."""

    target: str
    seconds: float = 0.0
    jobs: dict[int, JobStats] = field(default_factory=dict)
    findings: list[tuple[str, str, str]] = field(default_factory=list)
    """(kind, crash file, summary)"""
    errors: list[str] = field(default_factory=list)

    @property
    def executions(self) -> int:
        return sum(job.executions for job in self.jobs.values())

    @property
    def exec_per_s(self) -> float:
        """libFuzzer's rate, summed over jobs (its final average once a job has ended)."""
        return float(sum(job.exec_per_s for job in self.jobs.values()))

    @property
    def coverage(self) -> int:
        return max((job.coverage for job in self.jobs.values()), default=0)

    def progress(self) -> str:
        return (f"fuzz_{self.target}: {self.seconds:5.1f} s  {self.executions} execs  {self.exec_per_s:.0f} exec/s  "
                f"cov {self.coverage}  findings {len(self.findings)}")

    def take_line(self, job: int, line: str) -> str | None:
        """Fold one output line of job `job` in; the line if the user should see it."""
        stats = self.jobs.setdefault(job, JobStats())
        if (status := STATUS_LINE.match(line)) and not stats.final:
            stats.executions, stats.coverage, stats.exec_per_s = map(int, status.groups())
        elif final := FINAL_STAT.match(line):
            if final[1] == "number_of_executed_units":
                stats.executions = int(final[2])
            else:
                stats.exec_per_s, stats.final = int(final[2]), True
        elif finding := FINDING_LINE.match(line):
            self.findings.append((finding[1], finding[2], finding[3]))
            return f"fuzz_{self.target}: finding {finding[1]} saved to {finding[2]}: {finding[3]}"
        elif ERROR_LINE.match(line) or "Uncaught Python exception" in line:
            self.errors.append(line)
            return line
        return None


def checked_seeds(target: str, corpora: Path, into: Path, say: Callable[[str], None]) -> int:
    """Copy the target's readable seeds into `into`; one line per seed left out. The count copied."""
    copied = 0
    for seed in sorted((corpora / target).glob("*")) if (corpora / target).is_dir() else []:
        if not seed.is_file() or seed.name.startswith("."):
            continue
        try:
            data = seed.read_bytes()
            if target in SCENARIO_FORMAT_TARGETS:
                decode(data, strict=True)
        except OSError as error:
            say(f"vballoon: skipping seed {seed}: cannot read ({error.strerror})")
            continue
        except DecodeError as error:
            say(f"vballoon: skipping seed {seed}: not a replayable vballoon fuzz input: {error}")
            continue
        shutil.copyfile(seed, into / seed.name)
        copied += 1
    return copied


def run_target(target: str, seconds: int, jobs: int, qemu: str | None, crashes: Path, corpora: Path,
               say: Callable[[str], None] = print, merge: bool = False) -> TargetRun:
    """Fuzz one target for `seconds` with `jobs` processes seeded from `corpora/<target>/`; with `merge`, keep the
    inputs that add coverage there at the end."""
    if target not in TARGETS:
        raise UsageError(f"unknown fuzz target {target!r}; known: {', '.join(TARGETS)}")
    run = TargetRun(target)
    with tempfile.TemporaryDirectory(prefix=f"vballoon-fuzz-{target}-") as work:
        corpus = Path(work) / "corpus"
        corpus.mkdir()
        checked_seeds(target, corpora, corpus, say)
        env = dict(os.environ, VBALLOON_FUZZ_KEEP_GOING="1", VBALLOON_FUZZ_CRASHES=str(crashes), TMPDIR=work,
                   PYTHONUNBUFFERED="1")
        if qemu:
            env["VBALLOON_QEMU"] = qemu
        command = [sys.executable, str(FUZZ_DIR / f"fuzz_{target}.py"), f"-max_total_time={seconds}",
                   "-print_final_stats=1", f"-artifact_prefix={work}/", str(corpus)]
        dictionary = FUZZ_DIR / f"fuzz_{target}.dict"
        if dictionary.exists():
            command.insert(2, f"-dict={dictionary}")
        processes = [subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True)
                     for _ in range(jobs)]
        try:
            _follow(run, processes, seconds, say)
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()
        if merge:
            _merge_corpus(run, corpus, corpora / target, qemu, say)
    return run


def _merge_corpus(run: TargetRun, corpus: Path, into: Path, qemu: str | None, say: Callable[[str], None]) -> None:
    """Merge the jobs' working corpus into `into`; a failed merge is one of the run's errors."""
    try:
        merged = merge_corpus(run.target, [corpus], into, qemu)
    except VballoonError as error:
        run.errors.append(str(error))
        say(f"vballoon: error: {error}")
        return
    say(f"fuzz_{run.target}: corpus {into}: {merged.before} -> {merged.after} inputs "
        f"({merged.offered} new ones offered to libFuzzer's merge)")


def _follow(run: TargetRun, processes: list[subprocess.Popen[bytes]], seconds: int, say: Callable[[str], None]) -> None:
    """Read every job's output until all exit (killing stragglers after the grace time); print progress."""
    started = time.monotonic()
    deadline = started + seconds + EXIT_GRACE
    selector = selectors.DefaultSelector()
    partial: dict[int, bytes] = {}
    for number, process in enumerate(processes):
        assert process.stdout is not None
        selector.register(process.stdout, selectors.EVENT_READ, number)
    next_progress = started + PROGRESS_EVERY
    while selector.get_map():
        now = time.monotonic()
        if now > deadline:
            say(f"fuzz_{run.target}: jobs still running {EXIT_GRACE:g} s past the time limit; killed")
            break
        for key, _ in selector.select(timeout=min(PROGRESS_EVERY, max(0.0, deadline - now))):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            lines = (partial.pop(key.data, b"") + chunk).split(b"\n")
            partial[key.data] = lines.pop()
            for line in lines:
                shown = run.take_line(key.data, line.decode(errors="replace").strip())
                if shown:
                    say(shown)
        run.seconds = min(time.monotonic() - started, float(seconds))
        if time.monotonic() >= next_progress:
            say(run.progress())
            next_progress += PROGRESS_EVERY
    selector.close()
    run.seconds = min(time.monotonic() - started, float(seconds)) or float(seconds)
    say(run.progress() + " (done)")


def write_junit(runs: list[TargetRun], out: Path) -> None:
    """reports/fuzz-junit.xml: one test case per target; each finding is a failure naming its crash file."""
    from junit_xml import TestCase, TestSuite, to_xml_report_string

    cases = []
    for run in runs:
        case = TestCase(f"fuzz_{run.target}", classname="vballoon.fuzz", elapsed_sec=run.seconds,
                        stdout=(f"executions={run.executions} exec_per_s={run.exec_per_s:.0f} "
                                f"coverage={run.coverage} findings={len(run.findings)}"))
        for kind, path, summary in run.findings:
            case.add_failure_info(message=f"{kind}: {path}", output=f"{summary}\nreproduce: vballoon reproduce {path}")
        for error in run.errors:
            case.add_error_info(message=error)
        cases.append(case)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_xml_report_string([TestSuite("vballoon-fuzz", cases)]))
