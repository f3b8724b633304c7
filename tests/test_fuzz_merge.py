"""`vballoon fuzz merge` and the merge that ends a campaign: libFuzzer keeps the inputs that add coverage, findings
are kept once per content and per signature, bad input is one line."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from vballoon.cli import main
from vballoon.fuzz.campaign import run_target
from vballoon.fuzz.format import decode, device_byte
from vballoon.fuzz.merge import canonical_input, merge, merge_corpus
from vballoon.fuzz.targets import DIFFERENTIAL_VARIANT
from vballoon.spec import encode_stats

DEVICE = device_byte(DIFFERENTIAL_VARIANT, False)
"""The stats target's device byte of the seeds; 0x40 is a reserved bit the decoder ignores, so an input differing
only there runs exactly the same code."""
ONE_STAT = bytes([DEVICE]) + encode_stats([(4, 1 << 30)])
EVERY_TAG = bytes([DEVICE]) + encode_stats([(tag, tag) for tag in reversed(range(17))])


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def finding(directory: Path, kind: str, data: bytes, summary: str | None, name: str | None = None) -> Path:
    """A crash file as `save_crash` writes it (sidecar only when `summary` is given)."""
    path = write(directory / (name or f"{kind}-{hashlib.sha1(data).hexdigest()}"), data)
    if summary is not None:
        path.with_name(path.name + ".json").write_text(json.dumps({"kind": kind, "summary": summary}))
    return path


def test_libfuzzer_merge_keeps_only_inputs_that_add_coverage(tmp_path: Path) -> None:
    corpus = tmp_path / "fuzz" / "corpora" / "stats"
    write(corpus / "one-entry", ONE_STAT)
    # The first input a process runs also counts the code it runs only once (caches filling): this one, run second,
    # has the coverage every later run of the same code has.
    write(corpus / "one-entry-again", bytes([DEVICE | 0x80]) + ONE_STAT[1:])
    first, second = tmp_path / "worker-1", tmp_path / "worker-2"
    write(first / "same-bytes-as-the-seed", ONE_STAT)
    write(first / "same-coverage-as-the-seed", bytes([DEVICE | 0x40]) + ONE_STAT[1:])
    write(first / "every-tag", EVERY_TAG)
    write(second / "every-tag-again", EVERY_TAG)

    result = merge_corpus("stats", [first, second], corpus)

    kept = {path.read_bytes() for path in corpus.iterdir()}
    assert result.offered == 2, f"expected the seed's and the repeated bytes to be offered once, got {result}"
    assert kept == {ONE_STAT, bytes([DEVICE | 0x80]) + ONE_STAT[1:], EVERY_TAG}, (
        f"expected only the input that adds coverage to be kept, got {kept}")
    assert (result.before, result.after) == (2, 3)


def test_a_target_that_cannot_merge_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    scripts = tmp_path / "scripts"
    write(scripts / "fuzz_stats.py", b"import sys\nsys.exit('ModuleNotFoundError: No module named atheris')\n")
    monkeypatch.setattr("vballoon.fuzz.merge.FUZZ_DIR", scripts)
    write(tmp_path / "worker" / "corpora" / "stats" / "every-tag", EVERY_TAG)
    corpora = tmp_path / "corpora"

    status = main(["fuzz", "merge", str(tmp_path / "worker"), "--corpora", str(corpora)])

    assert (status, capsys.readouterr().err) == (2, f"vballoon: error: fuzz_stats: libFuzzer's merge into "
                                                    f"{corpora / 'stats'} failed (exit status 1): "
                                                    "ModuleNotFoundError: No module named atheris\n")


def test_scenario_inputs_are_kept_in_a_form_that_decodes_strictly() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 60)))
        kept = canonical_input("scenario", data)
        assert kept is not None and decode(kept, strict=True) == decode(data), f"{data.hex()} -> {kept!r}"
    assert canonical_input("stats", b"\xff\x00") == b"\xff\x00", "other targets' inputs are kept as they are"


def test_findings_are_kept_once_per_content_and_per_signature(tmp_path: Path) -> None:
    crashes = tmp_path / "fuzz" / "crashes"
    known = finding(crashes / "config", "difference", b"\2\1\3", "BAL-CFG-1: actual: expected 1, got 2")
    first, second = tmp_path / "worker-1", tmp_path / "worker-2"
    renamed = finding(first / "crashes" / "config", "difference", b"\2\1\3", None, name="difference-renamed")
    same_bug = finding(first / "crashes" / "config", "difference", b"\2\1\4", "BAL-CFG-1: actual: expected 1, got 7")
    new_bug = finding(first / "crashes" / "config", "difference", b"\2\1\5", "BAL-CFG-2: num_pages: expected 0, got 1")
    its_twin = finding(second / "crashes" / "config", "difference", b"\2\1\6", "BAL-CFG-2: num_pages: expected 0, got 9")
    no_sidecar = finding(second / "crashes" / "config", "reference-exception", b"\2\1\7", None)
    said: list[str] = []

    [result] = merge([first, second], None, tmp_path / "fuzz" / "corpora", crashes, say=said.append)

    assert [p.name for p in result.findings.new] == [new_bug.name, no_sidecar.name]
    assert sorted(result.findings.dropped) == sorted([
        (renamed, f"same input as {known}"),
        (same_bug, f"same signature as {known} (difference:BAL-CFG-1: actual)"),
        (its_twin, f"same signature as {crashes / 'config' / new_bug.name} (difference:BAL-CFG-2: num_pages)")])
    copied_sidecar = crashes / "config" / (new_bug.name + ".json")
    assert copied_sidecar.read_text() == new_bug.with_name(new_bug.name + ".json").read_text()
    assert sorted(p.name for p in (crashes / "config").iterdir()) == sorted(
        [known.name, known.name + ".json", new_bug.name, new_bug.name + ".json", no_sidecar.name])
    assert said[0] == "fuzz_config: inputs 0 -> 0 (0 offered); findings 2 new, 3 duplicate"
    assert said[1:] == [f"fuzz_config: dropped {path}: {why}" for path, why in result.findings.dropped]


def test_a_campaign_ends_by_merging_its_jobs_corpus_into_the_seeds(tmp_path: Path) -> None:
    corpora = tmp_path / "corpora"
    write(corpora / "stats" / "one-entry", ONE_STAT)
    said: list[str] = []

    run = run_target("stats", 2, 2, None, tmp_path / "crashes", corpora, said.append, merge=True)

    assert not run.errors, run.errors
    merged = [line for line in said if line.startswith(f"fuzz_stats: corpus {corpora / 'stats'}: 1 -> ")]
    assert merged, f"expected a line saying what the merge kept, got {said[-3:]}"
    kept = sorted(corpora.joinpath("stats").iterdir())
    assert len(kept) > 1 and f"1 -> {len(kept)} inputs" in merged[0]


@pytest.mark.parametrize("args, message", [
    (["fuzz", "merge"], "vballoon fuzz merge: name at least one DIR (a fuzz/ directory of another worker or machine)"),
    (["fuzz", "merge", "{tmp}/absent"], "{tmp}/absent: no such directory; pass fuzz/ directories of other workers "
                                        "or machines (corpora/<target>/, crashes/<target>/)"),
    (["fuzz", "merge", "{tmp}"], "{tmp}: has neither corpora/ nor crashes/; pass fuzz/ directories of other workers "
                                 "or machines (corpora/<target>/, crashes/<target>/)"),
    (["fuzz", "merge", "{tmp}", "--target", "nope"], "--target nope: unknown fuzz target; known: stats, pfn, hint, "
                                                     "report, config, scenario, qemu_differential"),
    (["fuzz", "stats", "{tmp}"], "vballoon fuzz: DIR arguments and --target go with "
                                 "'vballoon fuzz merge DIR... [--target T]'"),
])
def test_bad_merge_input_is_one_line(tmp_path: Path, args: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    status = main([arg.format(tmp=tmp_path) for arg in args])
    out, err = capsys.readouterr()
    assert (status, out) == (2, ""), f"expected exit status 2 and no output, got {status}, {out!r}"
    assert err == f"vballoon: error: {message.format(tmp=tmp_path)}\n"
