"""HMP `info balloon` (through QMP `human-monitor-command`): the same `actual` as `query-balloon`, at once.

No requirement binds the monitors; the closest is BAL-DRV-ACT-1: both views
print the `actual` the driver last wrote, and a host view must not wait for
the guest to answer.

Variants: the baseline only: both commands read QEMU's copy of the config
(virtio_balloon_stat), which no device property or transport changes.
"""

from __future__ import annotations

import re
import time

import pytest

from fixtures.variant_gates import baseline_only
from vballoon.matrix import Variant
from vballoon.qemu.hmp import hmp
from vballoon.qemu.balloon import MIB
from vballoon.qemu.machine import Machine

INFO_BALLOON = re.compile(r"^balloon: actual=(\d+)\s*$")
# Measured: `info balloon` answers in 0.5-3 ms with the VM stopped (TCG, 2 busy cores); a monitor that waited
# for the guest would take until `cont`. 2 s allows a loaded host.
ANSWER_DEADLINE_S = 2.0


baseline = baseline_only("both monitors read QEMU's copy of the balloon config, the same on every "
                                  "device configuration")


def info_balloon_mib(vm: Machine) -> int:
    text = hmp(vm, "info balloon")
    match = INFO_BALLOON.match(text)
    assert match, f"info balloon: expected 'balloon: actual=<MiB>', got {text!r}"
    return int(match[1])


@pytest.mark.req("BAL-DRV-ACT-1")
def test_info_balloon_agrees_with_query_balloon(baseline: Variant, shared_vm: Machine) -> None:
    """At several sizes, `info balloon` prints query-balloon's actual in whole MiB."""
    vm, ram = shared_vm, shared_vm.memory_mib * MIB
    for target in (ram, ram * 3 // 4, ram // 2 + 3 * MIB, ram):
        vm.host_balloon.reach_target(target)
        shown, actual = info_balloon_mib(vm), vm.host_balloon.query_balloon()
        assert shown == actual >> 20, (
            f"BAL-DRV-ACT-1: target {target}: expected info balloon actual={actual >> 20} (query-balloon {actual} "
            f"bytes), got actual={shown}")


@pytest.mark.req("BAL-DRV-ACT-1")
def test_info_balloon_answers_while_the_guest_cannot(baseline: Variant, shared_vm: Machine) -> None:
    """With the VM stopped and a new target pending, `info balloon` answers at once with the old actual; after
    `cont` the guest reaches the target and both views show it."""
    vm, ram = shared_vm, shared_vm.memory_mib * MIB
    vm.qmp.command("stop")
    try:
        vm.host_balloon.set_target(ram // 2)
        started = time.monotonic()
        shown = info_balloon_mib(vm)
        took = time.monotonic() - started
        print(f"info balloon with the VM stopped: {took * 1000:.1f} ms")
        assert took <= ANSWER_DEADLINE_S, (
            f"BAL-DRV-ACT-1: expected info balloon to answer within {ANSWER_DEADLINE_S} s while the VM is stopped, "
            f"took {took:.2f} s")
        assert shown == ram >> 20 == vm.host_balloon.query_balloon() >> 20, (
            f"BAL-DRV-ACT-1: VM stopped, target pending: expected both views at the old actual {ram >> 20} MiB, "
            f"got info balloon {shown} MiB and query-balloon {vm.host_balloon.query_balloon() >> 20} MiB")
    finally:
        vm.qmp.command("cont")
    vm.host_balloon.reach_target(ram // 2)
    assert info_balloon_mib(vm) == (ram // 2) >> 20, "BAL-DRV-ACT-1: after cont: info balloon lags query-balloon"
