"""The QEMU executor: a scenario's operations on QEMU's balloon over qtest, and its standalone reproducer.

`QemuExecutor` drives the balloon through `QtestBalloon` (the virtio-pci driver over qtest) on a fresh
`QtestMachine`; host requests go over QMP. Every qtest line it sends is recorded, so a scenario renders as a
reproducer for `qemu-system-x86_64 ... -qtest stdio` (`reproducer`). Its dispatch mirrors the reference
executor's: `QEMU_STEPS` maps every operation type to a handler, and `QMP_COMMANDS` every host request to
its QMP command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

from vballoon.errors import QemuError
from vballoon.matrix import Variant
from vballoon.qemu.balloon import polling_interval_command, target_command
from vballoon.qemu.machine import QemuBinary
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.scenario.observation import NO_ANSWER, Answer, Observation
from vballoon.scenario.malformed import ABANDONS_QUEUE, add_malformed_chain
from vballoon.scenario.operations import (HOST_REQUESTS, MEMORY_MIB, POOL_FIRST_PFN, POOL_PFNS, AddBuffer, Cont,
                                          FillPage, HostRequest, MalformedChain, Negotiate, Operation, ReadConfig, Reset,
                                          Scenario, SetPollingInterval, SetTarget, Stop, WriteConfig, scenario_to_json)
from vballoon.scenario.reference_executor import reference_properties
from vballoon.spec import PAGE_SIZE, PFN_SHIFT, config_size
from vballoon.virtqueue import Buffer, SplitDriverQueue
from vballoon.waiting import DeadlineExceeded, wait_for

USED_TIMEOUT = 3.0
"""Seconds QEMU gets to use as many buffers as the reference used."""


class QemuExecutor:
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
        self.abandoned: set[str] = set()
        """Queues whose used rings no longer follow the driver after a malformed chain: not collected."""
        self._malformed_mark: tuple[SplitDriverQueue, int, int] | None = None
        """The last malformed chain's queue, with its used index and QEMU's device errors before it."""
        self._balloon: QtestBalloon | None = None

    def __enter__(self) -> "QemuExecutor":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start QEMU and the host driver of its balloon."""
        self.machine.start()
        try:
            if self.record:
                self.machine.qtest.recording = self.recording
                self.recording.append("# QMP: cont")
            self._balloon = QtestBalloon(self.machine, self.legacy_interface)
            self._balloon.driver.allocator.end = POOL_FIRST_PFN << PFN_SHIFT
        except BaseException:
            self.machine.stop()
            raise

    def stop(self) -> None:
        """Stop QEMU (the process core's policy)."""
        self.machine.stop()

    @property
    def balloon(self) -> QtestBalloon:
        if self._balloon is None:
            raise QemuError("the QEMU executor is not started")
        return self._balloon

    @property
    def config_size(self) -> int:
        return config_size(self.balloon.offered)

    # --- operations -------------------------------------------------------------------------

    def apply(self, op: Operation, queues: Collection[str] | None = None) -> Answer:
        """Run `op` on QEMU; a Negotiate sets up `queues` (default: all), the others ignore it."""
        return QEMU_STEPS[type(op)](self, op, queues)

    def qmp_command(self, op: HostRequest) -> tuple[str, dict[str, Any]]:
        """The QMP command (name, arguments) of a host request."""
        return QMP_COMMANDS[type(op)](self, op)

    def apply_host_requests(self, ops: Sequence[HostRequest]) -> list[Answer]:
        """Host requests sent over QMP together (QEMU runs them in order), noted in the reproducer; the answer
        of each: QEMU's error text if it refused."""
        commands = [self.qmp_command(op) for op in ops]
        if not commands:
            return []
        self.machine.qtest.flush()  # what the driver did before reaches QEMU first
        if self.record:
            self.recording += [f"# QMP: {json.dumps({'execute': name, 'arguments': arguments})}"
                               for name, arguments in commands]
        return [(None, error) for _, error in self.machine.qmp.try_commands(commands)]

    def _negotiate(self, op: Negotiate, queues: Collection[str] | None) -> Answer:
        balloon = self.balloon
        self.abandoned = set()
        indices = None if queues is None else [self.queue_names.index(name) for name in queues]
        try:
            balloon.start(op.driver_features(balloon.offered), op.poison_val, indices)
        except QemuError as error:
            return None, str(error)
        return NO_ANSWER

    def _host_request(self, op: HostRequest, _: object) -> Answer:
        return self.apply_host_requests([op])[0]

    def _write_config(self, op: WriteConfig, _: object) -> Answer:
        self.balloon.driver.config_write(op.offset, op.width, op.value)
        return NO_ANSWER

    def _read_config(self, op: ReadConfig, _: object) -> Answer:
        return self.balloon.driver.config_read(op.offset, op.width), None

    def _add_buffer(self, op: AddBuffer, _: object) -> Answer:
        in_buffers = [Buffer(pfn << PFN_SHIFT, PAGE_SIZE) for pfn in op.in_pfns]
        self.balloon.post(self.queue_names.index(op.queue), [op.out] if op.out else [], in_buffers)
        return NO_ANSWER

    def _malformed_chain(self, op: MalformedChain, _: object) -> Answer:
        balloon, index = self.balloon, self.queue_names.index(op.queue)
        if op.kind in ABANDONS_QUEUE:
            self.abandoned.add(op.queue)
        queue = balloon.driver.queues[index]
        if isinstance(queue, SplitDriverQueue):  # the split kinds, whose outcome QEMU chooses
            self._malformed_mark = (queue, queue.ring.used_idx(), self.device_errors())
        with self.machine.qtest.pipeline():
            add_malformed_chain(queue, op.kind, balloon._place(op.out), lambda data: balloon._place(data).addr,
                                self.machine.ram_bytes)
            balloon.driver.notify(index)
        return NO_ANSWER

    def device_errors(self) -> int:
        """Device errors (virtio_error lines on stderr) since QEMU started."""
        return len(self.machine.device_errors())

    def malformed_outcome(self, timeout: float = USED_TIMEOUT) -> bool:
        """Whether QEMU answered the last malformed chain with a device error, once it answered it with an error or
        by using it (its notification may be handled after the qtest write returns), waited for up to `timeout`."""
        if self._malformed_mark is None:
            raise QemuError("no malformed chain to wait for")
        queue, used_idx, errors = self._malformed_mark
        self.machine.qtest.flush()

        def answered() -> bool:
            return self.device_errors() > errors or queue.ring.used_idx() != used_idx

        try:
            wait_for(answered, timeout, "QEMU's answer to the malformed chain", interval=0.0005)
        except DeadlineExceeded:
            pass  # neither: the comparison shows what QEMU did not do
        return self.device_errors() > errors

    def _fill_page(self, op: FillPage, _: object) -> Answer:
        self.machine.qtest.memset(op.pfn << PFN_SHIFT, PAGE_SIZE, op.byte)
        return NO_ANSWER

    def _reset(self, op: Reset, _: object) -> Answer:
        self.abandoned = set()
        self.balloon.driver.reset()
        return NO_ANSWER

    def _balloon_command(self, op: SetTarget) -> tuple[str, dict[str, Any]]:
        return target_command(self.machine.ram_bytes - op.pages_below_ram * PAGE_SIZE)

    def _polling_command(self, op: SetPollingInterval) -> tuple[str, dict[str, Any]]:
        return polling_interval_command(op.seconds)

    def _run_state_command(self, op: Stop | Cont) -> tuple[str, dict[str, Any]]:
        return type(op).__name__.lower(), {}

    # --- observation ------------------------------------------------------------------------

    def observe(self, answer: Answer, expect_used: Mapping[str, int] = {}) -> Observation:
        """The state after the last operation, whose answer was `answer`; QEMU is first waited for (up to
        USED_TIMEOUT) until it has used `expect_used` entries per queue."""
        machine = self.machine
        crash = tuple(machine.crash_evidence())
        if crash or machine.process is None or machine.process.poll() is not None:
            return Observation(alive=False, crash=crash or (machine.exit_description(),))
        try:
            return self._observe_running(answer, expect_used)
        except QemuError as error:
            return Observation(alive=False, crash=tuple(machine.crash_evidence()) or (str(error),))

    def _observe_running(self, answer: Answer, expect_used: Mapping[str, int]) -> Observation:
        balloon, machine = self.balloon, self.machine
        used = self._collect_used(expect_used)
        self.events += [e["data"]["actual"] for e in machine.qmp.take_events("BALLOON_CHANGE")]
        stats = balloon.guest_stats()
        return Observation(
            alive=True, status=balloon.driver.status,
            config=bytes(balloon.driver.config_read(i, 1) for i in range(self.config_size)),
            read_value=answer[0], request_error=answer[1], used=used,
            query_balloon=machine.host_balloon.query_balloon(),
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
                if name not in self.abandoned:
                    collected[name] += [(name, e.id, e.length) for e in queue.collect_used()]
            return all(len(collected[name]) >= count for name, count in expect_used.items())

        try:
            wait_for(gather, USED_TIMEOUT, "the used entries the reference device produced", interval=0.001)
        except DeadlineExceeded:
            pass  # fewer than expected: the comparison reports it
        return tuple(entry for name in self.queue_names for entry in collected[name])

    # --- reproducer -------------------------------------------------------------------------

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


QEMU_STEPS: dict[type, Callable[[QemuExecutor, Any, Collection[str] | None], Answer]] = {
    Negotiate: QemuExecutor._negotiate, WriteConfig: QemuExecutor._write_config,
    ReadConfig: QemuExecutor._read_config, AddBuffer: QemuExecutor._add_buffer,
    MalformedChain: QemuExecutor._malformed_chain, FillPage: QemuExecutor._fill_page,
    Reset: QemuExecutor._reset, **dict.fromkeys(HOST_REQUESTS, QemuExecutor._host_request),
}
"""How QEMU runs each operation type: the handler `QemuExecutor.apply` looks up. Host requests go over QMP, as
`QMP_COMMANDS` says (`reference_executor.REFERENCE_STEPS` is the reference's table)."""
QMP_COMMANDS: dict[type, Callable[[QemuExecutor, Any], tuple[str, dict[str, Any]]]] = {
    SetTarget: QemuExecutor._balloon_command, SetPollingInterval: QemuExecutor._polling_command,
    Stop: QemuExecutor._run_state_command, Cont: QemuExecutor._run_state_command,
}
"""The QMP command (name, arguments) of each host request."""
