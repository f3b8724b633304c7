"""Benchmarks: boot-to-SSH time and QEMU's memory after boot.

Speed targets are checked here, not in timed tests: the numbers go to
reports/bench-*.json with the QEMU, kernel and accelerator they were measured on.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from vballoon.errors import VballoonError
from vballoon.matrix import Variant
from vballoon.qemu.machine import Machine, MachineSpec
from vballoon.qemu.process import QemuBinary
from vballoon.qemu.snapshots import SnapshotCache
from vballoon.session import Session

BOOT_TARGET_S = 5.0  # issue target: median boot-to-SSH under TCG on a 2-core host
WARM_TARGET_S = 1.0  # issue target: median warm start (snapshot load) to SSH under TCG


def process_rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/smaps_rollup."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Rss line")


def run_boot_benchmark(qemu: str | None, accel: str, kernel: str | None, modules: str | None,
                       variant_name: str, boots: int, out: Path, warm_starts: int = 0) -> dict[str, object]:
    """Boot `boots` guests one after another, then (with `warm_starts`) start that many warm from a snapshot the
    first boot saved in a cache of the benchmark's own; record seconds to SSH and QEMU RSS of each."""
    session = Session.from_options(qemu, accel, kernel, modules, warm=False)
    variant = Variant.from_name(variant_name)
    image = session.image_for(variant)
    choice = session.accel(image)
    with tempfile.TemporaryDirectory(prefix="vballoon-bench-") as work:
        snapshots = SnapshotCache(Path(work) / "snapshots")

        def timed_start(number: int, warm: bool) -> tuple[float, float]:
            spec = MachineSpec(variant, image, session.qemu, choice.accel, Path(work) / f"logs-{number}")
            started = time.monotonic()
            machine = snapshots.start(spec) if warm else Machine(spec)
            try:
                if not warm:
                    machine.start()
                elapsed = time.monotonic() - started
                if warm and not machine.warm:
                    raise VballoonError(f"--warm: the guest of {variant.name} booted cold; see {spec.log_dir}")
                machine.ssh.output("true")
                rss = process_rss_kib(machine.pid) / 1024
            finally:
                machine.stop()
            kind = "warm start" if warm else "boot"
            print(f"{kind} {number}: SSH after {elapsed:.2f} s, QEMU RSS {rss:.0f} MiB")
            return round(elapsed, 3), round(rss, 1)

        cold = [timed_start(number, warm=False) for number in range(1, boots + 1)]
        warm: list[tuple[float, float]] = []
        if warm_starts:
            snapshots.start(MachineSpec(variant, image, session.qemu, choice.accel, Path(work) / "logs-save")).stop()
            warm = [timed_start(number, warm=True) for number in range(1, warm_starts + 1)]
    result: dict[str, object] = {
        "benchmark": "boot-to-ssh",
        "qemu": session.qemu.version_text,
        "kernel": image.kernel_version,
        "accelerator": choice.accel,
        "variant": variant.name,
        **figures("", cold, BOOT_TARGET_S),
    }
    if warm:
        result.update(figures("warm_", warm, WARM_TARGET_S))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median boot-to-SSH {result['median_s']} s (target {BOOT_TARGET_S} s), "
          f"spread {result['min_s']}-{result['max_s']} s, median QEMU RSS {result['median_rss_mib']} MiB -> {out}")
    if warm:
        print(f"median warm start to SSH {result['warm_median_s']} s (target {WARM_TARGET_S} s), "
              f"spread {result['warm_min_s']}-{result['warm_max_s']} s, against {result['median_s']} s cold")
    return result


def figures(prefix: str, runs: list[tuple[float, float]], target: float) -> dict[str, object]:
    """Seconds and RSS of `runs` ((seconds, RSS MiB) each): every value, median, spread, and the target's verdict."""
    seconds, rss_mib = [s for s, _ in runs], [r for _, r in runs]
    return {
        f"{prefix}boot_seconds": seconds,
        f"{prefix}median_s": round(statistics.median(seconds), 3),
        f"{prefix}min_s": min(seconds),
        f"{prefix}max_s": max(seconds),
        f"{prefix}stdev_s": round(statistics.stdev(seconds), 3) if len(seconds) > 1 else 0.0,
        f"{prefix}qemu_rss_mib": rss_mib,
        f"{prefix}median_rss_mib": round(statistics.median(rss_mib), 1),
        f"{prefix}target_median_s": target,
        f"{prefix}meets_target": statistics.median(seconds) <= target,
    }


# Pytest seconds of a whole tier (suites/device, suites/guest, suites/migration) on 2 workers under TCG, as a QEMU
# developer runs it on every patch: the quick tier within 4 minutes, the standard tier within 10.
MATRIX_TARGETS_S = {"quick": 240.0, "standard": 600.0}


def junit_matrix_summary(junit: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Outcome counts and seconds per variant (setup, call and teardown: boot included) from a JUnit file."""
    import xml.etree.ElementTree as ElementTree

    per_variant: dict[str, float] = {}
    outcomes = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        variant = next((prop.get("value") for prop in case.iter("property") if prop.get("name") == "variant"), None)
        if variant:
            per_variant[variant] = round(per_variant.get(variant, 0.0) + float(case.get("time", 0)), 2)
        kinds = {child.tag for child in case}
        skipped = case.find("skipped")
        if "failure" in kinds or "error" in kinds:
            outcomes["failed"] += 1
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            outcomes["xfailed"] += 1
        elif skipped is not None:
            outcomes["skipped"] += 1
        else:
            outcomes["passed"] += 1
    return outcomes, per_variant


def run_matrix_benchmark(qemu: str | None, accel: str, kernel: str | None, modules: str | None, tiers: list[str],
                         out: Path, jobs: str, suites: str = "suites") -> dict[str, object]:
    """Run `suites` (every suite by default) over each tier on `jobs` xdist workers (a number, or auto: one more than
    the CPUs), as `make conformance` does (one variant's tests stay on one worker); record wall time, the workers
    that ran, per-variant cost (boot + tests, summed over workers) and the
    timeline's summary (each worker's busy and idle seconds, the costliest tests and boots; the run's timeline
    stays in reports/timeline/matrix-<tier> for `vballoon report timeline`).

    Tiers not run this time keep their earlier entry in `out`.
    """
    import subprocess
    import sys

    from vballoon.timeline import describe_cpu, read_run, summarise

    result: dict[str, object] = json.loads(out.read_text()) if out.exists() else {}
    result.update({"benchmark": "conformance-matrix", "accelerator": accel})
    result.pop("suites", None)
    recorded: dict[str, object] = dict(result.get("tiers", {}))  # type: ignore[call-overload]
    for tier_name in tiers:
        junit = out.parent / f"bench-matrix-{tier_name}.xml"
        timeline_dir = out.parent / "timeline" / f"matrix-{tier_name}"
        args = [sys.executable, "-m", "pytest", suites, "-q", "-p", "no:cacheprovider", f"--matrix={tier_name}",
                f"--accel={accel}", f"--junitxml={junit}", f"--timeline-dir={timeline_dir}"]
        if jobs != "1":
            args += ["-n", jobs, "--dist", "loadgroup"]
        targets = (("qemu", qemu), ("kernel", kernel), ("modules", modules))
        args += [f"--{name}={value}" for name, value in targets if value]
        started = time.monotonic()
        completed = subprocess.run(args)
        wall = time.monotonic() - started
        outcomes, per_variant = junit_matrix_summary(junit)
        target = MATRIX_TARGETS_S.get(tier_name)
        summary = summarise(read_run(timeline_dir))
        recorded[tier_name] = {
            "suites": suites, "wall_s": round(wall, 1), "workers": len(summary["workers"]), "target_s": target,
            "meets_target": target is None or wall <= target,
            "pytest_exit": completed.returncode, "outcomes": outcomes, "per_variant_s": per_variant,
            "timeline": summary,
        }
        print(f"{tier_name}: {wall:.0f} s wall (target {target} s), {outcomes}")
        if summary["cpu"]:
            print(f"{tier_name}: {describe_cpu(summary['cpu'])}")
    result["tiers"] = recorded
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


MIGRATION_BENCH = "bench-migration.json"


def record_migration_benchmark(reports: Path, entry: dict[str, object]) -> Path:
    """Add or replace one named measurement in reports/bench-migration.json (keyed by `entry["name"]`)."""
    out = reports / MIGRATION_BENCH
    results: dict[str, object] = json.loads(out.read_text()) if out.is_file() else {}
    results[str(entry["name"])] = {**entry, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return out


FUZZ_REFERENCE_TARGET = 10_000  # issue target: exec/s per core of a reference-only target
FUZZ_QEMU_TARGET = 300  # issue target: exec/s of the QEMU differential target


def run_fuzz_benchmark(qemu: str | None, seconds: int, out: Path) -> dict[str, object]:
    """Fuzz every target for `seconds` on one core each (seeds only, findings to a scratch dir); record exec/s."""
    from vballoon.fuzz.campaign import run_target
    from vballoon.fuzz.harness import FUZZ_DIR
    from vballoon.fuzz.targets import TARGETS

    binary = QemuBinary.find(qemu)
    targets: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="vballoon-bench-fuzz-") as scratch:
        for name, target in TARGETS.items():
            run = run_target(name, seconds, 1, str(binary.path), Path(scratch), FUZZ_DIR / "corpora")
            wanted = FUZZ_QEMU_TARGET if target.on_qemu else FUZZ_REFERENCE_TARGET
            targets[name] = {"exec_per_s": round(run.exec_per_s), "executions": run.executions,
                             "coverage": run.coverage, "findings": len(run.findings), "target_exec_per_s": wanted,
                             "meets_target": run.exec_per_s >= wanted}
    result: dict[str, object] = {"benchmark": "fuzz-exec-per-second", "qemu": binary.version_text,
                                 "seconds_per_target": seconds, "cpus": os.cpu_count(),
                                 "load_average_1m": os.getloadavg()[0], "targets": targets}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, numbers in targets.items():
        print(f"fuzz_{name}: {numbers['exec_per_s']} exec/s (target {numbers['target_exec_per_s']})")  # type: ignore[index]
    print(f"-> {out}")
    return result


QTEST_SCRATCH = 0x200000  # guest RAM the qtest benchmark writes; nothing else uses it


def _rate(operations: int, seconds: float) -> float:
    return round(operations / seconds, 1)


def run_qtest_benchmark(qemu: str | None, operations: int, device_tests: int, out: Path) -> dict[str, object]:
    """Operations per second of the qtest transport: unbatched round trips, pipelined writes, bulk memory, and
    the wall time of a whole device test (start QEMU, negotiate, inflate, a stats buffer, stop)."""
    from vballoon.qemu.qtest_machine import STATSQ, QtestBalloon, QtestMachine
    from vballoon.spec import PAGE_SIZE, PFN_SHIFT, Feature, encode_stats, feature_mask

    qemu_binary = QemuBinary.find(qemu)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vballoon-bench-") as logs:
        with QtestMachine(qemu_binary, Variant(), Path(logs)) as machine:
            qtest = machine.qtest
            started = time.monotonic()
            for i in range(operations):
                qtest.writel(QTEST_SCRATCH, i)
                qtest.readl(QTEST_SCRATCH)
            rates["writel_readl_round_trips_per_s"] = _rate(2 * operations, time.monotonic() - started)
            started = time.monotonic()
            with qtest.pipeline():
                for i in range(operations):
                    qtest.writel(QTEST_SCRATCH + 4 * (i % 1024), i)
            rates["pipelined_writel_per_s"] = _rate(operations, time.monotonic() - started)
            started = time.monotonic()
            for _ in range(operations // 10):
                qtest.read(QTEST_SCRATCH, PAGE_SIZE)
            rates["page_reads_per_s"] = _rate(operations // 10, time.monotonic() - started)
    device_seconds: list[float] = []
    for _ in range(device_tests):
        with tempfile.TemporaryDirectory(prefix="vballoon-bench-") as logs:
            started = time.monotonic()
            with QtestMachine(qemu_binary, Variant(), Path(logs)) as machine:
                balloon = QtestBalloon(machine, legacy_interface=False)
                balloon.start(feature_mask(Feature.STATS_VQ, Feature.VERSION_1))
                pages = [balloon.new_page(0xAA) >> PFN_SHIFT for _ in range(4)]
                balloon.inflate(pages)
                balloon.deflate(pages)
                balloon.post(STATSQ, [encode_stats([(4, 1)])])
                balloon.guest_stats()
            device_seconds.append(round(time.monotonic() - started, 3))
    result: dict[str, object] = {
        "benchmark": "qtest-transport",
        "qemu": qemu_binary.version_text,
        "operations": operations,
        **rates,
        "device_test_seconds": device_seconds,
        "device_test_median_s": statistics.median(device_seconds),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"round trips {rates['writel_readl_round_trips_per_s']}/s, pipelined writes "
          f"{rates['pipelined_writel_per_s']}/s, 4 KiB reads {rates['page_reads_per_s']}/s, device test median "
          f"{result['device_test_median_s']} s -> {out}")
    return result



def run_balloon_benchmark(qemu: str | None, accel: str, kernel: str | None, modules: str | None,
                          variant_name: str, sizes_mib: tuple[int, ...], repeats: int, out: Path) -> dict[str, object]:
    """Inflate and deflate by each size `repeats` times in one guest; MiB/s and p50/p95 latency per size.

    Latency runs from QEMU receiving QMP `balloon` to the driver writing the target into `actual`, on QEMU's
    trace clock (vballoon.guest.response_time).
    """
    from vballoon.guest.response_time import RESPONSE_TRACE_EVENTS, TIMESTAMPED_TRACE_ARGS, percentile, timed_resize

    session = Session.from_options(qemu, accel, kernel, modules)
    variant = Variant.from_name(variant_name)
    image = session.image_for(variant)
    choice = session.accel(image)
    per_size: dict[str, object] = {}
    ram_mib = 0
    with tempfile.TemporaryDirectory(prefix="vballoon-bench-") as logs:
        with Machine(MachineSpec(variant, image, session.qemu, choice.accel, Path(logs),
                                 trace_events=RESPONSE_TRACE_EVENTS, extra_args=TIMESTAMPED_TRACE_ARGS)) as machine:
            ram_mib = machine.memory_mib
            ram = ram_mib << 20
            for size in sizes_mib:
                timings: dict[str, list[float]] = {"inflate": [], "deflate": []}
                for _ in range(repeats):
                    timings["inflate"].append(timed_resize(machine, ram - (size << 20)))
                    timings["deflate"].append(timed_resize(machine, ram))
                entry: dict[str, object] = {}
                for direction, seconds in timings.items():
                    p50 = percentile(seconds, 0.5)
                    entry[direction] = {"seconds": [round(s, 4) for s in seconds], "p50_s": round(p50, 4),
                                        "p95_s": round(percentile(seconds, 0.95), 4),
                                        "mib_per_s_at_p50": round(size / p50, 1)}
                per_size[f"{size}MiB"] = entry
                print(f"{size} MiB: inflate p50 {entry['inflate']['p50_s']} s "  # type: ignore[index]
                      f"({entry['inflate']['mib_per_s_at_p50']} MiB/s), deflate p50 "  # type: ignore[index]
                      f"{entry['deflate']['p50_s']} s ({entry['deflate']['mib_per_s_at_p50']} MiB/s)")  # type: ignore[index]
    result: dict[str, object] = {
        "benchmark": "balloon-response", "qemu": session.qemu.version_text, "kernel": image.kernel_version,
        "accelerator": choice.accel, "variant": variant.name, "guest_ram_mib": ram_mib, "repeats": repeats,
        "sizes": per_size,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result
