"""pytest JUnit XML as vballoon reads it: one file or a one-line error, and the result of each testcase.

Every report (`vballoon report requirements`, the requirement × variant
matrix, `vballoon report merge`) reads its files through `read_junit_file`,
so a missing, truncated or foreign file is the same one line everywhere:
`FILE: what is wrong`. A file is accepted as a vballoon run's when its
testsuite carries a `vballoon.*` property or is named like pytest's
(`pytest`) or vballoon's (`vballoon-fuzz`); a testsuite named by another
tool is refused.

A testcase's outcome is one of OUTCOMES, worst last: an xfail is a known
deviation (vballoon/data/known-deviations.toml), worse than a pass and
better than a failure; a skip carries no verdict and ranks below a pass.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vballoon.errors import UsageError
from vballoon.requirements import unknown_ids

NOT_RUN = "not run"
DEVIATES = "deviates"
"""An expected failure: the test saw a known deviation whose version bounds cover the QEMU or kernel under test."""
OUTCOMES = (NOT_RUN, "skipped", "passed", DEVIATES, "failed", "error")
REQUIREMENTS_PROPERTY = "requirements"
QEMU_VERSION_PROPERTY = "qemu_version"
VARIANT_PROPERTY = "variant"
VBALLOON_PROPERTY_PREFIX = "vballoon."
SUITE_NAMES = ("pytest",)
SUITE_NAME_PREFIX = "vballoon"


def worst(outcomes: Iterable[str]) -> str:
    """The worst of `outcomes` in the order of OUTCOMES; NOT_RUN for none."""
    return max(outcomes, key=OUTCOMES.index, default=NOT_RUN)


def _properties(element: ET.Element) -> list[tuple[str, str]]:
    """The (name, value) pairs of an element's `<properties>`, in file order."""
    return [(prop.get("name", ""), prop.get("value", "")) for prop in element.iterfind("properties/property")]


@dataclass(frozen=True)
class JunitFile:
    """One JUnit XML file: its path and its `<testsuite>` elements."""

    path: Path
    suites: tuple[ET.Element, ...]

    @property
    def properties(self) -> list[tuple[str, str]]:
        """The testsuite-level properties of every suite, in file order."""
        return [pair for suite in self.suites for pair in _properties(suite)]

    def property_value(self, name: str) -> str | None:
        """The value of the first testsuite property called `name`, or None."""
        return next((value for key, value in self.properties if key == name), None)

    @property
    def testcases(self) -> list[ET.Element]:
        """Every `<testcase>` of every suite, in file order."""
        return [case for suite in self.suites for case in suite.iter("testcase")]


def _is_foreign(suite: ET.Element) -> bool:
    """A testsuite another tool named, without any vballoon property."""
    name = suite.get("name")
    if name is None or name in SUITE_NAMES or name.startswith(SUITE_NAME_PREFIX):
        return False
    return not any(key.startswith(VBALLOON_PROPERTY_PREFIX) for key, _ in _properties(suite))


def read_junit_file(path: Path) -> JunitFile:
    """Parse `path` as a pytest/vballoon JUnit file, or raise a one-line UsageError naming it."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise UsageError(f"{path}: JUnit file not found") from None
    except ET.ParseError as err:
        raise UsageError(f"{path}: not a readable JUnit XML file ({err}); a truncated file needs its run "
                         "(or download) again") from None
    except OSError as err:
        raise UsageError(f"{path}: not a readable JUnit XML file ({err.strerror})") from None
    if root.tag == "testsuite":
        suites: tuple[ET.Element, ...] = (root,)
    elif root.tag == "testsuites":
        suites = tuple(root.iterfind("testsuite"))
    else:
        raise UsageError(f"{path}: not a JUnit XML file (root element <{root.tag}>)")
    foreign = next((suite for suite in suites if _is_foreign(suite)), None)
    if foreign is not None:
        raise UsageError(f"{path}: not a JUnit file of pytest or vballoon (testsuite {foreign.get('name')!r}); "
                         "pass the --junitxml output of a vballoon run")
    return JunitFile(path, suites)


XDIST_GROUP_SUFFIX = re.compile(r"@[^@\[\]]*$")
"""What pytest-xdist's `--dist loadgroup` appends to the id of a test with an `xdist_group` mark: `@<group>`."""


def without_xdist_group(name: str) -> str:
    """A test id or JUnit name without pytest-xdist's `@<group>` suffix (the same test, wherever it ran)."""
    return XDIST_GROUP_SUFFIX.sub("", name)


def case_id(case: ET.Element) -> str:
    """The testcase's id as the reports name it, `classname::name`, without pytest-xdist's `@<group>` suffix."""
    return f"{case.get('classname', '')}::{without_xdist_group(case.get('name', ''))}"


@dataclass(frozen=True)
class CaseResult:
    """One `<testcase>` of a JUnit file."""

    case: str
    test: str
    outcome: str
    requirements: tuple[str, ...] | None
    qemu: str | None = None
    """QEMU's major.minor from the `qemu_version` property, when the testcase has one."""
    variant: str | None = None
    """The `variant` property, else the parameter id in the name's brackets; None for an unparametrised test."""


def _outcome(case: ET.Element) -> str:
    tags = {child.tag for child in case}
    if "error" in tags:
        return "error"
    if "failure" in tags:
        return "failed"
    skipped = case.find("skipped")
    if skipped is not None:
        return DEVIATES if skipped.get("type") == "pytest.xfail" else "skipped"
    return "passed"


def _qemu_version(properties: dict[str, str]) -> str | None:
    """'7.2' from a `qemu_version` property such as 'QEMU emulator version 7.2.22 (Debian ...)'."""
    if QEMU_VERSION_PROPERTY not in properties:
        return None
    match = re.search(r"(\d+)\.(\d+)", properties[QEMU_VERSION_PROPERTY])
    return f"{match[1]}.{match[2]}" if match else None


def _property_ids(properties: dict[str, str], name: str, junit: Path) -> tuple[str, ...] | None:
    """The IDs of the testcase's `requirements` property, or None without one."""
    if REQUIREMENTS_PROPERTY not in properties:
        return None
    ids = tuple(part.strip() for part in properties[REQUIREMENTS_PROPERTY].split(",") if part.strip())
    unknown = unknown_ids(ids)
    if unknown:
        raise UsageError(f"{junit}: unknown requirement ID {unknown[0]!r} in the "
                         f"{REQUIREMENTS_PROPERTY} property of {name!r}")
    return ids


def read_junit(junit: Path) -> list[CaseResult]:
    """The testcases of a pytest JUnit XML file, in file order."""
    results = []
    for case in read_junit_file(junit).testcases:
        name = without_xdist_group(case.get("name", ""))
        function, bracket, parameters = name.partition("[")
        parametrised = bool(bracket) and name.endswith("]")
        properties = {}
        for key, value in _properties(case):
            properties.setdefault(key, value)
        results.append(CaseResult(
            case=case_id(case), test=f"{case.get('classname', '')}::{function if parametrised else name}",
            outcome=_outcome(case), requirements=_property_ids(properties, name, junit),
            qemu=_qemu_version(properties),
            variant=properties.get(VARIANT_PROPERTY) or (parameters[:-1] if parametrised else None)))
    return results
