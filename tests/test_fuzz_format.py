"""The fuzz input format: any bytes decode, canonical round trips, strict loading and its one-line errors."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vballoon.errors import DecodeError
from vballoon.fuzz.format import MAX_HOST_REQUESTS, MAX_OPERATIONS, VERSION, ScenarioState, decode, encode, load
from vballoon.fuzz.harness import INSTRUMENTED
from vballoon.fuzz.reference_run import run_reference
from vballoon.fuzz.targets import TARGETS
from vballoon.matrix import Variant
from vballoon.reference.device import INFLATEQ, REPORTING_VQ, STATSQ
from vballoon.scenario.operations import (OPERATIONS, AddBuffer, Negotiate, ReadConfig, SetPollingInterval, Stop,
                                          WriteConfig)


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
    (bytes([VERSION, 0x40]), "reserved device bits"),
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


