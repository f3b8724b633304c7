"""`--shard K/N`: parsing, units, the LPT split, the cost table, and the split of every tier's real collection.

The real collections (quick, standard and the ~108k tests of full) and the
end-to-end runs are pytest subprocesses started together once for the module
(`runs`); each collection is split for N = 1..8 in process with the function
the plugin uses. The collections run with hash seed 0, the end-to-end runs with
seeds 1 and 2: a split that depended on hash order would not match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from vballoon import cli, junit
from vballoon.costs import DEFAULT_TABLE, HEADER, load_costs, measured_costs, render_costs
from vballoon.errors import UsageError
from vballoon.run_identity import COLLECTED, SHARD
from vballoon.shard import (MIGRATION_UNIT_PREFIX, Shard, assign, case_id, estimated_costs, longest_first,
                            parse_shard, split, unit_of)

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("quick", "standard", "full")
SHARD_COUNTS = range(1, 9)
E2E_STANDARD = Shard(3, 5)
E2E_XDIST = Shard(2, 3)
E2E_DESELECT = "not test_features"
EMPTY_SELECTION = "test_offered_features_follow_the_properties and pci-modern-poison]"
BAD_SHARDS = ("0/4", "5/4", "a/b", "1/0")


# --- parsing -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shard", [("1/1", Shard(1, 1)), ("2/4", Shard(2, 4)), ("4/4", Shard(4, 4)),
                                         (" 3 / 8 ", Shard(3, 8))])
def test_parse_shard_reads_k_of_n(text: str, shard: Shard) -> None:
    assert parse_shard(text, "--shard") == shard
    assert str(shard) == f"{shard.index}/{shard.count}"


@pytest.mark.parametrize("text", [*BAD_SHARDS, "", "2", "1/2/3", "-1/4", "1/-4", "1.5/4"])
@pytest.mark.parametrize("option", ["--shard", "VBALLOON_SHARD"])
def test_parse_shard_refuses_anything_else_naming_the_option(text: str, option: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_shard(text, option)
    message = str(raised.value)
    assert message.startswith(f"{option}={text}: ") and "K/N" in message and "\n" not in message


# --- test ids and units --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodeid, case", [
    ("suites/guest/test_inflate.py::test_x[pci-modern+doom]", "suites.guest.test_inflate::test_x[pci-modern+doom]"),
    ("suites/guest/test_inflate.py::test_x[pci-modern+doom]@pci-modern+doom",
     "suites.guest.test_inflate::test_x[pci-modern+doom]"),
    ("suites/device/test_stats.py::test_y[pci-transitional@legacy]",
     "suites.device.test_stats::test_y[pci-transitional@legacy]"),
    ("suites/device/test_stats.py::test_y[pci-transitional@legacy]@group",
     "suites.device.test_stats::test_y[pci-transitional@legacy]"),
    ("suites/migration/test_shrinker.py::test_z", "suites.migration.test_shrinker::test_z"),
    ("suites/migration/test_shrinker.py::test_z@group", "suites.migration.test_shrinker::test_z"),
    ("tests/test_a.py::TestB::test_c[x::y-1]", "tests.test_a.TestB::test_c[x::y-1]"),
    ("README.txt", "README.txt"),
])
def test_case_id_spells_a_node_id_as_junit_does(nodeid: str, case: str) -> None:
    assert case_id(nodeid) == case


@pytest.mark.parametrize("case, unit", [
    ("suites.guest.test_boot::test_x[pci-modern]", "pci-modern"),
    ("suites.guest.test_oom::test_x[pci-legacy+doom+fpr-poison-eventidx]", "pci-legacy+doom+fpr-poison-eventidx"),
    ("suites.guest.test_suspend::test_s[pci-legacy+doom+fpr-poison-eventidx-mem]",
     "pci-legacy+doom+fpr-poison-eventidx"),
    ("suites.guest.test_suspend::test_s[pci-modern-freeze]", "pci-modern"),
    ("suites.migration.test_integrity::test_m[pci-legacy+fph-empty]", MIGRATION_UNIT_PREFIX + "pci-legacy+fph"),
    ("suites.guest.test_backends::test_b[shm]", "suites.guest.test_backends::test_b[shm]"),
    ("suites.guest.test_x::test_x[pci-modern+fph+doom]", "suites.guest.test_x::test_x[pci-modern+fph+doom]"),
    ("suites.migration.test_shrinker::test_z", "suites.migration.test_shrinker::test_z"),
    ("suites.device.test_inflate::test_d[pci-modern]", "suites.device.test_inflate::test_d[pci-modern]"),
    ("tests.test_shard::test_t[pci-modern]", "tests.test_shard::test_t[pci-modern]"),
])
def test_unit_is_the_variant_in_the_guest_and_migration_suites_else_the_test(case: str, unit: str) -> None:
    assert unit_of(case) == unit


# --- costs and the split -------------------------------------------------------------------------------------------

def test_missing_units_cost_their_tests_times_the_median_per_test_cost() -> None:
    # a: 10 s over 2 tests, b: 30 s over 3 tests: per-test costs 5, 5, 10, 10, 10, median 10
    assert estimated_costs({"a": 2, "b": 3, "c": 4}, {"a": 10.0, "b": 30.0, "gone": 99.0}) == \
        {"a": 10.0, "b": 30.0, "c": 40.0}


def test_without_measured_units_the_cost_is_the_test_count() -> None:
    assert estimated_costs({"a": 2, "b": 5}, {}) == {"a": 2.0, "b": 5.0}
    assert estimated_costs({"a": 2, "b": 5}, {"other": 7.0}) == {"a": 2.0, "b": 5.0}


def test_assign_is_lpt_longest_first_onto_the_least_loaded_shard() -> None:
    costs = {"a": 7.0, "b": 6.0, "c": 5.0, "d": 4.0, "e": 3.0}
    # a->1 (7), b->2 (6), c->2 (11), d->1 (11), e: both 11 with two tests, the lower K
    assert assign(dict.fromkeys(costs, 1), costs, 2) == {"a": 1, "b": 2, "c": 2, "d": 1, "e": 1}


def test_assign_breaks_ties_by_name_whatever_the_order() -> None:
    units = {"z": 1, "x": 1, "y": 1}
    assert assign(units, {}, 3) == {"x": 1, "y": 2, "z": 3}
    assert assign(dict(reversed(units.items())), {}, 3) == {"x": 1, "y": 2, "z": 3}


def test_assign_spreads_free_units_by_test_count() -> None:
    assert assign({"a": 3, "b": 1, "c": 1}, {"a": 0.0, "b": 0.0, "c": 0.0}, 2) == {"a": 1, "b": 2, "c": 2}


def test_more_shards_than_units_leaves_the_last_shards_empty() -> None:
    assert assign({"a": 1, "b": 2}, {}, 10**9) == {"b": 1, "a": 2}


def test_split_keeps_a_unit_together_in_test_order() -> None:
    cases = ["suites.guest.test_a::t[pci-modern]", "suites.device.test_d::t[pci-modern]",
             "suites.guest.test_b::t[pci-modern]", "suites.guest.test_a::t[pci-legacy]"]
    # pci-modern (2 tests) goes first to shard 1, the other two units to shard 2
    assert split(cases, {}, 2) == [1, 2, 1, 2]


def test_longest_first_puts_variants_by_cost_then_single_tests_in_order() -> None:
    cases = ["suites.device.test_d::t1", "suites.guest.test_a::t[pci-modern]", "suites.guest.test_a::t[pci-legacy]",
             "suites.device.test_d::t2", "suites.guest.test_b::t[pci-modern]", "suites.guest.test_b::t[pci-legacy]",
             "suites.guest.test_c::t[pci-legacy]", "suites.guest.test_a::t[pci-modern+doom]",
             "suites.guest.test_b::t[pci-modern+doom]"]
    costs = {"pci-modern": 10.0, "pci-legacy": 30.0, "suites.device.test_d::t1": 99.0}
    # pci-legacy (30 s), pci-modern+doom (unmeasured: 2 tests x the median of 5, 5, 10, 10, 10, 99 s/test = 20 s),
    # pci-modern (10 s), then the single tests in collection order whatever their cost
    assert [cases[i] for i in longest_first(cases, costs)] == [
        cases[2], cases[5], cases[6], cases[7], cases[8], cases[1], cases[4], cases[0], cases[3]]
    costs["pci-modern"] = 20.0  # a tie with pci-modern+doom: the one that appeared first goes first
    assert [cases[i] for i in longest_first(cases, costs)][3:7] == [cases[1], cases[4], cases[7], cases[8]]


# --- the cost table ------------------------------------------------------------------------------------------------

def test_the_packaged_table_is_valid_and_says_how_it_is_made() -> None:
    load_costs(DEFAULT_TABLE)
    assert DEFAULT_TABLE.read_text(encoding="utf-8").startswith(HEADER)
    assert "vballoon report costs" in HEADER


@pytest.mark.parametrize("text", ["pci-modern = ", '"pci-modern" = "12"', '"pci-modern" = -1.0',
                                  '"pci-modern" = true', '"pci-modern" = nan', '[pci-modern]\nx = 1'])
def test_a_bad_table_is_one_line_naming_it(tmp_path: Path, text: str) -> None:
    table = tmp_path / "costs.toml"
    table.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as raised:
        load_costs(table)
    assert str(raised.value).startswith(f"{table}: ") and "\n" not in str(raised.value)


def test_a_missing_table_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{tmp_path / 'none.toml'}: cost table not found"):
        load_costs(tmp_path / "none.toml")


def test_a_rendered_table_reads_back(tmp_path: Path) -> None:
    costs = {"pci-modern+doom": 812.456, 'tests.t::q["\\\x7f\n]': 1.0, "suites.é::x": 0.0}
    table = tmp_path / "costs.toml"
    table.write_text(render_costs(costs), encoding="utf-8")
    assert load_costs(table) == {"pci-modern+doom": 812.46, 'tests.t::q["\\\x7f\n]': 1.0, "suites.é::x": 0.0}


def _junit(path: Path, cases: list[tuple[str, str, str]]) -> Path:
    suite = ET.Element("testsuite", name="pytest")
    for classname, name, time in cases:
        ET.SubElement(suite, "testcase", classname=classname, name=name, time=time)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path)
    return path


def test_measured_costs_sum_the_testcase_times_per_unit(tmp_path: Path) -> None:
    first = _junit(tmp_path / "junit-shard-1-of-2.xml", [
        ("suites.guest.test_boot", "test_a[pci-modern]@pci-modern", "40.5"),
        ("suites.guest.test_stats", "test_b[pci-modern]", "2.5"),
        ("suites.guest.test_suspend", "test_s[pci-modern-mem]", "7"),
        ("suites.device.test_stats", "test_d[pci-transitional@legacy]", "1.25"),
        ("suites.migration.test_state", "test_m[pci-modern+fph]", "30"),
    ])
    second = _junit(tmp_path / "junit-shard-2-of-2.xml", [
        ("suites.guest.test_boot", "test_a[pci-legacy]", "20"),
        ("suites.guest.test_stats", "test_b[pci-modern]", "3.5"),  # a rerun: its last time counts
    ])
    assert measured_costs([first, second]) == {
        "pci-modern": 51.0, "suites.device.test_stats::test_d[pci-transitional@legacy]": 1.25,
        "migration:pci-modern+fph": 30.0, "pci-legacy": 20.0}


def test_a_bad_testcase_time_is_one_line_naming_the_file(tmp_path: Path) -> None:
    junit = _junit(tmp_path / "j.xml", [("suites.guest.test_boot", "test_a[pci-modern]", "soon")])
    with pytest.raises(UsageError, match=f"^{junit}: testcase 'suites.guest.test_boot::test_a\\[pci-modern\\]'"):
        measured_costs([junit])


def test_report_costs_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junit = _junit(tmp_path / "j.xml", [("suites.guest.test_boot", "test_a[pci-modern]", "4"),
                                        ("suites.guest.test_stats", "test_b[pci-modern]", "6")])
    out = tmp_path / "data" / "variant-cost.toml"
    assert cli.main(["report", "costs", str(junit), "--out", str(out)]) == 0
    assert load_costs(out) == {"pci-modern": 10.0}
    assert capsys.readouterr().out == f"1 shard units, 10 s in all -> {out}\n"


def test_report_costs_of_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.xml"
    assert cli.main(["report", "costs", str(missing), "--out", str(tmp_path / "t.toml")]) == 2
    assert capsys.readouterr().err == f"vballoon: error: {missing}: JUnit file not found\n"


# --- the real collections, split in process, and the plugin end to end ---------------------------------------------

Rows = list[list[str | None]]
"""A collection as tests/shard_collection.py records it: [node id, variant or None, migration variant or None]."""
Process = subprocess.CompletedProcess[str]


def _pytest(args: list[str], tmp: Path, hash_seed: str = "0", shard_env: str | None = None) -> Process:
    """pytest in this checkout with the collection recorder on the path, VBALLOON_SHARD only if given, its timeline
    (if it records one) in `tmp`."""
    env = {key: value for key, value in os.environ.items() if key not in ("VBALLOON_SHARD", "VBALLOON_MATRIX")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), PYTHONHASHSEED=hash_seed,
               VBALLOON_TIMELINE_DIR=str(tmp / "timeline"))
    if shard_env is not None:
        env["VBALLOON_SHARD"] = shard_env
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _collect(tier: str, tmp: Path, *options: str, hash_seed: str = "0", shard_env: str | None = None
             ) -> tuple[Rows, str]:
    """The tests a `--collect-only` run of the suites keeps, and its output."""
    out = tmp / f"collection-{tier}-{len(options)}.json"
    done = _pytest(["--collect-only", "-q", "-p", "shard_collection", "--collection-json", str(out),
                    "suites", "--matrix", tier, *options], tmp, hash_seed, shard_env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows: Rows = json.loads(out.read_text(encoding="utf-8"))
    return rows, done.stdout


@dataclass
class Runs:
    """The module's subprocesses, started at once."""

    tiers: dict[str, Future[tuple[Rows, str]]]
    """Each tier's whole collection."""
    standard_shard: Future[tuple[Rows, str]]
    """--collect-only of shard E2E_STANDARD (from VBALLOON_SHARD) of the standard tier after -k E2E_DESELECT, with
    another hash seed, into `standard_junit`."""
    standard_junit: Path
    xdist: Future[Process]
    """Shard E2E_XDIST of the quick tier under pytest-xdist, fixtures planned, not run (nothing boots), with another
    hash seed and an exported VBALLOON_SHARD that --shard overrides, into `xdist_junit`."""
    xdist_junit: Path
    bad: dict[str, Future[Process]]
    """Runs with bad input, by what they name."""
    empty: Future[Process]
    """Shard 2/2 of a selection of one test, which shard 1/2 has."""
    loadgroup: Future[tuple[Rows, str]]
    """The quick tier's collection as `--dist loadgroup` orders it, with another hash seed."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Every subprocess of the module, started at once."""
    tmp = tmp_path_factory.mktemp("shard-runs")
    bad_table = tmp / "bad.toml"
    bad_table.write_text("pci-modern = [", encoding="utf-8")
    standard_junit, xdist_junit = tmp / "junit-standard.xml", tmp / "junit-xdist.xml"
    with ThreadPoolExecutor(max_workers=3) as pool:  # the full tier's collection, the longest, first
        tiers = {tier: pool.submit(_collect, tier, tmp) for tier in reversed(TIERS)}
        xdist = pool.submit(_pytest, ["suites", "--matrix", "quick", "--shard", str(E2E_XDIST), "-n", "2", "--dist",
                                      "loadgroup", "--setup-plan", "--junitxml", str(xdist_junit)],
                            tmp, hash_seed="1", shard_env="1/2")
        standard_shard = pool.submit(_collect, "standard", tmp, "-k", E2E_DESELECT, "--junitxml", str(standard_junit),
                                     hash_seed="2", shard_env=str(E2E_STANDARD))
        bad = {f"--shard={text}": pool.submit(_pytest, ["--collect-only", "--shard", text], tmp) for text in BAD_SHARDS}
        bad["VBALLOON_SHARD=a/b"] = pool.submit(_pytest, ["--collect-only"], tmp, shard_env="a/b")
        bad[str(bad_table)] = pool.submit(_pytest, ["--collect-only", "--shard", "1/2", f"--shard-costs={bad_table}"],
                                          tmp)
        empty = pool.submit(_pytest, ["--collect-only", "suites/device/test_features.py", "-k", EMPTY_SELECTION,
                                      "--shard", "2/2"], tmp)
        loadgroup = pool.submit(_collect, "quick", tmp, "--dist", "loadgroup", hash_seed="3")
        yield Runs(tiers, standard_shard, standard_junit, xdist, xdist_junit, bad, empty, loadgroup)


def _expected_unit(nodeid: str | None, variant: str | None, migration_variant: str | None) -> str:
    """The unit a test must be in, from its real parameters."""
    if variant is not None:
        return variant
    if migration_variant is not None:
        return MIGRATION_UNIT_PREFIX + migration_variant
    return case_id(str(nodeid))


def _testsuite_properties(junit: Path) -> dict[str | None, str | None]:
    return {prop.get("name"): prop.get("value") for prop in ET.parse(junit).getroot().iterfind("testsuite/properties/"
                                                                                               "property")}


@pytest.mark.parametrize("tier", TIERS)
def test_every_tier_splits_into_shards_that_cover_it_once_keeping_variants_together(runs: Runs, tier: str) -> None:
    rows, _ = runs.tiers[tier].result()
    nodeids = [str(row[0]) for row in rows]
    cases = [case_id(nodeid) for nodeid in nodeids]
    assert len(set(cases)) == len(cases)
    units = [unit_of(case) for case in cases]
    assert units == [_expected_unit(*row) for row in rows]
    tests_per_unit = Counter(units)
    # two units in three measured, at various costs per test; the others estimated
    measured = {unit: count * (1 + i % 7) for i, (unit, count) in enumerate(sorted(tests_per_unit.items())) if i % 3}
    for costs in ({}, measured):
        estimate = estimated_costs(tests_per_unit, costs)
        for count in SHARD_COUNTS:
            shards = split(cases, costs, count)
            members: dict[int, list[str]] = {k: [] for k in range(1, count + 1)}
            for nodeid, shard in zip(nodeids, shards, strict=True):
                members[shard].append(nodeid)
            assert sorted(nodeid for k in members for nodeid in members[k]) == sorted(nodeids)
            for column in (1, 2):  # the variant, the migration variant
                on: dict[str, set[int]] = {}
                for row, shard in zip(rows, shards, strict=True):
                    if row[column] is not None:
                        on.setdefault(str(row[column]), set()).add(shard)
                assert all(len(found) == 1 for found in on.values()), (count, column)
            loads = dict.fromkeys(members, 0.0)
            for unit, shard in assign(tests_per_unit, costs, count).items():
                loads[shard] += estimate[unit]
            # LPT: no shard is short of the most loaded by more than the costliest unit
            assert max(loads.values()) - min(loads.values()) <= max(estimate.values()) + 1e-6


def test_collect_only_with_shard_splits_what_k_left(runs: Runs) -> None:
    (everything, _), (kept, output) = runs.tiers["standard"].result(), runs.standard_shard.result()
    # -k "not test_features" leaves the tests outside suites/device/test_features.py; the split is of those
    selected = [str(row[0]) for row in everything if "test_features.py::" not in str(row[0])]
    shards = split([case_id(nodeid) for nodeid in selected], load_costs(DEFAULT_TABLE), E2E_STANDARD.count)
    expected = [nodeid for nodeid, shard in zip(selected, shards, strict=True) if shard == E2E_STANDARD.index]
    assert 0 < len(expected) < len(selected) < len(everything)
    assert [row[0] for row in kept] == expected
    assert f"vballoon shard {E2E_STANDARD}: {len(expected)} of {len(selected)} tests" in output.splitlines()
    assert f"{len(expected)}/{len(everything)} tests collected ({len(everything) - len(expected)} deselected)" in output
    properties = _testsuite_properties(runs.standard_junit)
    assert properties[SHARD] == str(E2E_STANDARD) and properties[COLLECTED] == str(len(selected))


def test_under_xdist_the_workers_keep_the_same_computed_shard(runs: Runs) -> None:
    (everything, _), done = runs.tiers["quick"].result(), runs.xdist.result()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    cases = [case_id(str(row[0])) for row in everything]
    shards = split(cases, load_costs(DEFAULT_TABLE), E2E_XDIST.count)
    expected = [case for case, shard in zip(cases, shards, strict=True) if shard == E2E_XDIST.index]
    ran = [junit.case_id(case)
           for case in ET.parse(runs.xdist_junit).getroot().iter("testcase")]
    assert sorted(ran) == sorted(expected)
    properties = _testsuite_properties(runs.xdist_junit)
    assert properties[SHARD] == str(E2E_XDIST) and properties[COLLECTED] == str(len(everything))
    assert f"vballoon shard {E2E_XDIST}: {len(expected)} of {len(everything)} tests" in done.stdout.splitlines()
    # the cost table of this run names the units of its tests as the collection does
    assert set(measured_costs([runs.xdist_junit])) == {unit_of(case) for case in expected}


def test_under_loadgroup_the_variants_go_out_longest_first(runs: Runs) -> None:
    """The order pytest-xdist's loadgroup hands out: variants by measured cost, most expensive first, then the
    single tests in collection order. (Broken on purpose: without the reorder the first variant is the tier's
    first, pci-modern, not its costliest.)"""
    (everything, _), (ordered, _) = runs.tiers["quick"].result(), runs.loadgroup.result()
    assert sorted(map(str, (row[0] for row in ordered))) == sorted(map(str, (row[0] for row in everything)))
    units = [unit_of(case_id(str(row[0]))) for row in ordered]
    grouped = [unit for unit, tests in Counter(units).items() if tests > 1]
    estimate = estimated_costs(Counter(units), load_costs(DEFAULT_TABLE))
    runs_of_units = [unit for i, unit in enumerate(units) if i == 0 or units[i - 1] != unit]
    assert runs_of_units[:len(grouped)] == sorted(grouped, key=lambda unit: -estimate[unit]), (
        f"expected the variants longest first, got {runs_of_units[:len(grouped)]}")
    singles = [str(row[0]) for row in ordered if unit_of(case_id(str(row[0]))) not in grouped]
    assert singles == [str(row[0]) for row in everything if unit_of(case_id(str(row[0]))) not in grouped]


def test_a_shard_the_split_left_empty_passes(runs: Runs) -> None:
    done = runs.empty.result()
    assert "vballoon shard 2/2: 0 of 1 tests" in done.stdout.splitlines(), done.stdout[-2000:]
    assert done.returncode == pytest.ExitCode.OK, (f"expected an empty shard to pass (its test is on shard 1/2), "
                                                   f"got exit {done.returncode}: {done.stdout[-1000:]}")


@pytest.mark.parametrize("named", [*(f"--shard={text}" for text in BAD_SHARDS), "VBALLOON_SHARD=a/b", "bad.toml"])
def test_bad_input_is_one_line_and_a_usage_error(runs: Runs, named: str) -> None:
    done = next(future for key, future in runs.bad.items() if key.endswith(named)).result()
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stdout + done.stderr, done.stderr
