"""QEMU's own line and branch coverage of the balloon: `vballoon bench qemu-coverage`.

The gcov flavour of QEMU (vballoon.qemu_build) runs the device suite, then
the corpus replay (every fuzz seed and saved crash, suites/device/
test_corpus_replay.py); gcovr measures after each stage. The counters are
zeroed (every .gcda removed) before the first stage. A QEMU writes its
counters as it exits, which the machines' stop (QMP quit, then SIGTERM, both
clean exits) gives it; only a QEMU that needs SIGKILL loses its share.

Measured: hw/virtio/virtio-balloon.c whole, and of hw/virtio/virtio.c the
functions the balloon reaches: those virtio-balloon.c calls by name, and the
virtio.c functions those call, transitively (the ring code behind
virtqueue_pop and virtqueue_push). Written to <out>/: qemu-coverage/index.html
(gcovr's pages), qemu-coverage.json (gcovr's summary and ours) and
qemu-coverage-uncovered.md (virtio-balloon.c's uncovered lines and untaken
branches, with their functions and source).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vballoon.errors import UsageError, VballoonError
from vballoon.qemu_build import BuiltQemu, build_flavour

BALLOON = "hw/virtio/virtio-balloon.c"
VIRTIO = "hw/virtio/virtio.c"
PROJECT = Path(__file__).resolve().parents[1]
REPLAY = "suites/device/test_corpus_replay.py"
# (name, pytest arguments): each stage adds to the counters of the ones before.
STAGES = (
    ("device suite", ("suites/device", f"--ignore={REPLAY}")),
    ("corpus replay", (REPLAY,)),
)
CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
# A C function definition's first line, as QEMU writes them: from column 0, up to the name and its parenthesis.
DEFINITION = re.compile(r"^(?!#|typedef|struct|enum|union|.*;\s*$)[A-Za-z_][\w \t*]*?\b([A-Za-z_]\w*)\(")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Figures:
    """Covered and total lines and branches of a set of lines."""

    lines: int
    lines_total: int
    branches: int
    branches_total: int

    def as_json(self) -> dict[str, Any]:
        def share(covered: int, total: int) -> dict[str, Any]:
            return {"covered": covered, "total": total, "percent": round(100 * covered / total, 1) if total else None}

        return {"lines": share(self.lines, self.lines_total), "branches": share(self.branches, self.branches_total)}

    def describe(self) -> str:
        figures = self.as_json()
        return ", ".join(f"{kind} {value['percent']}% ({value['covered']}/{value['total']})"
                         for kind, value in figures.items())


def figures(lines: list[dict[str, Any]]) -> Figures:
    """The coverage figures of gcovr JSON line records."""
    branches = [branch for line in lines for branch in line["branches"]]
    return Figures(sum(line["count"] > 0 for line in lines), len(lines),
                   sum(branch["count"] > 0 for branch in branches), len(branches))


def name_functions(lines: list[dict[str, Any]], source: list[str]) -> list[dict[str, Any]]:
    """The line records with a name for the lines gcov could not name (code of functions the compiler merged
    away): the function defined last above them, its name taken from the source."""
    def defined_above(number: int) -> str:
        for text in reversed(source[:number]):
            found = DEFINITION.match(text)
            if found:
                return found[1]
        return "(file scope)"

    return [line if line.get("function_name") and not line["function_name"].startswith("<")
            else {**line, "function_name": defined_above(line["line_number"])} for line in lines]


def reached_functions(balloon_source: str, balloon_lines: list[dict[str, Any]], virtio_lines: list[dict[str, Any]],
                      virtio_source: list[str]) -> list[str]:
    """The virtio.c functions virtio-balloon.c calls by name, and those they call, transitively, in source order
    (a function both files define, static in each, is the balloon's own)."""
    extents: dict[str, tuple[int, int]] = {}
    for line in virtio_lines:
        if line.get("function_name") is None:
            continue
        first, last = extents.get(line["function_name"], (line["line_number"], line["line_number"]))
        extents[line["function_name"]] = (min(first, line["line_number"]), max(last, line["line_number"]))
    calls = {name: (set(CALL.findall("\n".join(virtio_source[first - 1:last]))) & extents.keys()) - {name}
             for name, (first, last) in extents.items()}
    own = {line["function_name"] for line in balloon_lines}
    reached, todo = set(), (set(CALL.findall(balloon_source)) & extents.keys()) - own
    while todo:
        name = todo.pop()
        reached.add(name)
        todo |= calls[name] - reached
    return sorted(reached, key=lambda name: extents[name][0])


def uncovered_markdown(version: str, balloon_lines: list[dict[str, Any]], source: list[str]) -> str:
    """virtio-balloon.c's uncovered lines and lines with untaken branches, with their functions and source."""
    def row(line: dict[str, Any], extra: str = "") -> str:
        text = source[line["line_number"] - 1].strip().replace("|", "\\|")
        return f"| {line['line_number']} | {line['function_name']} |{extra} `{text}` |"

    missed = [line for line in balloon_lines if line["count"] == 0]
    partial = [line for line in balloon_lines if line["count"] > 0
               and any(branch["count"] == 0 for branch in line["branches"])]
    out = [f"# Uncovered code of {BALLOON} (QEMU {version})", "",
           "Written by `vballoon bench qemu-coverage` after the device suite and the corpus replay.", "",
           f"## {len(missed)} lines never run", "", "| line | function | source |", "|---:|---|---|"]
    out += [row(line) for line in missed]
    out += ["", f"## {len(partial)} lines run with a branch never taken", "",
            "| line | function | taken | source |", "|---:|---|---|---|"]
    out += [row(line, f" {sum(b['count'] > 0 for b in line['branches'])}/{len(line['branches'])} |")
            for line in partial]
    return "\n".join(out) + "\n"


def zero_counters(build: Path) -> int:
    """Remove every .gcda file of the build; return how many there were."""
    counters = list(build.rglob("*.gcda"))
    for path in counters:
        path.unlink()
    return len(counters)


def run_stage(name: str, args: tuple[str, ...], qemu: Path, pytest_args: tuple[str, ...], log: Path) -> dict[str, Any]:
    """Run one stage's tests on the gcov QEMU with pytest; return its outcome counts and time."""
    logger.info(f"coverage stage {name}: pytest {' '.join(args)} ({log})")
    with tempfile.TemporaryDirectory(prefix="vballoon-coverage-") as tmp:
        junit = Path(tmp) / "junit.xml"
        started = time.monotonic()
        with log.open("w") as out:
            done = subprocess.run([sys.executable, "-m", "pytest", *args, "--qemu", str(qemu), "-p", "no:cacheprovider",
                                   f"--junitxml={junit}", *pytest_args], cwd=PROJECT, stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, "VBALLOON_SHARD": ""}, check=False)
        seconds = round(time.monotonic() - started, 1)
        if done.returncode not in (0, 1) or not junit.is_file():
            raise VballoonError(f"coverage stage {name}: pytest exited {done.returncode}; its log is {log}")
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {kind: int(suite.get(kind, 0)) for kind in ("tests", "failures", "errors", "skipped")}
    return {"stage": name, "pytest": " ".join(args), "seconds": seconds, **counts, "log": str(log)}


def gcovr(built: BuiltQemu, *outputs: str) -> None:
    """Run gcovr over the build, for virtio-balloon.c and virtio.c only, writing `outputs` (its options)."""
    filters = [arg for path in (BALLOON, VIRTIO)
               for arg in ("--filter", re.escape(str(built.source_dir / path)) + "$")]
    done = subprocess.run([sys.executable, "-m", "gcovr", "--root", str(built.source_dir), *filters,
                           "--exclude-unreachable-branches", *outputs, str(built.build_dir)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no message"]
        raise VballoonError(f"gcovr over {built.build_dir} failed (exit {done.returncode}): {lines[-1]}")


def measure(built: BuiltQemu, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The gcovr line records of virtio-balloon.c and of virtio.c, as the counters stand."""
    report = work / "gcovr.json"
    gcovr(built, "--json", str(report))
    files = {entry["file"]: entry["lines"] for entry in json.loads(report.read_text())["files"]}
    missing = [path for path in (BALLOON, VIRTIO) if path not in files]
    if missing:
        raise VballoonError(f"{built.build_dir}: no coverage data for {', '.join(missing)}; "
                            "the QEMU under test did not run or did not exit cleanly")
    return files[BALLOON], files[VIRTIO]


def run_qemu_coverage(source: Path | None, out: Path, pytest_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Build the gcov QEMU, run the stages on it, and write the HTML, JSON and uncovered-lines reports to out/."""
    if importlib.util.find_spec("gcovr") is None:
        raise VballoonError("gcovr is not installed: `make qemu-coverage` installs it (tox env qemu-coverage), "
                            "as does pip install 'vballoon[dev]'")
    if not (PROJECT / REPLAY).is_file():
        raise UsageError(f"vballoon bench qemu-coverage runs vballoon's suites: {PROJECT / REPLAY} is missing; "
                         "run it from a vballoon checkout")
    built = build_flavour("gcov", source)
    html = out / "qemu-coverage"
    html.mkdir(parents=True, exist_ok=True)
    logger.info(f"zeroed {zero_counters(built.build_dir)} counter files of {built.build_dir}")
    balloon_source = (built.source_dir / BALLOON).read_text(errors="replace")
    virtio_source = (built.source_dir / VIRTIO).read_text(errors="replace").splitlines()
    stages = []
    with tempfile.TemporaryDirectory(prefix="vballoon-coverage-") as tmp:
        for name, args in STAGES:
            stage = run_stage(name, args, built.binary, pytest_args, html / f"pytest-{name.replace(' ', '-')}.log")
            balloon, virtio = measure(built, Path(tmp))
            balloon = name_functions(balloon, balloon_source.splitlines())
            virtio = name_functions(virtio, virtio_source)
            functions = reached_functions(balloon_source, balloon, virtio, virtio_source)
            stage[BALLOON] = figures(balloon).as_json()
            stage[f"{VIRTIO} (reached)"] = figures([line for line in virtio if line.get("function_name") in functions]) \
                .as_json()
            stages.append(stage)
            logger.info(f"after {name}: {BALLOON} {figures(balloon).describe()}")
        gcovr(built, "--html-details", str(html / "index.html"), "--json-summary", str(Path(tmp) / "summary.json"))
        gcovr_summary = json.loads((Path(tmp) / "summary.json").read_text())
    per_function = [{"function": name, **figures([line for line in virtio if line.get("function_name") == name]).as_json()}
                    for name in functions]
    summary = {
        "qemu": {"version": built.version, "binary": str(built.binary), "source": str(built.source_dir)},
        "reached_functions_of_virtio_c": per_function,
        "stages": stages,
        "gcovr_summary": gcovr_summary,
    }
    (out / "qemu-coverage.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "qemu-coverage-uncovered.md").write_text(
        uncovered_markdown(built.version, balloon, balloon_source.splitlines()))
    return summary
