"""BALLOON_CHANGE in a real guest: every settled `actual` reaches the host, paced by QEMU's event throttling.

The guest driver writes `actual` after every inflate round of up to 256 pages (update_balloon_size_func,
drivers/virtio/virtio_balloon.c, Linux 6.1 and 6.12), so one resize changes it many times a second; QEMU raises
BALLOON_CHANGE on each change (virtio_balloon_set_config) and its monitor passes at most one a second
(vballoon.qemu.event_throttle has the source reading and the checks).
"""

from __future__ import annotations

import time

import pytest

from vballoon.qemu.balloon import MIB
from vballoon.qemu.event_throttle import RATE_LIMIT_S, Change, pacing_problems
from vballoon.qemu.machine import Machine
from vballoon.waiting import wait_for

STEP_MIB = 48
# Four steps inflate 192 MiB: the balloon stays under 0xff00 pages and every round is 256 pages, so over legacy
# virtio-pci, where the driver writes actual a byte at a time (BAL-DRV-LEG-ACT), no write carries into a third
# byte and QEMU never sees a transient actual: the values QEMU announces only fall. Each step waits for the next
# paced event (a second): eight steps of 24 MiB checked the same pacing in 4 s more a variant.
STEPS = 4
POLL_S = 0.005
# Slack: QEMU's throttle timer firing late and a sent event waiting a poll more for the host's reader, on a busy
# 2-core TCG host. Measured (pci-modern, TCG, QEMU 7.2): events received 0.9975-1.0035 s apart, the first one
# 1-4 ms after QEMU raised it.
SLACK_S = 0.1
EVENT_DEADLINE_S = 10 * RATE_LIMIT_S
SETTLE_DEADLINE_S = 60.0


class ChangeLog:
    """The BALLOON_CHANGE events of one machine with the host time each was read, polled every POLL_S."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.changes: list[Change] = []
        self.looked = time.time()

    def _read(self) -> None:
        before, self.looked = self.looked, time.time()
        self.changes += [Change.of(event, before, self.looked) for event in self.vm.qmp.take_events("BALLOON_CHANGE")]

    def wait_for(self, count: int) -> Change:
        """Wait until `count` events have been read; the newest."""
        def enough() -> Change | None:
            self._read()
            return self.changes[-1] if len(self.changes) >= count else None

        return wait_for(enough, EVENT_DEADLINE_S, f"BALLOON_CHANGE number {count}", interval=POLL_S,
                        max_interval=POLL_S, describe_last=lambda: f"{len(self.changes)} events")

    def wait_for_actual(self, actual: int) -> Change:
        def announced() -> Change | None:
            self._read()
            return self.changes[-1] if self.changes and self.changes[-1].actual == actual else None

        return wait_for(announced, EVENT_DEADLINE_S, f"BALLOON_CHANGE with actual {actual} (BAL-DRV-ACT-1)",
                        interval=POLL_S, max_interval=POLL_S,
                        describe_last=lambda: f"{[c.actual for c in self.changes]}")

    def after(self) -> list[Change]:
        """Events read since the last wait."""
        seen = len(self.changes)
        self._read()
        return self.changes[seen:]


@pytest.mark.req("BAL-DRV-ACT-1", "BAL-DRV-OP-1")
def test_balloon_change_paced_and_last_value_delivered(shared_vm: Machine) -> None:
    """Four inflate steps, each asked for as the previous BALLOON_CHANGE arrives: the events' actual only falls
    (no value twice in a row), they are paced one per second by receive time and by QEMU's timestamps, each
    arrives at most a second after QEMU raised it, the last one is the settled actual, and none follows it.
    (Broken on purpose: an interval of 1.5 s fails the pacing, dropping the last event fails the settled
    value; tests/test_event_throttle.py breaks each check on made-up events.)"""
    vm, ram = shared_vm, shared_vm.memory_mib * MIB
    vm.host_balloon.reach_target(ram)
    vm.qmp.take_events("BALLOON_CHANGE")
    log = ChangeLog(vm)
    final = ram - STEPS * STEP_MIB * MIB
    for step in range(1, STEPS + 1):
        vm.host_balloon.set_target(ram - step * STEP_MIB * MIB)
        log.wait_for(step)
    log.wait_for_actual(final)
    settled = vm.host_balloon.wait_settled(quiet_s=2 * RATE_LIMIT_S + SLACK_S, timeout=SETTLE_DEADLINE_S)
    late = log.after()
    changes = log.changes
    print("\n".join(f"actual {c.actual // MIB} MiB raised {c.raised:.6f}, sent in {c.sent_after:.6f}-"
                    f"{c.received:.6f}" for c in changes))
    assert settled == final, f"BAL-DRV-OP-1: expected actual to settle at {final}, got {settled}"
    assert not late, (f"BAL-DRV-ACT-1: expected no BALLOON_CHANGE after the settled actual {settled} was announced, "
                      f"got {[c.actual for c in late]}")
    actuals = [c.actual for c in changes]
    assert actuals == sorted(set(actuals), reverse=True), (
        f"BAL-DRV-ACT-1: over an inflate-only run expected each BALLOON_CHANGE below the one before, got {actuals}")
    problems = pacing_problems(changes, SLACK_S)
    assert not problems, "QEMU's BALLOON_CHANGE throttling (monitor_qapi_event_conf): " + "; ".join(problems)
    assert changes[-1].actual == settled, (
        f"BAL-DRV-ACT-1: expected the last BALLOON_CHANGE to carry the settled actual {settled}, "
        f"got {changes[-1].actual}")
