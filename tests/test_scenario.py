"""Scenarios as plain data, the reference executor, and what the executors share: one dispatch table each, and an
import closure without QEMU for the reference side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vballoon.errors import DecodeError
from vballoon.matrix import Variant
from vballoon.reference.device import FREE_PAGE_VQ
from vballoon.scenario.operations import (HOST_REQUESTS, OPERATIONS, POOL_PFNS, AddBuffer, Cont, FillPage, Negotiate,
                                          ReadConfig, Reset, Scenario, SetPollingInterval, SetTarget, Stop, WriteConfig,
                                          scenario_from_json, scenario_to_json)
from vballoon.scenario.qemu_executor import QEMU_STEPS, QMP_COMMANDS
from vballoon.scenario.reference_executor import REFERENCE_STEPS, ReferenceExecutor
from vballoon.spec import ConfigField, Feature, encode_pfns, encode_stats, feature_mask

ROOT = Path(__file__).resolve().parents[1]
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


def test_reference_executor_answers_host_requests_like_qemu() -> None:
    reference = ReferenceExecutor(Variant(), False)
    assert reference.apply(SetTarget(128 << 8)) == (None, "balloon target 0 refused: it must be a positive size")
    assert reference.apply(SetPollingInterval(-1)) == (None, "polling interval -1 refused: it must not be negative")
    assert reference.apply(SetPollingInterval(1 << 32)) == (None, f"polling interval {1 << 32} refused: it must fit "
                                                                   "in 32 bits")
    reference.apply(Negotiate(feature_mask(Feature.STATS_VQ)))
    reference.apply(SetTarget(5))
    assert reference.apply(ReadConfig(ConfigField.NUM_PAGES, 4)) == (5, None)


def test_stats_buffer_is_held_until_polling_starts_and_not_while_stopped() -> None:
    reference = ReferenceExecutor(Variant(), False)
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
        reference = ReferenceExecutor(variant, False)
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


def test_each_executor_has_a_handler_for_every_operation() -> None:
    operations = set(OPERATIONS.values())
    assert set(REFERENCE_STEPS) == operations, f"reference: missing {operations - set(REFERENCE_STEPS)}"
    assert set(QEMU_STEPS) == operations, f"QEMU: missing {operations - set(QEMU_STEPS)}"
    assert set(QMP_COMMANDS) == set(HOST_REQUESTS), f"QMP: missing {set(HOST_REQUESTS) - set(QMP_COMMANDS)}"


def test_the_reference_side_loads_without_qemu_ssh_or_qmp() -> None:
    """The fuzz format, the reference-only targets, the reference executor and the judge import nothing of QEMU,
    SSH or QMP (checked in a fresh interpreter: this one has them loaded)."""
    check = ("import sys\n"
             "import vballoon.fuzz.format, vballoon.fuzz.reference_run, vballoon.fuzz.targets, vballoon.scenario.judge\n"
             "from vballoon.fuzz.harness import reference_input\n"
             "reference_input('scenario')\n"
             "print(sorted(m for m in sys.modules if m.startswith(('vballoon.qemu', 'qemu', 'paramiko'))))\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "[]", f"loaded: {result.stdout.strip()}"
