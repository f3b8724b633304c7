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

STATEMENT_COUNT = 65
BINDS = ("driver", "device", "both")
LEVELS = ("MUST", "MUST NOT", "SHOULD", "SHOULD NOT", "MAY")
TESTABLE = ("qtest", "guest", "host+guest", "not-applicable")
CATALOGUE_HINT = "see vballoon/data/requirements.toml"

_REQUIRED_KEYS = ("id", "binds", "level", "legacy", "section", "quote", "testable", "how")
_OPTIONAL_KEYS = ("why", "note")
_DEVIATION_KEYS = ("requirement", "qemu_versions", "behaviour", "source", "observation")
_ALL_VERSIONS = "all known"
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
    """A known, source-confirmed deviation of QEMU from one requirement."""

    requirement: str
    qemu_versions: str
    behaviour: str
    source: str
    observation: str
    bounds: tuple[Bound, ...]

    def affects(self, qemu_version: Version) -> bool:
        """True when QEMU `qemu_version` has this deviation."""
        return all(bound.admits(qemu_version) for bound in self.bounds)


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
    """Parse "all known" or bounds like ">=2.0 <=7.2"; ValueError when malformed."""
    if spec.strip() == _ALL_VERSIONS:
        return ()
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
    return tuple(bounds)


def load_deviations(source: Path | Traversable,
                    known: dict[str, Requirement]) -> list[Deviation]:
    """Load and validate a known-deviations file against the catalogue `known`."""
    deviations = []
    for number, entry in enumerate(_entries(source, "deviation"), start=1):
        where = f"deviation #{number}"
        _check_keys(source, where, entry, _DEVIATION_KEYS)
        if entry["requirement"] not in known:
            raise UsageError(f"{source}: {where}: unknown requirement ID "
                             f"{entry['requirement']!r}")
        try:
            bounds = parse_versions(entry["qemu_versions"])
        except ValueError as err:
            raise UsageError(f"{source}: {where}: qemu_versions: {err}") from None
        deviations.append(Deviation(bounds=bounds, **entry))
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


def deviation_for(req_id: str, qemu_version: Version) -> Deviation | None:
    """The known deviation of QEMU `qemu_version` from `req_id`, if any."""
    return next((dev for dev in _packaged_deviations()
                 if dev.requirement == req_id and dev.affects(qemu_version)), None)


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
