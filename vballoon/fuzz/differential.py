"""The fuzzing differential: inputs on one long-lived QEMU over qtest and on the reference device.

QEMU starts once per `QemuDifferential` and stays up: between inputs the device is reset and everything a reset
leaves behind in QEMU 7.2 and 10.0 is put back by hand (a stopped VM, the polling interval, num_pages, actual, the
pool pages; guest-stats cannot be cleared, so after an input that sent statistics both sides are "primed"
with an empty report, see `_prime_stats_on_qemu`), and only what the input changed and did not leave as a
fresh QEMU has it. It restarts only after a crash or a hang.

An input's operations are applied to both sides in order, all its qtest requests in one pipeline that goes
out only when an answer is needed or before a QMP command (config reads and the FEATURES_OK check ride it;
their answers are taken when it goes out; the restore goes out with the input's first requests). Host
requests in a row go to QMP together. A Negotiate sets up only the queues the input uses before its next
one, on both sides. QEMU processes free page hints in an iothread: where the reference breaks on a hint
buffer, QEMU is given until its DEVICE_NEEDS_RESET shows (or its message stands alone, the bit being lost)
before the next operation, which a working device would still process. Used entries are collected before
each Negotiate/Reset and at the end (QEMU is waited for until it used as many; they are not judged), and QEMU
is observed once, at the end, with as few round trips as possible: config fields, status, used rings of the
queues the input touched, the pool pages a buffer names, QMP query-balloon and guest-stats when the input
could change them (otherwise they are not compared), in one QMP batch with the restores of polling interval
and target. `vballoon.scenario.judge.compare` judges the final observation; the value of every ReadConfig
and the answer to every host request are compared one by one. The hypothesis differential observes QEMU after
every operation instead (`vballoon.scenario.differential_run`, whose docstring lists what each of the two
observes, side by side, and why they differ).

A finding is a QEMU crash (exit by signal, assertion, segfault, a sanitizer's report: its sidecar keeps the
report), a hang (a qtest deadline), a device error
(virtio_error) where the reference has none, or an observation outside the reference's allowed outcomes.
An input that inflates or reports its driver's own rings is a driver violation and yields no finding.
A difference whose requirement has a known deviation for this QEMU explains the whole input (the two
devices no longer agree on state after it), so that input yields no finding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

from vballoon.errors import QemuError
from vballoon.fuzz.crashes import Finding
from vballoon.fuzz.format import offered_balloon_features
from vballoon.fuzz.reference_run import run_checked, step_reference
from vballoon.matrix import Variant
from vballoon.qemu.balloon import guest_stats_command, query_balloon_command
from vballoon.qemu.process import ERROR_LINE, QemuBinary, crash_lines, tail
from vballoon.qemu.profile import qemu_profile
from vballoon.qemu.qtest import QtestExpectationFailed
from vballoon.qemu.sanitizers import reports_text
from vballoon.qemu.virtio_pci import FIRST_FREE_RAM
from vballoon.reference.device import DEFLATEQ, FREE_PAGE_VQ, INFLATEQ, REPORTING_VQ, STATSQ
from vballoon.requirements import deviation_for
from vballoon.scenario.judge import Difference, compare
from vballoon.scenario.observation import Answer, Observation
from vballoon.scenario.operations import (BUFFERS, HOST_REQUESTS, POOL_FIRST_PFN, POOL_PAGES, AddBuffer, Cont,
                                          HostRequest, MalformedChain, Negotiate, Operation, ReadConfig, Reset, Scenario,
                                          SetPollingInterval, SetTarget, Stop, WriteConfig, queues_used,
                                          touches_poison_val)
from vballoon.scenario.qemu_executor import QemuExecutor
from vballoon.scenario.reference_executor import ReferenceExecutor
from vballoon.spec import PAGE_SIZE, PFN_SHIFT, ConfigField, Status, decode_pfns
from vballoon.virtqueue import VirtqueueError
from vballoon.waiting import DeadlineExceeded, wait_for

QTEST_DEADLINE = 5.0
"""A qtest request QEMU has not answered by then is a hang."""
USED_DEADLINE = 0.25
"""How long QEMU gets to use what the reference used (the free page queue runs in an iothread)."""
LOST_BIT_GRACE = 0.01
"""Seconds a virtio_error message may stand without DEVICE_NEEDS_RESET before the bit counts as lost: virtio_error
sets it right after printing, and QEMU's iothread reaches the error within about 0.1 ms here."""
EVENT_RATE_LIMIT = 1.0
"""Seconds: QEMU emits at most one BALLOON_CHANGE per second (monitor_qapi_event_conf, monitor/monitor.c)
and the last one held back at the end of the period, on the virtual clock, which stops while the VM does."""
STALE_EVENT_SECONDS = 2 * EVENT_RATE_LIMIT
"""How long a BALLOON_CHANGE value an earlier input or a restore caused is taken as stale when it heads an input's
events: twice the period QEMU can hold an event back."""
STATS_PRIMING_BUFFER = bytes(1)
"""A stats buffer without a whole entry: every statistic unset, last-update set (QEMU 7.2 and 10.0, and the reference)."""


@dataclass
class _Registers:
    """QEMU's device status, config space and pool pages at the end of an input."""

    status: int = 0
    config: bytearray = field(default_factory=bytearray)
    pages: tuple[tuple[int, bytes], ...] = ()

    def read_later(self, executor: QemuExecutor) -> None:
        """Queue the status and config reads in the qtest pipeline; they are filled in when it goes out."""
        driver, qtest = executor.balloon.driver, executor.machine.qtest
        words = range(0, executor.config_size, 4)
        self.config = bytearray(4 * len(words))
        qtest.read_later(lambda: driver.status, self._set_status)
        for offset in words:
            qtest.read_later(functools.partial(driver.config_read, offset, 4), functools.partial(self._set_word, offset))

    def _set_status(self, value: int) -> None:
        self.status = value

    def _set_word(self, offset: int, value: int) -> None:
        self.config[offset:offset + 4] = value.to_bytes(4, "little")


@dataclass
class _Side:
    """What one input did on one side, collected as it runs."""

    used: list[tuple[str, int, int]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)


def _writes_actual(ops: tuple[Operation, ...]) -> bool:
    """Whether a config write reaches `actual` (what query-balloon reports)."""
    return any(isinstance(op, WriteConfig) and op.offset < ConfigField.ACTUAL + 4 and op.offset + op.width >
               ConfigField.ACTUAL for op in ops)


def _may_change_stats(ops: tuple[Operation, ...]) -> bool:
    """Whether guest-stats can differ from before: only a stats buffer changes it (QEMU's (7.2 and 10.0) poll timer gives
    a held buffer back without touching the values)."""
    return any(isinstance(op, AddBuffer) and op.queue == STATSQ for op in ops)


DRIVER_MEMORY = (range(FIRST_FREE_RAM >> PFN_SHIFT, POOL_FIRST_PFN), range(0x7E00, 0x8000))
"""Pages holding rings and buffers: QEMU's driver below the pool, the reference driver's top 2 MiB of RAM."""


def _gives_away_driver_memory(scenario: Scenario) -> bool:
    """Whether the input inflates or reports a page its driver still uses (BAL-DRV-OP-6 forbids it; QEMU
    then discards live rings, which the reference's RAM model does not do)."""
    for op in scenario.operations:
        if isinstance(op, BUFFERS) and op.queue in (INFLATEQ, REPORTING_VQ):
            pfns = (*decode_pfns(op.out).pfns, *op.in_pfns) if op.queue == INFLATEQ else op.in_pfns
            if any(pfn in region for pfn in pfns for region in DRIVER_MEMORY):
                return True
    return False


def _pool_pages_named(ops: tuple[Operation, ...]) -> list[int]:
    """The pool pages a buffer of `ops` names (a PFN of inflateq or deflateq, or a device-writable page): the only
    ones a device has the address of, so the only ones observed (each read is 4 KiB over qtest)."""
    named: set[int] = set()
    for op in ops:
        if isinstance(op, BUFFERS):
            named.update(op.in_pfns)
            if op.queue in (INFLATEQ, DEFLATEQ):
                named.update(decode_pfns(op.out).pfns)
    return sorted(pfn for pfn in named if POOL_FIRST_PFN <= pfn < POOL_FIRST_PFN + POOL_PAGES)


def _fingerprint(observation: Observation) -> dict[str, Any]:
    """An observation as JSON-friendly data for a sidecar (pages by their distinct bytes)."""
    data = dataclasses.asdict(observation)
    data["config"] = observation.config.hex()
    data["pages"] = {f"{pfn:#x}": sorted(set(content)) for pfn, content in observation.pages}
    return json.loads(json.dumps(data, default=str))


class QemuDifferential:
    """Scenarios of one device configuration on a long-lived QEMU and on the reference (a context manager)."""

    def __init__(self, qemu: QemuBinary, variant: Variant, legacy_interface: bool, log_dir: Path,
                 record: bool = True) -> None:
        self.qemu = qemu
        self.record = record
        """Keep every qtest line (for `reproducer`); a fuzzer running inputs by the thousand turns it off."""
        self.variant = variant
        self.legacy_interface = legacy_interface
        self.log_dir = log_dir
        self.executor: QemuExecutor | None = None
        self.last_executor: QemuExecutor | None = None
        """The QEMU used last, kept after it stops: its recording is the standalone reproducer."""
        self.starts = 0
        self._stderr_offset = 0
        self._stats_primed = False
        self._restore: set[str] = set()
        """What the previous input changed that a device reset leaves behind."""
        self._error_line_seen = 0.0
        """When this input's first virtio_error message was seen without DEVICE_NEEDS_RESET (0: not yet)."""
        self.explained: tuple[Difference, ...] = ()
        """The last input's differences, when a known deviation of this QEMU explained them (it yielded no finding)."""
        self._recent_events: dict[int, float] = {}
        """actual -> when an earlier input or a restore last caused a BALLOON_CHANGE with it: QEMU's rate limit
        can hold one back and emit it (the last of its period) during a later input."""

    def __enter__(self) -> "QemuDifferential":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.executor is not None:
            executor, self.executor = self.executor, None
            self.last_executor = executor
            executor.stop()

    # --- QEMU's lifecycle ------------------------------------------------------------------

    def _start(self) -> QemuExecutor:
        """A fresh QEMU; QemuError (one line, with QEMU's stderr) when it dies at start."""
        executor = QemuExecutor(self.qemu, self.variant, self.legacy_interface, self.log_dir, self.record)
        executor.machine.qtest_timeout = QTEST_DEADLINE
        executor.start()
        self.executor, self.last_executor, self.starts = executor, executor, self.starts + 1
        self._stderr_offset = self._stderr_size()
        self._stats_primed = False
        self._restore = set()
        return executor

    def _stderr_size(self) -> int:
        return self.executor.machine.mark().stderr if self.executor else 0

    def _new_stderr(self) -> str:
        assert self.executor is not None
        return self.executor.machine.stderr_since(self._stderr_offset)

    def command_line(self) -> str:
        """The command line of the QEMU in use (or last used)."""
        path = self.log_dir / "qemu-command-line.txt"
        return path.read_text().strip() if path.exists() else ""

    # --- between inputs ----------------------------------------------------------------------

    def _restore_device(self, executor: QemuExecutor) -> None:
        """Bring the long-lived QEMU back to what a fresh one shows (see the module docstring). Called within
        the input's pipeline: the qtest part goes out with the input's first requests."""
        machine, driver = executor.machine, executor.balloon.driver
        self._ask_then_restore(executor, [])  # what the last input's observation did not already restore
        driver.reset()
        driver.allocator.next = FIRST_FREE_RAM
        machine.qtest.memset(POOL_FIRST_PFN << PFN_SHIFT, POOL_PAGES * PAGE_SIZE, 0)
        if "actual" in self._restore:
            driver.config_write(ConfigField.ACTUAL, 4, 0)
            self._recent_events[machine.ram_bytes] = time.monotonic()
        # A read makes QEMU rebuild its config image; writes apply the whole stale image otherwise.
        machine.qtest.read_later(lambda: driver.config_read(ConfigField.NUM_PAGES, 4), lambda _: None)
        if "running" in self._restore:  # after the reset: hint buffers held while stopped are gone, not used late
            machine.qtest.flush()
            machine.qmp.command("cont")
        if "stats" in self._restore:
            self._prime_stats_on_qemu(executor)
            self._stats_primed = True
        machine.qmp.drop_events()
        self._restore = set()
        self._stderr_offset = self._stderr_size()

    def _ask_then_restore(self, executor: QemuExecutor, queries: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Send `queries` over QMP, then put the polling interval and the target back if the input changed them,
        all in one batch; the queries' results. QemuError if QEMU refused or did not answer."""
        restores = [executor.qmp_command(op) for name, op in (("polling", SetPollingInterval(0)),
                                                                ("target", SetTarget(0))) if name in self._restore]
        if not queries and not restores:
            return []
        answers = executor.machine.qmp.try_commands(queries + restores)
        for (name, _), (_, error) in zip(queries + restores, answers, strict=True):
            if error is not None:
                raise QemuError(f"QMP {name}: {error}")
        self._restore -= {"polling", "target"}
        return [result for result, _ in answers[:len(queries)]]

    def _priming(self) -> list[Operation]:
        """Operations that leave every statistic unset and last-update set, then reset the device.

        Over a legacy interface the reference ignores the first buffer (BAL-DEV-LEG-ST-FIRST), so a
        second buffer replaces it.
        """
        buffers = 2 if self.legacy_interface else 1
        return ([Negotiate(offered_balloon_features(self.variant))] + [AddBuffer(STATSQ, STATS_PRIMING_BUFFER)]
                * buffers + [Reset()])

    def _prime_stats_on_qemu(self, executor: QemuExecutor) -> None:
        for op in self._priming():
            executor.apply(op, (STATSQ,))
            if isinstance(op, Reset):
                executor.balloon.driver.reset()
                executor.balloon.driver.allocator.next = FIRST_FREE_RAM

    # --- one input -----------------------------------------------------------------------------

    def run(self, scenario: Scenario) -> Finding | None:
        """Run `scenario` on QEMU and the reference; the finding, or None when QEMU conforms."""
        if (scenario.variant, scenario.legacy_interface) != (self.variant, self.legacy_interface):
            raise ValueError(f"scenario for {scenario.variant.name}, differential for {self.variant.name}")
        executor = self.executor
        fresh = executor is None
        if executor is None:
            executor = self._start()
        with executor.machine.qtest.pipeline():  # round trips only for answers, and before QMP commands
            if not fresh:
                try:
                    self._restore_device(executor)
                except QemuError as error:
                    return self._lost(f"restoring the device between inputs: {error}")
            return self._run(executor, scenario)

    def _run(self, executor: QemuExecutor, scenario: Scenario) -> Finding | None:
        self._error_line_seen = 0.0
        self.explained = ()
        reference = ReferenceExecutor(self.variant, self.legacy_interface, executor.machine.ram_bytes,
                                       qemu_profile(self.qemu).device_shape, follow_device=True)
        if self._stats_primed:
            run_checked(reference, tuple(self._priming()))
        expected_side, got_side = _Side(), _Side()
        # QEMU discards a ballooned ring page: used entries the reference makes there never show, so do not wait
        used_deadline = 0.0 if _gives_away_driver_memory(scenario) else USED_DEADLINE
        touched: set[str] = set()
        try:
            ops = scenario.operations
            for host, group in itertools.groupby(enumerate(ops), key=lambda item: isinstance(item[1], HOST_REQUESTS)):
                if host:
                    self._run_host_requests(executor, reference, [op for _, op in group], expected_side, got_side)
                    continue
                with executor.machine.qtest.pipeline():
                    for position, op in group:
                        if isinstance(op, (Negotiate, Reset)):
                            self._collect(executor, reference, touched, expected_side, got_side, used_deadline)
                            touched = set()
                        errors_before = len(reference.device.errors)
                        queues = queues_used(ops, position + 1) if isinstance(op, Negotiate) else None
                        expected_side.answers.append(step_reference(reference, op, queues))
                        self._apply_on_qemu(executor, op, got_side, queues)
                        if isinstance(op, MalformedChain) and reference.unsettled:  # QEMU's outcome, where allowed
                            reference.settle(not reference.device.broken
                                             and executor.malformed_outcome(USED_DEADLINE))
                        if isinstance(op, BUFFERS):
                            touched.add(op.queue)
                            if op.queue == FREE_PAGE_VQ and len(reference.device.errors) > errors_before:
                                self._await_hint_error(executor)
                        self._note_restore(op)
            registers = self._collect(executor, reference, touched, expected_side, got_side, used_deadline,
                                      _pool_pages_named(ops))
            assert registers is not None
            self._keep_fresh_host_state(reference, ops, expected_side, got_side)
            got = self._observe(executor, scenario, got_side, registers)
        except VirtqueueError as error:  # QEMU's used ring names a chain the driver never made available
            if _gives_away_driver_memory(scenario):
                return None  # the input ballooned its own rings: QEMU zeroed them, as it may (BAL-DRV-OP-6)
            return Finding("difference", f"virtio used ring (2.7.8): {error}", (str(error),),
                           stderr_tail=tail(executor.machine.logs.stderr, 20))
        except QtestExpectationFailed as error:  # QEMU is alive and refused what the reference accepts
            return Finding("difference", f"BAL-DEV-LEG-FEAT-1: {error}", (str(error),),
                           stderr_tail=tail(executor.machine.logs.stderr, 20))
        except QemuError as error:
            return self._lost(str(error))
        expected = dataclasses.replace(reference.observe((None, None)), used=tuple(expected_side.used))
        now = time.monotonic()
        self._recent_events = {value: when for value, when in self._recent_events.items()
                               if when > now - STALE_EVENT_SECONDS} | dict.fromkeys(expected.events, now)
        got = self._unobserved_as_expected(scenario, got, expected)
        return self._judge(reference, expected, got, scenario, expected_side, got_side)

    def _run_host_requests(self, executor: QemuExecutor, reference: ReferenceExecutor, ops: list[HostRequest],
                           expected_side: _Side, got_side: _Side) -> None:
        """Host requests in a row: QEMU gets them over QMP together, up to a Cont after which the reference broke
        on a held hint buffer (QEMU then gets until its own error shows, see `_await_hint_error`)."""
        batch: list[HostRequest] = []
        for op in ops:
            errors_before = len(reference.device.errors)
            expected_side.answers.append(step_reference(reference, op))
            batch.append(op)
            self._note_restore(op)
            if isinstance(op, Cont) and len(reference.device.errors) > errors_before:
                got_side.answers += executor.apply_host_requests(batch)
                batch = []
                self._await_hint_error(executor)
        got_side.answers += executor.apply_host_requests(batch)

    def _await_hint_error(self, executor: QemuExecutor) -> None:
        """The reference broke on a hint buffer: let QEMU's iothread reach the same virtio_error before the next
        operation, which a working device would process (the main loop and the iothread race otherwise)."""
        executor.machine.qtest.flush()
        try:
            wait_for(lambda: self._shows_device_error(executor), USED_DEADLINE,
                     "QEMU's virtio_error for the hint buffer", interval=0.0005)
        except DeadlineExceeded:
            pass  # QEMU raised none: the comparison shows it

    def _shows_device_error(self, executor: QemuExecutor) -> bool:
        """Whether QEMU's device is in virtio_error now. On the modern interface its DEVICE_NEEDS_RESET bit says
        so (set after the message is printed): a register of this device, where stderr can hold a late line of
        an earlier input's hint iothread. QEMU 7.2 and 10.0 can lose the bit (`judge.LOST_NEEDS_RESET`), so a message
        of this input that no bit has followed for LOST_BIT_GRACE counts too. The legacy interface has no such
        bit, so stderr is read there."""
        if self.legacy_interface:
            return bool(ERROR_LINE.search(self._new_stderr()))
        if executor.balloon.driver.status & Status.DEVICE_NEEDS_RESET:
            return True
        if not ERROR_LINE.search(self._new_stderr()):
            return False
        now = time.monotonic()
        self._error_line_seen = self._error_line_seen or now
        return now - self._error_line_seen >= LOST_BIT_GRACE

    @staticmethod
    def _apply_on_qemu(executor: QemuExecutor, op: Operation, side: _Side,
                       queues: Collection[str] | None) -> None:
        """`executor.apply(op, queues)`, its answer noted in `side`; a config read rides the pipeline instead
        of costing a round trip, its answer filled in when the batch goes out."""
        if not isinstance(op, ReadConfig):
            side.answers.append(executor.apply(op, queues))
            return
        slot = len(side.answers)
        side.answers.append((None, None))
        driver = executor.balloon.driver
        executor.machine.qtest.read_later(lambda: driver.config_read(op.offset, op.width),
                                           lambda value: side.answers.__setitem__(slot, (value, None)))

    def _note_restore(self, op: Operation) -> None:
        if isinstance(op, Stop):
            self._restore.add("running")
        elif isinstance(op, SetPollingInterval):
            self._restore.add("polling")
        elif isinstance(op, SetTarget):
            self._restore.add("target")
        elif isinstance(op, WriteConfig):
            self._restore.add("actual")
        elif isinstance(op, AddBuffer) and op.queue == STATSQ:
            self._restore.add("stats")

    def _keep_fresh_host_state(self, reference: ReferenceExecutor, ops: tuple[Operation, ...],
                               expected_side: _Side, got_side: _Side) -> None:
        """Leave out the restores of host state the input left as a fresh QEMU has it: where QEMU accepted and
        refused the same host requests as the reference, its polling interval, target and run state are the
        reference's (each restore is a QMP round trip of 500-800 µs)."""
        if any((want[1] is None) != (have[1] is None) for op, want, have in
               zip(ops, expected_side.answers, got_side.answers, strict=True) if isinstance(op, HOST_REQUESTS)):
            return
        device = reference.device
        fresh = {"polling": not device.stats.poll_interval, "target": not device.num_pages,
                 "running": reference.running}
        self._restore -= {name for name, is_fresh in fresh.items() if is_fresh}

    def _collect(self, executor: QemuExecutor, reference: ReferenceExecutor, touched: set[str],
                 expected_side: _Side, got_side: _Side, deadline: float,
                 pool_pages: Sequence[int] | None = None) -> _Registers | None:
        """Used entries of the touched queues on both sides; QEMU gets `deadline` seconds to match counts. With
        `pool_pages` (the input's last collection) QEMU's status, config space and those pages are read in the
        same round trip as the used rings, and returned."""
        ref_entries = [(name, e.id, e.length) for name, queue in reference.driver.queues.items()
                       if name not in reference.abandoned for e in queue.collect_used()]
        expected_side.used += ref_entries
        queues = executor.balloon.driver.queues
        names = executor.queue_names
        # QEMU holds free page hints while the VM is stopped (block_iothread): waiting for them is in vain
        touched = touched - executor.abandoned  # their used rings no longer follow the driver
        wanted = {name: sum(1 for entry in ref_entries if entry[0] == name) for name in touched
                  if reference.running or name != FREE_PAGE_VQ}
        found: list[tuple[str, int, int]] = []

        layouts = [queues[names.index(name)].layout for name in touched if names.index(name) in queues]
        used_rings = [layout.collect_range for layout in layouts]
        registers = None if pool_pages is None else _Registers()
        pages = [(pfn << PFN_SHIFT, PAGE_SIZE) for pfn in pool_pages or ()]
        qtest = executor.machine.qtest

        ranges = used_rings + pages

        def gather() -> bool:
            if registers is not None:
                registers.read_later(executor)
                if not ranges:
                    qtest.flush()  # no memory to read: the register reads go out alone
            with qtest.snapshot(ranges):  # every touched used ring (and page) in one round trip
                for name in touched:
                    index = names.index(name)
                    if index in queues:
                        found.extend((name, e.id, e.length) for e in queues[index].collect_used())
                if registers is not None:
                    registers.pages = tuple((pfn, qtest.read(pfn << PFN_SHIFT, PAGE_SIZE)) for pfn in pool_pages or ())
            # the iothread's virtio_error comes late, and not at all while the VM is stopped (QEMU holds hints)
            settled = not (FREE_PAGE_VQ in touched and reference.device.broken and reference.running) or \
                self._shows_device_error(executor)
            # after a device error QEMU uses nothing more, and the ledger does not compare used entries
            return settled and (reference.device.broken or all(sum(1 for entry in found if entry[0] == name) >= count
                                                               for name, count in wanted.items()))

        try:
            wait_for(gather, deadline, "QEMU to use what the reference used", interval=0.0005)
        except DeadlineExceeded:
            pass  # fewer than the reference: the comparison shows it
        got_side.used += found
        return registers

    def _observe(self, executor: QemuExecutor, scenario: Scenario, side: _Side, registers: _Registers
                 ) -> Observation:
        """QEMU's state at the end of the input: `registers` from the last collection, and QMP."""
        machine = executor.machine
        stderr = self._new_stderr()
        crash = tuple(crash_lines(stderr))
        if crash or machine.process is None or machine.process.poll() is not None:
            return Observation(alive=False, crash=crash or (machine.exit_description(),))
        ops = scenario.operations
        query_balloon, stats, stats_updated = 0, (), False
        ask_balloon, ask_stats = _writes_actual(ops), _may_change_stats(ops)
        queries: list[tuple[str, dict[str, Any]]] = []
        if ask_balloon:
            queries.append(query_balloon_command())
        if ask_stats:
            queries.append(guest_stats_command())
        results = iter(self._ask_then_restore(executor, queries))
        if ask_balloon:
            query_balloon = int(next(results)["actual"])
        if ask_stats:
            guest_stats = next(results)
            stats, stats_updated = tuple(sorted(guest_stats["stats"].items())), bool(guest_stats["last-update"])
        events = tuple(e["data"]["actual"] for e in machine.qmp.take_events("BALLOON_CHANGE"))
        stale = {value for value, when in self._recent_events.items() if when > time.monotonic() - STALE_EVENT_SECONDS}
        while events and events[0] in stale:  # an earlier input's event, held back by the rate limit until now
            events = events[1:]
        return Observation(alive=True, status=registers.status, config=bytes(registers.config), used=tuple(side.used),
                           query_balloon=query_balloon, guest_stats=stats, stats_updated=stats_updated, events=events,
                           pages=registers.pages, device_errors=len(ERROR_LINE.findall(stderr)))

    @staticmethod
    def _unobserved_as_expected(scenario: Scenario, got: Observation, expected: Observation) -> Observation:
        """What `_observe` did not ask QEMU for takes the reference's value (it is not compared)."""
        if not got.alive:
            return got
        ops = scenario.operations
        changes: dict[str, Any] = {}
        if not got.pages:
            changes["pages"] = expected.pages
        if not _writes_actual(ops):
            changes["query_balloon"] = expected.query_balloon
        if not _may_change_stats(ops):
            changes.update(guest_stats=expected.guest_stats, stats_updated=expected.stats_updated)
        return dataclasses.replace(got, **changes)

    def _lost(self, error: str) -> Finding:
        """QEMU died or stopped answering: a crash or a hang; the next input gets a fresh QEMU."""
        assert self.executor is not None
        machine = self.executor.machine
        hang = "did not answer" in error and machine.process is not None and machine.process.poll() is None
        stderr_tail, stderr = tail(machine.logs.stderr, 20), self._new_stderr()
        evidence = crash_lines(stderr)
        self.close()
        kind = "hang" if hang and not evidence else "crash"
        return Finding(kind, f"QEMU {kind}: {'; '.join(evidence) or error}", (error,), stderr_tail=stderr_tail,
                       sanitizer_report=reports_text(stderr))

    def _judge(self, reference: ReferenceExecutor, expected: Observation, got: Observation, scenario: Scenario,
               expected_side: _Side, got_side: _Side) -> Finding | None:
        differences = compare(reference, expected, got)
        for number, (op, want, have) in enumerate(zip(scenario.operations, expected_side.answers, got_side.answers,
                                                       strict=True), 1):
            poison_read = isinstance(op, ReadConfig) and touches_poison_val(op.offset, op.width)
            if want[0] != have[0] and not (poison_read and reference.poison_val_was_unspecified):
                differences.append(Difference("BAL-CFG-LEG-LE", f"operation {number} {op!r} read", want[0], have[0]))
            if (want[1] is None) != (have[1] is None):
                differences.append(Difference("BAL-CFG-LEG-LE", f"operation {number} {op!r} refused",
                                              want[1], have[1]))
        if not got.alive:
            return self._lost("; ".join(got.crash))
        if not reference.running and reference.device.errors and "cmd id" in reference.device.errors[-1] \
                and not got.device_errors:
            return None  # QEMU holds hint buffers while the VM is stopped (block_iothread): its error comes later
        if not differences or _gives_away_driver_memory(scenario):
            return None
        if any(d.requirement and deviation_for(d.requirement, self.qemu.version, difference=d.what)
               for d in differences):
            self.explained = tuple(differences)
            return None
        kind = "device-error" if got.device_errors and not expected.device_errors else "difference"
        return Finding(kind, str(differences[0]), tuple(map(str, differences)), _fingerprint(got),
                       _fingerprint(expected), tail(self.executor.machine.logs.stderr, 20) if self.executor else "")
