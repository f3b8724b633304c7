"""The judge: how a QEMU observation is compared with the reference's, and the used-entry ledger."""

from __future__ import annotations

import dataclasses

from vballoon.matrix import Variant
from vballoon.scenario.judge import LOST_NEEDS_RESET, UsedLedger, compare
from vballoon.scenario.observation import Observation
from vballoon.scenario.operations import POOL_PFNS, AddBuffer, FillPage, Negotiate
from vballoon.scenario.reference_executor import ReferenceExecutor
from vballoon.spec import PAGE_SIZE, Feature, encode_pfns, feature_mask


def test_a_page_zeroed_without_licence_is_a_difference() -> None:
    reference = ReferenceExecutor(Variant(), False)
    reference.apply(FillPage(POOL_PFNS[0], 0x55))
    reference.apply(Negotiate(feature_mask(Feature.STATS_VQ)))
    expected = reference.observe(reference.apply(AddBuffer("inflateq", encode_pfns([POOL_PFNS[1]]))))
    pages = dict(expected.pages)
    zeroed_inflated = dataclasses.replace(expected, pages=tuple({**pages, POOL_PFNS[1]: bytes(PAGE_SIZE)}.items()))
    assert compare(reference, expected, zeroed_inflated) == [], "an inflated page MAY read zero (BAL-DEV-OP-1)"
    zeroed_other = dataclasses.replace(expected, pages=tuple({**pages, POOL_PFNS[0]: bytes(PAGE_SIZE)}.items()))
    (difference,) = compare(reference, expected, zeroed_other)
    assert difference.requirement == "BAL-DEV-OP-1" and difference.what == f"page {POOL_PFNS[0]:#x} content"


def test_a_dead_qemu_is_a_difference_without_requirement() -> None:
    reference = ReferenceExecutor(Variant(), False)
    expected = reference.observe((None, None))
    (difference,) = compare(reference, expected, Observation(alive=False, crash=("QEMU killed by SIGABRT",)))
    assert difference.requirement is None and "SIGABRT" in str(difference)


def test_a_virtio_error_without_needs_reset_is_named_as_the_lost_bit() -> None:
    """QEMU 7.2's race (virtio_set_status storing a stale status over virtio_error's NEEDS_RESET) gets its own
    name, apart from a plain status difference."""
    reference = ReferenceExecutor(Variant(), False)
    expected = dataclasses.replace(reference.observe((None, None)), status=0x4F, device_errors=1)
    (lost,) = compare(reference, expected, dataclasses.replace(expected, status=0x0F))
    assert (lost.requirement, lost.what) == ("VQ-DEV-STATUS-1", LOST_NEEDS_RESET), \
        f"expected VQ-DEV-STATUS-1: {LOST_NEEDS_RESET}, got {lost}"
    no_error = dataclasses.replace(expected, device_errors=0)
    (plain,) = compare(reference, no_error, dataclasses.replace(no_error, status=0x0F))
    assert plain.requirement == "BAL-DEV-LEG-FEAT-1" and plain.what == "device status", f"got {plain}"
    gained = dataclasses.replace(expected, status=0x0F)
    (extra,) = compare(reference, gained, dataclasses.replace(gained, status=0x4F))
    assert extra.requirement == "BAL-DEV-LEG-FEAT-1", f"a NEEDS_RESET the reference lacks is not a lost bit, got {extra}"


def test_used_entries_may_come_late_only_while_stopped() -> None:
    ledger = UsedLedger()
    entry = ("free_page_vq", 0, 0)
    assert ledger.expect(Observation(alive=True, used=(entry,))) == {"free_page_vq": 1}
    assert ledger.settle(Observation(alive=True), running=False, device_broken=False) == []
    assert ledger.settle(Observation(alive=True, used=(entry,)), running=True, device_broken=False) == []
    ledger.expect(Observation(alive=True, used=(entry,)))
    (missing,) = ledger.settle(Observation(alive=True), running=True, device_broken=False)
    assert missing.requirement == "BAL-LEG-USED" and missing.expected == (entry,)
    (extra,) = ledger.settle(Observation(alive=True, used=(entry,)), running=True, device_broken=False)
    assert extra.got == (entry,)
