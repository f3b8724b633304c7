"""Inflate and deflate through QMP in a real guest: actual follows the target, events, vmstat, MemTotal, host RSS."""

from __future__ import annotations

import itertools
import random
import re
import zlib

import pytest

from fixtures.qtest_device import expect_conformance
from vballoon.qemu.host_memory import qemu_memory_bytes
from vballoon.guest.memhog import run_hog, start_hog
from vballoon.guest.pfn_trace import TRACE_EVENTS, PfnMessage, inflate_queue, pfn_messages, replay
from vballoon.guest.procfs import read_guest_memory
from vballoon.matrix import Variant
from vballoon.qemu.balloon import MIB
from vballoon.qemu.hmp import trace_events_on
from vballoon.qemu.machine import Machine
from vballoon.session import Session
from vballoon.spec import PAGE_SIZE, Feature
from vballoon.waiting import wait_for

FRACTIONS_OF_RAM = (3 / 4, 1 / 2, 5 / 8, 3 / 8, 1)  # evict, evict more, enlarge, evict, enlarge to full
RANDOM_WALK_STEPS = 50
EVENT_DEADLINE_S = 10.0  # BALLOON_CHANGE is rate-limited to one a second; the last value comes after at most 1 s
RSS_FALL_FRACTION = 0.8
RSS_DEADLINE_S = 30.0
# Inflate 64 MiB, deflate 32, inflate 16, deflate the rest: MiB of the balloon after each step.
TRACED_STEPS_MIB = (64, 32, 48, 0)
TRACE_DEADLINE_S = 60.0  # QEMU's trace lines reach its stderr file after actual was written; 40k lines under TCG
SET_CONFIG = re.compile(r"virtio_balloon_set_config actual: (\d+) oldactual: (\d+)")


@pytest.fixture
def legacy_variant(variant: Variant) -> Variant:
    """The variant, if its driver uses the legacy interface (requested before the guest, so a skip boots nothing)."""
    if variant.transport != "legacy":
        pytest.skip("BAL-DRV-LEG-ACT binds the legacy interface; this variant's driver uses the modern one")
    return variant


@pytest.fixture
def small_host_pages(variant: Variant) -> Variant:
    if variant.backend == "hugetlb":
        pytest.skip("QEMU 7.2 and 10.0 discard a 2 MiB host page only when one inflate element names all 512 of its "
                    "4 KiB pages (balloon_inflate_page, PartiallyBalloonedPage reset per element in "
                    "virtio_balloon_handle_output); Linux sends 256 PFNs per element, so nothing is discarded")
    return variant


def ram_bytes(vm: Machine) -> int:
    return vm.memory_mib * MIB


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OP-2", "BAL-DRV-ACT-1", "BAL-LEG-USED")
def test_targets_reached_with_events_vmstat_and_memtotal(shared_vm: Machine, variant: Variant) -> None:
    """Each target is reached, announced by BALLOON_CHANGE, counted page by page in vmstat; MemTotal
    shrinks by the balloon without DEFLATE_ON_OOM and stays put with it."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    for fraction in FRACTIONS_OF_RAM:
        target = int(ram * fraction) // PAGE_SIZE * PAGE_SIZE
        before_actual, before = vm.host_balloon.query_balloon(), read_guest_memory(vm.ssh)
        vm.qmp.take_events("BALLOON_CHANGE")
        vm.host_balloon.reach_target(target)
        vm.qmp.wait_event("BALLOON_CHANGE", EVENT_DEADLINE_S, lambda e, wanted=target: e["data"]["actual"] == wanted)
        after = read_guest_memory(vm.ssh)
        pages = (before_actual - target) // PAGE_SIZE
        inflated = after.vmstat["balloon_inflate"] - before.vmstat["balloon_inflate"]
        deflated = after.vmstat["balloon_deflate"] - before.vmstat["balloon_deflate"]
        assert (inflated, deflated) == (max(pages, 0), max(-pages, 0)), (
            f"BAL-DRV-OP-1/BAL-DRV-OP-2: target {target}: expected vmstat balloon_inflate/deflate to move by "
            f"{(max(pages, 0), max(-pages, 0))} pages, got {(inflated, deflated)}")
        memtotal_change = after.mem("MemTotal") - before.mem("MemTotal")
        expected_change = 0 if variant.deflate_on_oom else target - before_actual
        assert memtotal_change == expected_change, (
            f"BAL-DRV-ACT-1: target {target} (deflate_on_oom={variant.deflate_on_oom}): expected MemTotal to "
            f"change by {expected_change} bytes, got {memtotal_change}")


@pytest.mark.req("BAL-DRV-OP-2", "BAL-DRV-ACT-1")
def test_target_above_ram_is_clamped(shared_vm: Machine) -> None:
    """A target above guest RAM empties the balloon: actual is all of RAM, never more."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    vm.host_balloon.reach_target(ram // 2)
    vm.host_balloon.set_target(2 * ram)
    wait_for(lambda: vm.host_balloon.query_balloon() == ram, 30, "actual to return to all of RAM")
    settled = vm.host_balloon.wait_settled(quiet_s=1.0, timeout=30)
    assert settled == ram, f"BAL-DRV-OP-2: target {2 * ram} above RAM: expected actual {ram}, got {settled}"


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OP-2", "BAL-DRV-ACT-1")
def test_random_walk_of_resizes(shared_vm: Machine, variant: Variant) -> None:
    """50 random targets between half of RAM and all of it are each reached before the deadline."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    seed = zlib.crc32(variant.name.encode())
    walk = random.Random(seed)
    for step in range(RANDOM_WALK_STEPS):
        target = walk.randrange(ram // 2, ram + 1, MIB)
        try:
            vm.host_balloon.reach_target(target)
        except AssertionError as error:
            raise AssertionError(f"random walk seed {seed}, step {step}: {error}") from None


@pytest.mark.req("BAL-DRV-OP-7", "BAL-DRV-OP-1", "BAL-DRV-OP-2")
def test_deflates_name_only_pages_whose_inflate_was_acknowledged(shared_vm: Machine) -> None:
    """QEMU's trace of the balloon queues over four resizes (TRACED_STEPS_MIB), replayed in order: every page QEMU
    is told to deflate was in the balloon, its inflate already processed and its buffer used (acknowledged) before
    the deflate's buffer was popped; the counts match the steps. A driver that deflated a page before the inflate
    naming it was acknowledged would show it deflated outside the balloon (QEMU handles one queue's buffer at a
    time, in the order it pops them). (Broken on purpose: tests/test_pfn_trace.py replays a deflate popped
    before its inflate and an inflate named twice.)"""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    vm.host_balloon.reach_target(ram)
    pages_per_mib = MIB // PAGE_SIZE
    expected = sum(abs(b - a) for a, b in itertools.pairwise((0, *TRACED_STEPS_MIB))) * pages_per_mib
    with trace_events_on(vm, *TRACE_EVENTS) as start:
        for balloon_mib in TRACED_STEPS_MIB:
            vm.host_balloon.reach_target(ram - balloon_mib * MIB)

        def traced() -> list[PfnMessage] | None:
            messages = pfn_messages(vm.stderr_since(start))
            return messages if len(messages) >= expected else None

        messages = wait_for(traced, TRACE_DEADLINE_S, f"QEMU to trace {expected} inflate and deflate PFNs",
                            describe_last=lambda: f"{len(pfn_messages(vm.stderr_since(start)))} traced")
    first_inflate = TRACED_STEPS_MIB[0] * pages_per_mib
    inflate = inflate_queue(messages[:first_inflate])
    balloon: set[int] = set()
    problems = replay(balloon, messages, inflate)
    assert not problems and len(messages) == expected and not balloon, (
        f"BAL-DRV-OP-7: expected {expected} PFNs, each deflate naming a page whose inflate QEMU had acknowledged, "
        f"and an empty balloon at the end; got {len(messages)} PFNs, {len(balloon)} pages left, problems "
        f"{problems[:5]}")


@pytest.mark.req("BAL-DRV-OP-1")
def test_inflate_returns_dirtied_memory_to_the_host(small_host_pages: Variant, shared_vm: Machine) -> None:
    """After the guest dirtied its free memory, an inflate lowers QEMU's RSS by at least 80% of the inflate."""
    if Feature.REPORTING in small_host_pages.accepted_features():
        # Seen on two legacy +fpr variants: RSS fell 64% of the inflate, because reporting had already
        # returned part of the freed memory, which the balloon then took (test_reporting covers reporting).
        pytest.skip("free page reporting is negotiated: it returns the dirtied memory to the host on its own, "
                    "before and while the balloon inflates, so the inflate's share of the RSS fall is unknown")
    vm, ram = shared_vm, ram_bytes(shared_vm)
    available = read_guest_memory(vm.ssh).mem("MemAvailable")
    run_hog(vm.ssh, f"fill --mib {available // MIB - 48}")
    inflate = ram // 2
    rss_before = qemu_memory_bytes(vm.pid)
    vm.host_balloon.reach_target(ram - inflate)
    wanted = rss_before - int(RSS_FALL_FRACTION * inflate)
    wait_for(lambda: qemu_memory_bytes(vm.pid) <= wanted, RSS_DEADLINE_S,
             f"QEMU RSS to fall from {rss_before} to at most {wanted} after a {inflate}-byte inflate "
             "(BAL-DRV-OP-1: inflated pages are given to the host)",
             describe_last=lambda: f"RSS {qemu_memory_bytes(vm.pid)}")


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OP-2", "BAL-DRV-OP-6")
def test_resizes_while_memhog_holds_a_pattern(shared_vm: Machine) -> None:
    """Inflating and deflating around a running memhog never touches its memory: the pattern verifies."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    hog = start_hog(vm.ssh, "fill --mib 64 --seed 11 --hold-forever", "resize")
    hog.wait_line(r"memhog: holding 64 MiB", 60)
    for fraction in (1 / 2, 3 / 4, 3 / 8, 1):
        vm.host_balloon.reach_target(int(ram * fraction) // PAGE_SIZE * PAGE_SIZE)
        verdict = hog.verify_now(60)
        assert verdict.endswith(" ok"), (
            f"BAL-DRV-OP-6: after resizing to {fraction:.3f} of RAM: expected memhog's pattern intact, got {verdict!r}")
    hog.stop()


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OOM-2")
def test_target_below_what_the_guest_can_give(with_deflate_on_oom: Variant, shared_vm: Machine) -> None:
    """Asking for nearly all guest RAM: with DEFLATE_ON_OOM the guest gives what it can and keeps answering SSH.

    Without DEFLATE_ON_OOM the balloon must hold its pages (BAL-DRV-OOM-1): Linux (6.1, 6.12) then inflates until the
    OOM killer has no victim left and panics "System is deadlocked on memory", so those variants skip.
    """
    vm, ram = shared_vm, ram_bytes(shared_vm)
    vm.host_balloon.set_target(MIB)
    held = ram - vm.host_balloon.wait_settled(quiet_s=3.0, timeout=180)
    assert held > ram // 2, f"BAL-DRV-OP-1: target 1 MiB: expected the guest to give most of its RAM, got {held}"
    vm.ssh.run("true", timeout=60)
    vm.host_balloon.reach_target(ram, timeout=120)
    vm.ssh.run("true", timeout=60)


@pytest.mark.req("BAL-DRV-LEG-ACT")
def test_legacy_actual_written_in_one_access(legacy_variant: Variant, shared_vm: Machine, session: Session) -> None:
    """Over legacy virtio-pci, every update of actual reaches QEMU whole: no intermediate value while inflating."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    start = vm.logs.stderr.stat().st_size
    target = ram - 300 * MIB  # actual crosses 0xff00 -> 0x10000 pages: a carry into the third byte
    vm.host_balloon.reach_target(target)
    values = [int(m[1]) for m in SET_CONFIG.finditer(vm.stderr_since(start))]
    backwards = [(a, b) for a, b in zip(values, values[1:], strict=False) if b < a]
    expect_conformance(not backwards, "BAL-DRV-LEG-ACT", session.qemu,
                       f"while inflating to {target} bytes actual went backwards {backwards[:3]} in QEMU's "
                       f"virtio_balloon_set_config trace: it was written in more than one access",
                       vm.image.kernel_version)
