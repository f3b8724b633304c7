"""The balloon as the host drives it over QMP: its device id and QOM path, targets and `actual`, the statistics
QEMU keeps (`guest-stats`) and their polling interval (BAL-DRV-OP-1/2, BAL-DRV-ACT-1, BAL-DRV-ST-*).

Each QMP command about the balloon is spelled here once, as a `QmpCommand` (name, arguments) that a caller can
send with others in one batch (`Monitor.try_commands`), and sent by a `HostBalloon` method named as the reference
device's host side names it (`set_target`, `query_balloon`, ...). Both QEMU machines (a guest's `Machine` and the
qtest `QtestMachine`) add their balloon with `device_args` and hand out a `HostBalloon` over their monitor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vballoon.errors import QemuError
from vballoon.matrix import Variant
from vballoon.qemu.monitor import Monitor
from vballoon.qemu.virtio_status import VirtioStatus, parse_status
from vballoon.spec import STAT_UNSET
from vballoon.waiting import DeadlineExceeded, wait_for

BALLOON_ID = "balloon0"
IOTHREAD_ID = "iothread0"
"""The iothread free page hinting runs on."""
QOM_PATH = f"/machine/peripheral/{BALLOON_ID}"
POLLING_INTERVAL_PROPERTY = "guest-stats-polling-interval"
MIB = 1 << 20
"""Targets and `actual` are bytes; suites write them in MiB."""
# Measured: 256 MiB inflate in 0.3-0.7 s under TCG on an idle 2-core host; the
# deadline allows 50x that for a loaded host.
CONVERGE_DEADLINE_S = 30.0
QMP_POLL_MAX_S = 0.1
"""The longest pause between two polls of actual or of guest-stats: a query costs QEMU well under a millisecond,
and a wait that backed off to wait_for's 1 s default overran the condition by 0.5 s on average."""

QmpCommand = tuple[str, dict[str, Any]]


def device_args(variant: Variant) -> list[str]:
    """The balloon of `variant` as QEMU arguments, with the iothread free page hinting needs."""
    iothread = ["-object", f"iothread,id={IOTHREAD_ID}"] if variant.free_page_hint else []
    properties = (f"{key}={value}" for key, value in variant.device_properties(IOTHREAD_ID).items())
    return [*iothread, "-device", ",".join(["virtio-balloon-pci", f"id={BALLOON_ID}", *properties])]


def target_command(target_bytes: int) -> QmpCommand:
    """QMP `balloon`: ask for `target_bytes` of guest RAM."""
    return "balloon", {"value": target_bytes}


def query_balloon_command() -> QmpCommand:
    """QMP `query-balloon`: its `actual` is guest RAM minus the balloon, in bytes."""
    return "query-balloon", {}


def guest_stats_command() -> QmpCommand:
    """`qom-get guest-stats`: last-update and one value per stat QEMU knows."""
    return "qom-get", {"path": QOM_PATH, "property": "guest-stats"}


def polling_interval_command(seconds: int) -> QmpCommand:
    """`qom-set guest-stats-polling-interval`: request stats every `seconds` of virtual time (0 stops polling)."""
    return "qom-set", {"path": QOM_PATH, "property": POLLING_INTERVAL_PROPERTY, "value": seconds}


@dataclass(frozen=True)
class StatsReport:
    """One `guest-stats` reading: host receive time (whole seconds) and every stat QEMU knows."""

    last_update: int
    values: dict[str, int]

    def present(self) -> frozenset[str]:
        """QOM keys of the stats the driver supplied (not 2^64-1)."""
        return frozenset(key for key, value in self.values.items() if value != STAT_UNSET)


class HostBalloon:
    """The balloon device of one QEMU, seen and driven through its QMP monitor."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def _send(self, command: QmpCommand) -> Any:
        name, arguments = command
        return self.monitor.command(name, **arguments)

    # --- target and actual ---------------------------------------------------

    def set_target(self, target_bytes: int) -> None:
        """QMP `balloon`, without waiting for the driver; QemuError with QEMU's text if refused."""
        self._send(target_command(target_bytes))

    def query_balloon(self) -> int:
        """`query-balloon` actual: guest RAM minus the balloon, in bytes."""
        return int(self._send(query_balloon_command())["actual"])

    def reach_target(self, target_bytes: int, timeout: float = CONVERGE_DEADLINE_S) -> float:
        """Ask for `target_bytes` of guest RAM and wait until query-balloon reports it; seconds taken.

        Fails naming BAL-DRV-OP-1 (inflate) or BAL-DRV-OP-2 (deflate) with the last actual seen.
        """
        before = self.query_balloon()
        started = time.monotonic()
        self.set_target(target_bytes)
        requirement = "BAL-DRV-OP-1" if target_bytes < before else "BAL-DRV-OP-2"
        try:
            wait_for(lambda: self.query_balloon() == target_bytes, timeout,
                     f"query-balloon actual to reach {target_bytes} ({requirement})", interval=0.01,
                     max_interval=QMP_POLL_MAX_S,
                     describe_last=lambda: f"actual {self.query_balloon()} (was {before})")
        except DeadlineExceeded as error:
            raise AssertionError(f"{requirement}: expected actual {target_bytes}, {error}") from None
        return time.monotonic() - started

    def wait_settled(self, quiet_s: float, timeout: float) -> int:
        """Wait until `actual` has not changed for `quiet_s` seconds; return it."""
        last = {"value": self.query_balloon(), "since": time.monotonic()}

        def settled() -> int | None:
            value = self.query_balloon()
            now = time.monotonic()
            if value != last["value"]:
                last.update(value=value, since=now)
                return None
            return value if now - last["since"] >= quiet_s else None

        return wait_for(settled, timeout, f"query-balloon actual to stay put for {quiet_s:g} s", interval=0.2,
                        max_interval=0.2,
                        describe_last=lambda: f"actual {last['value']}")

    # --- statistics ----------------------------------------------------------

    def set_stats_polling_interval(self, seconds: int) -> None:
        """Ask QEMU to request stats every `seconds` of virtual time (0 stops polling)."""
        self._send(polling_interval_command(seconds))

    def request_stats_now(self, seconds: int) -> None:
        """Have QEMU ask for stats at once (it hands back the buffer it holds), then every `seconds`: QEMU arms its
        stats timer with no delay when polling starts (balloon_stats_set_poll_interval), so polling is stopped and
        started again. A QEMU that waited a whole interval instead would only be slower to hand the buffer back."""
        self.set_stats_polling_interval(0)
        self.set_stats_polling_interval(seconds)

    def stats_polling_interval(self) -> int:
        """`qom-get guest-stats-polling-interval`, in seconds."""
        return int(self.monitor.command("qom-get", path=QOM_PATH, property=POLLING_INTERVAL_PROPERTY))

    def guest_stats(self) -> dict[str, Any]:
        """`qom-get guest-stats` as QEMU answers it: {"last-update": ..., "stats": {qom key: value}}."""
        return dict(self._send(guest_stats_command()))

    def stats_report(self) -> StatsReport:
        raw = self.guest_stats()
        return StatsReport(int(raw["last-update"]), {k: int(v) for k, v in raw["stats"].items()})

    def wait_report_after(self, last_update: int, timeout: float, what: str) -> StatsReport:
        """The first report whose last-update is later than `last_update`."""
        seen: list[StatsReport] = []

        def newer() -> StatsReport | None:
            seen.append(self.stats_report())
            return seen[-1] if seen[-1].last_update > last_update else None

        return wait_for(newer, timeout, what, interval=0.1, max_interval=QMP_POLL_MAX_S,
                        describe_last=lambda: f"last-update {seen[-1].last_update}" if seen else "nothing")

    # --- the virtio device -----------------------------------------------------

    def virtio_path(self) -> str:
        """QOM path of the balloon's virtio device, for the `x-query-virtio-*` commands."""
        for device in self.monitor.command("x-query-virtio"):
            if device["name"] == "virtio-balloon":
                return str(device["path"])
        raise QemuError("x-query-virtio lists no virtio-balloon device")

    def virtio_status(self) -> VirtioStatus:
        """`x-query-virtio-status` of the balloon's virtio device: features offered and accepted, status."""
        return parse_status(self.monitor.command("x-query-virtio-status", path=self.virtio_path()))
