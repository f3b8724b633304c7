"""The fuzz input format: any bytes decode, canonical round trips, strict loading and its one-line errors."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vballoon.errors import DecodeError
from vballoon.fuzz.format import (MAX_HOST_REQUESTS, MAX_OPERATIONS, VERSION, ScenarioState, decode, device_byte,
                                  encode, load)
from vballoon.fuzz.harness import INSTRUMENTED
from vballoon.fuzz.reference_run import run_reference
from vballoon.fuzz.targets import TARGETS, differential_scenario
from vballoon.matrix import Variant
from vballoon.reference.device import DEFLATEQ, INFLATEQ, REPORTING_VQ, STATSQ
from vballoon.scenario.malformed import MALFORMED_KINDS, PACKED_KINDS
from vballoon.scenario.operations import (OPERATIONS, AddBuffer, MalformedChain, Negotiate, ReadConfig, Scenario,
                                          SetPollingInterval, Stop, WriteConfig)
from vballoon.spec import Feature, feature_mask

INDIRECT = feature_mask(Feature.INDIRECT_DESC)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_scenario_the_reference_runs(data: bytes) -> None:
    scenario = decode(data)
    assert len(scenario.operations) <= MAX_OPERATIONS
    run_reference(scenario)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_canonical_encoding_round_trips_strictly(data: bytes) -> None:
    scenario = decode(data)
    encoded = encode(scenario)
    assert encoded[0] == VERSION
    assert decode(encoded, strict=True) == scenario


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(TARGETS)), st.binary(max_size=120))
def test_every_target_maps_any_bytes_to_a_runnable_scenario(name: str, data: bytes) -> None:
    scenario = TARGETS[name].scenario_for(data)
    assert decode(encode(scenario), strict=True) == scenario
    run_reference(scenario)


def test_every_target_names_the_modules_that_guide_it() -> None:
    assert set(INSTRUMENTED) == set(TARGETS), f"INSTRUMENTED has {sorted(INSTRUMENTED)}, targets are {sorted(TARGETS)}"
    missing = [module for modules in INSTRUMENTED.values() for module in modules if find_spec(module) is None]
    assert not missing, f"instrumented modules that do not exist: {missing}"


def test_invalid_operations_are_made_runnable_not_kept() -> None:
    state = ScenarioState(Variant())
    ops = (AddBuffer(STATSQ, b"\1"), Negotiate(0b111111), ReadConfig(5, 4), WriteConfig(6, 4, 1), AddBuffer(STATSQ),
           AddBuffer(INFLATEQ, b"", (0xA0, 0xFFFFFFFF)), SetPollingInterval(5))
    assert [state.admit(op) for op in ops] == [None, Negotiate(0b10010), ReadConfig(4, 4), WriteConfig(4, 4, 1),
                                               AddBuffer(STATSQ, b"\0"), AddBuffer(INFLATEQ, b"\0"),
                                               SetPollingInterval(60)]


def test_a_queue_gets_no_more_descriptors_than_it_holds() -> None:
    """The driver takes used descriptors back only at a negotiation: reporting_vq (32 entries in QEMU 7.2)
    admits 32 one-page reports, inflateq 100 buffers."""
    state = ScenarioState(Variant(free_page_reporting=True))
    state.admit(Negotiate(0b111111))
    reports = [state.admit(AddBuffer(REPORTING_VQ, b"", (0x800,))) for _ in range(40)]
    inflates = [state.admit(AddBuffer(INFLATEQ, b"\0\0\0\0")) for _ in range(120)]
    assert reports.count(None) == 8 and inflates.count(None) == 20, (
        f"admitted {40 - reports.count(None)} reports (expected 32), {120 - inflates.count(None)} inflates (100)")


def test_a_scenario_holds_at_most_eight_host_requests() -> None:
    """Version 2 drops host requests past MAX_HOST_REQUESTS (each is a QMP round trip); version 1 kept them all."""
    polls = bytes([0x11, 2]) * 12  # host request 1: SetPollingInterval(1), twelve times
    assert decode(bytes([2, 0]) + polls).operations == (SetPollingInterval(60),) * MAX_HOST_REQUESTS
    assert len(decode(bytes([1, 0]) + bytes([0x06, 2]) * 12).operations) == 12


def test_version_1_inputs_keep_their_meaning() -> None:
    """Saved version-1 inputs replay as they were found: 0x00 and 0x0f were Negotiate there, 0x0e ReadConfig,
    0x07 Stop."""
    data = bytes([1, 0, 0x00, 0b10, 0x0E, 4, 0x07, 0x0F, 0])
    assert decode(data, strict=True).operations == (Negotiate(0b10), ReadConfig(4, 1), Stop(), Negotiate(0))
    assert decode(bytes([2, 0, 0x00, 2, 0x0F, 4]), strict=True).operations == (ReadConfig(2, 1), ReadConfig(4, 1))


def test_the_seeds_cover_every_operation() -> None:
    seeds = Path(__file__).resolve().parents[1] / "fuzz" / "corpora" / "scenario"
    kinds = {type(op).__name__ for seed in seeds.iterdir() for op in load(seed).operations}
    assert kinds == set(OPERATIONS)


@pytest.mark.parametrize("data, problem", [
    (b"", "empty"),
    (bytes([VERSION + 1, 0]), f"format version {VERSION + 1} is newer than this vballoon reads"),
    (bytes([0, 0]), "format version 0 is unknown"),
    (bytes([VERSION, 0x80]), "reserved device bits"),
    (bytes([2, 0x40]), "reserved device bits"),
    (bytes([VERSION, 0x43]), "asks a packed ring of the legacy-only transport"),
    (bytes([VERSION, 0, 0x0E, 0b10, 0x0C | 7 << 5, 1, 5]), "malformed chain kind 7"),
    (bytes([VERSION, 0, 0x1E, 0b10, 1, 2]), "operation 1 (at offset 2) ends 2 byte(s) short"),
    (bytes([VERSION, 0, 0x1E]), "operation 1 (at offset 2) ends 1 byte(s) short at offset 3"),
    (bytes([VERSION, 0, 0x0E, 0b10, 0x04, 5, 1, 2]), "operation 2 (at offset 4) ends 3 byte(s) short at offset 8"),
    (bytes([VERSION, 0, 0x0E, 0b10, 0x41]), "host request code 4 at offset 4"),
])
def test_strict_loading_names_the_file_and_the_problem(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "input"
    path.write_bytes(data)
    with pytest.raises(DecodeError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a replayable vballoon fuzz input: ") and problem in message
    assert "\n" not in message




# --- version 3: malformed chains, INDIRECT_DESC, the packed ring bit -----------------------------------


def malformed_input(version: int, device: int, kind_code: int, queue: int = 0, features: int = 0x42) -> bytes:
    """Negotiate(`features` byte), then opcode 0x0C with arg (kind_code << 1 | queue) and one out byte."""
    return bytes([version, device, 0x0E, features, 0x0C | (kind_code << 1 | queue) << 4, 1, 5])


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_every_malformed_kind_decodes_and_round_trips(kind: str) -> None:
    """Code 12 with kind bits 1-3 and queue bit 0 is a MalformedChain in version 3, on the ring layout that has the kind
    (split: pci-modern; packed: the device byte's bit 6), after a Negotiate of INDIRECT_DESC through bit 6; the
    canonical encoding is the input."""
    device = 0x40 if kind in PACKED_KINDS else 0
    for queue, name in enumerate((INFLATEQ, DEFLATEQ)):
        scenario = decode(malformed_input(VERSION, device, MALFORMED_KINDS.index(kind), queue), strict=True)
        assert scenario.operations == (Negotiate(0b10 | INDIRECT), MalformedChain(name, kind, b"\5")), \
            f"{kind} on {name}: got {scenario.operations}"
        assert scenario.variant.packed == (kind in PACKED_KINDS)
        assert encode(scenario) == malformed_input(VERSION, device, MALFORMED_KINDS.index(kind), queue)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_a_kind_of_the_other_layout_is_dropped(kind: str) -> None:
    """Split-ring kinds on a packed ring and the packed kind on a split ring (or on a packed=on device seen through
    its legacy interface, which has split rings) are dropped, as are indirect tables without INDIRECT_DESC."""
    code = MALFORMED_KINDS.index(kind)
    other = 0 if kind in PACKED_KINDS else 0x40
    assert len(decode(malformed_input(VERSION, other, code)).operations) == 1
    if kind in PACKED_KINDS:
        legacy_view = decode(malformed_input(VERSION, 0x42, code))
        assert legacy_view.legacy_interface and legacy_view.variant.packed
        assert len(legacy_view.operations) == 1, f"{kind} through the legacy interface: {legacy_view.operations}"
    without_indirect = decode(malformed_input(VERSION, 0, code, features=0x02))
    dropped = kind in PACKED_KINDS or kind in ("long-chain", "nested-indirect")
    assert len(without_indirect.operations) == (1 if dropped else 2), f"{kind}: {without_indirect.operations}"


def test_version_3_negotiates_indirect_desc_through_bit_6() -> None:
    assert decode(bytes([VERSION, 0, 0x0E, 0x40])).operations == (Negotiate(INDIRECT),)
    assert encode(Scenario(decode(bytes([VERSION, 0])).variant, False, (Negotiate(INDIRECT | 0b10),))) == \
        bytes([VERSION, 0, 0x0E, 0x42])


def test_version_2_inputs_keep_their_meaning() -> None:
    """Saved version-2 inputs replay as they were found: code 12 is AddBuffer, bit 6 of Negotiate's feature byte and
    of the device byte are ignored (the device byte's refused by strict loading, as any reserved bit)."""
    data = bytes([2, 0, 0x0E, 0x42, 0x0C, 1, 5, 0, 0x1C, 2, 1, 2, 0])
    expected = (Negotiate(0b10), AddBuffer(INFLATEQ, b"\5"), AddBuffer(DEFLATEQ, b"\1\2"))
    assert decode(data, strict=True).operations == expected
    packed_bit = decode(bytes([2, 0x40]) + data[2:])
    assert packed_bit.operations == expected and not packed_bit.variant.packed
    reencoded = encode(decode(data, strict=True))
    assert reencoded[0] == VERSION and decode(reencoded, strict=True) == decode(data, strict=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_old_versions_never_decode_version_3_operations(data: bytes) -> None:
    """Whatever a version-1 or version-2 input holds, it decodes without malformed chains, INDIRECT_DESC or a packed
    ring, and the same with its device byte's bits 6 and 7 flipped."""
    for version in (1, 2):
        for flip in (0, 0xC0):
            body = bytes([version, (data[0] if data else 0) ^ flip]) + data[1:]
            scenario = decode(body)
            assert not scenario.variant.packed
            assert not any(isinstance(op, MalformedChain) or isinstance(op, Negotiate) and op.features & INDIRECT
                           for op in scenario.operations), f"version {version}: {scenario.operations}"
            if flip:
                assert scenario == decode(bytes([version, body[1] ^ flip]) + data[1:])


def test_the_device_byte_carries_the_packed_ring() -> None:
    scenario = decode(bytes([VERSION, 0x41]), strict=True)
    assert scenario.variant.packed and scenario.variant.transport == "transitional"
    assert device_byte(scenario.variant, False) == 0x41
    assert decode(bytes([VERSION, 0x43])).variant.packed is False, "legacy-only: bit 6 ignored leniently"


@pytest.mark.parametrize("version", [1, 2, VERSION])
def test_the_differential_target_keeps_its_packed_device_for_every_version(version: int) -> None:
    """The qemu_differential target replaces the device byte with its device's: a packed device stays packed
    whatever version byte libFuzzer writes (one QEMU, one device)."""
    packed = decode(bytes([VERSION, 0x41])).variant
    scenario = differential_scenario(device_byte(packed, False))(bytes([version, 0, 0x0E, 2]))
    assert scenario.variant == packed, f"version {version}: expected {packed.name}, got {scenario.variant.name}"
