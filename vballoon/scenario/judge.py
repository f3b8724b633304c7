"""The judge: a QEMU observation against the reference's, with the requirement each difference breaks.

`compare` judges one observation: where the spec lets the device choose (MAY/SHOULD), the reference's allowed
outcomes decide, and each `Difference` names the requirement it breaks. `UsedLedger` matches used entries
across observations (QEMU may use a buffer later than the reference). Nothing here imports QEMU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from vballoon.differences import describe_mapping_difference
from vballoon.reference import BalloonDevice
from vballoon.scenario.malformed import DEVICE_REQUIREMENTS, OUTCOMES
from vballoon.scenario.observation import Observation
from vballoon.scenario.reference_executor import ReferenceExecutor
from vballoon.spec import ConfigField, Feature, Status, has_feature


@dataclass(frozen=True)
class Difference:
    """An observation of QEMU outside what the reference allows, and the requirement that says so."""

    requirement: str | None
    """None when no requirement covers it (QEMU crashed)."""
    what: str
    expected: Any
    got: Any

    def __str__(self) -> str:
        if isinstance(self.expected, Mapping) and isinstance(self.got, Mapping):
            return f"{self.requirement or 'QEMU crash'}: {self.what}: " \
                   f"{describe_mapping_difference(self.expected, self.got)}"
        return f"{self.requirement or 'QEMU crash'}: {self.what}: expected {self.expected!r}, got {self.got!r}"


@dataclass
class Judgement:
    """The differences of one step."""

    differences: list[Difference] = field(default_factory=list)

    def add(self, requirement: str | None, what: str, expected: Any, got: Any) -> None:
        self.differences.append(Difference(requirement, what, expected, got))


def _is_subsequence(part: Sequence[int], whole: Sequence[int]) -> bool:
    remaining = iter(whole)
    return all(any(value == candidate for candidate in remaining) for value in part)


LOST_NEEDS_RESET = "QEMU logged a virtio_error but its device status lacks DEVICE_NEEDS_RESET"
"""The difference from VQ-DEV-STATUS-1 ("The device SHOULD set DEVICE_NEEDS_RESET when it enters an error state that
a reset is needed") of a device error whose bit is gone. QEMU can lose the bit: virtio_error in the free page hint
iothread sets it while the main loop is inside virtio_set_status (hw/virtio/virtio.c), which wakes that iothread
through the balloon's set_status and then stores the status value it was called with (a known deviation that names
this difference)."""


RING_ERROR = "VQ-DEV-STATUS-1"
"""After a malformed chain, a device error (or its absence) outside the kind's allowed outcomes (unless the kind names
another device requirement: `malformed.DEVICE_REQUIREMENTS`), and a device error whose bit is lost (`LOST_NEEDS_RESET`)."""


def compare(reference: ReferenceExecutor, expected: Observation, got: Observation) -> list[Difference]:
    """Differences of QEMU's `got` from the reference's `expected`, judged with the reference's allowed sets."""
    judgement = Judgement()
    if not got.alive:
        judgement.add(None, "QEMU alive", True, "; ".join(got.crash))
        return judgement.differences
    device, malformed = reference.device, reference.last_malformed
    ring_requirement = DEVICE_REQUIREMENTS.get(malformed.kind, RING_ERROR) if malformed else None
    legacy = not device.properties.modern
    actual_requirement = "BAL-DEV-LEG-ACT" if legacy else "BAL-DRV-ACT-1"
    if (got.request_error is None) != (expected.request_error is None):  # the refusal, not QEMU's words
        judgement.add("BAL-CFG-LEG-LE", "host request refused", expected.request_error or "accepted",
                      got.request_error or "accepted")
    status_bits = Status.FEATURES_OK | Status.DRIVER_OK | Status.DEVICE_NEEDS_RESET
    if got.status & status_bits != expected.status & status_bits:
        lost_needs_reset = expected.status & status_bits == got.status & status_bits | Status.DEVICE_NEEDS_RESET
        if lost_needs_reset and got.device_errors:
            judgement.add(RING_ERROR, LOST_NEEDS_RESET, hex(expected.status), hex(got.status))
        else:
            judgement.add(ring_requirement or "BAL-DEV-LEG-FEAT-1", "device status", hex(expected.status),
                          hex(got.status))
    if (got.device_errors > 0) != (expected.device_errors > 0):
        # A command id buffer that is not 4 bytes breaks BAL-DRV-FPH-1; what the device then does is its own choice.
        if malformed:
            allowed = " or ".join(sorted(outcome.value for outcome in OUTCOMES[malformed.kind]))
            judgement.add(ring_requirement, f"device error after a {malformed.kind} chain (allowed: {allowed})",
                          expected.device_errors, got.device_errors)
        else:
            judgement.add("BAL-DRV-FPH-1" if device.errors and "cmd id" in device.errors[-1] else "BAL-DEV-LEG-FEAT-1",
                          "device error (virtio_error)", expected.device_errors, got.device_errors)
    for name, offset in (("num_pages", ConfigField.NUM_PAGES), ("actual", ConfigField.ACTUAL),
                         ("free_page_hint_cmd_id", ConfigField.FREE_PAGE_HINT_CMD_ID),
                         ("poison_val", ConfigField.POISON_VAL)):
        want, have = expected.config[offset:offset + 4], got.config[offset:offset + 4]
        if want != have and not (name == "poison_val" and reference.poison_val_unspecified):
            requirement = {"actual": actual_requirement, "free_page_hint_cmd_id": "BAL-DEV-FPH-1"}.get(
                name, "BAL-CFG-LEG-LE")
            judgement.add(requirement, f"config {name}", want.hex(), have.hex())
    if got.read_value != expected.read_value:
        judgement.add(actual_requirement if legacy else "BAL-CFG-LEG-LE", "config read", expected.read_value,
                      got.read_value)
    if got.query_balloon != expected.query_balloon:
        judgement.add(actual_requirement, "query-balloon actual", expected.query_balloon, got.query_balloon)
    if not _is_subsequence(got.events, expected.events):
        judgement.add(actual_requirement, "BALLOON_CHANGE values (QEMU may rate-limit: a subsequence)",
                      expected.events, got.events)
    first_legacy_stats = legacy and device.stats.buffers_seen == 1
    stats_requirement = "BAL-DEV-LEG-ST-FIRST" if first_legacy_stats else "BAL-DEV-ST-2"
    if dict(got.guest_stats) != dict(expected.guest_stats):
        judgement.add(stats_requirement, "guest-stats", dict(expected.guest_stats), dict(got.guest_stats))
    if got.stats_updated != expected.stats_updated:
        judgement.add(stats_requirement, "guest-stats last-update set", expected.stats_updated, got.stats_updated)
    for pfn, content in got.pages:
        if pfn in device.reported and reference.poison_val_unspecified:
            continue  # what the device does to a reported page depends on poison_val: any content
        if not device.page_content_allowed(pfn, content):
            allowed = sorted(o.value for o in device.allowed_page_outcomes(pfn))
            judgement.add(_page_requirement(device, pfn), f"page {pfn:#x} content",
                          f"one of {allowed}", _describe_page(content))
    return judgement.differences


def _page_requirement(device: BalloonDevice, pfn: int) -> str:
    if pfn in device.reported:
        return "BAL-DEV-FPR-2" if has_feature(device.driver_features, Feature.PAGE_POISON) else "BAL-DEV-FPR-1"
    if pfn in device.hinted:
        return "BAL-DEV-FPH-5"
    return "BAL-DEV-OP-1"


def _describe_page(content: bytes) -> str:
    return ", ".join(f"{byte:#04x}x{content.count(byte)}" for byte in sorted(set(content)))


class UsedLedger:
    """Used entries the reference produced that QEMU has not shown yet.

    QEMU may use a buffer later than the reference does (it holds free page
    hints while the VM is stopped), so an entry is pending until QEMU shows
    it; pending entries are a difference only while the VM runs. After a
    device error the device may or may not use what it was given: the
    ledger starts afresh.
    """

    def __init__(self) -> None:
        self.pending: Counter[tuple[str, int, int]] = Counter()

    def expect(self, observation: Observation) -> dict[str, int]:
        """Add the reference's new entries; the counts per queue QEMU is waited for."""
        self.pending.update(observation.used)
        counts: Counter[str] = Counter()
        for (name, _, _), count in self.pending.items():
            counts[name] += count
        return dict(counts)

    def settle(self, got: Observation, running: bool, device_broken: bool) -> list[Difference]:
        """Match QEMU's new entries against the pending ones."""
        extra = [entry for entry in got.used if not self._take(entry)]
        if device_broken:
            self.pending.clear()
            return []
        differences = [Difference("BAL-LEG-USED", "used entries the reference did not produce (queue, id, length)",
                                  (), tuple(extra))] if extra else []
        if running and +self.pending:
            differences.append(Difference("BAL-LEG-USED", "used entries QEMU did not produce (queue, id, length)",
                                          tuple(sorted(self.pending.elements())), ()))
            self.pending.clear()
        return differences

    def _take(self, entry: tuple[str, int, int]) -> bool:
        if self.pending[entry] <= 0:
            return False
        self.pending[entry] -= 1
        return True
