"""The catalogue of the balloon's normative statements and QEMU's known deviations.

Both live as TOML in `vballoon/data/`: `requirements.toml` (one entry per
normative statement of the spec's balloon section, with a stable ID) and
`known-deviations.toml`. Loading validates them; a broken file raises a
one-line `UsageError` naming the file and the problem.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Iterable

from vballoon.errors import UsageError

BALLOON_STATEMENT_COUNT = 65
"""Statements of the balloon section (5.5)."""
VIRTQUEUE_STATEMENT_COUNT = 8
"""Statements of chapter 2 (device status, virtqueues) the ring-level tests check (IDs VQ-*)."""
STATEMENT_COUNT = BALLOON_STATEMENT_COUNT + VIRTQUEUE_STATEMENT_COUNT
BINDS = ("driver", "device", "both")
LEVELS = ("MUST", "MUST NOT", "SHOULD", "SHOULD NOT", "MAY")
TESTABLE = ("qtest", "guest", "host+guest", "not-applicable")
CATALOGUE_HINT = "see vballoon/data/requirements.toml"

_REQUIRED_KEYS = ("id", "binds", "level", "legacy", "section", "quote", "testable", "how")
_OPTIONAL_KEYS = ("why", "note")
_DEVIATION_KEYS = ("requirement", "qemu_versions", "behaviour", "source", "observation")
_DEVIATION_OPTIONAL_KEYS = ("linux_versions", "difference")
_COMPARATORS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Requirement:
    """One normative statement of the specification."""

    id: str
    binds: str
    level: str
    legacy: bool
    section: str
    quote: str
    testable: str
    how: str
    why: str | None = None
    note: str | None = None

    @property
    def is_testable(self) -> bool:
        """True when vballoon can check this statement against QEMU/Linux."""
        return self.testable != "not-applicable"


@dataclass(frozen=True)
class Bound:
    """One version bound such as `<=7.2`: compares the version's prefix."""

    op: str
    version: tuple[int, ...]

    def admits(self, version: Version) -> bool:
        """True when `version` satisfies this bound."""
        return _COMPARATORS[self.op](version[: len(self.version)], self.version)


@dataclass(frozen=True)
class Deviation:
    """A known, source-confirmed deviation from one requirement, for the versions whose sources were read.

    A device-side deviation is QEMU's and has QEMU bounds; a driver-side one is Linux's and has Linux bounds
    too (with the QEMU bounds of the device behaviour that makes it visible). Outside its bounds a test is
    strict: a newer QEMU or kernel that still deviates fails until someone reads its source.
    """

    requirement: str
    qemu_versions: str
    behaviour: str
    source: str
    observation: str
    bounds: tuple[Bound, ...]
    linux_versions: str | None = None
    linux_bounds: tuple[Bound, ...] = ()
    difference: str | None = None
    """The judge's name of the one difference from the requirement this deviation explains
    (`vballoon.scenario.judge.Difference.what`); None: every difference from it."""

    def affects(self, qemu_version: Version, linux_version: tuple[int, ...] | None = None) -> bool:
        """True when QEMU `qemu_version` (and, for a driver-side deviation, Linux `linux_version`) has it."""
        if not all(bound.admits(qemu_version) for bound in self.bounds):
            return False
        if self.linux_versions is None:
            return True
        return linux_version is not None and all(bound.admits(linux_version) for bound in self.linux_bounds)

    def versions(self) -> str:
        """'QEMU >=1.0 <=10.0' or 'QEMU >=1.0 <=10.0 with Linux >=6.1 <=6.12', for messages."""
        linux = f" with Linux {self.linux_versions}" if self.linux_versions else ""
        return f"QEMU {self.qemu_versions}{linux}"


def _read_toml(source: Path | Traversable) -> dict[str, Any]:
    """Parse one TOML file; errors name the file."""
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{source}: file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{source}: invalid TOML: {err}") from None


def _entries(source: Path | Traversable, table: str) -> list[dict[str, Any]]:
    """The `[[table]]` entries of a data file."""
    entries = _read_toml(source).get(table)
    if not isinstance(entries, list):
        raise UsageError(f"{source}: no [[{table}]] entries")
    return entries


def _check_keys(source: Path | Traversable, where: str, entry: dict[str, Any],
                required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Every required key present as a string (or bool for `legacy`), nothing unknown."""
    missing = [key for key in required if key not in entry]
    if missing:
        raise UsageError(f"{source}: {where}: missing key {missing[0]!r}")
    unknown = sorted(set(entry) - set(required) - set(optional))
    if unknown:
        raise UsageError(f"{source}: {where}: unknown key {unknown[0]!r}")
    for key, value in entry.items():
        expected = bool if key == "legacy" else str
        if not isinstance(value, expected) or (expected is str and not value.strip()):
            raise UsageError(f"{source}: {where}: {key} must be a non-empty "
                             f"{expected.__name__}, got {value!r}")


def _check_choice(source: Path | Traversable, where: str, key: str, value: str,
                  allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{source}: {where}: {key} {value!r} is not one of "
                         f"{', '.join(allowed)}")


def load_catalogue(source: Path | Traversable) -> dict[str, Requirement]:
    """Load and validate a requirements file; IDs keep the file's order."""
    catalogue: dict[str, Requirement] = {}
    for number, entry in enumerate(_entries(source, "requirement"), start=1):
        where = f"requirement {entry.get('id', f'#{number}')}"
        _check_keys(source, where, entry, _REQUIRED_KEYS, _OPTIONAL_KEYS)
        _check_choice(source, where, "binds", entry["binds"], BINDS)
        _check_choice(source, where, "level", entry["level"], LEVELS)
        _check_choice(source, where, "testable", entry["testable"], TESTABLE)
        if (entry["testable"] == "not-applicable") != ("why" in entry):
            raise UsageError(f"{source}: {where}: 'why' is required exactly when "
                             f"testable is 'not-applicable'")
        if entry["id"] in catalogue:
            raise UsageError(f"{source}: duplicate requirement ID {entry['id']!r}")
        catalogue[entry["id"]] = Requirement(**entry)
    if len(catalogue) != STATEMENT_COUNT:
        raise UsageError(f"{source}: expected {STATEMENT_COUNT} requirements, "
                         f"got {len(catalogue)}")
    return catalogue


def parse_versions(spec: str) -> tuple[Bound, ...]:
    """Parse bounds like ">=2.0 <=7.2"; ValueError when malformed or without an upper bound (a deviation holds
    for the versions whose source was read, never for every future one)."""
    bounds = []
    for word in spec.split():
        op = next((op for op in sorted(_COMPARATORS, key=len, reverse=True)
                   if word.startswith(op)), None)
        if op is None:
            raise ValueError(f"bound {word!r} has no comparator")
        digits = word[len(op):].split(".")
        if not 1 <= len(digits) <= 3 or not all(d.isdigit() for d in digits):
            raise ValueError(f"bound {word!r} is not a version like 7.2 or 7.2.1")
        bounds.append(Bound(op, tuple(int(d) for d in digits)))
    if not bounds:
        raise ValueError("empty version range")
    if not any(bound.op in ("<=", "<", "==") for bound in bounds):
        raise ValueError(f"{spec!r} has no upper bound; give the newest version whose source was read (<=x.y)")
    return tuple(bounds)


def load_deviations(source: Path | Traversable,
                    known: dict[str, Requirement]) -> list[Deviation]:
    """Load and validate a known-deviations file against the catalogue `known`."""
    deviations = []
    for number, entry in enumerate(_entries(source, "deviation"), start=1):
        where = f"deviation #{number}"
        _check_keys(source, where, entry, _DEVIATION_KEYS, _DEVIATION_OPTIONAL_KEYS)
        if entry["requirement"] not in known:
            raise UsageError(f"{source}: {where}: unknown requirement ID "
                             f"{entry['requirement']!r}")
        driver_side = known[entry["requirement"]].binds == "driver"
        if driver_side != ("linux_versions" in entry):
            raise UsageError(f"{source}: {where}: linux_versions is required exactly for a driver requirement")
        parsed = {}
        for key in ("qemu_versions", "linux_versions"):
            try:
                parsed[key] = parse_versions(entry[key]) if key in entry else ()
            except ValueError as err:
                raise UsageError(f"{source}: {where}: {key}: {err}") from None
        deviations.append(Deviation(bounds=parsed["qemu_versions"], linux_bounds=parsed["linux_versions"], **entry))
    return deviations


def _data_file(name: str) -> Traversable:
    return resources.files("vballoon").joinpath("data", name)


@functools.cache
def catalogue() -> dict[str, Requirement]:
    """The packaged catalogue, ID -> requirement, in specification order."""
    return load_catalogue(_data_file("requirements.toml"))


@functools.cache
def _packaged_deviations() -> tuple[Deviation, ...]:
    return tuple(load_deviations(_data_file("known-deviations.toml"), catalogue()))


def deviations() -> list[Deviation]:
    """QEMU's known deviations, as packaged."""
    return list(_packaged_deviations())


def deviation_for(req_id: str, qemu_version: Version, linux_version: tuple[int, ...] | None = None,
                  difference: str | None = None) -> Deviation | None:
    """The known deviation from `req_id` of QEMU `qemu_version` (with Linux `linux_version`) that explains
    `difference` (the judge's name of what differed; None for a check that is not the judge's), if any."""
    return next((dev for dev in _packaged_deviations()
                 if dev.requirement == req_id and dev.affects(qemu_version, linux_version)
                 and dev.difference in (None, difference)), None)


def unknown_ids(ids: Iterable[str]) -> list[str]:
    """The IDs in `ids` that the catalogue does not have, in the given order."""
    known = catalogue()
    return [req_id for req_id in ids if req_id not in known]


def check_marker_args(args: Iterable[object]) -> list[str]:
    """Validate the arguments of `@pytest.mark.req(...)` and return the IDs."""
    ids: list[str] = []
    for arg in args:
        if not isinstance(arg, str):
            raise UsageError(f"requirement ID {arg!r} in @pytest.mark.req is not "
                             f"a string; {CATALOGUE_HINT}")
        ids.append(arg)
    if not ids:
        raise UsageError(f"@pytest.mark.req needs at least one requirement ID; "
                         f"{CATALOGUE_HINT}")
    unknown = unknown_ids(ids)
    if unknown:
        raise UsageError(f"unknown requirement ID {unknown[0]!r} in @pytest.mark.req; "
                         f"{CATALOGUE_HINT}")
    return ids
