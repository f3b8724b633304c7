"""The `vballoon` command: run the suites, build the guest image, report, benchmark, fuzz, reproduce.

Errors a user can cause print one line (`vballoon: error: ...`) and exit 2;
Ctrl-C stops every QEMU the command started and exits 130. Progress messages
of the `vballoon` loggers go to stderr as plain lines; stdout carries only a
command's output.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from vballoon.errors import VballoonError


def worker_count(text: str) -> str:
    """An argparse type for pytest-xdist's -n: auto or a positive integer."""
    if text == "auto" or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")


def positive_int(text: str) -> int:
    """An argparse type for counts, seconds and workers: 0 or less is a usage error, not a crash or an endless run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qemu", help="qemu-system-x86_64 to test (default: the one on PATH)")
    parser.add_argument("--kernel", help="guest bzImage (default: Debian's cloud kernel)")
    parser.add_argument("--modules", help="modules_install tree or folder of .ko files")
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))


def _cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    import pytest

    return int(pytest.main(["suites", *rest]))


def _cmd_image_clean(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.qemu.snapshots import SnapshotCache

    snapshots = SnapshotCache.in_cache()
    print(f"deleted the warm-start snapshots in {snapshots.directory}: {snapshots.clean() >> 20} MiB freed")
    return 0


def _cmd_image_build(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.guest.image import build_image

    image = build_image(kernel_package=args.kernel_package, kernel=Path(args.kernel) if args.kernel else None,
                        modules=Path(args.modules) if args.modules else None)
    print(f"{'cache hit' if image.cache_hit else 'built'} {image.key}")
    print(f"kernel  {image.kernel} ({image.kernel_version})")
    print(f"boots   {image.booted} ({image.boot})")
    print(f"initrd  {image.initrd}")
    print(f"ssh key {image.ssh_key}")
    print(f"modules {' '.join(image.modules) or '(built in)'}")
    return 0


def _cmd_report_requirements(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.report import run_requirements_report

    text = run_requirements_report([Path(j) for j in args.junit or ()], Path(args.out),
                                   [Path(r) for r in args.roots], Path(args.matrix_out))
    print(text)
    return 0


def _cmd_report_costs(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.costs import write_costs

    costs = write_costs([Path(f) for f in args.files], Path(args.out))
    print(f"{len(costs)} shard units, {sum(costs.values()):.0f} s in all -> {args.out}")
    return 0


def _cmd_report_merge(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.merge import merge_junit, write_merged

    merged = merge_junit([Path(f) for f in args.files])
    write_merged(merged, Path(args.out))
    print(merged.summary(Path(args.out)))
    for problem in merged.problems:
        print(f"vballoon: problem: {problem}", file=sys.stderr)
    return 1 if merged.problems else 0


def _cmd_report_timeline(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.timeline import describe_cpu, read_run, summarise, top_markdown
    from vballoon.timeline_svg import write_svg

    run = read_run(Path(args.run_dir))
    summary = summarise(run)
    write_svg(run, Path(args.out))
    top = Path(args.top)
    top.parent.mkdir(parents=True, exist_ok=True)
    top.write_text(top_markdown(summary))
    busy = ", ".join(f"{worker} busy {load['busy_s']} s ({load['busy_pct']}%), idle {load['idle_s']} s"
                     for worker, load in summary["workers"].items())
    print(f"{args.run_dir}: {summary['wall_s']} s wall, {summary['tests']} tests, {summary['boots']} boots "
          f"({summary['boot_s']} s); {busy}")
    if summary["cpu"]:
        print(describe_cpu(summary["cpu"]))
    print(f"timeline -> {args.out}, costliest tests and boots -> {args.top}")
    return 0


def _cmd_bench_boot(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.benchmarks import run_boot_benchmark

    run_boot_benchmark(args.qemu, args.accel, args.kernel, args.modules, args.variant, args.boots, Path(args.out),
                       warm_starts=args.warm_starts if args.warm else 0)
    return 0


def _cmd_bench_matrix(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.benchmarks import run_matrix_benchmark

    run_matrix_benchmark(args.qemu, args.accel, args.kernel, args.modules, args.tiers, Path(args.out), args.jobs,
                         args.suites)
    return 0


def _cmd_fuzz(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.errors import UsageError
    from vballoon.fuzz.campaign import run_target, write_junit
    from vballoon.fuzz.harness import FUZZ_DIR
    from vballoon.fuzz.targets import TARGETS

    corpora = Path(args.corpora) if args.corpora else FUZZ_DIR / "corpora"
    if args.target == "merge":
        return _fuzz_merge(args, corpora)
    if args.dirs or args.merge_target:
        raise UsageError("vballoon fuzz: DIR arguments and --target go with 'vballoon fuzz merge DIR... [--target T]'")
    if args.target is None and not args.report:
        raise UsageError(f"vballoon fuzz: name a target ({', '.join(TARGETS)}) or 'all', or pass --report")
    names = list(TARGETS) if args.target in (None, "all") else [args.target.removeprefix("fuzz_")]
    runs = [run_target(name, args.time, args.jobs, args.qemu, Path(args.crashes), corpora, merge=True)
            for name in names]
    if args.report:
        write_junit(runs, Path(args.junit))
        print(f"fuzz report -> {args.junit}")
    return 1 if any(run.findings or run.errors for run in runs) else 0


def _fuzz_merge(args: argparse.Namespace, corpora: Path) -> int:
    from vballoon.errors import UsageError
    from vballoon.fuzz.merge import merge

    if not args.dirs:
        raise UsageError("vballoon fuzz merge: name at least one DIR (a fuzz/ directory of another worker or machine)")
    merge([Path(d) for d in args.dirs], args.merge_target, corpora, Path(args.crashes), args.qemu)
    return 0


def _cmd_reproduce(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.fuzz.reproduce import emit_qtest, replay
    from vballoon.qemu.process import QemuBinary

    qemu = QemuBinary.find(args.qemu)
    outcomes = []
    for name in args.files:
        try:
            if args.emit_qtest:
                print(emit_qtest(Path(name), qemu), end="")
                outcomes.append(0)
                continue
            result = replay(Path(name), qemu)
        except VballoonError as error:
            print(f"vballoon: error: {error}", file=sys.stderr)
            outcomes.append(2)
            continue
        if result.finding is None:
            print(f"{name}: no longer reproduces (target {result.target.name})")
            outcomes.append(0)
            continue
        print(f"{name}: reproduces (target {result.target.name}): {result.finding.kind}: {result.finding.summary}")
        for line in result.finding.differences[1:]:
            print(f"  {line}")
        if result.finding.sanitizer_report:
            print("QEMU's sanitizer report:\n" + result.finding.sanitizer_report)
        elif result.finding.stderr_tail:
            print("QEMU stderr tail:\n" + result.finding.stderr_tail)
        outcomes.append(1)
    return 1 if 1 in outcomes else max(outcomes, default=0)


def _cmd_bench_fuzz(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.benchmarks import run_fuzz_benchmark

    run_fuzz_benchmark(args.qemu, args.time, Path(args.out))
    return 0


def _cmd_bench_balloon(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.benchmarks import run_balloon_benchmark

    run_balloon_benchmark(args.qemu, args.accel, args.kernel, args.modules, args.variant, tuple(args.sizes),
                          args.repeats, Path(args.out))
    return 0


def _cmd_bench_qtest(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.benchmarks import run_qtest_benchmark

    run_qtest_benchmark(args.qemu, args.operations, args.device_tests, Path(args.out))
    return 0


def _cmd_upstream_fetch(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.upstream import fetch, format_options

    entries = fetch(only=args.only, qemu_version=args.qemu_version, kernel_package=args.kernel_package)
    print(format_options(entries, args.format))
    return 0


def _cmd_bench_qemu_coverage(args: argparse.Namespace, rest: list[str]) -> int:
    import shlex

    from vballoon.qemu_coverage import run_qemu_coverage

    summary = run_qemu_coverage(Path(args.source) if args.source else None, Path(args.out),
                                tuple(shlex.split(args.pytest_args)))
    for stage in summary["stages"]:
        figures = "; ".join(f"{name}: lines {value['lines']['percent']}%, branches {value['branches']['percent']}%"
                            for name, value in stage.items() if name.startswith("hw/"))
        print(f"after {stage['stage']} ({stage['tests']} tests, {stage['failures'] + stage['errors']} failed, "
              f"{stage['seconds']} s): {figures}")
    print(f"reports: {args.out}/qemu-coverage/index.html, {args.out}/qemu-coverage.json, "
          f"{args.out}/qemu-coverage-uncovered.md")
    return int(any(stage["failures"] + stage["errors"] for stage in summary["stages"]))


def _cmd_qemu_build(args: argparse.Namespace, rest: list[str]) -> int:
    from vballoon.qemu_build import build_flavour

    print(build_flavour(args.flavour, Path(args.source) if args.source else None).binary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vballoon", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the conformance suites (pytest options pass through)",
                              add_help=False)
    run.set_defaults(handler=_cmd_run)

    image = commands.add_parser("image", help="the guest image").add_subparsers(dest="action", required=True)
    clean = image.add_parser("clean", help="delete the guests saved for warm starts (the images stay)")
    clean.set_defaults(handler=_cmd_image_clean)
    build = image.add_parser("build", help="build (or find in the cache) the guest image")
    build.add_argument("--kernel-package", default="linux-image-cloud-amd64",
                       help="Debian kernel metapackage (linux-image-amd64 has CONFIG_PAGE_POISONING)")
    build.add_argument("--kernel", help="your bzImage instead of a Debian kernel")
    build.add_argument("--modules", help="modules_install tree or folder of .ko files")
    build.set_defaults(handler=_cmd_image_build)

    upstream = commands.add_parser("upstream", help="Debian 13's QEMU and kernel in the cache")
    upstream_fetch = upstream.add_subparsers(dest="action", required=True).add_parser(
        "fetch", help="fetch trixie's QEMU (built from source) and kernel with a private APT state; "
                      "print the options that test them (progress goes to stderr)")
    upstream_fetch.add_argument("--only", choices=("qemu", "kernel"), help="fetch one of the two")
    upstream_fetch.add_argument("--qemu-version", help="a trixie version of the qemu source package (default: the "
                                                       "newest); with --only qemu a cached one needs no apt-get update")
    upstream_fetch.add_argument("--kernel-package", default="linux-image-cloud-amd64",
                                help="trixie kernel metapackage (linux-image-amd64 has CONFIG_PAGE_POISONING)")
    upstream_fetch.add_argument("--format", choices=("options", "env"), default="options",
                                help="--qemu P --kernel P --modules P, or VBALLOON_QEMU=P lines")
    upstream_fetch.set_defaults(handler=_cmd_upstream_fetch)

    qemu = commands.add_parser("qemu", help="flavoured QEMU builds").add_subparsers(dest="action", required=True)
    qemu_build = qemu.add_parser("build", help="build qemu-system-x86_64 with sanitizers or coverage (cached); "
                                               "print its path (progress goes to stderr)")
    qemu_build.add_argument("--flavour", required=True, choices=("asan", "gcov"),
                            help="asan: AddressSanitizer and UBSan; gcov: line and branch coverage")
    qemu_build.add_argument("--source", help="a QEMU source tree, built out of tree (default: Debian's source of "
                                             "the installed qemu-system-x86)")
    qemu_build.set_defaults(handler=_cmd_qemu_build)

    report = commands.add_parser("report", help="reports").add_subparsers(dest="action", required=True)
    requirements = report.add_parser("requirements", help="requirement coverage, written to reports/requirements.md; "
                                                          "with --junit also the requirement x variant matrix")
    requirements.add_argument("--junit", nargs="+", metavar="FILE",
                              help="JUnit XML of a run (merged, or its shards), to show each test's latest result")
    requirements.add_argument("--out", default="reports/requirements.md")
    requirements.add_argument("--matrix-out", default="reports/requirements-matrix.md",
                              help="where the requirement x variant matrix goes (written with --junit)")
    requirements.add_argument("--roots", nargs="*", default=["suites"], help="test trees to scan for req marks")
    requirements.set_defaults(handler=_cmd_report_requirements)
    costs = report.add_parser("costs", help="the seconds each shard unit took in a run's JUnit files: the cost "
                                            "table --shard balances with")
    costs.add_argument("files", nargs="+", metavar="JUNIT", help="JUnit files of a run, e.g. reports/junit-shard-*.xml")
    costs.add_argument("--out", required=True, help="the cost table to write, e.g. vballoon/data/variant-cost.toml")
    costs.set_defaults(handler=_cmd_report_costs)
    merge = report.add_parser("merge", help="merge the JUnit files of a run's shards into one; exit 1 when a test "
                                            "is in two files or a shard is missing")
    merge.add_argument("files", nargs="+", metavar="FILE", help="JUnit files, e.g. reports/junit-shard-*.xml")
    merge.add_argument("-o", "--out", required=True, help="the merged JUnit file, e.g. reports/junit.xml")
    merge.set_defaults(handler=_cmd_report_merge)
    timeline = report.add_parser("timeline", help="a run's timeline: one lane per xdist worker, written to "
                                                  "reports/timeline.svg and reports/timeline-top.md")
    timeline.add_argument("run_dir", nargs="?", default="reports/timeline/latest", metavar="RUN_DIR",
                          help="a run's timeline dir (default: the last pytest run's, reports/timeline/latest)")
    timeline.add_argument("--out", default="reports/timeline.svg")
    timeline.add_argument("--top", default="reports/timeline-top.md",
                          help="where the 15 costliest tests and boots are written")
    timeline.set_defaults(handler=_cmd_report_timeline)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="action", required=True)
    boot = bench.add_parser("boot", help="boot-to-SSH time and QEMU RSS, written to reports/bench-boot.json")
    _add_target_options(boot)
    boot.add_argument("--variant", default="pci-modern")
    boot.add_argument("--boots", type=positive_int, default=5)
    boot.add_argument("--warm", action="store_true", help="also start guests warm from a snapshot the first boot saves")
    boot.add_argument("--warm-starts", type=positive_int, default=10, help="how many warm starts --warm times")
    boot.add_argument("--out", default="reports/bench-boot.json")
    boot.set_defaults(handler=_cmd_bench_boot)
    balloon = bench.add_parser("balloon", help="inflate/deflate MiB/s and p50/p95 latency from QMP balloon to "
                                               "actual, written to reports/bench-balloon.json")
    _add_target_options(balloon)
    balloon.add_argument("--variant", default="pci-modern")
    balloon.add_argument("--sizes", type=positive_int, nargs="+", default=[16, 64, 256], metavar="MIB")
    balloon.add_argument("--repeats", type=positive_int, default=10)
    balloon.add_argument("--out", default="reports/bench-balloon.json")
    balloon.set_defaults(handler=_cmd_bench_balloon)
    qtest = bench.add_parser("qtest", help="qtest transport operations per second, written to reports/bench-qtest.json")
    qtest.add_argument("--qemu", help="qemu-system-x86_64 to test (default: the one on PATH)")
    qtest.add_argument("--operations", type=positive_int, default=5000)
    qtest.add_argument("--device-tests", type=positive_int, default=5)
    qtest.add_argument("--out", default="reports/bench-qtest.json")
    qtest.set_defaults(handler=_cmd_bench_qtest)
    bench_fuzz = bench.add_parser("fuzz", help="exec/s of every fuzz target, written to reports/bench-fuzz.json")
    bench_fuzz.add_argument("--qemu", help="qemu-system-x86_64 for the differential target (default: on PATH)")
    bench_fuzz.add_argument("--time", type=positive_int, default=20, help="seconds per target")
    bench_fuzz.add_argument("--out", default="reports/bench-fuzz.json")
    bench_fuzz.set_defaults(handler=_cmd_bench_fuzz)

    fuzz = commands.add_parser("fuzz", help="run fuzz targets (fuzz/fuzz_*.py); findings go to fuzz/crashes/; "
                                            "'fuzz merge DIR...' merges other workers' corpora and findings")
    fuzz.add_argument("target", nargs="?", help="stats, pfn, hint, report, config, scenario, qemu_differential "
                                                "or all; or merge")
    fuzz.add_argument("dirs", nargs="*", metavar="DIR",
                      help="with merge: fuzz/ directories of other workers or machines (corpora/<target>/, "
                           "crashes/<target>/)")
    fuzz.add_argument("--target", dest="merge_target", metavar="T", help="with merge: only this target")
    fuzz.add_argument("--corpora", help="seeds per target, where new inputs that add coverage are merged "
                                        "(default: fuzz/corpora)")
    fuzz.add_argument("--time", type=positive_int, default=60, help="seconds per target")
    fuzz.add_argument("--jobs", type=positive_int, default=1, help="fuzzing processes per target")
    fuzz.add_argument("--qemu", help="qemu-system-x86_64 for the differential target (default: on PATH)")
    fuzz.add_argument("--crashes", default="fuzz/crashes", help="where findings are saved, per target")
    fuzz.add_argument("--report", action="store_true", help="write a JUnit report (every target unless one is named)")
    fuzz.add_argument("--junit", default="reports/fuzz-junit.xml", help="where --report writes")
    fuzz.set_defaults(handler=_cmd_fuzz)

    reproduce = commands.add_parser("reproduce", help="replay saved fuzz inputs: exit 1 if a finding reproduces")
    reproduce.add_argument("files", nargs="+", metavar="FILE", help="crash files or seeds")
    reproduce.add_argument("--qemu", help="qemu-system-x86_64 to replay on (default: the one on PATH)")
    reproduce.add_argument("--emit-qtest", action="store_true",
                           help="print the QEMU command line and qtest lines for `qemu-system-x86_64 ... -qtest stdio`")
    reproduce.set_defaults(handler=_cmd_reproduce)
    qemu_coverage = bench.add_parser("qemu-coverage", help="QEMU's line and branch coverage of virtio-balloon.c "
                                                           "under the device suite and the corpus replay (gcov build)")
    qemu_coverage.add_argument("--source", help="a QEMU source tree (default: Debian's source of the installed "
                                                "qemu-system-x86)")
    qemu_coverage.add_argument("--out", default="reports", help="where qemu-coverage/, qemu-coverage.json and "
                                                               "qemu-coverage-uncovered.md go")
    qemu_coverage.add_argument("--pytest-args", default="", help="more pytest options for each stage, e.g. '-k inflate'")
    qemu_coverage.set_defaults(handler=_cmd_bench_qemu_coverage)
    matrix = bench.add_parser("matrix", help="wall time of the conformance suites per tier and per variant, "
                                             "written to reports/bench-matrix.json")
    _add_target_options(matrix)
    matrix.add_argument("--tiers", nargs="+", default=["quick", "standard"], choices=("quick", "standard", "full"))
    matrix.add_argument("--jobs", type=worker_count, default="auto",
                        help="pytest-xdist workers, a number or auto (default: one more than the CPUs, as make "
                             "conformance uses)")
    matrix.add_argument("--suites", default="suites",
                        help="what pytest runs (default: every suite, as make conformance; e.g. suites/guest)")
    matrix.add_argument("--out", default="reports/bench-matrix.json")
    matrix.set_defaults(handler=_cmd_bench_matrix)
    return parser


@contextlib.contextmanager
def _progress_to_stderr() -> Iterator[None]:
    """While a command runs, INFO messages of the `vballoon` loggers are printed to stderr as they are."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("vballoon")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # `vballoon run` is pytest: the plugin (conftest.py) shows the messages with the tests.
    progress = contextlib.nullcontext() if args.command == "run" else _progress_to_stderr()
    try:
        with progress:
            return int(args.handler(args, rest))
    except VballoonError as error:
        print(f"vballoon: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vballoon: interrupted; QEMU processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
