"""Asking for more than the guest can give: the driver backs off, the guest answers, `actual` settles.

When balloon_page_alloc fails, fill_balloon logs "Out of puff!" through
dev_info_ratelimited (at most 10 lines per 5 s, then a "callbacks suppressed"
count) and sleeps 200 ms before the next try (BAL-DRV-OP-1: SHOULD supply
pages, as many as it can). The guest boots with `quiet`, so the lines are
read from dmesg over SSH.

Variants: those with DEFLATE_ON_OOM. Without it Linux (6.1, 6.12) keeps inflating
until the OOM killer has no victim and panics "System is deadlocked on
memory" (see test_inflate.py); with it the OOM notifier gives pages back and
the guest lives. The guest is left without known state: `fresh_vm`.
The response-time figures are a benchmark (`vballoon bench balloon`), not a test.
"""

from __future__ import annotations

import math
import time

import pytest

from vballoon.matrix import Variant
from vballoon.qemu.balloon import MIB
from vballoon.qemu.machine import Machine

OUT_OF_PUFF = "Out of puff"
RATELIMIT_INTERVAL_S = 5.0  # DEFAULT_RATELIMIT_INTERVAL
RATELIMIT_BURST = 10  # DEFAULT_RATELIMIT_BURST
# Measured: actual settled within 6 s of a 1 MiB target (TCG, 2 busy cores), with 10 "Out of puff" lines;
# the deadline allows a loaded host.
SETTLE_DEADLINE_S = 180.0
SSH_DEADLINE_S = 60.0


@pytest.mark.oom_report_expected
@pytest.mark.req("BAL-DRV-OP-1", "BAL-DRV-OOM-2", "BAL-DRV-ACT-1")
def test_driver_backs_off_when_the_guest_has_nothing_left(with_deflate_on_oom: Variant, fresh_vm: Machine) -> None:
    """Target 1 MiB: "Out of puff" lines stay within the rate limit, SSH answers, actual settles, and the balloon
    empties again on request."""
    vm, ram = fresh_vm, fresh_vm.memory_mib * MIB
    started = time.monotonic()
    vm.host_balloon.set_target(MIB)
    settled = vm.host_balloon.wait_settled(quiet_s=3.0, timeout=SETTLE_DEADLINE_S)
    vm.ssh.run("true", timeout=SSH_DEADLINE_S)
    dmesg = vm.ssh.output("dmesg", timeout=SSH_DEADLINE_S)
    elapsed = time.monotonic() - started
    puffs = dmesg.count(OUT_OF_PUFF)
    allowed = RATELIMIT_BURST * (math.ceil(elapsed / RATELIMIT_INTERVAL_S) + 1)
    print(f"actual settled at {settled} bytes; {puffs} 'Out of puff' lines in {elapsed:.1f} s (allowed {allowed})")
    assert settled < ram // 2, f"BAL-DRV-OP-1: target 1 MiB: expected the guest to give most of its RAM, " \
                               f"got actual {settled}"
    assert puffs <= allowed, (
        f"BAL-DRV-OP-1: expected at most {allowed} 'Out of puff' lines in {elapsed:.0f} s (dev_info_ratelimited, "
        f"{RATELIMIT_BURST} per {RATELIMIT_INTERVAL_S:g} s), got {puffs}")
    vm.host_balloon.reach_target(ram, timeout=120)
    vm.ssh.run("true", timeout=SSH_DEADLINE_S)
