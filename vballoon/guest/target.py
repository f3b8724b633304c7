"""Driving the balloon from the host: QMP `balloon` targets, waiting for `actual` (BAL-DRV-OP-1/2, BAL-DRV-ACT-1)."""

from __future__ import annotations

import time

from vballoon.qemu.machine import Machine
from vballoon.spec import PAGE_SIZE
from vballoon.waiting import DeadlineExceeded, wait_for

MIB = 1 << 20
PAGE = PAGE_SIZE
# Measured: 256 MiB inflate in 0.3-0.7 s under TCG on an idle 2-core host; the
# deadline allows 50x that for a loaded host.
CONVERGE_DEADLINE_S = 30.0


def set_target(vm: Machine, target_bytes: int, timeout: float = CONVERGE_DEADLINE_S) -> float:
    """Ask for `target_bytes` of guest RAM and wait until query-balloon reports it; seconds taken.

    Fails naming BAL-DRV-OP-1 (inflate) or BAL-DRV-OP-2 (deflate) with the last actual seen.
    """
    before = vm.query_balloon_bytes()
    started = time.monotonic()
    vm.qmp.command("balloon", value=target_bytes)
    requirement = "BAL-DRV-OP-1" if target_bytes < before else "BAL-DRV-OP-2"
    try:
        wait_for(lambda: vm.query_balloon_bytes() == target_bytes, timeout,
                 f"query-balloon actual to reach {target_bytes} ({requirement})", interval=0.01,
                 describe_last=lambda: f"actual {vm.query_balloon_bytes()} (was {before})")
    except DeadlineExceeded as error:
        raise AssertionError(f"{requirement}: expected actual {target_bytes}, {error}") from None
    return time.monotonic() - started


def wait_actual_settles(vm: Machine, quiet_s: float, timeout: float) -> int:
    """Wait until `actual` has not changed for `quiet_s` seconds; return it."""
    last = {"value": vm.query_balloon_bytes(), "since": time.monotonic()}

    def settled() -> int | None:
        value = vm.query_balloon_bytes()
        now = time.monotonic()
        if value != last["value"]:
            last.update(value=value, since=now)
            return None
        return value if now - last["since"] >= quiet_s else None

    return wait_for(settled, timeout, f"query-balloon actual to stay put for {quiet_s:g} s", interval=0.2,
                    describe_last=lambda: f"actual {last['value']}")
