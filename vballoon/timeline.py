"""Where a run's time goes: timed events per test and per machine, recorded as JSON lines, read back and summed.

Recording. A pytest run (the plugin fixtures/timeline.py) starts one `Recorder`
in each process that runs tests; it appends one JSON line per event to
`<worker>.jsonl` (gw0, gw1, ... under pytest-xdist, else main) in the run
dir, so workers never share a file. Every event has a kind, a name, its
wall-clock start and end (seconds since the epoch), the worker and the test
and variant running at the time. The QEMU process core and the guest's boot
call `span` and `record`, which do nothing when no recorder is active.

Kinds: a test's `setup`, `call` and `teardown` (and a worker's `collect`);
a machine's `boot` (launch to ready for use), made for a guest of the stages
`qemu-start` (launch to QMP ready), `kernel` (to /init on the serial console),
`init` (to sshd listening) and `ssh` (to SSH connected); a shared guest's
`health` check and `restore`; `qemu-stop`. When a worker stops recording it
adds one `cpu` event: the CPU seconds it used itself (`harness_s`) and those
of the processes it started and reaped (`processes_s`: QEMU, above all).

Reading. `read_run` gives a `Run`; `summarise` gives each worker's busy and
idle seconds, the CPU the run used against what the machine's cores could
give over its wall time, and the costliest tests and boots; `top_markdown`
the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vballoon.errors import UsageError

DEFAULT_RUN_DIR = Path("reports/timeline/latest")
RUN_FILE = "run.json"
"""The run's start and end, its pytest arguments and the CPUs it could use, written by the controller."""
EVENTS_SUFFIX = ".jsonl"
TEST_PHASES = ("setup", "call", "teardown")
BOOT = "boot"
BOOT_STAGES = ("qemu-start", "kernel", "init", "snapshot-load", "ssh")
MACHINE_KINDS = (*BOOT_STAGES, "snapshot-save", "health", "restore", "qemu-stop")
CPU = "cpu"
TOP = 15


class Recorder:
    """Appends one process's events to `<worker>.jsonl` in the run dir, one write per event."""

    def __init__(self, run_dir: Path, worker: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.worker = worker
        self.path = run_dir / f"{worker}{EVENTS_SUFFIX}"
        self.context: dict[str, str] = {}
        """Attributes every event gets while set (the running test and its variant)."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(self, kind: str, name: str, start: float, end: float, **attrs: Any) -> None:
        """One event from `start` to `end` (time.time() seconds)."""
        event = {**self.context, **attrs, "kind": kind, "name": name, "start": round(start, 4),
                 "end": round(end, 4), "worker": self.worker}
        os.write(self._fd, (json.dumps(event) + "\n").encode())

    @contextlib.contextmanager
    def span(self, kind: str, name: str, **attrs: Any) -> Iterator[None]:
        """The `with` block as one event; one ended by an exception has `failed: true`."""
        start = time.time()
        ended = False
        try:
            yield
            ended = True
        finally:
            self.record(kind, name, start, time.time(), **attrs, **({} if ended else {"failed": True}))

    def record_cpu(self) -> None:
        """The `cpu` event: this process's CPU seconds so far and those of the children it reaped."""
        used, now = os.times(), time.time()
        self.record(CPU, self.worker, now, now, harness_s=round(used.user + used.system, 2),
                    processes_s=round(used.children_user + used.children_system, 2))

    def close(self) -> None:
        os.close(self._fd)


_active: Recorder | None = None


def start_recording(run_dir: Path, worker: str) -> Recorder:
    """Make this process record its events into `run_dir` as `worker`."""
    global _active
    stop_recording()
    _active = Recorder(run_dir, worker)
    return _active


def stop_recording() -> None:
    """End this process's recording with its `cpu` event."""
    global _active
    if _active is not None:
        _active.record_cpu()
        _active.close()
        _active = None


def record(kind: str, name: str, start: float, end: float, **attrs: Any) -> None:
    """Record an event if this process is recording."""
    if _active is not None:
        _active.record(kind, name, start, end, **attrs)


def span(kind: str, name: str, **attrs: Any) -> AbstractContextManager[None]:
    """Time the `with` block as an event if this process is recording."""
    return _active.span(kind, name, **attrs) if _active is not None else contextlib.nullcontext()


@contextlib.contextmanager
def context(**attrs: str) -> Iterator[None]:
    """Give every event recorded in the `with` block these attributes."""
    recorder = _active
    if recorder is None:
        yield
        return
    saved = dict(recorder.context)
    recorder.context.update(attrs)
    try:
        yield
    finally:
        recorder.context = saved


def begin_run(run_dir: Path, args: tuple[str, ...] | list[str]) -> None:
    """Empty `run_dir` of an earlier run's timeline and note this run's start (the controller, once)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob(f"*{EVENTS_SUFFIX}"):
        old.unlink()
    (run_dir / RUN_FILE).write_text(json.dumps({"started": time.time(), "args": list(args),
                                                "cpus": len(os.sched_getaffinity(0))}) + "\n")


def end_run(run_dir: Path) -> None:
    """Note the run's end in run.json."""
    path = run_dir / RUN_FILE
    run = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**run, "finished": time.time()}) + "\n")


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One recorded event; `attrs` holds the rest (test, variant, outcome, machine, failed)."""

    kind: str
    name: str
    start: float
    end: float
    worker: str
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Event":
        core = ("kind", "name", "start", "end", "worker")
        return cls(str(data["kind"]), str(data["name"]), float(data["start"]), float(data["end"]),
                   str(data["worker"]), {k: v for k, v in data.items() if k not in core})


def worker_order(worker: str) -> tuple[str, int]:
    """gw2 before gw10."""
    match = re.fullmatch(r"(\D*)(\d+)", worker)
    return (match[1], int(match[2])) if match else (worker, -1)


@dataclass(frozen=True)
class Run:
    """The events of one run, its start and end (the controller's, else the events'), and the CPUs it could use
    (0: not recorded)."""

    directory: Path
    events: tuple[Event, ...]
    started: float
    finished: float
    cpus: int = 0

    @property
    def wall(self) -> float:
        return self.finished - self.started

    @property
    def workers(self) -> list[str]:
        return sorted({event.worker for event in self.events}, key=worker_order)

    def of_worker(self, worker: str) -> list[Event]:
        return [event for event in self.events if event.worker == worker]


def read_run(run_dir: Path) -> Run:
    """Every worker's events in `run_dir`. A line cut short (a worker killed while writing) is left out."""
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such timeline run dir; run the suites first (make conformance) "
                         f"or name a dir under reports/timeline/")
    events: list[Event] = []
    for path in sorted(run_dir.glob(f"*{EVENTS_SUFFIX}")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                events.append(Event.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
    if not events:
        raise UsageError(f"{run_dir}: no timeline events (no *{EVENTS_SUFFIX} with events); run the suites "
                         "first (make conformance) or name another run dir")
    run_file = run_dir / RUN_FILE
    meta = json.loads(run_file.read_text()) if run_file.is_file() else {}
    started = min([event.start for event in events] + [float(meta.get("started", float("inf")))])
    finished = max([event.end for event in events] + [float(meta.get("finished", float("-inf")))])
    return Run(run_dir, tuple(sorted(events, key=lambda e: e.start)), started, finished, int(meta.get("cpus", 0)))


# --- summing up -------------------------------------------------------------------------


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of `intervals`."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def worker_load(run: Run) -> dict[str, dict[str, float]]:
    """Per worker: seconds spent in test phases (busy), the rest of the run's wall time (idle), busy %."""
    load: dict[str, dict[str, float]] = {}
    for worker in run.workers:
        busy = union_seconds([(e.start, e.end) for e in run.of_worker(worker) if e.kind in TEST_PHASES])
        load[worker] = {"busy_s": round(busy, 1), "idle_s": round(run.wall - busy, 1),
                        "busy_pct": round(100 * busy / run.wall, 1) if run.wall > 0 else 0.0}
    return load


def cpu_use(run: Run) -> dict[str, float] | None:
    """The CPU seconds the workers used (their own, their QEMU processes'), their share of what the run's CPUs
    could give over its wall time, and the wall time that work needs at the least: all of it spread evenly over
    the CPUs, never waiting. None when no worker recorded its CPU."""
    used = [e for e in run.events if e.kind == CPU]
    if not used:
        return None
    harness = sum(float(e.attrs.get("harness_s", 0.0)) for e in used)
    processes = sum(float(e.attrs.get("processes_s", 0.0)) for e in used)
    total = harness + processes
    use: dict[str, float] = {"harness_s": round(harness, 1), "processes_s": round(processes, 1),
                             "total_s": round(total, 1)}
    if run.cpus and run.wall > 0:
        use.update(cpus=run.cpus, busy_pct=round(100 * total / (run.cpus * run.wall), 1),
                   least_wall_s=round(total / run.cpus, 1))
    return use


def overall_outcome(outcomes: list[str]) -> str:
    """A test's outcome from its phases' outcomes: failed if one failed, else skipped if one skipped, else passed."""
    return next((o for o in ("failed", "skipped") if o in outcomes), "passed")


def costliest_tests(run: Run, top: int = TOP) -> list[dict[str, Any]]:
    """The `top` tests by setup + call + teardown seconds, with each phase's seconds."""
    phases: dict[str, list[Event]] = {}
    for event in run.events:
        if event.kind in TEST_PHASES:
            phases.setdefault(event.name, []).append(event)
    rows = []
    for name, events in phases.items():
        row: dict[str, Any] = {"test": name, "variant": events[0].attrs.get("variant", ""),
                               "worker": events[0].worker, "seconds": round(sum(e.seconds for e in events), 2)}
        for phase in TEST_PHASES:
            row[f"{phase}_s"] = round(sum(e.seconds for e in events if e.kind == phase), 2)
        row["outcome"] = overall_outcome([str(e.attrs.get("outcome", "")) for e in events])
        rows.append(row)
    return sorted(rows, key=lambda r: -r["seconds"])[:top]


def costliest_boots(run: Run, top: int = TOP) -> list[dict[str, Any]]:
    """The `top` machine boots by seconds, with the seconds of each stage (guests only) and the test booting it."""
    rows = []
    for boot in run.events:
        if boot.kind != BOOT:
            continue
        row: dict[str, Any] = {"machine": boot.name, "variant": boot.attrs.get("variant", ""),
                               "worker": boot.worker, "seconds": round(boot.seconds, 2),
                               "test": boot.attrs.get("test", ""), "failed": bool(boot.attrs.get("failed"))}
        for stage in run.events:
            if (stage.kind in BOOT_STAGES and stage.worker == boot.worker and stage.name == boot.name
                    and boot.start <= stage.start and stage.end <= boot.end):
                row[f"{stage.kind}_s"] = round(row.get(f"{stage.kind}_s", 0.0) + stage.seconds, 2)
        rows.append(row)
    return sorted(rows, key=lambda r: -r["seconds"])[:top]


def summarise(run: Run, top: int = TOP) -> dict[str, Any]:
    """Wall time, each worker's load, the costliest tests and boots: what bench-matrix.json keeps of a run."""
    boots = [e for e in run.events if e.kind == BOOT]
    return {"run_dir": str(run.directory), "wall_s": round(run.wall, 1), "workers": worker_load(run),
            "cpu": cpu_use(run), "boots": len(boots), "boot_s": round(sum(e.seconds for e in boots), 1),
            "tests": len({e.name for e in run.events if e.kind in TEST_PHASES}),
            "costliest_tests": costliest_tests(run, top), "costliest_boots": costliest_boots(run, top)}


def top_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: workers' load, then the costliest tests and the costliest boots."""
    lines = [f"# Where the time went: {summary['run_dir']}", "",
             f"{summary['wall_s']} s wall; {summary['tests']} tests; {summary['boots']} boots taking "
             f"{summary['boot_s']} s in all.", "",
             "| worker | busy s | idle s | busy % |", "| --- | ---: | ---: | ---: |"]
    for worker, load in summary["workers"].items():
        lines.append(f"| {worker} | {load['busy_s']} | {load['idle_s']} | {load['busy_pct']} |")
    if summary.get("cpu"):
        lines += ["", describe_cpu(summary["cpu"])]
    tests = summary["costliest_tests"]
    lines += ["", f"## The {len(tests)} costliest tests (setup includes a boot when the test booted a guest)", ""]
    lines += ["| test | variant | worker | seconds | setup | call | teardown | outcome |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"] if tests else ["No test ran."]
    lines += [f"| `{cell(t['test'])}` | {t['variant']} | {t['worker']} | {t['seconds']} | {t['setup_s']} "
              f"| {t['call_s']} | {t['teardown_s']} | {t['outcome']} |" for t in tests]
    boots = summary["costliest_boots"]
    lines += ["", f"## The {len(boots)} costliest boots (launch to ready: QMP, and SSH for a guest)", ""]
    lines += [f"| machine | variant | worker | seconds | {' | '.join(BOOT_STAGES)} | test |",
              "| --- | --- | --- | ---: |" + " ---: |" * len(BOOT_STAGES) + " --- |"] if boots else \
        ["No machine was started."]
    for b in boots:
        stage_cells = " | ".join(str(b.get(f"{stage}_s", "")) for stage in BOOT_STAGES)
        failed = " (failed)" if b["failed"] else ""
        lines.append(f"| {cell(b['machine'])}{failed} | {b['variant']} | {b['worker']} | {b['seconds']} "
                     f"| {stage_cells} | `{cell(b['test'])}` |")
    return "\n".join(lines) + "\n"


def describe_cpu(cpu: Mapping[str, Any]) -> str:
    """`cpu_use` in a sentence."""
    text = (f"CPU: {cpu['total_s']} s ({cpu['processes_s']} s in QEMU and other processes the workers started, "
            f"{cpu['harness_s']} s in the workers themselves).")
    if "cpus" in cpu:
        text += (f" That is {cpu['busy_pct']}% of what {cpu['cpus']} CPUs give over the wall time; spread evenly "
                 f"over them, never waiting, the same work takes {cpu['least_wall_s']} s.")
    return text


def cell(text: str) -> str:
    """`text` safe in a Markdown table cell."""
    return text.replace("|", "\\|")
