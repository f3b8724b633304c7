"""Requirement coverage: which tests check which normative statement, and how they did.

Tests are found statically: the `@pytest.mark.req("ID", ...)` marks on test
functions and classes (a class mark applies to its methods) and module or
class `pytestmark = pytest.mark.req(...)` assignments, read with `ast` so the
report needs neither QEMU nor a guest. Results come from pytest `--junitxml`
files (one run's, merged or its shards'); a testcase's `requirements`
property, when present, takes precedence over the static marks. With
results, the requirement × variant matrix (vballoon/requirement_matrix.py)
is written beside the report.

A statement that binds the driver is checked against Linux only by a guest
or migration test (a real virtio_balloon driver); a device test over qtest
checks it with vballoon's own host-side driver, usually by breaking it and
watching the device. The report's "sides" column says which of the two
checked each statement, and the driver statements no guest test checks are
listed apart.

A test is named like pytest's JUnit output names it, `classname::function`,
e.g. `suites.guest.test_boot.TestBoot::test_boot`; parametrised cases
(`test_boot[pci-modern]`) count towards their function.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from vballoon.errors import UsageError
from vballoon.junit import DEVIATES, NOT_RUN, OUTCOMES, CaseResult, read_junit, worst
from vballoon.requirement_matrix import build_matrix, render_matrix
from vballoon.requirements import Requirement, catalogue, check_marker_args

DEFAULT_REPORT = Path("reports/requirements.md")
SIDES = {"suites.device.": "qtest", "suites.guest.": "linux", "suites.migration.": "linux"}
"""Test module prefix -> the side it drives the device from: vballoon's host driver over qtest, or Linux."""
DEFAULT_ROOTS = (Path("suites"),)


@dataclass
class Coverage:
    """Tests per requirement and the results of those tests."""

    requirements: dict[str, Requirement]
    tests: dict[str, tuple[str, ...]]
    results: dict[str, str] = field(default_factory=dict)
    deviating_qemus: dict[str, set[str]] = field(default_factory=dict)
    """Test -> the QEMU versions (major.minor) under which it saw a known deviation."""
    cases: list[CaseResult] = field(default_factory=list)
    """The testcases the results come from, each once (its last occurrence)."""

    def tests_for(self, req_id: str) -> list[str]:
        """The tests that name `req_id`, in discovery order."""
        return [test for test, ids in self.tests.items() if req_id in ids]

    def sides_for(self, req_id: str) -> list[str]:
        """The sides ('qtest', 'linux') whose tests name `req_id`, in SIDES order."""
        named = {side for test in self.tests_for(req_id) for prefix, side in SIDES.items() if test.startswith(prefix)}
        return [side for side in dict.fromkeys(SIDES.values()) if side in named]

    def result_for(self, req_id: str) -> str:
        """Worst result of the tests naming `req_id`, or NOT_RUN."""
        return worst(self.results.get(test, NOT_RUN) for test in self.tests_for(req_id))

    def describe_result(self, req_id: str) -> str:
        """The result for the report: 'deviates (known, QEMU 7.2, 10.0)' names the versions that deviated."""
        result = self.result_for(req_id)
        if result != DEVIATES:
            return result
        versions = sorted({v for test in self.tests_for(req_id) for v in self.deviating_qemus.get(test, ())},
                          key=lambda v: tuple(int(part) for part in v.split(".")))
        return f"{DEVIATES} (known, QEMU {', '.join(versions)})" if versions else f"{DEVIATES} (known)"

    @property
    def testable(self) -> list[Requirement]:
        """Requirements vballoon can check against QEMU/Linux."""
        return [req for req in self.requirements.values() if req.is_testable]

    @property
    def covered(self) -> list[Requirement]:
        """Testable requirements named by at least one test."""
        named = {req_id for ids in self.tests.values() for req_id in ids}
        return [req for req in self.testable if req.id in named]


def _is_mark_namespace(node: ast.expr) -> bool:
    """`pytest.mark` (or `mark` after `from pytest import mark`)."""
    return ((isinstance(node, ast.Attribute) and node.attr == "mark")
            or (isinstance(node, ast.Name) and node.id == "mark"))


def _mark_ids(node: ast.expr, where: str) -> list[str]:
    """The IDs of a `pytest.mark.req(...)` expression; [] for any other mark."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "req" and _is_mark_namespace(node.func.value)):
        return []
    location = f"{where}:{node.lineno}"
    if node.keywords or not all(isinstance(arg, ast.Constant) for arg in node.args):
        raise UsageError(f"{location}: @pytest.mark.req takes string literals only")
    try:
        return check_marker_args([arg.value for arg in node.args if isinstance(arg, ast.Constant)])
    except UsageError as err:
        raise UsageError(f"{location}: {err}") from None


def _pytestmark_ids(body: list[ast.stmt], where: str) -> list[str]:
    """IDs from `pytestmark = <mark>` or `pytestmark = [<mark>, ...]` in `body`."""
    ids: list[str] = []
    for stmt in body:
        if isinstance(stmt, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "pytestmark"
                for target in stmt.targets):
            marks = stmt.value.elts if isinstance(stmt.value, (ast.List, ast.Tuple)) else [stmt.value]
            for mark in marks:
                ids += _mark_ids(mark, where)
    return ids


def _decorator_ids(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
                   where: str) -> list[str]:
    return [req_id for deco in node.decorator_list for req_id in _mark_ids(deco, where)]


def _collect(body: list[ast.stmt], prefix: str, inherited: list[str], where: str,
             found: dict[str, tuple[str, ...]]) -> None:
    """Record every test function in `body` (recursing into Test classes)."""
    marks = inherited + _pytestmark_ids(body, where)
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            ids = marks + _decorator_ids(node, where)
            found[f"{prefix}::{node.name}"] = tuple(dict.fromkeys(ids))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            _collect(node.body, f"{prefix}.{node.name}", marks + _decorator_ids(node, where),
                     where, found)


def _module_name(path: Path, root: Path, rootdir: Path) -> str:
    """Dotted module name as pytest's JUnit classname spells it."""
    try:
        relative = path.relative_to(rootdir)
    except ValueError:
        relative = path.relative_to(root.parent)
    return ".".join(relative.with_suffix("").parts)


def _test_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise UsageError(f"{root}: test directory not found")
    return sorted({*root.rglob("test_*.py"), *root.rglob("*_test.py")})


def marked_tests(roots: Iterable[Path], rootdir: Path) -> dict[str, tuple[str, ...]]:
    """Every test function under `roots` with the requirement IDs its marks name."""
    found: dict[str, tuple[str, ...]] = {}
    for root in roots:
        root = root.resolve()
        for path in _test_files(root):
            where = str(path)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=where)
            except SyntaxError as err:
                raise UsageError(f"{where}:{err.lineno}: cannot parse: {err.msg}") from None
            _collect(tree.body, _module_name(path, root, rootdir.resolve()), [], where, found)
    return found


def _apply_junit(coverage: Coverage, cases: list[CaseResult]) -> None:
    """Attach results; property IDs replace the static marks of their test.

    A testcase that appears more than once (a rerun) counts with its last
    occurrence; a test's result is the worst of its parametrised cases.
    """
    latest = {case.case: case for case in cases}
    outcomes: dict[str, list[str]] = {}
    from_properties: dict[str, list[str]] = {}
    for case in latest.values():
        outcomes.setdefault(case.test, []).append(case.outcome)
        if case.outcome == DEVIATES and case.qemu:
            coverage.deviating_qemus.setdefault(case.test, set()).add(case.qemu)
        if case.requirements is not None:
            from_properties.setdefault(case.test, []).extend(case.requirements)
    for test, ids in from_properties.items():
        coverage.tests[test] = tuple(dict.fromkeys(ids))
    coverage.results = {test: worst(results) for test, results in outcomes.items()}
    coverage.cases = list(latest.values())


def requirement_coverage(test_roots: list[Path], junit: Path | Sequence[Path] | None,
                         rootdir: Path | None = None) -> Coverage:
    """Coverage of the catalogue by the tests under `test_roots`, with the results of one JUnit file or several.

    Module names are taken relative to `rootdir` (default: the current
    directory, pytest's rootdir for this project).
    """
    coverage = Coverage(requirements=catalogue(),
                        tests=marked_tests(test_roots, rootdir or Path.cwd()))
    junits = [junit] if isinstance(junit, Path) else list(junit or ())
    if junits:
        _apply_junit(coverage, [case for path in junits for case in read_junit(path)])
    return coverage


def render_markdown(cov: Coverage) -> str:
    """The coverage report: counts first, then one table row per requirement."""
    counts = {outcome: 0 for outcome in reversed(OUTCOMES)}
    for req_id in cov.requirements:
        counts[cov.result_for(req_id)] += 1
    driver = [req.id for req in cov.covered if req.binds in ("driver", "both")]
    on_linux = [req_id for req_id in driver if "linux" in cov.sides_for(req_id)]
    qtest_only = [req_id for req_id in driver if req_id not in on_linux]
    lines = [
        "# Requirement coverage",
        "",
        f"Statements covered: {len(cov.covered)} / {len(cov.testable)} testable "
        f"/ {len(cov.requirements)} total",
        "",
        "Results: " + ", ".join(f"{outcome} {count}" for outcome, count in counts.items()),
        "",
        f"Driver statements checked against Linux: {len(on_linux)} / {len(driver)} covered; checked only with "
        f"vballoon's host-side driver over qtest: {', '.join(qtest_only) or 'none'}",
        "",
        "| ID | binds | level | testable | sides | tests | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for req in cov.requirements.values():
        tests = "<br>".join(f"`{test}`" for test in cov.tests_for(req.id)) or "-"
        lines.append(f"| {req.id} | {req.binds} | {req.level} | {req.testable} | {', '.join(cov.sides_for(req.id)) or '-'} "
                     f"| {tests} | {cov.describe_result(req.id)} |")
    return "\n".join(lines) + "\n"


def write_markdown(text: str, out: Path) -> str:
    """Write `text` to `out` (parents created) and return it; a path that cannot be written is one line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UsageError(f"{out}: cannot write the report ({err.strerror})") from None
    return text


def run_requirements_report(junits: Sequence[Path] | None, out: Path, roots: list[Path],
                            matrix_out: Path | None = None) -> str:
    """`vballoon report requirements`: write the coverage report to `out` and return its text.

    With results, the requirement × variant matrix is written to `matrix_out` as well.
    """
    coverage = requirement_coverage(roots or list(DEFAULT_ROOTS), junits)
    text = write_markdown(render_markdown(coverage), out)
    if matrix_out is not None and junits:
        write_markdown(render_matrix(build_matrix(coverage.cases, coverage.tests, list(coverage.requirements))),
                       matrix_out)
    return text
