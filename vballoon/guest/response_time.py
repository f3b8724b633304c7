"""How fast the balloon answers: QMP `balloon` to `actual` at the target, timed by QEMU's own trace clock.

QEMU started with `-msg timestamp=on` prefixes each trace line with
`PID@SECONDS.MICROS:`. `virtio_balloon_to_target` marks the QMP command,
`virtio_balloon_set_config` each `actual` the driver writes (in 4 KiB pages);
the latency is the time between the command and the first write of the
target's page count, free of any polling interval on the host.
"""

from __future__ import annotations

import math
import re

from vballoon.qemu.machine import Machine
from vballoon.spec import PAGE_SIZE

TIMESTAMPED_TRACE_ARGS = ("-msg", "timestamp=on")
RESPONSE_TRACE_EVENTS = ("virtio_balloon_to_target", "virtio_balloon_set_config")
TO_TARGET = re.compile(r"@(\d+\.\d+):virtio_balloon_to_target ")
SET_CONFIG = re.compile(r"@(\d+\.\d+):virtio_balloon_set_config actual: (\d+) ")


def timed_resize(vm: Machine, target_bytes: int) -> float:
    """Resize to `target_bytes` (waiting as `HostBalloon.reach_target` does); seconds from the command to `actual`
    at the target."""
    start = vm.logs.stderr.stat().st_size
    vm.host_balloon.reach_target(target_bytes)
    trace = vm.stderr_since(start)
    commanded = TO_TARGET.search(trace)
    assert commanded is not None, "no timestamped virtio_balloon_to_target line: start QEMU with " \
                                  f"{' '.join(TIMESTAMPED_TRACE_ARGS)} and trace {RESPONSE_TRACE_EVENTS}"
    pages = (vm.memory_mib * (1 << 20) - target_bytes) // PAGE_SIZE
    reached = next((float(m[1]) for m in SET_CONFIG.finditer(trace, commanded.end()) if int(m[2]) == pages), None)
    assert reached is not None, f"no virtio_balloon_set_config line with actual {pages} pages after the command"
    return reached - float(commanded[1])


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
