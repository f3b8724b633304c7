"""Scenarios as plain data, the reference transport, and how a QEMU observation is judged."""

from __future__ import annotations

import dataclasses

import pytest

from vballoon.errors import DecodeError
from vballoon.matrix import Variant
from vballoon.reference.device import FREE_PAGE_VQ
from vballoon.spec import PAGE_SIZE, ConfigField, Feature, encode_pfns, encode_stats, feature_mask
from vballoon.transport import (LOST_NEEDS_RESET, POOL_PFNS, AddBuffer, Cont, FillPage, Negotiate, Observation,
                                ReadConfig, ReferenceTransport, Reset, Scenario, SetPollingInterval, SetTarget, Stop,
                                UsedLedger, WriteConfig, compare, scenario_from_json, scenario_to_json)

EVERY_OPERATION = (Negotiate(feature_mask(Feature.STATS_VQ), 0xAA), SetTarget(3), WriteConfig(4, 2, 0x1234),
                   ReadConfig(0, 4), AddBuffer("inflateq", encode_pfns([POOL_PFNS[0]])),
                   AddBuffer("reporting_vq", in_pfns=(POOL_PFNS[1],)), FillPage(POOL_PFNS[2], 7),
                   SetPollingInterval(-1), Stop(), Cont(), Reset())


def test_a_scenario_round_trips_through_json() -> None:
    scenario = Scenario(Variant(free_page_reporting=True), False, EVERY_OPERATION)
    text = scenario_to_json(scenario)
    assert "\n" not in text
    assert scenario_from_json(text) == scenario


@pytest.mark.parametrize("text", ["", "{}", '{"variant": "pci-modern", "legacy_interface": false, '
                                              '"operations": [["Explode", 1]]}'])
def test_a_broken_scenario_is_a_decode_error(text: str) -> None:
    with pytest.raises(DecodeError, match="not a vballoon scenario"):
        scenario_from_json(text)


def test_reference_transport_answers_host_requests_like_qemu() -> None:
    reference = ReferenceTransport(Variant(), False)
    assert reference.apply(SetTarget(128 << 8)) == (None, "balloon target 0 refused: it must be a positive size")
    assert reference.apply(SetPollingInterval(-1)) == (None, "polling interval -1 refused: it must not be negative")
    assert reference.apply(SetPollingInterval(1 << 32)) == (None, f"polling interval {1 << 32} refused: it must fit "
                                                                   "in 32 bits")
    reference.apply(Negotiate(feature_mask(Feature.STATS_VQ)))
    reference.apply(SetTarget(5))
    assert reference.apply(ReadConfig(ConfigField.NUM_PAGES, 4)) == (5, None)


def test_stats_buffer_is_held_until_polling_starts_and_not_while_stopped() -> None:
    reference = ReferenceTransport(Variant(), False)
    reference.apply(Negotiate(feature_mask(Feature.STATS_VQ)))
    observed = reference.observe(reference.apply(AddBuffer("statsq", encode_stats([(4, 1)]))))
    assert observed.used == () and observed.stats_updated
    reference.apply(Stop())
    assert reference.observe(reference.apply(SetPollingInterval(3600))).used == ()
    assert reference.observe(reference.apply(Cont())).used == (("statsq", 0, 0),)


@pytest.mark.req("BAL-DRV-FPH-1")
def test_hint_buffers_wait_for_cont_and_a_reset_drops_them() -> None:
    """QEMU's hint iothread is blocked while the VM is stopped: the reference takes the same timing."""
    variant = Variant(free_page_hint=True)
    for before_cont, errors in (((), 1), ((Negotiate(feature_mask(Feature.FREE_PAGE_HINT)),), 0)):
        reference = ReferenceTransport(variant, False)
        reference.apply(Negotiate(feature_mask(Feature.FREE_PAGE_HINT)))
        reference.apply(Stop())
        reference.apply(AddBuffer(FREE_PAGE_VQ, b"\0"))  # a 1-byte command id: a device error once processed
        assert reference.observe((None, None)).device_errors == 0, "processed while the VM was stopped"
        for op in before_cont:
            reference.apply(op)
        observed = reference.observe(reference.apply(Cont()))
        assert observed.device_errors == errors, (
            f"BAL-DRV-FPH-1 (a 1-byte command id): after {[type(op).__name__ for op in before_cont]} then cont: "
            f"expected {errors} device error(s), got {observed.device_errors}")


def test_a_page_zeroed_without_licence_is_a_difference() -> None:
    reference = ReferenceTransport(Variant(), False)
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
    reference = ReferenceTransport(Variant(), False)
    expected = reference.observe((None, None))
    (difference,) = compare(reference, expected, Observation(alive=False, crash=("QEMU killed by SIGABRT",)))
    assert difference.requirement is None and "SIGABRT" in str(difference)


def test_a_virtio_error_without_needs_reset_is_named_as_the_lost_bit() -> None:
    """QEMU 7.2's race (virtio_set_status storing a stale status over virtio_error's NEEDS_RESET) gets its own
    name, apart from a plain status difference."""
    reference = ReferenceTransport(Variant(), False)
    expected = dataclasses.replace(reference.observe((None, None)), status=0x4F, device_errors=1)
    (lost,) = compare(reference, expected, dataclasses.replace(expected, status=0x0F))
    assert lost.requirement == LOST_NEEDS_RESET, f"expected {LOST_NEEDS_RESET!r}, got {lost}"
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
