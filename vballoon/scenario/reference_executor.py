"""The reference executor: a scenario's operations on the reference device and driver in memory.

The device model is `vballoon.reference`; the host side QEMU provides (QMP requests, the stats timer, stop and
cont, when the free page hint iothread runs) is modelled here, taking QEMU's timing where the spec leaves it
open. Nothing here imports QEMU, SSH or QMP: the fuzz format and the reference-only fuzz targets run on it alone.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

from vballoon.matrix import Variant
from vballoon.reference import BalloonDevice, DeviceProperties, DeviceShape, RequestRejected
from vballoon.reference.device import DEFAULT_SHAPE, FREE_PAGE_VQ
from vballoon.reference.driver import ReferenceDriver
from vballoon.scenario.observation import NO_ANSWER, Answer, Observation
from vballoon.scenario.malformed import ABANDONS_QUEUE, OUTCOMES, RingOutcome, add_malformed_chain, equivalent_buffers
from vballoon.scenario.operations import (MEMORY_MIB, POOL_PFNS, AddBuffer, Cont, FillPage, MalformedChain, Negotiate,
                                          Operation, ReadConfig, Reset, SetPollingInterval, SetTarget, Stop, WriteConfig,
                                          touches_poison_val)
from vballoon.virtqueue import MalformedRingError
from vballoon.spec import PAGE_SIZE, PFN_SHIFT, Feature, Status, has_feature
from vballoon.virtqueue import Buffer


@functools.lru_cache(maxsize=256)  # one per device a fuzz target meets; each reference starts from one
def reference_properties(variant: Variant, legacy_interface: bool, ram_bytes: int,
                         shape: DeviceShape = DEFAULT_SHAPE) -> DeviceProperties:
    """`Variant.reference_properties`, the same object for the same device: its offer, config size and queues are
    worked out once; `shape` is what the QEMU under test chose where the spec lets a device choose
    (`QemuProfile.device_shape`)."""
    return variant.reference_properties(legacy_interface, ram_bytes, shape)


def preferred_outcome(op: MalformedChain) -> RingOutcome:
    """The reference's own answer to a malformed chain: a device error where the spec's SHOULD (VQ-DEV-STATUS-1)
    allows one, else the chain used."""
    return RingOutcome.ERROR if RingOutcome.ERROR in OUTCOMES[op.kind] else RingOutcome.USED


@dataclass(frozen=True)
class FixedClock:
    """The reference's clock: time stands still within a scenario."""

    seconds: float

    def __call__(self) -> float:
        return self.seconds


class ReferenceExecutor:
    """The reference device and driver in memory; the host side (QMP, timers, stop/cont) is modelled here."""

    def __init__(self, variant: Variant, legacy_interface: bool, ram_bytes: int = MEMORY_MIB << 20,
                 shape: DeviceShape = DEFAULT_SHAPE, *, follow_device: bool = False) -> None:
        self.device = BalloonDevice(reference_properties(variant, legacy_interface, ram_bytes, shape),
                                    FixedClock(time.time()))
        self.driver = ReferenceDriver(self.device)
        self.running = True
        self.events: list[int] = []
        self.poison_val_unspecified = False
        """The driver broke BAL-DRV-PP-2 or BAL-DRV-PP-3 since it last negotiated, so the device's poison_val
        (and what it does to reported pages) is not the spec's concern: any value is allowed.

        Why this is a driver violation and not a device deviation: the spec makes poison_val "valid" only with
        PAGE_POISON negotiated (5.5.4) and asks the driver to populate it before DRIVER_OK (BAL-DRV-PP-2) and
        never to change it while DRIVER_OK is set (BAL-DRV-PP-3); it says nothing of the value the device holds
        when the driver did not populate it. QEMU 7.2 and 10.0 keep the driver's bytes in its config image
        (`vdev->config`, rebuilt only by a config read) and `virtio_balloon_set_config` copies the whole image
        on any config write: bytes written to poison_val without PAGE_POISON, or before a reset, come back as
        poison_val at the next config write of a negotiation that accepted PAGE_POISON but did not write
        poison_val. A driver that populates poison_val before DRIVER_OK, as it must, overwrites them."""
        self.poison_val_was_unspecified = False
        """`poison_val_unspecified` held at some point of the scenario (reads of poison_val are then not judged)."""
        self.hints_held = False
        """Free page hint buffers were published while the VM was stopped and wait for cont. QEMU 7.2 and 10.0 hand
        them to an iothread that is blocked while the VM is stopped (`block_iothread`); a reset before cont
        leaves them unprocessed. The spec lets a device use a buffer whenever it likes, so the reference
        takes QEMU's timing."""
        self.follow_device = follow_device
        """A malformed chain's outcome waits for `settle` with what the device under test did (a differential);
        otherwise the reference takes its preferred outcome at once (`preferred_outcome`)."""
        self.unsettled: MalformedChain | None = None
        self.last_malformed: MalformedChain | None = None
        """The last malformed chain since the last negotiation or reset (the judge names its outcomes)."""
        self.abandoned: set[str] = set()
        """Queues whose used rings no longer follow the driver (`malformed.ABANDONS_QUEUE`): not collected."""

    def apply(self, op: Operation, queues: Collection[str] | None = None) -> Answer:
        """Run `op` on the reference; a Negotiate sets up `queues` (default: all), the others ignore it."""
        try:
            return REFERENCE_STEPS[type(op)](self, op, queues)
        except RequestRejected as error:
            return None, str(error)

    def _negotiate(self, op: Negotiate, queues: Collection[str] | None) -> Answer:
        self.hints_held = False
        self.abandoned, self.last_malformed = set(), None
        features = op.driver_features(self.device.offered_features)
        self.poison_val_unspecified = has_feature(features, Feature.PAGE_POISON) and op.poison_val is None
        self.poison_val_was_unspecified |= self.poison_val_unspecified
        if not self.driver.negotiate(features, poison_val=op.poison_val, queues=queues):
            return None, f"FEATURES_OK refused for {features:#x}"
        return NO_ANSWER

    def _set_target(self, op: SetTarget, _: object) -> Answer:
        device = self.device
        device.set_target(device.properties.ram_size - op.pages_below_ram * PAGE_SIZE)
        return NO_ANSWER

    def _write_config(self, op: WriteConfig, _: object) -> Answer:
        if self.device.status & Status.DRIVER_OK and touches_poison_val(op.offset, op.width):
            self.poison_val_unspecified = self.poison_val_was_unspecified = True  # BAL-DRV-PP-3
        self.device.write_config(op.offset, op.width, op.value)
        return NO_ANSWER

    def _read_config(self, op: ReadConfig, _: object) -> Answer:
        return self.device.read_config(op.offset, op.width), None

    def _add_buffer(self, op: AddBuffer, _: object) -> Answer:
        held = op.queue == FREE_PAGE_VQ and not self.running
        self.driver.send(op.queue, op.out, [Buffer(pfn << PFN_SHIFT, PAGE_SIZE) for pfn in op.in_pfns], notify=not held)
        self.hints_held |= held
        return NO_ANSWER

    def _malformed_chain(self, op: MalformedChain, _: object) -> Answer:
        self.last_malformed = op
        if OUTCOMES[op.kind] == {RingOutcome.IGNORED}:
            self._write_chain(op)
        elif self.follow_device:
            self.unsettled = op
        else:
            self._take(op, preferred_outcome(op))
        return NO_ANSWER

    def _write_chain(self, op: MalformedChain) -> None:
        """Write the chain in the reference driver's ring and notify: the reference device answers it itself (the
        kinds with one allowed outcome, which needs no device under test to choose)."""
        queue, driver = self.driver.queues.get(op.queue), self.driver
        if queue is None:
            return
        payload = Buffer(driver.place(op.out), len(op.out))
        add_malformed_chain(queue, op.kind, payload, driver.place, self.device.properties.ram_size)
        self.device.notify(self.device.queue_index(op.queue))

    def settle(self, device_error: bool) -> None:
        """Take the outcome of the unsettled malformed chain that the device under test took: a device error, or
        the chain used. An outcome the spec does not allow for the kind is not taken: the comparison then shows
        the difference."""
        op, self.unsettled = self.unsettled, None
        if op is None:
            return
        seen = RingOutcome.ERROR if device_error else RingOutcome.USED
        self._take(op, seen if seen in OUTCOMES[op.kind] else preferred_outcome(op))

    def _take(self, op: MalformedChain, outcome: RingOutcome) -> None:
        device = self.device
        if op.kind in ABANDONS_QUEUE:
            self.abandoned.add(op.queue)
        if device.broken or op.queue not in self.driver.queues:
            return  # a broken device ignores notifications, as QEMU's virtio_queue_notify
        if outcome is RingOutcome.ERROR:
            device.fail(str(MalformedRingError(op.kind, f"a malformed chain on {op.queue}")))
        else:
            self.driver.send(op.queue, op.out, equivalent_buffers(op.kind, device.properties.ram_size))

    def _fill_page(self, op: FillPage, _: object) -> Answer:
        self.device.ram.write(op.pfn << PFN_SHIFT, bytes([op.byte]) * PAGE_SIZE)
        return NO_ANSWER

    def _set_polling_interval(self, op: SetPollingInterval, _: object) -> Answer:
        self.device.set_stats_polling_interval(op.seconds)
        return NO_ANSWER

    def _stop_or_cont(self, op: Stop | Cont, _: object) -> Answer:
        self.running = isinstance(op, Cont)
        if self.running and self.hints_held:
            self.hints_held = False
            self.device.notify(self.device.queue_index(FREE_PAGE_VQ))
        return NO_ANSWER

    def _reset(self, op: Reset, _: object) -> Answer:
        self.hints_held = False
        self.device.write_status(0)
        self.driver.queues = {}
        self.abandoned, self.last_malformed = set(), None
        self.poison_val_unspecified = False
        return NO_ANSWER

    def observe(self, answer: Answer) -> Observation:
        """The state after the last operation, whose answer was `answer`; due timers fire first while running."""
        device = self.device
        if self.running:
            device.run_timers()
        used = tuple((name, e.id, e.length) for name, queue in self.driver.queues.items()
                     if name not in self.abandoned for e in queue.collect_used())
        self.events += [e.actual for e in device.take_events()]
        stats = device.guest_stats()
        return Observation(
            alive=True, status=device.status, config=device.config_bytes(),
            read_value=answer[0], request_error=answer[1], used=used, query_balloon=device.query_balloon(),
            guest_stats=tuple(sorted(stats["stats"].items())),  # type: ignore[attr-defined]
            stats_updated=bool(stats["last-update"]), events=tuple(self.events),
            pages=tuple((pfn, device.ram.page(pfn)) for pfn in POOL_PFNS), device_errors=len(device.errors))


REFERENCE_STEPS: dict[type, Callable[[ReferenceExecutor, Any, Collection[str] | None], Answer]] = {
    Negotiate: ReferenceExecutor._negotiate, SetTarget: ReferenceExecutor._set_target,
    WriteConfig: ReferenceExecutor._write_config, ReadConfig: ReferenceExecutor._read_config,
    AddBuffer: ReferenceExecutor._add_buffer, MalformedChain: ReferenceExecutor._malformed_chain,
    FillPage: ReferenceExecutor._fill_page,
    SetPollingInterval: ReferenceExecutor._set_polling_interval, Stop: ReferenceExecutor._stop_or_cont,
    Cont: ReferenceExecutor._stop_or_cont, Reset: ReferenceExecutor._reset,
}
"""How the reference runs each operation type: the handler `ReferenceExecutor.apply` looks up (one lookup instead of
a chain of isinstance tests per operation; `qemu_executor.QEMU_STEPS` is QEMU's table)."""
