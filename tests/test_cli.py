"""The `vballoon` command's errors: bad counts are one usage line naming the option, a user's error one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vballoon.cli import main


@pytest.mark.parametrize("args, option, wanted", [
    (["bench", "boot", "--boots", "0"], "--boots", "expected a positive integer, got 0"),
    (["bench", "matrix", "--jobs", "x"], "--jobs", "expected auto or a positive integer, got 'x'"),
    (["bench", "matrix", "--jobs", "0"], "--jobs", "expected auto or a positive integer, got '0'"),
    (["fuzz", "stats", "--time", "-1"], "--time", "expected a positive integer, got -1"),
    (["fuzz", "stats", "--jobs", "0"], "--jobs", "expected a positive integer, got 0"),
])
def test_a_count_below_one_is_a_usage_error_naming_the_option(args: list[str], option: str, wanted: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, f"expected exit status 2 for {args}, got {exit_info.value.code}"
    assert err[-1].endswith(wanted), f"expected the last line to end {wanted!r}, got {err[-1]!r}"
    assert f"argument {option}:" in err[-1], f"expected the error to name {option}, got {err[-1]!r}"
    assert not any("Traceback" in line for line in err), f"expected no traceback, got {err}"


def test_a_user_error_is_one_line_on_stderr_without_a_traceback(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    kernel = tmp_path / "bzImage"
    status = main(["image", "build", "--kernel", str(kernel)])
    out, err = capsys.readouterr()
    assert status == 2, f"expected exit status 2, got {status}"
    assert out == "", f"expected nothing on stdout, got {out!r}"
    assert err == (f"vballoon: error: --kernel {kernel}: no such file; pass the path of a bzImage "
                   "(arch/x86/boot/bzImage)\n"), f"expected one error line, got {err!r}"
