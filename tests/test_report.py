"""Tests of the requirement-coverage report: mark discovery, JUnit mapping, markdown."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vballoon.errors import UsageError
from vballoon.requirements import catalogue
from vballoon.report import (
    NOT_RUN, marked_tests, read_junit, render_markdown, requirement_coverage,
    run_requirements_report,
)

DEVICE_TESTS = '''
import pytest

pytestmark = pytest.mark.req("BAL-DEV-ST-1")


@pytest.mark.req("BAL-DEV-ST-2", "BAL-DEV-OP-1")
@pytest.mark.slow
def test_stats_order():
    pass


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.req("BAL-DEV-OP-1")
def test_inflate(n):
    pass


def helper():
    pass


@pytest.mark.req("BAL-DEV-FPR-1")
class TestReporting:
    pytestmark = [pytest.mark.req("BAL-DEV-FPR-2"), pytest.mark.slow]

    @pytest.mark.req("BAL-DEV-PP-1")
    async def test_poison(self):
        pass

    class TestNested:
        def test_inner(self):
            pass


class Helper:
    def test_not_collected(self):
        pass
'''

GUEST_TESTS = '''
from pytest import mark


def test_boot():
    pass


@mark.req("BAL-DRV-ST-3")
def test_stats_refill():
    pass
'''


def write_tree(base: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return base / "suites"


def junit_xml(base: Path, cases: str) -> Path:
    path = base / "junit.xml"
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest">'
                    f"{cases}</testsuite></testsuites>", encoding="utf-8")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path, {"suites/device/test_stats.py": DEVICE_TESTS,
                                 "suites/guest/test_boot.py": GUEST_TESTS,
                                 "suites/guest/helpers.py": "def test_ignored():\n    pass\n"})


def test_marks_from_decorators_classes_and_pytestmark(tree: Path) -> None:
    got = marked_tests([tree], rootdir=tree.parent)
    expected = {
        "suites.device.test_stats::test_stats_order": ("BAL-DEV-ST-1", "BAL-DEV-ST-2", "BAL-DEV-OP-1"),
        "suites.device.test_stats::test_inflate": ("BAL-DEV-ST-1", "BAL-DEV-OP-1"),
        "suites.device.test_stats.TestReporting::test_poison":
            ("BAL-DEV-ST-1", "BAL-DEV-FPR-1", "BAL-DEV-FPR-2", "BAL-DEV-PP-1"),
        "suites.device.test_stats.TestReporting.TestNested::test_inner":
            ("BAL-DEV-ST-1", "BAL-DEV-FPR-1", "BAL-DEV-FPR-2"),
        "suites.guest.test_boot::test_boot": (),
        "suites.guest.test_boot::test_stats_refill": ("BAL-DRV-ST-3",),
    }
    assert got == expected, f"expected {expected}, got {got}"


def test_module_names_fall_back_to_root_parent_outside_rootdir(tree: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = sorted(marked_tests([tree / "guest"], rootdir=elsewhere))
    expected = ["guest.test_boot::test_boot", "guest.test_boot::test_stats_refill"]
    assert got == expected, f"expected {expected}, got {got}"


@pytest.mark.parametrize("source,problem", [
    ('import pytest\n\n@pytest.mark.req("BAL-TYPO")\ndef test_x():\n    pass\n',
     "test_bad.py:3: unknown requirement ID 'BAL-TYPO' in @pytest.mark.req"),
    ('import pytest\nIDS = ["BAL-DEV-ST-1"]\n\n@pytest.mark.req(*IDS)\ndef test_x():\n    pass\n',
     "test_bad.py:4: @pytest.mark.req takes string literals only"),
    ("def test_x(:\n", "test_bad.py:1: cannot parse"),
])
def test_bad_test_file_names_file_and_line(tmp_path: Path, source: str, problem: str) -> None:
    root = write_tree(tmp_path, {"suites/test_bad.py": source})
    with pytest.raises(UsageError) as caught:
        marked_tests([root], rootdir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and problem in message, f"expected one line with {problem!r}, got {message!r}"


def test_missing_test_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="test directory not found"):
        marked_tests([tmp_path / "nowhere"], rootdir=tmp_path)


def test_junit_parametrised_cases_map_to_their_function(tree: Path) -> None:
    junit = junit_xml(tree.parent, """
        <testcase classname="suites.device.test_stats" name="test_inflate[1]"/>
        <testcase classname="suites.device.test_stats" name="test_inflate[2]"><failure message="x"/></testcase>
        <testcase classname="suites.device.test_stats" name="test_stats_order"/>
        <testcase classname="suites.device.test_stats.TestReporting" name="test_poison"><skipped/></testcase>
    """)
    cov = requirement_coverage([tree], junit, rootdir=tree.parent)
    got = {req_id: cov.result_for(req_id) for req_id in
           ("BAL-DEV-OP-1", "BAL-DEV-ST-2", "BAL-DEV-PP-1", "BAL-DEV-FPR-1", "BAL-DEV-ST-1", "BAL-DRV-OP-1")}
    expected = {"BAL-DEV-OP-1": "failed", "BAL-DEV-ST-2": "passed", "BAL-DEV-PP-1": "skipped",
                "BAL-DEV-FPR-1": "skipped", "BAL-DEV-ST-1": "failed", "BAL-DRV-OP-1": NOT_RUN}
    assert got == expected, f"expected {expected}, got {got}"


def test_junit_error_outranks_failure_and_rerun_keeps_latest(tree: Path) -> None:
    junit = junit_xml(tree.parent, """
        <testcase classname="suites.device.test_stats" name="test_stats_order"><failure/></testcase>
        <testcase classname="suites.device.test_stats" name="test_stats_order"/>
        <testcase classname="suites.device.test_stats" name="test_inflate[1]"><failure/><error/></testcase>
    """)
    cov = requirement_coverage([tree], junit, rootdir=tree.parent)
    assert cov.result_for("BAL-DEV-ST-2") == "passed", \
        f"expected the rerun's pass to replace the failure, got {cov.result_for('BAL-DEV-ST-2')}"
    assert cov.result_for("BAL-DEV-OP-1") == "error", \
        f"expected error to outrank failure, got {cov.result_for('BAL-DEV-OP-1')}"


def test_junit_requirements_property_replaces_static_marks(tree: Path) -> None:
    junit = junit_xml(tree.parent, """
        <testcase classname="suites.guest.test_boot" name="test_boot[pci-modern]">
          <properties><property name="requirements" value="BAL-DRV-OP-1, BAL-DRV-ACT-1"/></properties>
        </testcase>
        <testcase classname="suites.device.test_stats" name="test_stats_order">
          <properties><property name="requirements" value="BAL-DEV-ST-2"/></properties>
          <failure/>
        </testcase>
    """)
    cov = requirement_coverage([tree], junit, rootdir=tree.parent)
    assert cov.tests_for("BAL-DRV-ACT-1") == ["suites.guest.test_boot::test_boot"], \
        f"expected test_boot from its property, got {cov.tests_for('BAL-DRV-ACT-1')}"
    assert cov.result_for("BAL-DRV-OP-1") == "passed", f"expected passed, got {cov.result_for('BAL-DRV-OP-1')}"
    assert "suites.device.test_stats::test_stats_order" not in cov.tests_for("BAL-DEV-OP-1"), \
        "expected the property to replace test_stats_order's static BAL-DEV-OP-1 mark"


@pytest.mark.parametrize("content,problem", [
    ("<testsuites><testcase", "not a readable JUnit XML file"),
    ("<html/>", "not a JUnit XML file (root element <html>)"),
    ('<testsuite><testcase classname="m" name="t"><properties>'
     '<property name="requirements" value="BAL-NOPE"/></properties></testcase></testsuite>',
     "unknown requirement ID 'BAL-NOPE'"),
])
def test_bad_junit_file_gives_one_line_error_naming_file(tmp_path: Path, content: str, problem: str) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as caught:
        read_junit(junit)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(junit)), \
        f"expected one line starting with {junit}, got {message!r}"
    assert problem in message, f"expected {problem!r} in the message, got {message!r}"


def test_missing_junit_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="junit.xml: JUnit file not found"):
        read_junit(tmp_path / "junit.xml")


def test_markdown_counts_and_one_row_per_requirement(tree: Path) -> None:
    junit = junit_xml(tree.parent, '<testcase classname="suites.device.test_stats" name="test_stats_order"/>')
    text = render_markdown(requirement_coverage([tree], junit, rootdir=tree.parent))
    requirements = catalogue()
    total, testable = len(requirements), sum(req.is_testable for req in requirements.values())
    # Marked: DEV-ST-1, DEV-ST-2, DEV-OP-1, DEV-FPR-1, DEV-FPR-2, DEV-PP-1, DRV-ST-3.
    assert f"Statements covered: 7 / {testable} testable / {total} total" in text, \
        f"expected 7/{testable}/{total} counts, got {text[:200]!r}"
    assert f"Results: error 0, failed 0, deviates 0, passed 3, skipped 0, not run {total - 3}" in text, \
        f"expected 3 passed (ST-1, ST-2, OP-1), got {text[:300]!r}"
    rows = [line for line in text.splitlines() if line.startswith(("| BAL-", "| VQ-"))]
    assert len(rows) == total, f"expected {total} table rows, got {len(rows)}"
    expected_row = ("| BAL-DEV-ST-2 | device | MUST | qtest | qtest "
                    "| `suites.device.test_stats::test_stats_order` | passed |")
    assert expected_row in rows, f"expected row {expected_row!r}, got {[r for r in rows if 'DEV-ST-2' in r]}"


def test_driver_statements_say_which_side_checked_them(tmp_path: Path) -> None:
    """A driver statement named only by a device test (vballoon's host driver over qtest) is not checked against
    Linux: the report lists it apart. (Broken on purpose: counting device tests as Linux's side lists none.)"""
    tree = write_tree(tmp_path, {
        "suites/device/test_a.py": 'import pytest\n\n@pytest.mark.req("BAL-DRV-ST-5", "BAL-DRV-FPH-1")\n'
                                   'def test_x():\n    pass\n',
        "suites/migration/test_b.py": 'import pytest\n\n@pytest.mark.req("BAL-DRV-ST-5")\ndef test_y():\n    pass\n'})
    text = render_markdown(requirement_coverage([tree], None, rootdir=tmp_path))
    assert ("Driver statements checked against Linux: 1 / 2 covered; checked only with vballoon's host-side driver "
            "over qtest: BAL-DRV-FPH-1") in text, text[:600]
    sides = {line.split(" | ")[0][2:]: line.split(" | ")[4] for line in text.splitlines()
             if line.startswith(("| BAL-DRV-ST-5 ", "| BAL-DRV-FPH-1 ", "| BAL-DRV-ST-3 "))}
    assert sides == {"BAL-DRV-ST-5": "qtest, linux", "BAL-DRV-FPH-1": "qtest", "BAL-DRV-ST-3": "-"}, sides


def test_a_known_deviation_is_reported_apart_from_passed_with_its_qemu_versions(tree: Path) -> None:
    """An xfail (a known deviation) is "deviates (known, QEMU x.y)", worse than passed and better than failed."""
    def case(name: str, qemu: str, body: str) -> str:
        return (f'<testcase classname="suites.device.test_stats" name="{name}"><properties>'
                f'<property name="qemu_version" value="QEMU emulator version {qemu}"/></properties>{body}</testcase>')

    xfail = '<skipped type="pytest.xfail" message="known deviation"/>'
    junit = junit_xml(tree.parent, case("test_stats_order[a]", "10.0.13", xfail)
                      + case("test_stats_order[b]", "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)", xfail)
                      + case("test_stats_order[c]", "7.2.22", ""))
    text = render_markdown(requirement_coverage([tree], junit, rootdir=tree.parent))
    row = next(line for line in text.splitlines() if line.startswith("| BAL-DEV-ST-2 "))
    assert row.endswith("| deviates (known, QEMU 7.2, 10.0) |"), f"expected the deviating versions, got {row!r}"
    assert "deviates 3, passed 0" in text, f"expected ST-1, ST-2, OP-1 to deviate, got {text[:300]!r}"
    plain_skip = junit_xml(tree.parent, '<testcase classname="suites.device.test_stats" name="test_stats_order">'
                                        '<skipped type="pytest.skip" message="no hugetlbfs"/></testcase>')
    text = render_markdown(requirement_coverage([tree], plain_skip, rootdir=tree.parent))
    assert "deviates 0, passed 0, skipped 3" in text, f"expected a plain skip to stay a skip, got {text[:300]!r}"


def test_run_requirements_report_writes_what_it_returns(tree: Path) -> None:
    out = tree.parent / "reports" / "requirements.md"
    text = run_requirements_report(None, out, [tree])
    assert out.read_text(encoding="utf-8") == text, f"expected {out} to hold the returned markdown"
    assert text.startswith("# Requirement coverage"), f"expected a titled report, got {text[:60]!r}"


def test_the_shipped_suites_are_readable_and_cover_most_statements() -> None:
    """Every req mark in suites/ is literal and known, so `vballoon report requirements` works on them."""
    repo = Path(__file__).resolve().parent.parent
    coverage = requirement_coverage([repo / "suites"], None, rootdir=repo)
    covered, testable = len(coverage.covered), len(coverage.testable)
    assert covered >= testable // 2, (
        f"expected the suites to cover at least half of {testable} statements, got {covered}")
