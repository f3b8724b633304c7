"""Inflate and deflate through QMP in a real guest: actual follows the target, events, vmstat, MemTotal, host RSS.

Host memory per guest page comes from QEMU's /proc/PID/pagemap (vballoon.qemu.guest_ram), the
ballooned pages from QEMU's trace of the balloon queues (vballoon.guest.pfn_trace): so the balloon's own share of
QEMU's RSS is known on every variant, free page reporting ones included, whose reports return free memory too.
"""

from __future__ import annotations

import itertools
import random
import re
import time
import zlib

import pytest

from fixtures.qtest_device import expect_conformance
from vballoon.guest.memhog import run_hog, start_hog
from vballoon.guest.pfn_trace import TRACE_EVENTS, PfnMessage, inflate_queue, pfn_messages, replay
from vballoon.guest.procfs import read_guest_memory
from vballoon.matrix import Variant
from vballoon.qemu.balloon import CONVERGE_DEADLINE_S, MIB
from vballoon.qemu.hmp import trace_events_on
from vballoon.qemu.guest_ram import guest_pages_present, pages_back_in_host_memory
from vballoon.qemu.host_memory import qemu_memory_bytes, settled_memory_bytes
from vballoon.qemu.machine import Machine
from vballoon.session import Session
from vballoon.spec import PAGE_SIZE, Feature
from vballoon.waiting import DeadlineExceeded, wait_for

FRACTIONS_OF_RAM = (3 / 4, 1 / 2, 5 / 8, 3 / 8, 1)  # evict, evict more, enlarge, evict, enlarge to full
RANDOM_WALK_STEPS = 50
# Each step of the walk asks for 8-64 MiB (less where half of RAM or all of it is nearer) the other way from the
# resize in flight, once that resize is halfway. Full-range targets (a mean 85 MiB a step, each reached) took 21-26 s
# a variant under TCG (QEMU 7.2 and 10.0); reversing in flight checks more (the driver follows a target that
# changed mid-resize) in 5 s on pci-modern.
WALK_STEP_MIB = (8, 64)
EVENT_DEADLINE_S = 10.0  # BALLOON_CHANGE is rate-limited to one a second; the last value comes after at most 1 s
# QEMU's RSS must fall by 80% of the balloon's share (the ballooned pages that were resident before the inflate):
# measured 1.00 on pci-modern (128 MiB share) and pci-transitional+doom+fph+fpr+iof (9 MiB), 0.97-1.00 of the
# inflate before the share was known; the margin is for memory the guest and QEMU touch meanwhile. Where free page
# reporting left the balloon a share of a few MiB (measured 9 MiB on both quick +fpr variants, fall 8-9 MiB),
# RSS_NOISE more: an idle guest's QEMU moved by up to 1 MiB in 45 s.
RSS_FALL_FRACTION = 0.8
RSS_NOISE = 4 * MIB
RSS_DEADLINE_S = 30.0
SETTLE_QUIET_S = 3.0  # longer than Linux's 2 s PAGE_REPORTING_DELAY: no reporting round pending when quiet
# Without free page reporting nothing gives the freed memory back: QEMU's RSS is settled once the hog has exited,
# and 1 s of samples (0.5 s apart) shows it; the 3 s window cost each of the two tests below 3 s on pci-modern.
SETTLE_QUIET_NO_REPORTING_S = 1.0
INFLATE_FRACTION = 1 / 4  # of RAM, for the RSS tests: 32,768 traced PFNs on a 512 MiB guest
# Deflated pages the guest's hog leaves untouched are among the guest's free pages while it holds: measured 0-32 MiB
# of 128 untouched with 48-94 MiB free (QEMU 7.2 and 10.0, the quick tier's variants and +shm+iof). The 8 MiB more
# is for pages the guest used and freed again, which reporting may discard again (not seen).
REFAULT_SLACK = 8 * MIB
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


def traced_pfns(vm: Machine, start: int, expected: int) -> list[PfnMessage]:
    """The balloon PFNs in QEMU's trace since `start`, once `expected` of them have been written."""
    def traced() -> list[PfnMessage] | None:
        messages = pfn_messages(vm.stderr_since(start))
        return messages if len(messages) >= expected else None

    return wait_for(traced, TRACE_DEADLINE_S, f"QEMU to trace {expected} inflate and deflate PFNs",
                    describe_last=lambda: f"{len(pfn_messages(vm.stderr_since(start)))} traced")


def traced_resize(vm: Machine, target: int, pages: int) -> list[int]:
    """Resize the balloon to `target` bytes of guest memory, moving `pages` pages; their guest page numbers."""
    with trace_events_on(vm, *TRACE_EVENTS) as start:
        vm.host_balloon.reach_target(target)
        return [message.gpa // PAGE_SIZE for message in traced_pfns(vm, start, pages)]


def dirty_free_memory(vm: Machine) -> int:
    """A hog fills all but 48 MiB of the guest's available memory and exits; QEMU's RSS once it has settled
    (free page reporting, where negotiated, has then returned what it reports of the freed memory)."""
    available = read_guest_memory(vm.ssh).mem("MemAvailable")
    run_hog(vm.ssh, f"fill --mib {available // MIB - 48}")
    reporting = Feature.REPORTING in vm.variant.accepted_features()
    quiet = SETTLE_QUIET_S if reporting else SETTLE_QUIET_NO_REPORTING_S
    return settled_memory_bytes(vm.pid, quiet, RSS_DEADLINE_S)


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


def balloon_pages(vm: Machine) -> int:
    """Pages in the guest's balloon by its own count: vmstat balloon_inflate less balloon_deflate."""
    vmstat = read_guest_memory(vm.ssh).vmstat
    return vmstat["balloon_inflate"] - vmstat["balloon_deflate"]


@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OP-2", "BAL-DRV-ACT-1")
def test_random_walk_of_resizes(shared_vm: Machine, variant: Variant) -> None:
    """50 direction changes between half of RAM and all of it, each made while the resize before it is in flight
    (halfway to its target): the driver turns and gets halfway to every new target (WALK_STEP_MIB), reaches the
    last one, and its vmstat balloon count moved by what actual moved.

    Broken on purpose: expecting the vmstat count to move by actual's change plus one page failed on pci-modern."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    balloon = vm.host_balloon
    seed = zlib.crc32(variant.name.encode())
    walk = random.Random(seed)
    low, start, pages_before = ram // 2, balloon.query_balloon(), balloon_pages(vm)
    target, first_inflate = start, start - low >= ram - start  # the first step has the larger room: 128+ MiB
    for step in range(RANDOM_WALK_STEPS):
        here = balloon.query_balloon()
        inflate = (step % 2 == 0) == first_inflate
        room = (here - low if inflate else ram - here) // MIB
        size = walk.randint(min(WALK_STEP_MIB[0], room), min(WALK_STEP_MIB[1], room)) * MIB
        target = here - size if inflate else here + size
        halfway = (here + target) // 2
        balloon.set_target(target)
        try:
            wait_for(lambda h=halfway, i=inflate: (balloon.query_balloon() <= h) == i, CONVERGE_DEADLINE_S,
                     f"actual to pass {halfway} on its way from {here} to {target} "
                     f"({'BAL-DRV-OP-1' if inflate else 'BAL-DRV-OP-2'})", interval=0.01, max_interval=0.05,
                     describe_last=lambda: f"actual {balloon.query_balloon()}")
        except DeadlineExceeded as error:
            raise AssertionError(f"random walk seed {seed}, step {step}: {error}") from None
    try:
        balloon.reach_target(target)
    except AssertionError as error:
        raise AssertionError(f"random walk seed {seed}, last target: {error}") from None
    moved = balloon_pages(vm) - pages_before
    assert moved == (start - target) // PAGE_SIZE, (
        f"BAL-DRV-ACT-1: random walk seed {seed}: actual went from {start} to {target}: expected vmstat's balloon "
        f"count to move by {(start - target) // PAGE_SIZE} pages, got {moved}")


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
        messages = traced_pfns(vm, start, expected)
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
    """After the guest dirtied its free memory and free page reporting (where negotiated) settled, an inflate
    leaves none of the ballooned pages in QEMU's host memory, and QEMU's RSS falls by at least 80% of the
    balloon's share (the ballooned pages that were resident before it), less RSS_NOISE. Without reporting that
    share is at least 80% of the inflate (the dirtied memory stayed resident).

    Measured (QEMU 7.2, Linux 6.1, TCG, 128 MiB inflate): pci-modern share 128 MiB, RSS fell 128 MiB;
    pci-transitional+doom+fph+fpr+iof share 9 MiB (reporting had returned the rest), RSS fell 9 MiB.
    Broken on purpose: with -overcommit mem-lock=on QEMU's discards fail (MADV_DONTNEED on locked memory) and the
    RSS wait failed on pci-modern (share 128 MiB, RSS unchanged)."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    rss_settled = dirty_free_memory(vm)
    before = guest_pages_present(vm)
    inflate = int(ram * INFLATE_FRACTION)
    inflating_since = time.monotonic()
    ballooned = traced_resize(vm, ram - inflate, inflate // PAGE_SIZE)
    share = sum(before[page] for page in ballooned) * PAGE_SIZE
    wanted = rss_settled - int(RSS_FALL_FRACTION * share) + RSS_NOISE
    wait_for(lambda: qemu_memory_bytes(vm.pid) <= wanted, RSS_DEADLINE_S,
             f"QEMU RSS to fall from {rss_settled} to at most {wanted} after a {inflate}-byte inflate whose pages "
             f"held {share} bytes of host memory (BAL-DRV-OP-1: inflated pages are given to the host)",
             describe_last=lambda: f"RSS {qemu_memory_bytes(vm.pid)}")
    print(f"{vm.variant.name}: RSS settled {rss_settled // MIB} MiB, balloon's share {share // MIB} MiB of a "
          f"{inflate // MIB} MiB inflate, RSS after {qemu_memory_bytes(vm.pid) // MIB} MiB")
    problem = pages_back_in_host_memory(vm, ballooned, inflating_since)
    assert problem is None, f"BAL-DRV-OP-1: ballooned pages after a {inflate}-byte inflate: {problem}"
    if Feature.REPORTING not in vm.variant.accepted_features():
        assert share >= RSS_FALL_FRACTION * inflate, (
            f"expected the dirtied memory to be resident without free page reporting: at least "
            f"{RSS_FALL_FRACTION} of the {inflate}-byte inflate, got a share of {share}")


@pytest.mark.req("BAL-DRV-OP-2", "BAL-DRV-OP-1")
def test_deflated_pages_refault_holding_what_the_guest_writes(small_host_pages: Variant, shared_vm: Machine) -> None:
    """With the guest's memory dirtied, an inflate takes the ballooned pages out of host memory; after the deflate
    the guest fills its memory with a pattern: the deflated pages are back in host memory (all but those still
    free in the guest, plus REFAULT_SLACK), QEMU's RSS rose from its level after the inflate by at least 80% of
    them, and the pattern verifies. (A guest that poisons or zeroes freed pages, init_on_free=1 or page_poison=1,
    touches the deflated pages as it frees them; the hog's fill touches them on the others.)

    Measured (QEMU 7.2, Linux 6.1, TCG, 128 MiB balloon): pci-modern 128 MiB refaulted, RSS rose 129 MiB;
    pci-transitional+doom+fph+fpr+iof 98 MiB refaulted with 48 MiB free in the guest, RSS rose 388 MiB (the fill
    also refaults what reporting had returned).
    Broken on purpose: with the deflate skipped, 126 of 128 MiB stayed absent on pci-modern and the check failed."""
    vm, ram = shared_vm, ram_bytes(shared_vm)
    dirty_free_memory(vm)
    inflate = int(ram * INFLATE_FRACTION)
    inflating_since = time.monotonic()
    ballooned = traced_resize(vm, ram - inflate, inflate // PAGE_SIZE)
    rss_inflated = qemu_memory_bytes(vm.pid)
    problem = pages_back_in_host_memory(vm, ballooned, inflating_since)
    assert problem is None, f"BAL-DRV-OP-1: ballooned pages after a {inflate}-byte inflate: {problem}"
    deflated = traced_resize(vm, ram, inflate // PAGE_SIZE)
    assert sorted(deflated) == sorted(ballooned), (
        f"BAL-DRV-OP-2: expected the deflate to return the {len(ballooned)} ballooned pages, got {len(deflated)} "
        f"pages, {len(set(deflated) ^ set(ballooned))} differing")
    available = read_guest_memory(vm.ssh).mem("MemAvailable")
    hog = start_hog(vm.ssh, f"fill --mib {available // MIB - 48} --seed 12 --hold-forever", "refault")
    hog.wait_line(r"memhog: holding", 120)
    free_while_held = read_guest_memory(vm.ssh).mem("MemFree")
    present = guest_pages_present(vm)
    rise = qemu_memory_bytes(vm.pid) - rss_inflated
    verdict = hog.verify_now(60)
    hog.stop()
    refaulted = sum(present[page] for page in ballooned) * PAGE_SIZE
    print(f"{vm.variant.name}: {refaulted // MIB} of {inflate // MIB} MiB deflated refaulted, {free_while_held // MIB} "
          f"MiB free in the guest, RSS rose {rise // MIB} MiB")
    assert verdict.endswith(" ok"), f"BAL-DRV-OP-2: expected the pattern in the deflated memory intact, got {verdict!r}"
    untouched = inflate - refaulted
    assert untouched <= free_while_held + REFAULT_SLACK, (
        f"BAL-DRV-OP-2: expected the deflated pages back in host memory once the guest filled its memory, all but "
        f"its {free_while_held} free bytes and {REFAULT_SLACK} more; got {untouched} of {inflate} bytes absent")
    assert rise >= RSS_FALL_FRACTION * refaulted - RSS_NOISE, (
        f"BAL-DRV-OP-2: expected QEMU's RSS to rise by at least {RSS_FALL_FRACTION} of the {refaulted} refaulted "
        f"bytes, got {rise}")


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
