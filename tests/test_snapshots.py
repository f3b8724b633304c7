"""Warm starts: what keys a snapshot, the cache's bound, and real guests saved, loaded and refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest

from vballoon.matrix import Variant
from vballoon.qemu.machine import Machine, MachineSpec
from vballoon.qemu.snapshots import SUFFIX, SnapshotCache
from vballoon.session import Session



@pytest.fixture
def spec(session: Session, tmp_path: Path) -> MachineSpec:
    variant = Variant.from_name("pci-modern")
    image = session.image_for(variant)
    return MachineSpec(variant, image, session.qemu, session.accel(image).accel, tmp_path / "logs")


def test_key_ignores_ports_and_log_paths_but_not_what_shapes_the_guest(spec: MachineSpec, tmp_path: Path) -> None:
    """Same guest, other log dir: same key; other RAM size, extra argument, boot path (PVH or bzImage), variant,
    image or QEMU: another."""
    cache = SnapshotCache(tmp_path / "cache")
    key = cache.key(spec)
    assert cache.key(dataclasses.replace(spec, log_dir=tmp_path / "elsewhere")).digest == key.digest
    for changed in (dataclasses.replace(spec, memory_mib=256), dataclasses.replace(spec, extra_args=("-S",)),
                    dataclasses.replace(spec, pvh=False), dataclasses.replace(spec, variant=Variant.from_name("pci-legacy")),
                    dataclasses.replace(spec, image=dataclasses.replace(spec.image, key="another-image"))):
        assert cache.key(changed).digest != key.digest, f"expected a new key for {changed}"
    copy = tmp_path / "qemu-copy"
    copy.write_bytes(spec.qemu.path.read_bytes() + b"\0")
    other_qemu = dataclasses.replace(spec, qemu=dataclasses.replace(spec.qemu, path=copy))
    assert cache.key(other_qemu).changed_inputs(key) == ["qemu"]


def test_a_missing_snapshot_names_the_input_that_changed(spec: MachineSpec, tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    key = cache.key(spec)
    assert cache.why_missing(key) == "no snapshot of pci-modern yet"
    cache.directory.mkdir()
    bigger = cache.key(dataclasses.replace(spec, memory_mib=1024))
    cache.path(bigger).with_suffix(".json").write_text(json.dumps(bigger.inputs))
    assert cache.why_missing(key) == "the snapshot of pci-modern was saved with another command line"


def test_the_cache_keeps_within_its_cap_dropping_the_least_recently_used(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache", cap_bytes=3 << 20)
    cache.directory.mkdir()
    for age, name in enumerate(("old", "middle", "new")):
        snapshot = cache.directory / f"{name}{SUFFIX}"
        snapshot.write_bytes(b"\0" * (3 << 19))  # 1.5 MiB each
        os.utime(snapshot, (1_000_000 + age, 1_000_000 + age))
    cache.trim()
    assert [p.name for p in cache.snapshots()] == [f"middle{SUFFIX}", f"new{SUFFIX}"]
    assert cache.clean() == 3 << 20 and not cache.directory.exists()


def test_a_guest_starts_warm_from_the_snapshot_its_first_boot_saved(spec: MachineSpec, tmp_path: Path) -> None:
    """A booted guest that saved itself is what a later start loads: a file written before the save is there, SSH
    is up, the balloon is empty and its driver works (an inflate reaches its target); with no snapshot the start
    boots and saves one. Broken once: without `cont` after the load, SSH never answers and the start fails."""
    cache = SnapshotCache(tmp_path / "cache")
    marker = os.urandom(8).hex()
    with Machine(spec) as booted:
        booted.ssh.run(f"echo {marker} > /run/vballoon-marker")
        cache.save(booted, cache.key(spec))
        assert booted.ssh.output("cat /run/vballoon-marker").strip() == marker, "the saved guest goes on"
    warm = cache.start(dataclasses.replace(spec, log_dir=tmp_path / "warm"))
    try:
        assert warm.warm, "expected a warm start from the saved guest"
        got = warm.ssh.output("cat /run/vballoon-marker 2>&1").strip()
        assert got == marker, f"expected the saved guest's file holding {marker}, got {got!r}"
        full = spec.memory_mib << 20
        assert warm.host_balloon.query_balloon() == full, "expected the saved guest's balloon to be empty"
        warm.host_balloon.reach_target(full - (64 << 20))
        warm.assert_healthy()
    finally:
        warm.stop()
    cache.clean()
    booted_and_saved = cache.start(dataclasses.replace(spec, log_dir=tmp_path / "cold"))
    booted_and_saved.stop()
    assert not booted_and_saved.warm and len(cache.snapshots()) == 1, "expected a boot that saved a snapshot"


def test_a_snapshot_that_does_not_load_is_dropped_and_the_guest_boots(spec: MachineSpec, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A truncated snapshot: QEMU refuses it, the guest boots cold, one warning says why, a good one replaces it;
    the refused attempt's logs are set aside, not mixed with the boot's."""
    cache = SnapshotCache(tmp_path / "cache")
    cache.start(spec).stop()
    (snapshot,) = cache.snapshots()
    snapshot.write_bytes(snapshot.read_bytes()[: 1 << 20])
    log_dir = tmp_path / "retry"
    with caplog.at_level(logging.WARNING, logger="vballoon"):
        machine = cache.start(dataclasses.replace(spec, log_dir=log_dir))
    try:
        assert not machine.warm
        machine.assert_healthy()
    finally:
        machine.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "warm start of pci-modern failed" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert (log_dir / "qemu-stderr-warm-start-failed.log").exists()
    assert snapshot.stat().st_size > 1 << 20, "expected the boot to save a whole snapshot again"


def test_a_warm_machine_loads_only_as_a_warm_start(spec: MachineSpec, tmp_path: Path) -> None:
    """A migration destination built from a warm guest's spec waits for its stream, not the snapshot."""
    warm = dataclasses.replace(spec, snapshot=tmp_path / "saved")
    assert Machine(warm).warm
    assert not Machine(dataclasses.replace(warm, incoming="defer")).warm
