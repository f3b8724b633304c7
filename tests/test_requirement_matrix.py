"""The requirement × variant matrix: rows, columns, the worst outcome per cell, and `report requirements --junit`."""

from __future__ import annotations

from pathlib import Path

import pytest

from vballoon.cli import main
from vballoon.junit import read_junit
from vballoon.requirement_matrix import build_matrix, render_matrix
from vballoon.requirements import catalogue

MODULE = "suites.guest.test_boot"


def case(name: str, body: str = "", requirements: str | None = None, variant: str | None = None) -> str:
    props = [("requirements", requirements), ("variant", variant)]
    properties = "".join(f'<property name="{key}" value="{value}"/>' for key, value in props if value is not None)
    return (f'<testcase classname="{MODULE}" name="{name}" time="1">'
            f"{f'<properties>{properties}</properties>' if properties else ''}{body}</testcase>")


FAILURE = '<failure message="x"/>'
ERROR = '<error message="x"/>'
SKIP = '<skipped type="pytest.skip" message="no hugetlbfs"/>'
XFAIL = '<skipped type="pytest.xfail" message="known deviation"/>'


def junit_file(path: Path, *cases: str) -> Path:
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">{"".join(cases)}'
                    "</testsuite></testsuites>", encoding="utf-8")
    return path


def table(text: str) -> dict[str, list[str]]:
    """Header and rows of the rendered matrix, by their first cell."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_a_cell_is_the_worst_of_its_tests_and_columns_are_the_variants(tmp_path: Path) -> None:
    junit = junit_file(
        tmp_path / "junit.xml",
        case("test_boot[pci-modern]", requirements="BAL-DRV-OP-1", variant="pci-modern"),
        case("test_inflate[pci-modern-64]", FAILURE, requirements="BAL-DRV-OP-1", variant="pci-modern"),
        case("test_boot[pci-legacy]", requirements="BAL-DRV-OP-1,BAL-DEV-ST-1"),
        case("test_boot[pci-legacy+doom]", XFAIL, requirements="BAL-DRV-OP-1"),
        case("test_stats[pci-legacy]", ERROR, requirements="BAL-DEV-ST-1"),
        case("test_stats[pci-legacy]", requirements="BAL-DEV-ST-1"),  # a rerun counts with its last result
        case("test_config", SKIP, requirements="BAL-DEV-ST-1"),
    )
    cases = read_junit(junit)
    latest = list({result.case: result for result in cases}.values())
    matrix = build_matrix(latest, {}, list(catalogue()))
    rows = table(render_matrix(matrix))

    assert rows["requirement"] == ["pci-legacy", "pci-legacy+doom", "pci-modern", "(none)"], \
        f"expected the variant property, else the brackets, and (none) last, got {rows['requirement']}"
    assert rows["BAL-DRV-OP-1"] == ["✓", "xfail", "✗", "-"], f"expected the worst per cell, got {rows['BAL-DRV-OP-1']}"
    assert rows["BAL-DEV-ST-1"] == ["✓", "-", "-", "skip"], f"expected the rerun's pass, got {rows['BAL-DEV-ST-1']}"
    assert list(rows)[1:] == ["BAL-DRV-OP-1", "BAL-DEV-ST-1"], f"expected catalogue order, got {list(rows)[1:]}"


def test_only_different_verdicts_make_a_requirement_vary(tmp_path: Path) -> None:
    junit = junit_file(
        tmp_path / "junit.xml",
        case("test_boot[a]", requirements="BAL-DRV-OP-1"),
        case("test_boot[b]", XFAIL, requirements="BAL-DRV-OP-1"),
        case("test_stats[a]", requirements="BAL-DEV-ST-1"),
        case("test_stats[b]", SKIP, requirements="BAL-DEV-ST-1"),
    )
    text = render_matrix(build_matrix(read_junit(junit), {}, list(catalogue())))
    assert "Different results between variants: BAL-DRV-OP-1\n" in text, \
        f"expected a known deviation in one variant to vary and a skip not to, got {text[:400]!r}"
    assert "2 requirements × 2 variants" in text, f"expected the size, got {text[:200]!r}"


def test_a_testcase_without_the_property_takes_its_tests_static_marks(tmp_path: Path) -> None:
    junit = junit_file(tmp_path / "junit.xml", case("test_boot[pci-modern]", FAILURE))
    matrix = build_matrix(read_junit(junit), {f"{MODULE}::test_boot": ("BAL-DRV-ACT-1",)}, list(catalogue()))
    assert matrix.requirements == ["BAL-DRV-ACT-1"], f"expected the mark's ID, got {matrix.requirements}"
    assert matrix.cell("BAL-DRV-ACT-1", "pci-modern") == "failed", "expected the failure in the pci-modern cell"


def test_report_requirements_reads_several_files_and_writes_the_matrix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    roots = tmp_path / "suites"
    roots.mkdir()
    one = junit_file(tmp_path / "junit-shard-1-of-2.xml",
                     case("test_boot[pci-modern]", requirements="BAL-DRV-OP-1", variant="pci-modern"))
    two = junit_file(tmp_path / "junit-shard-2-of-2.xml",
                     case("test_boot[pci-legacy]", FAILURE, requirements="BAL-DRV-OP-1", variant="pci-legacy"))
    report, matrix = tmp_path / "out" / "requirements.md", tmp_path / "out" / "matrix.md"
    status = main(["report", "requirements", "--junit", str(one), str(two), "--roots", str(roots),
                   "--out", str(report), "--matrix-out", str(matrix)])
    out, err = capsys.readouterr()

    assert status == 0, f"expected exit 0, got {status}: {err}"
    assert "| BAL-DRV-OP-1 | driver | SHOULD |" in out and out.rstrip().endswith(report.read_text().rstrip()), \
        "expected the coverage report on stdout and in --out"
    row = next(line for line in report.read_text().splitlines() if line.startswith("| BAL-DRV-OP-1 "))
    assert row.endswith("| failed |"), f"expected the second file's failure in the coverage report, got {row!r}"
    rows = table(matrix.read_text())
    assert (rows["requirement"], rows["BAL-DRV-OP-1"]) == (["pci-legacy", "pci-modern"], ["✗", "✓"]), \
        f"expected both files in the matrix, got {rows}"


def test_report_requirements_names_a_truncated_file_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = junit_file(tmp_path / "good.xml", case("test_boot[a]"))
    cut = tmp_path / "cut.xml"
    cut.write_text(good.read_text()[:60], encoding="utf-8")
    matrix = tmp_path / "matrix.md"
    status = main(["report", "requirements", "--junit", str(good), str(cut), "--roots", str(tmp_path),
                   "--out", str(tmp_path / "requirements.md"), "--matrix-out", str(matrix)])
    out, err = capsys.readouterr()
    assert status == 2 and out == "", f"expected exit 2 and no report, got {status}, {out[:80]!r}"
    assert err.count("\n") == 1 and err.startswith(f"vballoon: error: {cut}: not a readable JUnit XML file ("), \
        f"expected one line naming {cut}, got {err!r}"
    assert not matrix.exists(), "expected no matrix from a run that could not be read"
