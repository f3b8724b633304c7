"""`vballoon report merge`: the JUnit files of a run's shards as one testsuite.

The merged file has every testcase of every file, its counts (tests,
failures, errors, skipped, time) recomputed from those testcases, and the
files' testsuite properties, identical ones once; `vballoon.shard` lists
the shards merged ("1/4,2/4,3/4,4/4").

Files of different runs are refused (a one-line error, nothing written):
they must agree on vballoon's version, the QEMU and the guest kernel
(vballoon/run_identity.py). Problems that leave a usable but incomplete or
doubtful report are returned, one line each, after the merged file is
written: a test in two files, a shard given twice or missing, shards that
collected different numbers of tests.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vballoon.errors import UsageError
from vballoon.junit import JunitFile, case_id, read_junit_file
from vballoon.run_identity import COLLECTED, IDENTITY, SHARD

SUITE_NAME = "pytest"
SUITES_NAME = "pytest tests"
DUPLICATES_SHOWN = 10
"""Duplicate tests named one per line; the rest are counted in one more line."""


@dataclass
class Merged:
    """The merged testsuite and what is doubtful about it."""

    root: ET.Element
    problems: list[str]
    files: int

    def summary(self, out: Path) -> str:
        """'OUT: 120 tests from 4 files, 2 failures, 0 errors, 3 skipped'."""
        suite = self.root[0]
        return (f"{out}: {suite.get('tests')} tests from {self.files} files, {suite.get('failures')} failures, "
                f"{suite.get('errors')} errors, {suite.get('skipped')} skipped")


def _check_identity(files: Sequence[JunitFile]) -> None:
    """Refuse files of different runs, naming the property, both values and both files."""
    for name in IDENTITY:
        first = files[0]
        for other in files[1:]:
            if other.property_value(name) != first.property_value(name):
                raise UsageError(
                    f"{name} differs: {first.property_value(name) or 'none'!r} in {first.path}, "
                    f"{other.property_value(name) or 'none'!r} in {other.path}; merge only the shards of one run "
                    "(same vballoon, QEMU and kernel)")


def _shards(files: Sequence[JunitFile]) -> list[tuple[tuple[int, int], Path]]:
    """(shard, file) for the `vballoon.shard` property of each file ('K/N', or a merged file's 'K/N,K/N')."""
    found: list[tuple[tuple[int, int], Path]] = []
    for junit in files:
        value = junit.property_value(SHARD)
        if value is None:
            continue
        for part in value.split(","):
            match = re.fullmatch(r"\s*(\d+)/(\d+)\s*", part)
            if not match or not 1 <= int(match[1]) <= int(match[2]):
                raise UsageError(f"{junit.path}: {SHARD} {value!r} is not K/N with 1 <= K <= N; "
                                 "pass the JUnit files a sharded run wrote")
            found.append(((int(match[1]), int(match[2])), junit.path))
    return found


def _shard_problems(files: Sequence[JunitFile], entries: list[tuple[tuple[int, int], Path]]) -> list[str]:
    """Shards given twice or missing, shards that collected different tests; a different split is refused."""
    if not entries:
        return []
    (first_k, total), first = entries[0]
    other = next(((shard, path) for shard, path in entries if shard[1] != total), None)
    if other is not None:
        raise UsageError(f"{first} is shard {first_k}/{total} but {other[1]} is shard {other[0][0]}/{other[0][1]}: "
                         "they split different runs; merge the shards of one split")
    problems: list[str] = []
    owner: dict[tuple[int, int], Path] = {}
    for shard, path in entries:
        if shard in owner:
            problems.append(f"shard {shard[0]}/{total} is in both {owner[shard]} and {path}")
        owner.setdefault(shard, path)
    missing = [f"{k}/{total}" for k in range(1, total + 1) if (k, total) not in owner]
    if missing:
        merged = ", ".join(f"{k}/{n}" for k, n in sorted(owner))
        problems.append(f"shards missing: {', '.join(missing)} (merged {merged}); their tests are not in the report")
    elif all(junit.property_value(COLLECTED) is not None for junit in files):
        collected = [(junit.property_value(COLLECTED), junit.path) for junit in files]
        differing = next(((value, path) for value, path in collected if value != collected[0][0]), None)
        if differing is not None:
            problems.append(f"{COLLECTED} differs: {collected[0][0]} in {collected[0][1]}, {differing[0]} in "
                            f"{differing[1]}; the shards collected different tests (another selection or tier?)")
    return problems


def _duplicate_problems(files: Sequence[JunitFile]) -> list[str]:
    """A test in two files, named up to DUPLICATES_SHOWN times, then counted."""
    seen: dict[str, Path] = {}
    duplicates: list[str] = []
    for junit in files:
        here: set[str] = set()
        for case in junit.testcases:
            test = case_id(case)
            if test in seen and test not in here:
                duplicates.append(f"test {test} is in both {seen[test]} and {junit.path}")
            here.add(test)
        for test in here:
            seen.setdefault(test, junit.path)
    if len(duplicates) > DUPLICATES_SHOWN:
        rest = len(duplicates) - DUPLICATES_SHOWN
        return [*duplicates[:DUPLICATES_SHOWN], f"{rest} more tests are in two files (the same shard given twice?)"]
    return duplicates


def _time(element: ET.Element) -> float:
    try:
        return float(element.get("time", "0") or 0)
    except ValueError:
        return 0.0


def _earliest(stamps: Sequence[str]) -> str | None:
    """The earliest ISO 8601 timestamp of `stamps` (unreadable ones ignored)."""
    parsed = []
    for stamp in stamps:
        try:
            parsed.append((datetime.fromisoformat(stamp), stamp))
        except ValueError:
            continue
    try:
        return min(parsed)[1] if parsed else None
    except TypeError:  # naive and aware timestamps do not compare
        return parsed[0][1]


def _merged_suite(files: Sequence[JunitFile], shards: list[tuple[tuple[int, int], Path]]) -> ET.Element:
    cases = [case for junit in files for case in junit.testcases]
    suites = [suite for junit in files for suite in junit.suites]
    suite = ET.Element("testsuite", {
        "name": next((s.get("name") for s in suites if s.get("name")), SUITE_NAME),
        "errors": str(sum(len(case.findall("error")) for case in cases)),
        "failures": str(sum(len(case.findall("failure")) for case in cases)),
        "skipped": str(sum(len(case.findall("skipped")) for case in cases)),
        "tests": str(len(cases)),
        "time": f"{sum(_time(case) for case in cases):.3f}",
    })
    timestamp = _earliest([s.get("timestamp", "") for s in suites])
    if timestamp:
        suite.set("timestamp", timestamp)
    hosts = list(dict.fromkeys(s.get("hostname") for s in suites if s.get("hostname")))
    if hosts:
        suite.set("hostname", ",".join(hosts))
    properties = [(name, value) for junit in files for name, value in junit.properties if name != SHARD]
    merged_shards = sorted({shard for shard, _ in shards})
    if merged_shards:
        properties.append((SHARD, ",".join(f"{k}/{n}" for k, n in merged_shards)))
    if properties:
        node = ET.SubElement(suite, "properties")
        for name, value in dict.fromkeys(properties):
            ET.SubElement(node, "property", name=name, value=value)
    suite.extend(cases)
    return suite


def merge_junit(paths: Sequence[Path]) -> Merged:
    """Read and check `paths`, and merge them; raises UsageError for a bad file or files of different runs."""
    files = [read_junit_file(path) for path in paths]
    _check_identity(files)
    shards = _shards(files)
    problems = _shard_problems(files, shards) + _duplicate_problems(files)
    root = ET.Element("testsuites", name=SUITES_NAME)
    root.append(_merged_suite(files, shards))
    return Merged(root, problems, len(files))


def write_merged(merged: Merged, out: Path) -> None:
    """Write the merged testsuite to `out` (parents created)."""
    tree = ET.ElementTree(merged.root)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tree.write(out, encoding="utf-8", xml_declaration=True)
    except OSError as err:
        raise UsageError(f"-o {out}: cannot write the merged report ({err.strerror})") from None
