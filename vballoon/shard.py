"""Split a test run over N machines (`--shard K/N`): units, their cost, and which shard runs each.

A test belongs to one unit, and a unit's tests run on one shard:

- a guest-suite test taking a `variant` (suites/guest) belongs to the variant:
  unit `pci-modern+doom`, so the variant's shared guest boots on one machine only;
- a migration-suite test taking a `migration_variant` (suites/migration)
  belongs to `migration:<variant>`;
- any other test is a unit of its own, named by its test id.

Tests are named the way their JUnit testcase is, `classname::name`
(`suites.guest.test_inflate::test_x[pci-modern+doom]`), so the units of a
run's JUnit files are the units of its collection. A variant is read from the
front of the test's parameter id: the longest run of its '-'-separated parts
that is a variant name.

Units go to shards by LPT: the most expensive first, each onto the shard with
the least cost so far (then the fewest tests, then the lowest K); units of
equal cost in name order. Nothing depends on hash order, the host or the
clock, so every machine computes the same split of the same collection.

Within a run, the same estimates order the work of pytest-xdist's workers
(`longest_first`): the units of several tests (a variant's shared guest) go
out most expensive first, so the last to finish is a short one, and the
single tests come after them in collection order, filling the gaps.
"""

from __future__ import annotations

import functools
import heapq
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vballoon.errors import UsageError, VballoonError
from vballoon.junit import without_xdist_group
from vballoon.matrix import Variant

MIGRATION_UNIT_PREFIX = "migration:"
VARIANT_SUITES = {"suites.guest.": "", "suites.migration.": MIGRATION_UNIT_PREFIX}
"""Test modules (as JUnit classnames start) whose variant-parametrised tests form one unit per variant, and the
prefix of that unit's name."""

@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of a run split in `count`."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str, option: str) -> Shard:
    """'K/N' as given to `option` (--shard or VBALLOON_SHARD); anything else is a UsageError naming it."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"{option}={text}: expected K/N, shard K of N with 1 <= K <= N (e.g. {option}=2/4)")
    return Shard(int(match[1]), int(match[2]))


def case_id(nodeid: str) -> str:
    """A pytest node id as its JUnit testcase names it, `classname::name` (the spelling of pytest's junitxml:
    the path dotted without `.py`, classes appended), without pytest-xdist's `@<group>` suffix."""
    nodeid = without_xdist_group(nodeid)
    head, bracket, params = nodeid.partition("[")
    path, *names = head.split("::")
    if not names:
        return nodeid
    classname = ".".join([path.removesuffix(".py").replace("/", "."), *names[:-1]])
    return f"{classname}::{names[-1]}{bracket}{params}"


@functools.cache
def _leading_variant(params: str) -> str | None:
    """The variant name a parameter id starts with ('pci-modern-poison' of 'pci-modern-poison-mem'), or None."""
    parts = params.split("-")
    for end in range(len(parts), 0, -1):
        name = "-".join(parts[:end])
        try:
            if Variant.from_name(name).name == name:
                return name
        except VballoonError:
            continue
    return None


def unit_of(case: str) -> str:
    """The unit of a test named `classname::name` (see the module docstring)."""
    head, bracket, params = case.partition("[")
    for module_prefix, unit_prefix in VARIANT_SUITES.items():
        if bracket and head.startswith(module_prefix):
            variant = _leading_variant(params.removesuffix("]"))
            if variant is not None:
                return unit_prefix + variant
    return case


def estimated_costs(unit_tests: Mapping[str, int], costs: Mapping[str, float]) -> dict[str, float]:
    """Each unit's cost: its measured seconds, else its test count times the median per-test cost of the measured
    units (a measured unit's seconds shared by its tests, the median taken over the tests); test counts alone when
    no unit was measured."""
    per_test: list[float] = []
    for unit, tests in unit_tests.items():
        if unit in costs:
            per_test.extend([costs[unit] / tests] * tests)
    median = statistics.median(per_test) if per_test else 1.0
    return {unit: costs[unit] if unit in costs else tests * median for unit, tests in unit_tests.items()}


def assign(unit_tests: Mapping[str, int], costs: Mapping[str, float], count: int) -> dict[str, int]:
    """The shard (1..count) of each unit of `unit_tests` (unit -> its number of tests), by LPT over estimated costs."""
    estimate = estimated_costs(unit_tests, costs)
    # (cost so far, tests so far, K), a heap; shards past the number of units stay empty whatever their number
    loads = [(0.0, 0, shard) for shard in range(1, min(count, len(unit_tests)) + 1)]
    shards = {}
    for unit in sorted(estimate, key=lambda u: (-estimate[u], u)):
        load, tests, shard = heapq.heappop(loads)
        shards[unit] = shard
        heapq.heappush(loads, (load + estimate[unit], tests + unit_tests[unit], shard))
    return shards


def split(cases: Sequence[str], costs: Mapping[str, float], count: int) -> list[int]:
    """The shard (1..count) of each test of `cases` (test ids `classname::name`), in order."""
    units = [unit_of(case) for case in cases]
    shards = assign(Counter(units), costs, count)
    return [shards[unit] for unit in units]


def longest_first(cases: Sequence[str], costs: Mapping[str, float]) -> list[int]:
    """Indices of `cases` in the order a worker pool should take them: units of several tests by estimated cost,
    most expensive first (ties in order of first appearance), then the single-test units in collection order; a
    unit's tests stay together, in their order."""
    units = [unit_of(case) for case in cases]
    tests = Counter(units)
    estimate = estimated_costs(tests, costs)
    first_seen = {unit: index for index, unit in reversed(list(enumerate(units)))}

    def rank(unit: str) -> tuple[int, float, int]:
        grouped = tests[unit] > 1
        return (0 if grouped else 1, -estimate[unit] if grouped else 0.0, first_seen[unit])

    return sorted(range(len(cases)), key=lambda index: (rank(units[index]), index))
