"""Balloon statistics as QEMU shows them: `qom-get guest-stats`, the polling interval, fresh reports (BAL-DRV-ST-*)."""

from __future__ import annotations

from dataclasses import dataclass

from vballoon.qemu.machine import Machine
from vballoon.spec import STAT_UNSET, STATS
from vballoon.waiting import wait_for

BALLOON_QOM_PATH = "/machine/peripheral/balloon0"
QOM_KEYS = {info.qom_key: info for info in STATS}


@dataclass(frozen=True)
class StatsReport:
    """One `guest-stats` reading: host receive time (whole seconds) and every stat QEMU knows."""

    last_update: int
    values: dict[str, int]

    def present(self) -> frozenset[str]:
        """QOM keys of the stats the driver supplied (not 2^64-1)."""
        return frozenset(key for key, value in self.values.items() if value != STAT_UNSET)


def read_stats(vm: Machine) -> StatsReport:
    raw = vm.qmp.command("qom-get", path=BALLOON_QOM_PATH, property="guest-stats")
    return StatsReport(int(raw["last-update"]), {k: int(v) for k, v in raw["stats"].items()})


def set_polling_interval(vm: Machine, seconds: int) -> None:
    """Ask QEMU to request stats every `seconds` of virtual time (0 stops polling)."""
    vm.qmp.command("qom-set", path=BALLOON_QOM_PATH, property="guest-stats-polling-interval", value=seconds)


def wait_report_after(vm: Machine, last_update: int, timeout: float, what: str) -> StatsReport:
    """The first report whose last-update is later than `last_update`."""
    seen: list[StatsReport] = []

    def newer() -> StatsReport | None:
        seen.append(read_stats(vm))
        return seen[-1] if seen[-1].last_update > last_update else None

    return wait_for(newer, timeout, what, interval=0.1,
                    describe_last=lambda: f"last-update {seen[-1].last_update}" if seen else "nothing")
