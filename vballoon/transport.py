"""Scenarios of balloon operations, run on QEMU over qtest or on the reference device, and compared.

A scenario is a list of small frozen operations (plain data: ints, bytes and
tuples, so a fuzzer can encode and replay them; see `scenario_to_json`). A
`Transport` applies them one by one and, after each, gives an `Observation`:
config bytes, device status, new used entries, query-balloon, guest-stats,
BALLOON_CHANGE events, the pages of the scenario's page pool, device errors
and whether QEMU is alive.

`QemuTransport` drives QEMU's balloon through `QtestBalloon` and records
every qtest line it sends, so a scenario renders as a standalone reproducer
(`reproducer()`: the QEMU command line and the lines for `-qtest stdio`).
`ReferenceTransport` drives `vballoon.reference` in memory. `compare` judges
a QEMU observation against the reference: where the spec lets the device
choose (MAY/SHOULD), the reference's allowed outcomes decide, and each
difference names the requirement it breaks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence, Union

from vballoon.differences import describe_mapping_difference
from vballoon.errors import DecodeError, QemuError, UsageError
from vballoon.matrix import Variant
from vballoon.qemu.process import QemuBinary
from vballoon.qemu.profile import qemu_profile
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.reference import BalloonDevice, DeviceProperties, DeviceShape, RequestRejected
from vballoon.reference.device import DEFAULT_SHAPE, FREE_PAGE_VQ
from vballoon.reference.driver import ReferenceDriver
from vballoon.spec import (BALLOON_FEATURES, PAGE_SIZE, PFN_SHIFT, ConfigField, Feature, Status, config_size,
                           feature_mask, has_feature)
from vballoon.virtqueue import Buffer
from vballoon.waiting import DeadlineExceeded, wait_for

POOL_FIRST_PFN = 0x800
"""The scenario's page pool starts at 8 MiB: above QEMU's rings and buffers, below the reference driver's."""
POOL_PAGES = 8
POOL_PFNS = tuple(range(POOL_FIRST_PFN, POOL_FIRST_PFN + POOL_PAGES))
MEMORY_MIB = 128
USED_TIMEOUT = 3.0

# --- operations -------------------------------------------------------------------


@dataclass(frozen=True)
class Negotiate:
    """Reset, accept `features` (balloon bits 0-5; VERSION_1 is added on the modern interface), write
    `poison_val` if given, set up every queue, DRIVER_OK."""

    features: int
    poison_val: int | None = None


@dataclass(frozen=True)
class SetTarget:
    """QMP `balloon` with RAM minus `pages_below_ram` pages (0 or more pages than RAM: refused)."""

    pages_below_ram: int


@dataclass(frozen=True)
class WriteConfig:
    """One config write of `width` bytes (1, 2, 4) at `offset` (actual is at 4, poison_val at 12)."""

    offset: int
    width: int
    value: int


@dataclass(frozen=True)
class ReadConfig:
    """One config read; the value is `Observation.read_value`."""

    offset: int
    width: int


@dataclass(frozen=True)
class AddBuffer:
    """One chain on `queue` (a reference queue name): `out` as one device-readable buffer when not empty,
    then one device-writable page per PFN of `in_pfns`; notify."""

    queue: str
    out: bytes = b""
    in_pfns: tuple[int, ...] = ()


@dataclass(frozen=True)
class FillPage:
    """The driver writes `byte` over the whole page `pfn`."""

    pfn: int
    byte: int


@dataclass(frozen=True)
class SetPollingInterval:
    """qom-set guest-stats-polling-interval (seconds)."""

    seconds: int


@dataclass(frozen=True)
class Stop:
    """QMP stop: virtual time (the stats timer) stands still."""


@dataclass(frozen=True)
class Cont:
    """QMP cont."""


@dataclass(frozen=True)
class Reset:
    """The driver writes 0 to the device status."""


Operation = Union[Negotiate, SetTarget, WriteConfig, ReadConfig, AddBuffer, FillPage, SetPollingInterval, Stop,
                  Cont, Reset]
HostRequest = Union[SetTarget, SetPollingInterval, Stop, Cont]
HOST_REQUESTS = (SetTarget, SetPollingInterval, Stop, Cont)
"""The operations a host makes: QMP commands on QEMU."""
OPERATIONS: dict[str, type] = {cls.__name__: cls for cls in (Negotiate, SetTarget, WriteConfig, ReadConfig,
                                                              AddBuffer, FillPage, SetPollingInterval, Stop,
                                                              Cont, Reset)}


def queues_used(ops: Sequence[Operation], start: int) -> frozenset[str]:
    """The queues `ops` add buffers to from `start` up to the next Negotiate or Reset: the ones a Negotiate just
    before `start` needs to set up (a device never touches a queue without buffers)."""
    used = set()
    for op in ops[start:]:
        if isinstance(op, (Negotiate, Reset)):
            break
        if isinstance(op, AddBuffer):
            used.add(op.queue)
    return frozenset(used)


@dataclass(frozen=True)
class Scenario:
    """A device configuration and the operations to run on it."""

    variant: Variant
    legacy_interface: bool
    operations: tuple[Operation, ...]


def scenario_to_json(scenario: Scenario) -> str:
    """One line of JSON: the variant by name, each operation as [name, fields...] with bytes in hex."""
    ops = [[type(op).__name__, *(v.hex() if isinstance(v, bytes) else v for v in dataclasses.astuple(op))]
           for op in scenario.operations]
    return json.dumps({"variant": scenario.variant.name, "legacy_interface": scenario.legacy_interface,
                       "operations": ops}, separators=(",", ":"))


def scenario_from_json(text: str) -> Scenario:
    """The inverse of `scenario_to_json`; DecodeError on anything else."""
    try:
        data = json.loads(text)
        operations = []
        for name, *values in data["operations"]:
            cls = OPERATIONS[name]
            kinds = [f.type for f in dataclasses.fields(cls)]
            args = [bytes.fromhex(v) if kind == "bytes" else tuple(v) if kind.startswith("tuple") else v
                    for v, kind in zip(values, kinds, strict=True)]
            operations.append(cls(*args))
        return Scenario(Variant.from_name(data["variant"]), bool(data["legacy_interface"]), tuple(operations))
    except (ValueError, KeyError, TypeError, UsageError) as error:
        raise DecodeError(f"not a vballoon scenario: {error}") from None


# --- observations ---------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What a transport shows after one operation."""

    alive: bool
    status: int = 0
    config: bytes = b""
    read_value: int | None = None
    request_error: str | None = None
    used: tuple[tuple[str, int, int], ...] = ()
    """(queue, head id, length) of the entries used since the previous observation."""
    query_balloon: int = 0
    guest_stats: tuple[tuple[str, int], ...] = ()
    stats_updated: bool = False
    """last-update is non-zero (its value is wall-clock seconds in QEMU, so only this is compared)."""
    events: tuple[int, ...] = ()
    """BALLOON_CHANGE values since the start, in order."""
    pages: tuple[tuple[int, bytes], ...] = ()
    device_errors: int = 0
    """Device errors (virtio_error) since the start."""
    crash: tuple[str, ...] = ()


class Transport(Protocol):
    """Where a scenario runs: start it, apply operations, observe."""

    def apply(self, op: Operation) -> tuple[int | None, str | None]:
        """Run one operation: (value read, or None; error text of a refused host request, or None)."""
        ...

    def observe(self, result: tuple[int | None, str | None], expect_used: Mapping[str, int]) -> Observation:
        """The state after the last operation; QEMU waits for `expect_used` entries per queue first."""
        ...


@functools.lru_cache(maxsize=256)  # one per device a fuzz target meets; each reference starts from one
def reference_properties(variant: Variant, legacy_interface: bool, ram_bytes: int,
                         shape: DeviceShape = DEFAULT_SHAPE) -> DeviceProperties:
    """The reference device standing for QEMU's balloon of `variant` seen through one interface; `shape` is
    what the QEMU under test chose where the spec lets a device choose (`QemuProfile.device_shape`)."""
    return DeviceProperties(ram_size=ram_bytes, deflate_on_oom=variant.deflate_on_oom,
                            free_page_hint=variant.free_page_hint, free_page_reporting=variant.free_page_reporting,
                            page_poison=variant.page_poison, modern=not legacy_interface, shape=shape)


def touches_poison_val(offset: int, width: int) -> bool:
    """Whether a config access of `width` bytes at `offset` covers a byte of poison_val."""
    return offset < ConfigField.POISON_VAL + 4 and offset + width > ConfigField.POISON_VAL


_BALLOON_BITS, _VERSION_1 = feature_mask(*BALLOON_FEATURES), feature_mask(Feature.VERSION_1)


def driver_features(features: int, offered: int) -> int:
    """The balloon bits of `features`, plus VERSION_1 when the interface offers it."""
    return features & _BALLOON_BITS | offered & _VERSION_1


@dataclass(frozen=True)
class FixedClock:
    """The reference's clock: time stands still within a scenario."""

    seconds: float

    def __call__(self) -> float:
        return self.seconds


class ReferenceTransport:
    """The reference device and driver in memory; the host side (QMP, timers, stop/cont) is modelled here."""

    def __init__(self, variant: Variant, legacy_interface: bool, ram_bytes: int = MEMORY_MIB << 20,
                 shape: DeviceShape = DEFAULT_SHAPE) -> None:
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

    def apply(self, op: Operation, queues: Collection[str] | None = None) -> tuple[int | None, str | None]:
        """Run `op` on the reference; a Negotiate sets up `queues` (default: all), the others ignore it."""
        try:
            return _REFERENCE_STEPS[type(op)](self, op, queues)
        except RequestRejected as error:
            return None, str(error)

    def _negotiate(self, op: Negotiate, queues: Collection[str] | None) -> tuple[int | None, str | None]:
        self.hints_held = False
        features = driver_features(op.features, self.device.offered_features)
        self.poison_val_unspecified = has_feature(features, Feature.PAGE_POISON) and op.poison_val is None
        self.poison_val_was_unspecified |= self.poison_val_unspecified
        if not self.driver.negotiate(features, poison_val=op.poison_val, queues=queues):
            return None, f"FEATURES_OK refused for {features:#x}"
        return _NO_ANSWER

    def _set_target(self, op: SetTarget, _: object) -> tuple[int | None, str | None]:
        device = self.device
        device.set_target(device.properties.ram_size - op.pages_below_ram * PAGE_SIZE)
        return _NO_ANSWER

    def _write_config(self, op: WriteConfig, _: object) -> tuple[int | None, str | None]:
        if self.device.status & Status.DRIVER_OK and touches_poison_val(op.offset, op.width):
            self.poison_val_unspecified = self.poison_val_was_unspecified = True  # BAL-DRV-PP-3
        self.device.write_config(op.offset, op.width, op.value)
        return _NO_ANSWER

    def _read_config(self, op: ReadConfig, _: object) -> tuple[int | None, str | None]:
        return self.device.read_config(op.offset, op.width), None

    def _add_buffer(self, op: AddBuffer, _: object) -> tuple[int | None, str | None]:
        held = op.queue == FREE_PAGE_VQ and not self.running
        self.driver.send(op.queue, op.out, [Buffer(pfn << PFN_SHIFT, PAGE_SIZE) for pfn in op.in_pfns], notify=not held)
        self.hints_held |= held
        return _NO_ANSWER

    def _fill_page(self, op: FillPage, _: object) -> tuple[int | None, str | None]:
        self.device.ram.write(op.pfn << PFN_SHIFT, bytes([op.byte]) * PAGE_SIZE)
        return _NO_ANSWER

    def _set_polling_interval(self, op: SetPollingInterval, _: object) -> tuple[int | None, str | None]:
        self.device.set_stats_polling_interval(op.seconds)
        return _NO_ANSWER

    def _stop_or_cont(self, op: Stop | Cont, _: object) -> tuple[int | None, str | None]:
        self.running = isinstance(op, Cont)
        if self.running and self.hints_held:
            self.hints_held = False
            self.device.notify(self.device.queue_index(FREE_PAGE_VQ))
        return _NO_ANSWER

    def _reset(self, op: Reset, _: object) -> tuple[int | None, str | None]:
        self.hints_held = False
        self.device.write_status(0)
        self.driver.queues = {}
        self.poison_val_unspecified = False
        return _NO_ANSWER

    def observe(self, result: tuple[int | None, str | None], expect_used: Mapping[str, int] = {}) -> Observation:
        device = self.device
        if self.running:
            device.run_timers()
        used = tuple((name, e.id, e.length) for name, queue in self.driver.queues.items()
                     for e in queue.collect_used())
        self.events += [e.actual for e in device.take_events()]
        stats = device.guest_stats()
        return Observation(
            alive=True, status=device.status, config=device.config_bytes(),
            read_value=result[0], request_error=result[1], used=used, query_balloon=device.query_balloon(),
            guest_stats=tuple(sorted(stats["stats"].items())),  # type: ignore[attr-defined]
            stats_updated=bool(stats["last-update"]), events=tuple(self.events),
            pages=tuple((pfn, device.ram.page(pfn)) for pfn in POOL_PFNS), device_errors=len(device.errors))


_NO_ANSWER: tuple[int | None, str | None] = (None, None)
_REFERENCE_STEPS: dict[type, Callable[[ReferenceTransport, Any, Collection[str] | None], tuple[int | None, str | None]]] = {
    Negotiate: ReferenceTransport._negotiate, SetTarget: ReferenceTransport._set_target,
    WriteConfig: ReferenceTransport._write_config, ReadConfig: ReferenceTransport._read_config,
    AddBuffer: ReferenceTransport._add_buffer, FillPage: ReferenceTransport._fill_page,
    SetPollingInterval: ReferenceTransport._set_polling_interval, Stop: ReferenceTransport._stop_or_cont,
    Cont: ReferenceTransport._stop_or_cont, Reset: ReferenceTransport._reset,
}
"""How the reference runs each operation type (one lookup instead of a chain of isinstance tests per operation)."""


class QemuTransport:
    """QEMU's balloon over qtest, one fresh QEMU per scenario (a context manager)."""

    def __init__(self, qemu: QemuBinary, variant: Variant, legacy_interface: bool, log_dir: Path,
                 record: bool = True) -> None:
        self.machine = QtestMachine(qemu, variant, log_dir, memory_mib=MEMORY_MIB, keep_transcripts=record)
        self.legacy_interface = legacy_interface
        self.queue_names = reference_properties(variant, legacy_interface, self.machine.ram_bytes).queue_names
        self.record = record
        """Whether qtest lines are kept (the reproducer and the transcript); off for a fuzzer's long-lived QEMU."""
        self.recording: list[str] = []
        self.events: list[int] = []
        self._balloon: QtestBalloon | None = None

    def __enter__(self) -> "QemuTransport":
        self.machine.__enter__()
        try:
            if self.record:
                self.machine.qtest.recording = self.recording
                self.recording.append("# QMP: cont")
            self._balloon = QtestBalloon(self.machine, self.legacy_interface)
            self._balloon.driver.allocator.end = POOL_FIRST_PFN << PFN_SHIFT
        except BaseException:
            self.machine.stop()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.machine.stop()

    @property
    def balloon(self) -> QtestBalloon:
        if self._balloon is None:
            raise QemuError("the QEMU transport is not started")
        return self._balloon

    @property
    def config_size(self) -> int:
        return config_size(self.balloon.offered)

    def qmp_command(self, op: HostRequest) -> tuple[str, dict[str, Any]]:
        """The QMP command (name, arguments) of a host request."""
        if isinstance(op, SetTarget):
            return "balloon", {"value": self.machine.ram_bytes - op.pages_below_ram * PAGE_SIZE}
        if isinstance(op, SetPollingInterval):
            return "qom-set", {"path": self.machine.balloon_qom_path(), "property": "guest-stats-polling-interval",
                               "value": op.seconds}
        return type(op).__name__.lower(), {}

    def apply_host_requests(self, ops: Sequence[HostRequest]) -> list[tuple[int | None, str | None]]:
        """Host requests sent over QMP together (QEMU runs them in order), noted in the reproducer; the answer
        of each: QEMU's error text if it refused."""
        commands = [self.qmp_command(op) for op in ops]
        if commands:
            self.machine.qtest.flush()  # what the driver did before reaches QEMU first
        if self.record:
            self.recording += [f"# QMP: {json.dumps({'execute': name, 'arguments': arguments})}"
                               for name, arguments in commands]
        return [(None, error) for _, error in self.machine.qmp.try_commands(commands)] if commands else []

    def apply(self, op: Operation, queues: Collection[str] | None = None) -> tuple[int | None, str | None]:
        """Run `op` on QEMU; a Negotiate sets up `queues` (default: all), the others ignore it."""
        balloon, driver = self.balloon, self.balloon.driver
        if isinstance(op, Negotiate):
            indices = None if queues is None else [self.queue_names.index(name) for name in queues]
            try:
                balloon.start(driver_features(op.features, balloon.offered), op.poison_val, indices)
            except QemuError as error:
                return None, str(error)
        elif isinstance(op, HOST_REQUESTS):
            return self.apply_host_requests([op])[0]
        elif isinstance(op, WriteConfig):
            driver.config_write(op.offset, op.width, op.value)
        elif isinstance(op, ReadConfig):
            return driver.config_read(op.offset, op.width), None
        elif isinstance(op, AddBuffer):
            in_buffers = [Buffer(pfn << PFN_SHIFT, PAGE_SIZE) for pfn in op.in_pfns]
            balloon.post(self.queue_names.index(op.queue), [op.out] if op.out else [], in_buffers)
        elif isinstance(op, FillPage):
            self.machine.qtest.memset(op.pfn << PFN_SHIFT, PAGE_SIZE, op.byte)
        elif isinstance(op, Reset):
            driver.reset()
        return None, None

    def observe(self, result: tuple[int | None, str | None], expect_used: Mapping[str, int] = {}) -> Observation:
        machine = self.machine
        crash = tuple(machine.crash_evidence())
        if crash or machine.process is None or machine.process.poll() is not None:
            return Observation(alive=False, crash=crash or (machine.exit_description(),))
        try:
            return self._observe_running(result, expect_used)
        except QemuError as error:
            return Observation(alive=False, crash=tuple(machine.crash_evidence()) or (str(error),))

    def _observe_running(self, result: tuple[int | None, str | None], expect_used: Mapping[str, int]) -> Observation:
        balloon, machine = self.balloon, self.machine
        used = self._collect_used(expect_used)
        self.events += [e["data"]["actual"] for e in machine.qmp.take_events("BALLOON_CHANGE")]
        stats = balloon.guest_stats()
        return Observation(
            alive=True, status=balloon.driver.status,
            config=bytes(balloon.driver.config_read(i, 1) for i in range(self.config_size)),
            read_value=result[0], request_error=result[1], used=used,
            query_balloon=int(machine.qmp.command("query-balloon")["actual"]),
            guest_stats=tuple(sorted(stats["stats"].items())), stats_updated=bool(stats["last-update"]),
            events=tuple(self.events),
            pages=tuple((pfn, machine.qtest.read(pfn << PFN_SHIFT, PAGE_SIZE)) for pfn in POOL_PFNS),
            device_errors=len(machine.device_errors()))

    def _collect_used(self, expect_used: Mapping[str, int]) -> tuple[tuple[str, int, int], ...]:
        """New used entries of every set-up queue, waiting (with a deadline) for the expected counts."""
        queues = self.balloon.driver.queues
        collected: dict[str, list[tuple[str, int, int]]] = {name: [] for name in self.queue_names}

        def gather() -> bool:
            for index, queue in queues.items():
                name = self.queue_names[index]
                collected[name] += [(name, e.id, e.length) for e in queue.collect_used()]
            return all(len(collected[name]) >= count for name, count in expect_used.items())

        try:
            wait_for(gather, USED_TIMEOUT, "the used entries the reference device produced", interval=0.001)
        except DeadlineExceeded:
            pass  # fewer than expected: the comparison reports it
        return tuple(entry for name in self.queue_names for entry in collected[name])

    def reproducer(self, scenario: Scenario | None = None) -> str:
        """The QEMU command line and every qtest line sent, for `qemu-system-x86_64 ... -qtest stdio`.

        QMP steps appear in place as `# QMP: ...` comments (strip them before piping the rest in).
        """
        lines = ["# vballoon reproducer: run the command below, paste the lines that are not comments on its stdin"
                 " (QEMU keeps running after the last one)",
                 f"# {shlex.join(self.machine.standalone_command_line())}"]
        if scenario is not None:
            lines.append(f"# scenario: {scenario_to_json(scenario)}")
        return "\n".join(lines + self.recording) + "\n"


# --- judging ------------------------------------------------------------------------


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


LOST_NEEDS_RESET = "virtio 2.1.2 DEVICE_NEEDS_RESET"
"""Outside the balloon chapter: "The device SHOULD set DEVICE_NEEDS_RESET when it enters an error state that a
reset is needed." QEMU 7.2 and 10.0 can lose the bit: virtio_error in the free page hint iothread sets it while the main
loop is inside virtio_set_status (hw/virtio/virtio.c), which wakes that iothread through the balloon's
set_status and then stores the status value it was called with."""


def compare(reference: ReferenceTransport, expected: Observation, got: Observation) -> list[Difference]:
    """Differences of QEMU's `got` from the reference's `expected`, judged with the reference's allowed sets."""
    judgement = Judgement()
    if not got.alive:
        judgement.add(None, "QEMU alive", True, "; ".join(got.crash))
        return judgement.differences
    device = reference.device
    legacy = not device.properties.modern
    actual_requirement = "BAL-DEV-LEG-ACT" if legacy else "BAL-DRV-ACT-1"
    if (got.request_error is None) != (expected.request_error is None):  # the refusal, not QEMU's words
        judgement.add("BAL-CFG-LEG-LE", "host request refused", expected.request_error or "accepted",
                      got.request_error or "accepted")
    status_bits = Status.FEATURES_OK | Status.DRIVER_OK | Status.DEVICE_NEEDS_RESET
    if got.status & status_bits != expected.status & status_bits:
        lost_needs_reset = expected.status & status_bits == got.status & status_bits | Status.DEVICE_NEEDS_RESET
        if lost_needs_reset and got.device_errors:
            judgement.add(LOST_NEEDS_RESET, "QEMU logged a virtio_error but its device status lacks DEVICE_NEEDS_RESET",
                          hex(expected.status), hex(got.status))
        else:
            judgement.add("BAL-DEV-LEG-FEAT-1", "device status", hex(expected.status), hex(got.status))
    if (got.device_errors > 0) != (expected.device_errors > 0):
        # A command id buffer that is not 4 bytes breaks BAL-DRV-FPH-1; what the device then does is its own choice.
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



@dataclass(frozen=True)
class Step:
    """One operation on both transports: what each showed and how QEMU differed."""

    operation: Operation
    expected: Observation
    got: Observation
    differences: tuple[Difference, ...]


class DifferentialRun:
    """A scenario run step by step on a fresh QEMU and on the reference (a context manager)."""

    def __init__(self, qemu: QemuBinary, variant: Variant, legacy_interface: bool, log_dir: Path) -> None:
        self.reference = ReferenceTransport(variant, legacy_interface, shape=qemu_profile(qemu).device_shape)
        self.qemu = QemuTransport(qemu, variant, legacy_interface, log_dir)
        self.ledger = UsedLedger()
        self.operations: list[Operation] = []
        self.variant = variant
        self.legacy_interface = legacy_interface

    def __enter__(self) -> "DifferentialRun":
        self.qemu.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.qemu.__exit__(*exc_info)

    def step(self, op: Operation) -> Step:
        """Apply `op` to the reference, then to QEMU, and compare what they show."""
        self.operations.append(op)
        self.qemu.recording.append(f"# step {len(self.operations)}: {op!r}")
        expected = self.reference.observe(self.reference.apply(op))
        try:
            result = self.qemu.apply(op)
        except QemuError as error:
            result = (None, f"operation failed: {error}")
        waiting = self.ledger.expect(expected)
        got = self.qemu.observe(result, waiting if self.reference.running and not self.reference.device.broken else {})
        differences = compare(self.reference, expected, got)
        if got.alive:
            differences += self.ledger.settle(got, self.reference.running, self.reference.device.broken)
        return Step(op, expected, got, tuple(differences))

    @property
    def scenario(self) -> Scenario:
        return Scenario(self.variant, self.legacy_interface, tuple(self.operations))

    def reproducer(self) -> str:
        return self.qemu.reproducer(self.scenario)
