"""The reference-only fuzz targets' oracle: a reference that breaks its contract is reported, with the step."""

from __future__ import annotations

import pytest

from vballoon.fuzz.reference_run import ReferenceFault, run_reference
from vballoon.matrix import Variant
from vballoon.reference.device import BalloonDevice
from vballoon.scenario.operations import Negotiate, ReadConfig, Scenario, SetTarget

SCENARIO = Scenario(Variant(), False, (Negotiate(0b10), SetTarget(16), ReadConfig(0, 4)))


def test_a_sound_reference_runs_the_scenario() -> None:
    reference = run_reference(SCENARIO)
    assert reference.device.num_pages == 16, f"expected num_pages 16 after SetTarget(16), got {reference.device.num_pages}"


def test_a_broken_invariant_is_a_reference_invariant_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule toggled: set_target leaves num_pages above RAM, which `check_device` catches after operation 2."""
    def set_target_beyond_ram(device: BalloonDevice, target: int) -> None:
        device.num_pages = device.ram.num_pages + 1

    monkeypatch.setattr(BalloonDevice, "set_target", set_target_beyond_ram)
    with pytest.raises(ReferenceFault) as fault:
        run_reference(SCENARIO)
    assert (fault.value.kind, fault.value.step, fault.value.op) == ("reference-invariant", 2, SetTarget(16)), (
        f"expected a reference-invariant fault at operation 2 SetTarget(16), got {fault.value}")
    assert "above RAM pages" in fault.value.detail, fault.value.detail


def test_an_escaping_exception_is_a_reference_exception_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_config_that_raises(device: BalloonDevice, offset: int, width: int) -> int:
        raise KeyError("config")

    monkeypatch.setattr(BalloonDevice, "read_config", read_config_that_raises)
    with pytest.raises(ReferenceFault) as fault:
        run_reference(SCENARIO)
    assert (fault.value.kind, fault.value.step) == ("reference-exception", 3), (
        f"expected a reference-exception fault at operation 3 ReadConfig, got {fault.value}")
    assert fault.value.detail == "KeyError: 'config'", fault.value.detail
