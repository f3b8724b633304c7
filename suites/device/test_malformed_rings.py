"""Malformed rings driven straight at QEMU: each split-ring kind of `vballoon.scenario.malformed`, on the modern and
the legacy interface, answered with an outcome the spec allows, and a device that works again after a renegotiation;
the packed-ring kind (a descriptor of the previous lap) ignored; and the valid but unusual chain of direct
descriptors followed by an indirect one (VQ-DEV-IND-2).

Broken on purpose once: with `OUTCOMES["loop"]` set to the chain used only, both loop cases failed with
"expected an outcome among ['chain used'], got device error". With the wrong-wrap descriptor written with the
current lap's flags, the packed cases failed ("expected the descriptor ignored ... inflated"). With the deviation's
bounds set to ">=7.2 <=7.1", the indirect-after-direct cases failed instead of an expected failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.qtest_device import INTERFACES, RING_LAYOUTS, DeviceVariant, expect_conformance, over
from vballoon.errors import QemuError
from vballoon.qemu.qtest_machine import INFLATEQ as INFLATEQ_INDEX
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.reference.device import INFLATEQ
from vballoon.scenario.malformed import ABANDONS_QUEUE, OUTCOMES, REQUIREMENTS, SPLIT_KINDS, RingOutcome
from vballoon.scenario.operations import POOL_PFNS, FillPage, MalformedChain, Negotiate
from vballoon.scenario.qemu_executor import QemuExecutor
from vballoon.session import Session
from vballoon.spec import PAGE_SIZE, PFN_SHIFT, Feature, Status, encode_pfns, feature_mask
from vballoon.virtqueue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_SIZE, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED, Descriptor,
                                PackedDriverQueue, SplitDriverQueue)
from vballoon.waiting import DeadlineExceeded, wait_for

CASES = (INTERFACES[0], INTERFACES[2])
"""The modern interface and a transitional device used through its legacy one (no DEVICE_NEEDS_RESET there)."""
FEATURES = feature_mask(Feature.STATS_VQ, Feature.INDIRECT_DESC)
IGNORED_WAIT = 0.5
"""Seconds a broken device gets to show it ignores a buffer (it answers at once when it works)."""


PACKED = tuple(case for case in RING_LAYOUTS if case.variant.packed)
PATTERN = 0x5A


KINDS = [pytest.param(kind, marks=pytest.mark.req("VQ-DEV-STATUS-1", *([REQUIREMENTS[kind]] if kind in REQUIREMENTS
                                                                         else [])), id=kind) for kind in SPLIT_KINDS]


@pytest.mark.parametrize("kind", KINDS)
@over(CASES)
def test_qemu_answers_a_malformed_chain_as_the_spec_allows(session: Session, device_variant: DeviceVariant,
                                                           kind: str, tmp_path: Path) -> None:
    """VQ-DEV-STATUS-1 and the driver requirement the kind breaks: a device error (with DEVICE_NEEDS_RESET on the
    modern interface, later buffers ignored) or the chain used, as `OUTCOMES` allows; QEMU stays alive and works
    after a renegotiation."""
    legacy = device_variant.legacy_interface
    with QemuExecutor(session.qemu, device_variant.variant, legacy, tmp_path) as qemu:
        driver = qemu.balloon.driver
        qemu.apply(Negotiate(FEATURES))
        qemu.apply(MalformedChain(INFLATEQ, kind, encode_pfns(POOL_PFNS[:1])))
        errored = qemu.malformed_outcome()
        outcome = RingOutcome.ERROR if errored else RingOutcome.USED
        allowed = sorted(o.value for o in OUTCOMES[kind])
        assert outcome in OUTCOMES[kind], \
            f"VQ-DEV-STATUS-1: {kind} chain: expected an outcome among {allowed}, got {outcome.value}"
        status = driver.status
        if not legacy:
            assert bool(status & Status.DEVICE_NEEDS_RESET) == errored, \
                f"VQ-DEV-STATUS-1: {kind} chain: expected DEVICE_NEEDS_RESET {'set' if errored else 'clear'}, " \
                f"got status {status:#x}"
        inflateq = qemu.queue_names.index(INFLATEQ)
        if kind not in ABANDONS_QUEUE:
            driver.queues[inflateq].collect_used()  # the malformed chain's own entry, if QEMU used it
            head = qemu.balloon.post(inflateq, [encode_pfns(POOL_PFNS[1:2])])
            try:
                used = [e.id for e in driver.wait_used(inflateq, 1, IGNORED_WAIT if errored else 5.0)]
            except QemuError:
                used = []
            expected = [] if errored else [head]
            assert used == expected, f"VQ-DEV-STATUS-1: the buffer after a {kind} chain ({outcome.value}): " \
                                     f"expected used heads {expected}, got {used}"
        qemu.apply(Negotiate(FEATURES))
        again = qemu.balloon.inflate(POOL_PFNS[2:3])
        assert again.length == 0, f"VQ-DEV-STATUS-1: after renegotiating: expected used length 0, got {again}"
        assert qemu.machine.crash_evidence() == [], f"QEMU crashed: {qemu.machine.crash_evidence()}"


@pytest.mark.req("VQ-DEV-PACKED-1")
@over(PACKED)
def test_qemu_ignores_a_packed_descriptor_of_the_previous_lap(session: Session, device_variant: DeviceVariant,
                                                             tmp_path: Path) -> None:
    """VQ-DEV-PACKED-1: a descriptor at the driver's next position whose AVAIL bit says the previous lap, notified:
    the device uses nothing (the descriptor stays as written, its PFN's page keeps its bytes) and reports no error;
    the driver's next chain, written over it, is used."""
    with QemuExecutor(session.qemu, device_variant.variant, False, tmp_path) as qemu:
        driver, inflateq = qemu.balloon.driver, qemu.queue_names.index(INFLATEQ)
        qemu.apply(FillPage(POOL_PFNS[0], PATTERN))
        qemu.apply(Negotiate(feature_mask(Feature.STATS_VQ)))
        queue = driver.queues[inflateq]
        assert isinstance(queue, PackedDriverQueue), f"expected a packed inflateq, got {type(queue).__name__}"
        slot, previous_lap = queue.next_avail, PACKED_DESC_F_USED if queue.avail_wrap else PACKED_DESC_F_AVAIL
        qemu.apply(MalformedChain(INFLATEQ, "wrong-wrap", encode_pfns(POOL_PFNS[:1])))
        try:  # QEMU handles a notification after the qtest write returns: give it time to (wrongly) answer
            wait_for(lambda: queue.read_descriptor(slot).flags != previous_lap or qemu.device_errors() > 0,
                     IGNORED_WAIT, "QEMU to answer a descriptor it must ignore", interval=0.001)
        except DeadlineExceeded:
            pass
        flags = queue.read_descriptor(slot).flags
        page = qemu.machine.qtest.read(POOL_PFNS[0] << PFN_SHIFT, PAGE_SIZE)
        inflated = page != bytes([PATTERN]) * PAGE_SIZE
        assert (flags, qemu.device_errors(), inflated) == (previous_lap, 0, False), \
            f"VQ-DEV-PACKED-1: expected the descriptor ignored (flags {previous_lap:#x}, no device error, page kept), " \
            f"got flags {flags:#x}, {qemu.device_errors()} device errors, page inflated {inflated}"
        assert not driver.status & Status.DEVICE_NEEDS_RESET, f"VQ-DEV-PACKED-1: status {driver.status:#x}"
        again = qemu.balloon.inflate(POOL_PFNS[1:2])
        assert again.length == 0, f"the chain written over it: expected used length 0, got {again}"


@pytest.mark.req("VQ-DEV-IND-2", "BAL-DEV-OP-1")
@over(CASES)
def test_direct_descriptors_followed_by_an_indirect_one(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                        session: Session) -> None:
    """VQ-DEV-IND-2: a split-ring chain of a direct PFN array, then a descriptor referring to an indirect table that
    holds a second PFN array: the device inflates the pages of both (QEMU discards them: they read zero)."""
    features = balloon.start(balloon.default_features | balloon.offered & feature_mask(Feature.INDIRECT_DESC))
    assert features & feature_mask(Feature.INDIRECT_DESC), f"INDIRECT_DESC not offered: {balloon.offered:#x}"
    queue = balloon.driver.queues[INFLATEQ_INDEX]
    assert isinstance(queue, SplitDriverQueue), f"expected a split inflateq, got {type(queue).__name__}"
    direct_page, table_page = balloon.new_page(PATTERN), balloon.new_page(PATTERN)
    endian = balloon.driver.endian
    direct, through_table = (balloon.new_page() for _ in range(2))
    qtest_machine.qtest.write(direct, encode_pfns([direct_page >> PFN_SHIFT], endian))
    qtest_machine.qtest.write(through_table, encode_pfns([table_page >> PFN_SHIFT], endian))
    table = balloon.new_page()
    queue.ring.write_desc(table, 0, Descriptor(through_table, 4, 0, 0))
    head = queue.add_raw([Descriptor(direct, 4, DESC_F_NEXT, 1), Descriptor(table, DESC_SIZE, DESC_F_INDIRECT, 0)])
    queue.publish(head)
    balloon.driver.notify(INFLATEQ_INDEX)
    (used,) = balloon.driver.wait_used(INFLATEQ_INDEX, 1)
    assert used.id == head, f"expected head {head} used, got {used.id}"
    zero = bytes(PAGE_SIZE)
    assert qtest_machine.qtest.read(direct_page, PAGE_SIZE) == zero, \
        "BAL-DEV-OP-1: the direct descriptor's page should be inflated (read zero)"
    table_inflated = qtest_machine.qtest.read(table_page, PAGE_SIZE) == zero
    expect_conformance(table_inflated, "VQ-DEV-IND-2", session.qemu,
                       f"the page named in the indirect table after a direct descriptor kept its bytes (expected it "
                       f"inflated, like the direct descriptor's page {direct_page:#x})")

