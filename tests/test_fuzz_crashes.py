"""Crash files: atomic, never overwritten, with a sidecar; and seed checking in campaigns."""

from __future__ import annotations

import json
from pathlib import Path

from vballoon.fuzz.campaign import TargetRun, checked_seeds
from vballoon.fuzz.crashes import crash_files, read_sidecar, save_crash, write_new


def test_saving_never_overwrites_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    first = save_crash(tmp_path, "difference", b"\1\2", {"summary": "first"})
    assert first is not None and first.name.startswith("difference-") and first.read_bytes() == b"\1\2"
    assert save_crash(tmp_path, "difference", b"\1\2", {"summary": "second"}) is None
    assert read_sidecar(first)["summary"] == "first"
    assert not write_new(first, b"other") and first.read_bytes() == b"\1\2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".json"]
    assert crash_files(tmp_path) == [first]


def test_checked_seeds_name_each_bad_seed_on_one_line(tmp_path: Path) -> None:
    seeds = tmp_path / "corpora" / "scenario"
    seeds.mkdir(parents=True)
    (seeds / "good").write_bytes(bytes([1, 0, 7]))
    (seeds / "truncated").write_bytes(bytes([1, 0, 0x10, 2]))
    (seeds / "newer").write_bytes(bytes([9, 0]))
    into = tmp_path / "work"
    into.mkdir()
    said: list[str] = []
    assert checked_seeds("scenario", tmp_path / "corpora", into, said.append) == 1
    assert [p.name for p in into.iterdir()] == ["good"]
    assert len(said) == 2 and all(line.startswith("vballoon: skipping seed ") for line in said)
    assert any("newer" in line and "format version 9 is newer" in line for line in said)


def test_campaign_reads_libfuzzer_status_and_findings() -> None:
    run = TargetRun("stats")
    run.take_line(0, "#4096\tpulse  cov: 151 ft: 200 corp: 20/800b lim: 100 exec/s: 2048 rss: 70Mb")
    shown = run.take_line(0, "vballoon-finding: difference fuzz/crashes/x/difference-ab BAL-X: what")
    run.take_line(0, "stat::number_of_executed_units: 5000")
    run.take_line(0, "stat::average_exec_per_sec:     2500")
    run.take_line(0, "#5001\tDONE   cov: 152 ft: 200 corp: 20/800b lim: 100 exec/s: 1 rss: 70Mb")
    assert (run.executions, run.exec_per_s, run.coverage) == (5000, 2500.0, 151)
    assert run.findings == [("difference", "fuzz/crashes/x/difference-ab", "BAL-X: what")]
    assert shown is not None and "difference-ab" in shown
    assert json.loads(json.dumps(run.progress()))
