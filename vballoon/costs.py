"""The cost table of the shard units (vballoon/data/variant-cost.toml): reading it, and building it from JUnit files.

The table maps a unit (vballoon.shard.unit_of) to seconds: the sum of the
`time` of its testcases in a run's JUnit files (setup, call and teardown, so a
variant's guest boot counts). `--shard K/N` balances the shards with it.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

from vballoon.errors import UsageError
from vballoon.junit import case_id, read_junit_file
from vballoon.shard import unit_of

DEFAULT_TABLE = Path(__file__).parent / "data" / "variant-cost.toml"
HEADER = """\
# Measured seconds of each shard unit, read by `pytest --shard K/N` (README "Shards"). A unit is a variant of the
# guest suites ("pci-modern+doom"), a variant of the migration suite ("migration:pci-modern+fph"), or any other
# test on its own ("suites.device.test_inflate::test_pfn_zero_is_discarded_and_acked[pci-legacy]"). A unit missing
# here costs its test count times the median per-test cost of the units listed; with none listed, the shards get
# equal test counts. Generated from the JUnit files of a run, e.g. of every shard of a standard run:
#   vballoon report costs reports/junit-shard-*.xml --out vballoon/data/variant-cost.toml
"""
REBUILD_HINT = "rebuild it with `vballoon report costs JUNIT... --out FILE`"


def load_costs(path: Path) -> dict[str, float]:
    """Unit -> seconds from a cost table; a missing or malformed table is a one-line UsageError naming it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: cost table not found; {REBUILD_HINT}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cost table not readable ({err}); {REBUILD_HINT}") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{path}: not a cost table, invalid TOML ({err}); {REBUILD_HINT}") from None
    costs = {}
    for unit, seconds in data.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            raise UsageError(f"{path}: {unit!r} = {seconds!r} is not a number of seconds; {REBUILD_HINT}")
        costs[unit] = float(seconds)
    return costs


def measured_costs(junits: Sequence[Path]) -> dict[str, float]:
    """Unit -> the summed testcase times of `junits`; a test in several files (a rerun) counts once, its last time."""
    times: dict[str, float] = {}
    for path in junits:
        for case in read_junit_file(path).testcases:
            test = case_id(case)
            try:
                seconds = float(case.get("time", "0"))
            except ValueError:
                seconds = math.nan
            if not 0 <= seconds < math.inf:
                raise UsageError(f"{path}: testcase {test!r} has time {case.get('time')!r}, not seconds")
            times[test] = seconds
    costs: dict[str, float] = {}
    for test, seconds in times.items():
        unit = unit_of(test)
        costs[unit] = costs.get(unit, 0.0) + seconds
    return costs


def render_costs(costs: Mapping[str, float]) -> str:
    """The TOML text of a cost table: the header, then `"unit" = seconds` by unit name."""
    lines = [f"{_toml_string(unit)} = {seconds:.2f}" for unit, seconds in sorted(costs.items())]
    return HEADER + "".join(f"{line}\n" for line in lines)


def _toml_string(text: str) -> str:
    """`text` as a TOML basic string (JSON's escapes are TOML's, except that TOML also escapes DEL)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_costs(junits: Sequence[Path], out: Path) -> dict[str, float]:
    """Build the cost table of `junits` and write it to `out`; return it."""
    costs = measured_costs(junits)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_costs(costs), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"{out}: cannot write the cost table ({err.strerror})") from None
    return costs
