"""Regression: every saved crash and every seed replayed on the QEMU under test and on the reference.

Each input is decoded strictly and run the way the differential fuzzer runs it (`vballoon.fuzz.reproduce`):
on a QEMU started for it and on the reference, comparing the final config space (BAL-CFG-LEG-LE, and
`actual` against query-balloon and BALLOON_CHANGE: BAL-DRV-ACT-1, BAL-DEV-LEG-ACT), the used entries
(BAL-LEG-USED), the pool pages after inflate, hint and report (BAL-DEV-OP-1, BAL-DEV-FPH-3, BAL-DEV-FPR-1,
BAL-DEV-FPR-2), guest-stats (BAL-DEV-ST-1, BAL-DEV-ST-2, BAL-DEV-LEG-ST-FIRST) and device errors and status
(BAL-DEV-LEG-FEAT-1, BAL-DEV-FPH-1; after a malformed chain VQ-DEV-STATUS-1, or VQ-DEV-PACKED-1 for a packed ring's
descriptor of the previous lap). Those are the requirements `vballoon.scenario.judge.compare` names,
so they are the ones this replay checks. A crash file that still reproduces fails with its evidence; known
deviations of this QEMU are excluded by name, as in the fuzzer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vballoon.fuzz.crashes import crash_files
from vballoon.fuzz.reproduce import replay_scenario, saved_input
from vballoon.session import Session

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
INPUTS = crash_files(FUZZ / "crashes") + crash_files(FUZZ / "corpora")


@pytest.mark.req("BAL-CFG-LEG-LE", "BAL-DRV-ACT-1", "BAL-DEV-LEG-ACT", "BAL-LEG-USED", "BAL-DEV-OP-1", "BAL-DEV-FPH-3",
                 "BAL-DEV-FPR-1", "BAL-DEV-FPR-2", "BAL-DEV-ST-1", "BAL-DEV-ST-2", "BAL-DEV-LEG-ST-FIRST",
                 "BAL-DEV-LEG-FEAT-1", "BAL-DEV-FPH-1", "VQ-DEV-STATUS-1", "VQ-DEV-PACKED-1")
@pytest.mark.parametrize("saved", INPUTS, ids=[str(p.relative_to(FUZZ)) for p in INPUTS])
def test_saved_input_conforms(session: Session, saved: Path) -> None:
    """QEMU's observations of a saved input stay within the reference's allowed outcomes."""
    scenario, target = saved_input(saved)
    finding, reproducer = replay_scenario(scenario, True, session.qemu)
    if finding is not None:
        pytest.fail(f"{saved} ({target.name}): {finding.kind}: {finding.summary}\n"
                    + "\n".join(finding.differences) + f"\nstandalone reproducer:\n{reproducer}")
