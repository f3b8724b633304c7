"""Tests of the measuring half of `vballoon bench qemu-coverage` (vballoon.qemu_coverage), on a small program.

A tree laid out as QEMU's (hw/virtio/virtio-balloon.c calling into
hw/virtio/virtio.c) is compiled with gcc --coverage out of tree and run;
gcov and gcovr measure it for real. The QEMU build and the suite stages run
in `make qemu-coverage`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vballoon.errors import VballoonError
from vballoon.qemu_build import BuiltQemu
from vballoon.qemu_coverage import (
    BALLOON,
    VIRTIO,
    figures,
    measure,
    name_functions,
    reached_functions,
    uncovered_markdown,
    zero_counters,
)

VIRTIO_C = """\
static int split_pop(int x)
{
    if (x > 1) {
        return 1;
    }
    return 0;
}

int virtqueue_pop(int x)
{
    return split_pop(x);
}

int virtio_unrelated(int x)
{
    return x * 3;
}
"""
BALLOON_C = """\
int virtqueue_pop(int x);

int main(int argc, char **argv)
{
    if (argc > 5) {
        return 9;
    }
    return virtqueue_pop(argc);
}
"""


@pytest.fixture
def built(tmp_path: Path) -> BuiltQemu:
    """The small tree compiled with --coverage in build/ and run once with no argument."""
    source, build = tmp_path / "src", tmp_path / "build"
    (source / "hw" / "virtio").mkdir(parents=True)
    (source / VIRTIO).write_text(VIRTIO_C)
    (source / BALLOON).write_text(BALLOON_C)
    build.mkdir()
    for path in (VIRTIO, BALLOON):
        subprocess.run(["gcc", "--coverage", "-O0", "-c", f"../src/{path}", "-o", Path(path).name + ".o"],
                       cwd=build, check=True)
    subprocess.run(["gcc", "--coverage", "-o", "program", "virtio.c.o", "virtio-balloon.c.o"], cwd=build, check=True)
    subprocess.run([str(build / "program")], check=False)
    return BuiltQemu(build / "program", build, source, "0-test", "gcov")


def test_the_balloons_lines_and_the_virtio_functions_it_reaches_are_measured(built: BuiltQemu, tmp_path: Path) -> None:
    """Broken once on purpose: the closure stopped at direct calls, split_pop was missing and this failed."""
    balloon, virtio = measure(built, tmp_path)
    assert figures(balloon).as_json() == {"lines": {"covered": 3, "total": 4, "percent": 75.0},
                                          "branches": {"covered": 1, "total": 2, "percent": 50.0}}, balloon
    functions = reached_functions(BALLOON_C, balloon, virtio, VIRTIO_C.splitlines())
    assert functions == ["split_pop", "virtqueue_pop"], f"expected the called function and its callee, got {functions}"
    reached = figures([line for line in virtio if line["function_name"] in functions])
    assert (reached.lines, reached.lines_total) == (5, 6), reached


def test_the_uncovered_lines_name_their_function_and_source(built: BuiltQemu, tmp_path: Path) -> None:
    balloon, _ = measure(built, tmp_path)
    text = uncovered_markdown("0-test", balloon, BALLOON_C.splitlines())
    assert "| 6 | main | `return 9;` |" in text, text
    assert "| 5 | main | 1/2 | `if (argc > 5) {` |" in text, text
    assert "## 1 lines never run" in text and "## 1 lines run with a branch never taken" in text, text


def test_lines_gcov_could_not_name_get_the_function_defined_above_them() -> None:
    """Broken once on purpose: name_functions returning the records as they were, this failed."""
    lines = [{"line_number": 2, "function_name": "<unknown function 1>"},
             {"line_number": 4, "function_name": "<unknown function 3>"},
             {"line_number": 8, "function_name": "main"}]
    assert [line["function_name"] for line in name_functions(lines, BALLOON_C.splitlines())] == \
        ["(file scope)", "main", "main"], "a prototype or nothing above counted as a definition"
    virtio = [{"line_number": 6, "function_name": "<unknown function 1>"},
              {"line_number": 11, "function_name": None}]
    assert [line["function_name"] for line in name_functions(virtio, VIRTIO_C.splitlines())] == \
        ["split_pop", "virtqueue_pop"]


def test_zeroed_counters_measure_nothing_run(built: BuiltQemu, tmp_path: Path) -> None:
    assert zero_counters(built.build_dir) == 2
    assert not list(built.build_dir.rglob("*.gcda"))
    balloon, virtio = measure(built, tmp_path)
    assert figures(balloon).lines == 0 and figures(virtio).lines == 0, "counters survived zero_counters"


def test_a_build_without_the_balloon_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "build").mkdir()
    empty = BuiltQemu(tmp_path / "build" / "q", tmp_path / "build", tmp_path / "src", "0", "gcov")
    with pytest.raises(VballoonError, match=rf"^{tmp_path / 'build'}: no coverage data for {BALLOON}, {VIRTIO}; "):
        measure(empty, tmp_path)
