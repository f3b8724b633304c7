"""The run timeline: the recorder's events read back, the SVG's lanes and bars, the costliest-first tables, and a
real pytest-xdist run in which both workers' events arrive and the controller alone empties the run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from pathlib import Path

import pytest

from vballoon import timeline
from vballoon.errors import UsageError
from vballoon.timeline import Event, Recorder, Run, read_run, summarise, top_markdown
from vballoon.timeline_svg import LEFT, PLOT_WIDTH, render

REPO = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"
T0 = 1_700_000_000.0


def test_recorded_events_read_back_with_worker_context_and_failure(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, "gw1")
    recorder.context.update(test="suites/guest/test_boot.py::test_x[pci-modern]", variant="pci-modern")
    recorder.record("call", "suites/guest/test_boot.py::test_x[pci-modern]", T0 + 1, T0 + 3.5, outcome="passed")
    with pytest.raises(RuntimeError):
        with recorder.span("boot", "shared-pci-modern-1-gw1", machine="Machine"):
            raise RuntimeError("QEMU did not start")
    recorder.close()

    run = read_run(tmp_path)
    call, boot = run.events
    assert (call.kind, call.worker, call.start, call.end) == ("call", "gw1", T0 + 1, T0 + 3.5), f"got {call}"
    assert call.attrs == {"test": "suites/guest/test_boot.py::test_x[pci-modern]", "variant": "pci-modern",
                          "outcome": "passed"}, f"expected the context and the outcome, got {call.attrs}"
    assert (boot.kind, boot.name, boot.attrs.get("failed"), boot.attrs.get("machine")) == \
        ("boot", "shared-pci-modern-1-gw1", True, "Machine"), f"expected a failed boot span, got {boot}"
    assert run.workers == ["gw1"], f"expected one worker, got {run.workers}"


def test_a_line_cut_short_is_left_out_and_an_empty_dir_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "gw0.jsonl").write_text(json.dumps({"kind": "call", "name": "t", "start": T0, "end": T0 + 1,
                                                    "worker": "gw0"}) + '\n{"kind": "setup", "na')
    assert [e.kind for e in read_run(tmp_path).events] == ["call"], "expected the cut line to be skipped"
    empty = tmp_path / "empty"
    empty.mkdir()
    for missing in (empty, tmp_path / "nowhere"):
        with pytest.raises(UsageError, match=str(missing)):
            read_run(missing)


def test_module_functions_record_nothing_unless_recording(tmp_path: Path) -> None:
    saved = timeline._active
    timeline._active = None
    try:
        timeline.record("call", "t", T0, T0 + 1)
        with timeline.span("boot", "m"), timeline.context(test="t"):
            pass
        assert not list(tmp_path.iterdir()), "expected no file without a recorder"
        recorder = Recorder(tmp_path, "main")
        timeline._active = recorder
        with timeline.context(test="t", variant="v"):
            with timeline.span("boot", "m"):
                pass
        timeline.record("call", "after", T0, T0 + 1)
    finally:
        timeline._active = saved
    recorder.close()
    events = {e.name: e for e in read_run(tmp_path).events}
    boot, call = events["m"], events["after"]
    assert boot.attrs == {"test": "t", "variant": "v"}, f"expected the context on the span, got {boot.attrs}"
    assert "test" not in call.attrs, f"expected the context gone after its block, got {call.attrs}"


def event(kind: str, name: str, start: float, end: float, worker: str, **attrs: object) -> Event:
    return Event(kind, name, T0 + start, T0 + end, worker, attrs)


def sample_run() -> Run:
    """100 s on two workers: gw0 runs a 40 s test (a 30 s boot in its setup), gw1 a 10 s test from 50 s."""
    events = (
        event("setup", "t_slow", 10, 40, "gw0", variant="pci-modern", outcome="passed"),
        event("boot", "shared-pci-modern-1-gw0", 10, 38, "gw0", variant="pci-modern", test="t_slow"),
        event("qemu-start", "shared-pci-modern-1-gw0", 10, 11, "gw0"),
        event("kernel", "shared-pci-modern-1-gw0", 11, 30, "gw0"),
        event("init", "shared-pci-modern-1-gw0", 30, 36, "gw0"),
        event("ssh", "shared-pci-modern-1-gw0", 36, 38, "gw0"),
        event("call", "t_slow", 40, 48, "gw0", variant="pci-modern", outcome="failed"),
        event("teardown", "t_slow", 48, 50, "gw0", variant="pci-modern", outcome="passed"),
        event("setup", "t_fast", 50, 51, "gw1", outcome="passed"),
        event("call", "t_fast", 51, 59, "gw1", outcome="passed"),
        event("teardown", "t_fast", 59, 60, "gw1", outcome="passed"),
        event("boot", "t_fast", 50, 50.5, "gw1", machine="QtestMachine"),
    )
    return Run(Path("reports/timeline/latest"), events, T0, T0 + 100)


def test_svg_is_xml_with_one_lane_per_worker_and_bars_where_their_events_are() -> None:
    root = ElementTree.fromstring(render(sample_run()))
    lanes = root.findall(f".//{SVG}g[@class='lane']")
    assert [lane.get("data-worker") for lane in lanes] == ["gw0", "gw1"], "expected one lane per worker, in order"
    gw0, gw1 = ({bar.get("data-kind"): bar for bar in lane.iter(f"{SVG}rect") if bar.get("class") == "bar"}
                for lane in lanes)
    for bars, kind, start, end in ((gw0, "kernel", 11, 30), (gw0, "call", 40, 48), (gw1, "call", 51, 59)):
        bar = bars[kind]
        assert float(bar.get("x", "nan")) == pytest.approx(LEFT + start / 100 * PLOT_WIDTH, abs=0.01), \
            f"{kind} bar of {start}-{end} s at x={bar.get('x')}"
        assert float(bar.get("width", "nan")) == pytest.approx((end - start) / 100 * PLOT_WIDTH, abs=0.02), \
            f"{kind} bar of {end - start} s is {bar.get('width')} wide"
    assert gw0["call"].get("stroke") == "#d62728", "expected the failed call outlined in red"
    assert "teardown" in gw1 and "kernel" not in gw1, "expected each worker's events in its own lane only"
    title = root.find(f"{SVG}text[@class='title']")
    assert title is not None and title.text == "vballoon run: 100.0 s wall on 2 worker(s): gw0 busy 40%, gw1 busy 10%", \
        f"got title {None if title is None else title.text!r}"
    ticks = [line.get("x1") for line in root.iter(f"{SVG}line") if line.get("class") == "tick"]
    assert len(ticks) == 11 and float(ticks[5]) == pytest.approx(LEFT + PLOT_WIDTH / 2), f"ticks at {ticks}"


def test_the_summary_puts_the_costliest_first_and_counts_busy_and_idle() -> None:
    run = sample_run()
    summary = summarise(run, top=1)
    assert summary["workers"] == {"gw0": {"busy_s": 40.0, "idle_s": 60.0, "busy_pct": 40.0},
                                  "gw1": {"busy_s": 10.0, "idle_s": 90.0, "busy_pct": 10.0}}, summary["workers"]
    assert [t["test"] for t in summary["costliest_tests"]] == ["t_slow"], "expected only the top test"
    slow = summary["costliest_tests"][0]
    assert (slow["seconds"], slow["setup_s"], slow["call_s"], slow["outcome"], slow["worker"]) == \
        (40.0, 30.0, 8.0, "failed", "gw0"), f"got {slow}"
    boots = summarise(run)["costliest_boots"]
    assert [b["machine"] for b in boots] == ["shared-pci-modern-1-gw0", "t_fast"], "expected the longest boot first"
    assert (boots[0]["kernel_s"], boots[0]["ssh_s"], boots[0]["test"]) == (19.0, 2.0, "t_slow"), f"got {boots[0]}"
    assert "kernel_s" not in boots[1], "a qtest machine has no guest stages"
    table = top_markdown(summarise(run))
    rows = [line for line in table.splitlines() if line.startswith("| `t_")]
    assert rows[0].startswith("| `t_slow` | pci-modern | gw0 | 40.0 |") and rows[1].startswith("| `t_fast`"), rows


def test_cpu_use_sums_the_workers_against_what_the_cpus_give_over_the_wall() -> None:
    """100 s of wall on 2 CPUs give 200 CPU s; the workers used 120 of them, so the work needs at least 60 s."""
    cpu = (event("cpu", "gw0", 100, 100, "gw0", harness_s=10.0, processes_s=70.0),
           event("cpu", "gw1", 100, 100, "gw1", harness_s=5.0, processes_s=35.0))
    run = sample_run()
    use = summarise(replace(run, events=run.events + cpu, cpus=2))["cpu"]
    assert use == {"harness_s": 15.0, "processes_s": 105.0, "total_s": 120.0, "cpus": 2, "busy_pct": 60.0,
                   "least_wall_s": 60.0}, f"got {use}"
    assert "least_wall_s" not in summarise(replace(run, events=run.events + cpu))["cpu"], \
        "expected no share without the number of CPUs"
    assert summarise(run)["cpu"] is None, "expected no CPU figures when no worker recorded them"
    assert "the same work takes 60.0 s" in top_markdown(summarise(replace(run, events=run.events + cpu, cpus=2)))


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    """Two tests in two xdist groups, so that with --dist loadgroup each of two workers runs one; test_b spends
    CPU in a child process as a test does in QEMU."""
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent("""
        import subprocess
        import sys
        import time
        import pytest

        @pytest.mark.xdist_group("a")
        def test_a():
            time.sleep(0.3)

        @pytest.mark.xdist_group("b")
        def test_b():
            subprocess.run([sys.executable, "-c", "import time\\nend = time.process_time() + 0.5\\n"
                            "while time.process_time() < end: pass"], check=True)
            time.sleep(0.3)
    """))
    return tmp_path


def test_an_xdist_run_records_both_workers_and_only_the_controller_empties_the_run_dir(tiny_suite: Path) -> None:
    run_dir = tiny_suite / "timeline"
    run_dir.mkdir()
    (run_dir / "gw7.jsonl").write_text(json.dumps({"kind": "call", "name": "stale", "start": 0, "end": 1,
                                                   "worker": "gw7"}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VBALLOON_TIMELINE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "fixtures.timeline", "-p", "no:cacheprovider",
                           "-n", "2", "--dist", "loadgroup", "--timeline-dir", "timeline", "-q", "test_tiny.py"],
                          cwd=tiny_suite, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pytest failed:\n{done.stdout}\n{done.stderr}"

    assert sorted(p.name for p in run_dir.iterdir()) == ["gw0.jsonl", "gw1.jsonl", "run.json"], \
        "expected the stale worker file gone, both workers' files and the controller's run.json"
    meta = json.loads((run_dir / "run.json").read_text())
    run = read_run(run_dir)
    assert meta["started"] <= run.events[0].start and run.events[-1].end <= meta["finished"], \
        f"expected the run's start and end around its events, got {meta}"
    phases = {(e.worker, e.name, e.kind) for e in run.events if e.kind in timeline.TEST_PHASES}
    by_worker = {worker: {name for w, name, _ in phases if w == worker} for worker in run.workers}
    assert sorted(map(sorted, by_worker.values())) == [["test_tiny.py::test_a"], ["test_tiny.py::test_b"]], \
        f"expected each worker to record its own test, got {by_worker}"
    assert len(phases) == 6, f"expected setup, call and teardown of both tests, got {sorted(phases)}"
    calls = [e for e in run.events if e.kind == "call"]
    assert all(e.seconds >= 0.3 and e.attrs.get("outcome") == "passed" for e in calls), f"got {calls}"
    assert {e.attrs.get("group") for e in calls} == {"a", "b"}, "expected the xdist group without the nodeid suffix"
    assert {e.kind for e in run.events} >= {"collect"}, "expected each worker's collection"
    assert run.cpus == len(os.sched_getaffinity(0)), f"expected run.json to name the CPUs, got {run.cpus}"
    cpu = {e.worker: e.attrs for e in run.events if e.kind == timeline.CPU}
    worker_b = next(e.worker for e in calls if e.name.endswith("test_b"))
    worker_a = next(e.worker for e in calls if e.name.endswith("test_a"))
    assert set(cpu) == {"gw0", "gw1"} and cpu[worker_b]["processes_s"] >= 0.4 > cpu[worker_a]["processes_s"], \
        f"expected each worker's CPU, 0.5 s of child-process CPU on test_b's worker {worker_b} alone, got {cpu}"
    assert all(attrs["harness_s"] > 0 for attrs in cpu.values()), f"expected the workers' own CPU, got {cpu}"
