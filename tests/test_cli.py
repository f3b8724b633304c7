"""The `vballoon` command's argument checks: bad counts are one usage line naming the option."""

from __future__ import annotations

import pytest

from vballoon.cli import main


@pytest.mark.parametrize("args, option", [
    (["bench", "boot", "--boots", "0"], "--boots"),
    (["bench", "matrix", "--jobs", "x"], "--jobs"),
    (["fuzz", "stats", "--time", "-1"], "--time"),
    (["fuzz", "stats", "--jobs", "0"], "--jobs"),
])
def test_a_count_below_one_is_a_usage_error_naming_the_option(args: list[str], option: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, f"expected exit status 2 for {args}, got {exit_info.value.code}"
    assert err[-1].endswith("expected a positive integer, got " + (repr(args[-1]) if args[-1] == "x" else args[-1])), (
        f"expected the last line to say what was wrong, got {err[-1]!r}")
    assert f"argument {option}:" in err[-1], f"expected the error to name {option}, got {err[-1]!r}"
    assert not any("Traceback" in line for line in err), f"expected no traceback, got {err}"
