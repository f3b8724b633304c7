"""`vballoon report merge`: shard JUnit files into one, with its counts, properties and one-line problems."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vballoon.cli import main
from vballoon.report import read_junit

IDENTITY = {"vballoon.version": "0.1.0 (git abc)", "vballoon.qemu": "QEMU emulator version 7.2.22 sha256:aa",
            "vballoon.kernel": "Debian linux-image-cloud-amd64"}
PASS = '<testcase classname="suites.device.test_stats" name="{name}" time="{time}"/>'
FAIL = '<testcase classname="suites.device.test_stats" name="{name}" time="{time}"><failure message="x"/></testcase>'
ERROR = '<testcase classname="suites.device.test_stats" name="{name}" time="{time}"><error message="x"/></testcase>'
SKIP = '<testcase classname="suites.device.test_stats" name="{name}" time="{time}"><skipped message="x"/></testcase>'
XFAIL = ('<testcase classname="suites.device.test_stats" name="{name}" time="{time}">'
         '<skipped type="pytest.xfail" message="known"/></testcase>')


def shard_file(tmp_path: Path, name: str, cases: list[tuple[str, str, float]], shard: str | None = None,
               collected: int | None = None, host: str = "ci-1", **identity: str) -> Path:
    """A pytest JUnit file as a vballoon shard writes it; `identity` overrides IDENTITY (keys with _ for .)."""
    props = {**IDENTITY, **{key.replace("_", "."): value for key, value in identity.items()}}
    if shard is not None:
        props["vballoon.shard"] = shard
    if collected is not None:
        props["vballoon.collected"] = str(collected)
    properties = "".join(f'<property name="{key}" value="{value}"/>' for key, value in props.items())
    body = "".join(template.format(name=case, time=time) for template, case, time in cases)
    path = tmp_path / name
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
                    f'<testsuite name="pytest" errors="9" failures="9" skipped="9" tests="99" time="99.0" '
                    f'timestamp="2026-12-07T05:0{len(name) % 10}:00+00:00" hostname="{host}">'
                    f'<properties>{properties}</properties>{body}</testsuite></testsuites>', encoding="utf-8")
    return path


def run_merge(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, list[str]]:
    """Exit status, stdout and the stderr lines of `vballoon report merge ARGS`."""
    status = main(["report", "merge", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, f"expected no traceback, got {err!r}"
    return status, out, err.splitlines()


def suite_of(path: Path) -> ET.Element:
    return ET.parse(path).getroot().find("testsuite")  # type: ignore[return-value]


def properties_of(suite: ET.Element) -> list[tuple[str | None, str | None]]:
    return [(prop.get("name"), prop.get("value")) for prop in suite.iterfind("properties/property")]


def test_a_clean_merge_has_every_testcase_recomputed_counts_and_the_shards_listed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = shard_file(tmp_path, "junit-shard-1-of-2.xml",
                     [(PASS, "test_a", 1.25), (FAIL, "test_b", 2.0), (XFAIL, "test_c", 0.5)],
                     shard="1/2", collected=6)
    two = shard_file(tmp_path, "junit-shard-2-of-2.xml",
                     [(ERROR, "test_d", 0.25), (SKIP, "test_e", 0.0), (ERROR, "test_f", 0.5)],
                     shard="2/2", collected=6, host="ci-2")
    out = tmp_path / "merged" / "junit.xml"
    status, stdout, err = run_merge(capsys, two, one, "-o", out)

    assert (status, err) == (0, []), f"expected a clean merge (exit 0, nothing on stderr), got {status}, {err}"
    assert stdout.strip() == f"{out}: 6 tests from 2 files, 1 failures, 2 errors, 2 skipped", stdout
    suite = suite_of(out)
    counts = {key: suite.get(key) for key in ("tests", "failures", "errors", "skipped", "time", "hostname")}
    assert counts == {"tests": "6", "failures": "1", "errors": "2", "skipped": "2", "time": "4.500",
                      "hostname": "ci-2,ci-1"}, f"expected the counts of the testcases, got {counts}"
    expected_properties = [*IDENTITY.items(), ("vballoon.collected", "6"), ("vballoon.shard", "1/2,2/2")]
    assert properties_of(suite) == expected_properties, \
        f"expected identical properties once and the shards listed, got {properties_of(suite)}"
    cases = read_junit(out)
    assert [(case.case.split("::")[1], case.outcome) for case in cases] == [
        ("test_d", "error"), ("test_e", "skipped"), ("test_f", "error"), ("test_a", "passed"),
        ("test_b", "failed"), ("test_c", "deviates")], f"expected every testcase in argument order, got {cases}"


def test_a_test_in_two_files_is_named_and_still_merged_with_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = shard_file(tmp_path, "a.xml", [(PASS, "test_a[pci-modern]", 1), (PASS, "test_b", 1)], shard="1/2")
    two = shard_file(tmp_path, "b.xml", [(FAIL, "test_a[pci-modern]", 1)], shard="2/2")
    out = tmp_path / "junit.xml"
    status, _, err = run_merge(capsys, one, two, "-o", out)

    assert status == 1, f"expected exit 1 for a duplicate test, got {status}"
    assert err == [f"vballoon: problem: test suites.device.test_stats::test_a[pci-modern] is in both {one} "
                   f"and {two}"], f"expected one line naming the test and both files, got {err}"
    assert suite_of(out).get("tests") == "3", "expected the merged file written with both copies"


def test_missing_shards_are_named_and_the_rest_still_merged_with_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = shard_file(tmp_path, "a.xml", [(PASS, "test_a", 1)], shard="1/4")
    three = shard_file(tmp_path, "c.xml", [(PASS, "test_c", 1)], shard="3/4")
    out = tmp_path / "junit.xml"
    status, _, err = run_merge(capsys, one, three, "-o", out)

    assert status == 1, f"expected exit 1 for missing shards, got {status}"
    assert err == ["vballoon: problem: shards missing: 2/4, 4/4 (merged 1/4, 3/4); their tests are not in the "
                   "report"], f"expected one line naming shards 2/4 and 4/4, got {err}"
    assert ("vballoon.shard", "1/4,3/4") in properties_of(suite_of(out)), "expected the merged shards listed"


def test_a_shard_given_twice_and_shards_that_collected_differently_are_problems(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = shard_file(tmp_path, "a.xml", [(PASS, "test_a", 1)], shard="1/2", collected=10)
    again = shard_file(tmp_path, "a-again.xml", [(PASS, "test_b", 1)], shard="1/2", collected=10)
    two = shard_file(tmp_path, "b.xml", [(PASS, "test_c", 1)], shard="2/2", collected=12)
    status, _, err = run_merge(capsys, one, again, two, "-o", tmp_path / "junit.xml")

    assert status == 1, f"expected exit 1, got {status}"
    assert err == [f"vballoon: problem: shard 1/2 is in both {one} and {again}",
                   f"vballoon: problem: vballoon.collected differs: 10 in {one}, 12 in {two}; the shards collected "
                   "different tests (another selection or tier?)"], f"expected two problem lines, got {err}"


@pytest.mark.parametrize("prop", ["vballoon.version", "vballoon.qemu", "vballoon.kernel"])
def test_files_of_different_runs_are_refused_naming_both_values_and_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], prop: str) -> None:
    one = shard_file(tmp_path, "a.xml", [(PASS, "test_a", 1)], shard="1/2")
    two = shard_file(tmp_path, "b.xml", [(PASS, "test_b", 1)], shard="2/2", **{prop.replace(".", "_"): "other"})
    out = tmp_path / "junit.xml"
    status, stdout, err = run_merge(capsys, one, two, "-o", out)

    assert status == 2, f"expected exit 2 for a {prop} mismatch, got {status}"
    assert err == [f"vballoon: error: {prop} differs: {IDENTITY[prop]!r} in {one}, 'other' in {two}; merge only the "
                   "shards of one run (same vballoon, QEMU and kernel)"], f"expected one line naming both, got {err}"
    assert stdout == "" and not out.exists(), "expected nothing merged"


def test_shards_of_different_splits_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = shard_file(tmp_path, "a.xml", [(PASS, "test_a", 1)], shard="1/2")
    other = shard_file(tmp_path, "b.xml", [(PASS, "test_b", 1)], shard="2/3")
    status, _, err = run_merge(capsys, one, other, "-o", tmp_path / "junit.xml")
    assert (status, err) == (2, [f"vballoon: error: {one} is shard 1/2 but {other} is shard 2/3: they split "
                                 "different runs; merge the shards of one split"]), f"got {status}, {err}"


@pytest.mark.parametrize("content, problem", [
    ('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="1"><testcase classname="m" name="t">',
     "not a readable JUnit XML file (no element found: line 1, column 101); a truncated file needs its run "
     "(or download) again"),
    ("<html><body/></html>", "not a JUnit XML file (root element <html>)"),
    ('<testsuites><testsuite name="com.example.SurefireTest" tests="1"><testcase classname="c" name="t"/>'
     "</testsuite></testsuites>",
     "not a JUnit file of pytest or vballoon (testsuite 'com.example.SurefireTest'); pass the --junitxml output "
     "of a vballoon run"),
])
def test_a_truncated_or_foreign_file_is_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, problem: str) -> None:
    good = shard_file(tmp_path, "a.xml", [(PASS, "test_a", 1)], shard="1/2")
    bad = tmp_path / "b.xml"
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "junit.xml"
    status, stdout, err = run_merge(capsys, good, bad, "-o", out)

    assert status == 2, f"expected exit 2, got {status}"
    assert err == [f"vballoon: error: {bad}: {problem}"], f"expected one line naming {bad}, got {err}"
    assert stdout == "" and not out.exists(), "expected nothing merged"


def test_a_missing_file_and_a_malformed_shard_property_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "junit-shard-*.xml"
    status, _, err = run_merge(capsys, missing, "-o", tmp_path / "junit.xml")
    assert (status, err) == (2, [f"vballoon: error: {missing}: JUnit file not found"]), f"got {status}, {err}"

    odd = shard_file(tmp_path, "a.xml", [(PASS, "test_a", 1)], shard="3/2")
    status, _, err = run_merge(capsys, odd, "-o", tmp_path / "junit.xml")
    assert (status, err) == (2, [f"vballoon: error: {odd}: vballoon.shard '3/2' is not K/N with 1 <= K <= N; "
                                 "pass the JUnit files a sharded run wrote"]), f"got {status}, {err}"


def test_many_duplicates_are_capped_with_a_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [(PASS, f"test_{n}", 0.1) for n in range(13)]
    one = shard_file(tmp_path, "a.xml", cases, shard="1/1")
    status, _, err = run_merge(capsys, one, one, "-o", tmp_path / "junit.xml")
    assert status == 1, f"expected exit 1, got {status}"
    assert len(err) == 12 and err[-1] == "vballoon: problem: 3 more tests are in two files (the same shard given " \
        "twice?)", f"expected the shard line, 10 tests and a count, got {err}"


def test_a_merged_file_merges_again_with_its_shards_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    halves = [shard_file(tmp_path, f"s{k}.xml", [(PASS, f"test_{k}", 1)], shard=f"{k}/3") for k in (1, 2, 3)]
    first = tmp_path / "first.xml"
    assert run_merge(capsys, halves[0], halves[1], "-o", first)[0] == 1, "expected 3/3 missing"
    status, _, err = run_merge(capsys, first, halves[2], "-o", tmp_path / "all.xml")
    assert (status, err) == (0, []), f"expected a clean merge of a merged file and the last shard, got {status}, {err}"
    assert ("vballoon.shard", "1/3,2/3,3/3") in properties_of(suite_of(tmp_path / "all.xml"))
