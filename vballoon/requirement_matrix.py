"""The requirement × variant matrix: for each spec statement, how every configuration did.

Rows are the requirement IDs the testcases check (a testcase's `requirements`
property, else its test's `req` marks), in catalogue order; columns are the
variants (a testcase's `variant` property, else the parameter id in its
name's brackets; `(none)` for an unparametrised test). A cell is the worst
outcome of the testcases of that requirement and variant, so one failing
test in a cell shows. Requirements whose verdict (pass, known deviation,
failure, error) is not the same in every variant are listed first: those
are the configurations that deviate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vballoon.junit import DEVIATES, NOT_RUN, CaseResult, worst

NO_VARIANT = "(none)"
SYMBOLS = {"passed": "✓", "failed": "✗", DEVIATES: "xfail", "skipped": "skip", "error": "error", NOT_RUN: "-"}
LEGEND = "✓ passed, ✗ failed, xfail a known deviation, skip skipped, error an error, - no test"
VERDICTS = ("passed", DEVIATES, "failed", "error")
"""The outcomes that say something about a configuration; a skip or no test does not."""


@dataclass
class RequirementMatrix:
    """Outcomes per requirement and variant."""

    requirements: list[str]
    variants: list[str]
    outcomes: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def cell(self, req_id: str, variant: str) -> str:
        """The worst outcome of the requirement's testcases in this variant; NOT_RUN for none."""
        return worst(self.outcomes.get((req_id, variant), ()))

    def varies(self, req_id: str) -> bool:
        """True when the requirement's verdict is not the same in every variant that gave one."""
        verdicts = {self.cell(req_id, variant) for variant in self.variants} & set(VERDICTS)
        return len(verdicts) > 1


def build_matrix(cases: Sequence[CaseResult], tests: Mapping[str, tuple[str, ...]],
                 order: Sequence[str]) -> RequirementMatrix:
    """The matrix of `cases`; `tests` gives a test's requirement IDs, `order` the row order."""
    outcomes: dict[tuple[str, str], list[str]] = {}
    for case in cases:
        ids = case.requirements if case.requirements is not None else tests.get(case.test, ())
        for req_id in ids:
            outcomes.setdefault((req_id, case.variant or NO_VARIANT), []).append(case.outcome)
    named = {req_id for req_id, _ in outcomes}
    variants = sorted({variant for _, variant in outcomes}, key=lambda v: (v == NO_VARIANT, v))
    rows = [req_id for req_id in order if req_id in named] + sorted(named - set(order))
    return RequirementMatrix(rows, variants, outcomes)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_matrix(matrix: RequirementMatrix) -> str:
    """The matrix as Markdown: a legend, the requirements that vary, then the table."""
    varying = [req_id for req_id in matrix.requirements if matrix.varies(req_id)]
    lines = [
        "# Requirement × variant matrix",
        "",
        f"{len(matrix.requirements)} requirements × {len(matrix.variants)} variants; "
        f"a cell is the worst outcome of its tests ({LEGEND}).",
        "",
        "Different results between variants: " + (", ".join(varying) or "none"),
        "",
    ]
    if not matrix.requirements:
        return "\n".join([*lines, "No testcase names a requirement."]) + "\n"
    lines += [
        "| requirement | " + " | ".join(_escape(variant) for variant in matrix.variants) + " |",
        "| --- |" + " --- |" * len(matrix.variants),
    ]
    for req_id in matrix.requirements:
        cells = " | ".join(SYMBOLS[matrix.cell(req_id, variant)] for variant in matrix.variants)
        lines.append(f"| {req_id} | {cells} |")
    return "\n".join(lines) + "\n"
