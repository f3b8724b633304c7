"""The one command that reruns a failed test alone, with the QEMU, kernel and accelerator of its run.

A suite test (suites/...) reruns through `make conformance TESTS=<node id>`,
as users run the suites; any other test through pytest with its node id.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

RUN_OPTIONS = ("--qemu", "--kernel", "--modules", "--accel")
"""The options that say what was tested; their values are repeated in the rerun command."""


def rerun_command(nodeid: str, tier: str, options: Mapping[str, str | None]) -> str:
    """The shell command that reruns `nodeid` alone, with the run's `options` (RUN_OPTIONS that were given)."""
    args = [part for name in RUN_OPTIONS if options.get(name) for part in (name, str(options[name]))]
    if nodeid.startswith("suites/"):
        pytest_args = " ".join(shlex.quote(arg) for arg in args)
        return (f"make conformance MATRIX={tier} JOBS=1 TESTS={shlex.quote(nodeid)}"
                + (f" PYTEST_ARGS={shlex.quote(pytest_args)}" if args else ""))
    return " ".join(shlex.quote(arg) for arg in ["python3", "-m", "pytest", nodeid, *args])
