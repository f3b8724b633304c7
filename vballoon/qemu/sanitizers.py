"""QEMU built with sanitizers: the options vballoon runs it with, and the reports it prints on stderr.

A QEMU configured with `--enable-asan --enable-ubsan` runs unchanged; when vballoon starts any QEMU it
passes `sanitizer_environment`: AddressSanitizer and UndefinedBehaviorSanitizer stop QEMU at their first
report (halt_on_error=1) with an exit status rather than a core dump (abort_on_error=0), UBSan prints the
stack (print_stacktrace=1), LeakSanitizer checks at exit (detect_leaks=1) with vballoon's suppressions
(LEAK_SUPPRESSIONS) and whole allocation stacks (fast_unwind_on_malloc=0: glib has no frame pointers, and a
suppression names a QEMU function; it doubles the time of an AddressSanitizer QEMU's device suite), and
reports are symbolized, with llvm-symbolizer when it is on PATH. Options the user set in ASAN_OPTIONS,
UBSAN_OPTIONS or LSAN_OPTIONS win: theirs come after vballoon's, and a sanitizer takes the last value it reads
for a key.

`sanitizer_reports` finds the reports in stderr, whatever the sanitizer was told: an AddressSanitizer or
LeakSanitizer report (`==PID==ERROR: ...Sanitizer: ...`, up to its `==PID==ABORTING` or its summary and
shadow map), an UndefinedBehaviorSanitizer `file:line:col: runtime error: ...` line with its stack (UBSan
prints it and lets QEMU go on without halt_on_error: it counts all the same), and a `SUMMARY: ...Sanitizer:`
line outside any of those.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

LEAK_SUPPRESSIONS = Path(__file__).resolve().parents[1] / "data" / "lsan-suppressions.txt"
"""QEMU functions whose leaks are not the balloon's, each with its reason."""
OPTION_VARIABLES: dict[str, tuple[str, ...]] = {
    "ASAN_OPTIONS": ("halt_on_error=1", "abort_on_error=0", "detect_leaks=1", "fast_unwind_on_malloc=0"),
    "UBSAN_OPTIONS": ("halt_on_error=1", "abort_on_error=0", "print_stacktrace=1"),
    "LSAN_OPTIONS": (f"suppressions={LEAK_SUPPRESSIONS}",),
}
"""vballoon's defaults for each sanitizer's options variable (symbolizing is added by `sanitizer_options`)."""
MAX_REPORT_CHARS = 16_384
"""A report's text is cut there (a fuzz sidecar holds it); the headline and the first frames come first."""

HEADLINE = re.compile(r"^==\d+==ERROR: (?P<sanitizer>\w+Sanitizer): .*$")
RUNTIME_ERROR = re.compile(r"^.*: runtime error: .*$")
NOTE = re.compile(r"^\S+: note: ")
SUMMARY = re.compile(r"^SUMMARY: (?P<sanitizer>\w+Sanitizer): .*$")
ABORTING = re.compile(r"^==\d+==ABORTING$")
FRAME = re.compile(r"^\s+#0 .*$")
SHADOW_MAP = re.compile(r"^(\s|=>|Shadow byte)")
"""The lines of AddressSanitizer's shadow map, printed after its summary line."""


def sanitizer_options(variable: str, user_value: str | None, symbolizer: str | None) -> str:
    """`variable`'s value for QEMU: vballoon's defaults, symbolizing, then what the user set (which wins)."""
    ours = [*OPTION_VARIABLES[variable], "symbolize=1"]
    if symbolizer:
        ours.append(f"external_symbolizer_path={symbolizer}")
    return ":".join([*ours, *([user_value] if user_value else [])])


def sanitizer_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with vballoon's sanitizer options merged in; the environment every QEMU vballoon starts gets."""
    symbolizer = shutil.which("llvm-symbolizer", path=environ.get("PATH"))
    return {**environ, **{variable: sanitizer_options(variable, environ.get(variable), symbolizer)
                          for variable in OPTION_VARIABLES}}


@dataclass(frozen=True)
class SanitizerReport:
    """One report a sanitizer printed."""

    sanitizer: str
    """AddressSanitizer, UndefinedBehaviorSanitizer, LeakSanitizer, ..."""
    headline: str
    first_frame: str
    """The report's first `#0 ...` stack frame ('' when it printed no stack)."""
    text: str
    """The whole report, at most MAX_REPORT_CHARS."""
    lines: range
    """Which lines of stderr it spans."""

    def describe(self) -> str:
        """The headline and the first frame, on one line."""
        return f"{self.headline} | {self.first_frame}" if self.first_frame else self.headline


def _report_end(lines: list[str], start: int) -> int:
    """The line after the report that begins at `start`."""
    end = start + 1
    if RUNTIME_ERROR.match(lines[start]):  # UBSan: its notes (with memory dumps), its stack, maybe a summary
        while end < len(lines) and (not lines[end].strip() or lines[end][0].isspace() or NOTE.match(lines[end])):
            end += 1
        return end + 1 if end < len(lines) and SUMMARY.match(lines[end]) else end
    if SUMMARY.match(lines[start]):
        return end
    while end < len(lines) and not HEADLINE.match(lines[end]) and not RUNTIME_ERROR.match(lines[end]):
        line, end = lines[end], end + 1
        if ABORTING.match(line):
            return end
        if SUMMARY.match(line):  # no ABORTING follows when the sanitizer goes on: end with the shadow map
            while end < len(lines) and (SHADOW_MAP.match(lines[end]) or ABORTING.match(lines[end])):
                end += 1
            return end
    return end


def reports_text(stderr: str) -> str:
    """The sanitizer reports in `stderr`, whole, one after another, at most MAX_REPORT_CHARS in all."""
    return "\n".join(report.text for report in sanitizer_reports(stderr))[:MAX_REPORT_CHARS]


def sanitizer_reports(stderr: str) -> list[SanitizerReport]:
    """The sanitizer reports in `stderr`, in order."""
    lines = stderr.splitlines()
    reports: list[SanitizerReport] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        match = HEADLINE.match(line) or SUMMARY.match(line)
        if match is None and not RUNTIME_ERROR.match(line):
            index += 1
            continue
        end = _report_end(lines, index)
        body = lines[index:end]
        frame = next((body_line.strip() for body_line in body if FRAME.match(body_line)), "")
        sanitizer = match["sanitizer"] if match else "UndefinedBehaviorSanitizer"
        reports.append(SanitizerReport(sanitizer, line.strip(), frame, "\n".join(body)[:MAX_REPORT_CHARS],
                                       range(index, end)))
        index = end
    return reports
