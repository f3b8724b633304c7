"""The reference's answer to each malformed chain kind: the outcomes the spec allows (VQ-DEV-STATUS-1), the one it
takes when a device under test took an allowed one, and the judge's verdict on one it does not allow.

Broken on purpose once: with `OUTCOMES["loop"]` allowing the chain used too,
test_the_allowed_outcomes_per_kind[loop] failed on the expected set (the cases of the other tests follow
OUTCOMES, so they changed with it).
"""

from __future__ import annotations

import dataclasses

import pytest

from vballoon.matrix import Variant
from vballoon.reference.device import INFLATEQ
from vballoon.scenario.judge import RING_ERROR, compare
from vballoon.scenario.malformed import MALFORMED_KINDS, OUTCOMES, SPLIT_KINDS, RingOutcome
from vballoon.scenario.observation import NO_ANSWER, Observation
from vballoon.scenario.operations import POOL_PFNS, AddBuffer, MalformedChain, Negotiate
from vballoon.scenario.reference_executor import ReferenceExecutor
from vballoon.spec import Feature, Status, encode_pfns, feature_mask
from vballoon.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_SIZE, Descriptor, SplitDriverQueue

FEATURES = feature_mask(Feature.STATS_VQ, Feature.INDIRECT_DESC)
ERROR, USED, IGNORED = RingOutcome.ERROR, RingOutcome.USED, RingOutcome.IGNORED
EXPECTED_OUTCOMES = {"loop": {ERROR}, "long-chain": {ERROR, USED}, "outside-ram": {ERROR, USED},
                     "past-ram-end": {ERROR, USED}, "avail-jump": {ERROR, USED}, "nested-indirect": {ERROR, USED},
                     "wrong-wrap": {IGNORED}}
"""What the spec allows: a loop breaks VQ-DRV-DESC-1 and cannot be used (the walk never ends); the other split kinds
break a driver requirement or the ring's layout, and the spec sets no device requirement for them beyond the SHOULD
of VQ-DEV-STATUS-1 (and for avail-jump none at all: 2.7.6 only says where the driver puts the next entry); a packed
descriptor whose AVAIL bit did not change must not be used (VQ-DEV-PACKED-1)."""
INTERFACES = [pytest.param(False, id="modern"), pytest.param(True, id="legacy")]


def after_chain(kind: str, legacy: bool, device_error: bool) -> tuple[ReferenceExecutor, Observation]:
    """A reference following a device that answered a `kind` chain on inflateq with a device error or not."""
    reference = ReferenceExecutor(Variant(transport="transitional"), legacy, follow_device=True)
    reference.apply(Negotiate(FEATURES))
    reference.observe(NO_ANSWER)
    reference.apply(MalformedChain(INFLATEQ, kind, encode_pfns(POOL_PFNS[:1])))
    reference.settle(device_error)
    return reference, reference.observe(NO_ANSWER)


@pytest.mark.req("VQ-DEV-STATUS-1")
@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_the_allowed_outcomes_per_kind(kind: str) -> None:
    assert set(OUTCOMES[kind]) == EXPECTED_OUTCOMES[kind], \
        f"VQ-DEV-STATUS-1: {kind}: expected allowed outcomes {EXPECTED_OUTCOMES[kind]}, got {set(OUTCOMES[kind])}"


@pytest.mark.req("VQ-DEV-STATUS-1")
@pytest.mark.parametrize("legacy", INTERFACES)
@pytest.mark.parametrize("kind, outcome", [(kind, outcome) for kind in SPLIT_KINDS for outcome in (ERROR, USED)
                                           if outcome in OUTCOMES[kind]],
                         ids=lambda value: value.name.lower() if isinstance(value, RingOutcome) else value)
def test_the_reference_takes_an_allowed_outcome(kind: str, legacy: bool, outcome: RingOutcome) -> None:
    """An allowed outcome is the reference's too: a device error (DEVICE_NEEDS_RESET on the modern interface, later
    buffers ignored until a negotiation) or the chain used (its used entry, the device still working)."""
    reference, seen = after_chain(kind, legacy, outcome is ERROR)
    needs_reset = bool(seen.status & Status.DEVICE_NEEDS_RESET)
    assert (seen.device_errors, needs_reset) == ((1, not legacy) if outcome is ERROR else (0, False)), \
        f"VQ-DEV-STATUS-1: {kind} answered with {outcome.value}: got {seen.device_errors} device errors, " \
        f"DEVICE_NEEDS_RESET {needs_reset}"
    chain_entries = [entry for entry in seen.used if entry[0] == INFLATEQ]
    abandoned = kind == "avail-jump"
    expected_entries = 0 if outcome is ERROR or abandoned else 1
    assert len(chain_entries) == expected_entries, \
        f"{kind} answered with {outcome.value}: expected {expected_entries} used entries, got {chain_entries}"
    reference.apply(AddBuffer(INFLATEQ, encode_pfns(POOL_PFNS[1:2])))
    later = [entry for entry in reference.observe(NO_ANSWER).used if entry[0] == INFLATEQ]
    expected_later = 0 if outcome is ERROR or abandoned else 1
    assert len(later) == expected_later, \
        f"VQ-DEV-STATUS-1: the buffer after a {kind} chain ({outcome.value}): expected {expected_later} used " \
        f"entries, got {later}"
    reference.apply(Negotiate(FEATURES))
    reference.apply(AddBuffer(INFLATEQ, encode_pfns(POOL_PFNS[2:3])))
    again = reference.observe(NO_ANSWER)
    assert not again.status & Status.DEVICE_NEEDS_RESET and len(again.used) == 1, \
        f"after renegotiating: expected a working device, got status {again.status:#x}, used {again.used}"


@pytest.mark.req("VQ-DEV-STATUS-1")
@pytest.mark.parametrize("kind", SPLIT_KINDS)
@pytest.mark.parametrize("outcome", [ERROR, USED], ids=["error", "used"])
def test_an_outcome_outside_the_set_is_a_difference(kind: str, outcome: RingOutcome) -> None:
    """A device that took an allowed outcome matches the reference that followed it; one that took another (a loop
    used) differs, and the judge names VQ-DEV-STATUS-1."""
    reference, expected = after_chain(kind, False, outcome is ERROR)
    status = expected.status & ~Status.DEVICE_NEEDS_RESET | (Status.DEVICE_NEEDS_RESET if outcome is ERROR else 0)
    got = dataclasses.replace(expected, device_errors=int(outcome is ERROR), status=status)
    requirements = {d.requirement for d in compare(reference, expected, got)}
    wanted = set() if outcome in OUTCOMES[kind] else {RING_ERROR}
    assert requirements == wanted, \
        f"{kind} answered with {outcome.value}: expected differences naming {wanted or 'nothing'}, got {requirements}"


@pytest.mark.req("VQ-DEV-PACKED-1")
def test_the_reference_ignores_a_descriptor_of_the_previous_lap() -> None:
    """wrong-wrap on a packed ring: the reference device, given the descriptor and a notification, uses nothing and
    does not fail; the driver's next chain goes over it and is used; a device that errs instead differs under
    VQ-DEV-PACKED-1."""
    reference = ReferenceExecutor(Variant(packed=True), False)
    reference.apply(Negotiate(FEATURES))
    reference.apply(MalformedChain(INFLATEQ, "wrong-wrap", encode_pfns(POOL_PFNS[:1])))
    seen = reference.observe(NO_ANSWER)
    inflated = sorted(reference.device.ballooned)
    assert (seen.used, seen.device_errors, inflated) == ((), 0, []), \
        f"VQ-DEV-PACKED-1: expected the descriptor ignored, got used {seen.used}, {seen.device_errors} device " \
        f"errors, inflated PFNs {inflated}"
    erring = dataclasses.replace(seen, device_errors=1, status=seen.status | Status.DEVICE_NEEDS_RESET)
    assert {d.requirement for d in compare(reference, seen, erring)} == {"VQ-DEV-PACKED-1"}
    reference.apply(AddBuffer(INFLATEQ, encode_pfns(POOL_PFNS[1:2])))
    after = reference.observe(NO_ANSWER)
    assert len(after.used) == 1 and after.device_errors == 0, \
        f"the chain after a wrong-wrap descriptor: expected one used entry, got {after.used}"


@pytest.mark.req("VQ-DEV-IND-2")
def test_the_reference_follows_an_indirect_descriptor_after_direct_ones() -> None:
    """The reference device reads a chain of a direct PFN array then an indirect table (holding a second PFN array)
    as the spec asks: both pages inflated, the chain used (what QEMU 7.2 and 10.0 do not: known-deviations.toml)."""
    reference = ReferenceExecutor(Variant(), False)
    reference.apply(Negotiate(FEATURES))
    driver = reference.driver
    queue = driver.queues[INFLATEQ]
    assert isinstance(queue, SplitDriverQueue)
    direct = driver.place(encode_pfns(POOL_PFNS[:1]))
    table = driver.place(bytes(DESC_SIZE))
    queue.ring.write_desc(table, 0, Descriptor(driver.place(encode_pfns(POOL_PFNS[1:2])), 4, 0, 0))
    queue.publish(queue.add_raw([Descriptor(direct, 4, DESC_F_NEXT, 1), Descriptor(table, DESC_SIZE, DESC_F_INDIRECT, 0)]))
    reference.device.notify(reference.device.queue_index(INFLATEQ))
    seen = reference.observe(NO_ANSWER)
    assert (sorted(reference.device.ballooned), len(seen.used), seen.device_errors) == (list(POOL_PFNS[:2]), 1, 0), \
        f"VQ-DEV-IND-2: expected {list(POOL_PFNS[:2])} inflated by one used chain, got " \
        f"{sorted(reference.device.ballooned)}, used {seen.used}, {seen.device_errors} device errors"


@pytest.mark.req("VQ-DEV-STATUS-1")
def test_the_reference_devices_own_answer_to_an_avail_jump_is_an_allowed_one() -> None:
    """The reference device's ring check (avail->idx moved on by more than the queue size) fails the device; the
    spec allows that as well as reading on, as QEMU 7.2 and 10.0 do, and the avail-jump kind allows both: the
    reference's own choice lies inside its allowed set."""
    reference = ReferenceExecutor(Variant(), False)
    reference.apply(Negotiate(FEATURES))
    driver, device = reference.driver, reference.device
    queue = driver.queues[INFLATEQ]
    assert isinstance(queue, SplitDriverQueue)
    head = queue.add_raw([Descriptor(driver.place(encode_pfns(POOL_PFNS[:1])), 4, 0, 0)])
    queue.publish_everywhere(head, queue.layout.size + 1)
    device.notify(device.queue_index(INFLATEQ))
    assert device.broken and "avail-idx-jump" in device.errors[-1] and device.status & Status.DEVICE_NEEDS_RESET, \
        f"expected the reference device failed on avail-idx-jump, got errors {device.errors}, status {device.status:#x}"
    assert OUTCOMES["avail-jump"] == {ERROR, USED}, f"avail-jump: expected error or used allowed, got {OUTCOMES['avail-jump']}"
