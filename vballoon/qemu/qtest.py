"""QEMU's qtest line protocol: port I/O, guest memory, IRQ lines and virtual time from the host.

QEMU connects to a unix socket we listen on (`-qtest unix:PATH`); each
request is one text line and each answer one line starting with `OK`,
`FAIL` or `ERR`. Lines `IRQ raise N` / `IRQ lower N` arrive at any time once
`irq_intercept_in` is on; they are folded into `irq_levels`.

Every round trip has a deadline. When QEMU stops answering or closes the
socket the caller gets a `QemuError` whose text comes from `on_failure`
(the launcher says how QEMU ended and where its logs are).

`QtestClient` implements the `Memory` protocol of `vballoon.virtqueue`
(`read(addr, n)`, `write(addr, data)`), so rings and buffers in guest RAM are
built by the same code the reference device parses.
"""

from __future__ import annotations

import base64
import functools
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO, TypeVar

from vballoon.errors import QemuError
from vballoon.waiting import wait_for

DEFAULT_TIMEOUT = 10.0
NOTED_ANSWER = "0000"
"""What a read answers while `batched` notes requests: parses as hex and as base64; the value is discarded."""
T = TypeVar("T")


class QtestCommandError(QemuError):
    """QEMU answered a qtest request with FAIL or ERR."""


class QtestExpectationFailed(QemuError):
    """A read checked with `QtestClient.expect` gave a value the check refused (QEMU is alive)."""


@functools.cache
def has_qtest_accelerator(qemu_path: Path) -> bool:
    """Whether `qemu_path -accel help` lists `qtest` (Debian's 7.2 does not)."""
    try:
        listing = subprocess.run([str(qemu_path), "-accel", "help"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise QemuError(f"{qemu_path} -accel help failed ({error})") from None
    return "qtest" in listing.split()


class QtestClient:
    """One qtest connection; its methods mirror the protocol's commands."""

    def __init__(self, connection: socket.socket, on_failure: Callable[[], str], *,
                 clock_step_supported: bool, timeout: float = DEFAULT_TIMEOUT,
                 transcript: TextIO | None = None) -> None:
        self._socket = connection
        self._on_failure = on_failure
        self._received = bytearray()
        self._unsent: list[str] = []
        self._unsent_reads: list[tuple[int, Callable[[int], None]]] = []
        """(position in `_unsent`, receiver) of the reads `read_later` left in the pipeline."""
        self._deferring: Callable[[int], None] | None = None
        self._pipeline_depth = 0
        self._transcript = transcript
        self.timeout = timeout
        self.clock_step_supported = clock_step_supported
        self.irq_levels: dict[int, bool] = {}
        self.round_trips = 0
        self._noted: list[str] | None = None
        self._answers: Iterator[str] | None = None
        self._snapshots: list[tuple[int, bytes]] = []
        self.recording: list[str] | None = None
        """When a list, every request line sent from now on is appended to it, in order (for reproducers)."""
        self.base64 = self._probe_base64()

    def close(self) -> None:
        self._unsent, self._unsent_reads = [], []  # nothing goes out on a closed connection
        self._socket.close()
        if self._transcript is not None:
            self._transcript.close()

    # --- the round trip ----------------------------------------------------

    def command(self, line: str) -> str:
        """Send one raw request line and return the text after `OK`; FAIL/ERR raise QtestCommandError."""
        return self._execute(line, reply_needed=True)

    @contextmanager
    def pipeline(self) -> Iterator[None]:
        """Within the block, requests without a result are sent together with the next read or at the end."""
        self._pipeline_depth += 1
        try:
            yield
        finally:
            self._pipeline_depth -= 1
        if self._pipeline_depth == 0 and self._unsent:
            self._round_trip([])

    @property
    def pipelining(self) -> bool:
        return self._pipeline_depth > 0

    def flush(self) -> None:
        """Send what the pipeline holds now, and take the answers (one round trip, none if it holds nothing)."""
        if self._unsent:
            self._round_trip([])

    def read_later(self, read: Callable[[], int], receive: Callable[[int], None]) -> None:
        """`receive(read())`: at once or, within a pipeline, when the pipeline next goes out (no round trip
        of its own). `read` makes one integer read."""
        if not self._pipeline_depth:
            receive(read())
            return
        self._deferring = receive
        try:
            read()
        finally:
            self._deferring = None

    def expect(self, read: Callable[[], int], check: Callable[[int], bool], what: str) -> None:
        """Check the value `read()` gets, at once or as `read_later` does; a value failing `check` raises
        QtestExpectationFailed naming `what`."""
        def verify(value: int) -> None:
            if not check(value):
                raise QtestExpectationFailed(f"qtest: {what}: read {value:#x}")
        self.read_later(read, verify)

    def batched(self, reads: Callable[[], T]) -> T:
        """`reads()` with all its requests in one round trip. `reads` runs twice: first to note its requests
        (reads answer a placeholder), then with QEMU's answers in order; so what it requests must not depend
        on what it reads, and it must not change anything."""
        self._noted = []
        try:
            reads()
            noted = self._noted
        finally:
            self._noted = None
        self._answers = iter(self._requests(noted))
        try:
            return reads()
        finally:
            self._answers = None

    @contextmanager
    def snapshot(self, ranges: Sequence[tuple[int, int]]) -> Iterator[None]:
        """Within the block, `read`s that lie inside one of the (address, length) `ranges` of guest memory are
        answered from one read of all of them, made in one round trip on entry."""
        contents = self._requests([f"b64read {addr:#x} {n:#x}" if self.base64 else f"read {addr:#x} {n:#x}"
                                     for addr, n in ranges])
        self._snapshots = [(addr, self._decode_memory(text)) for (addr, _), text in zip(ranges, contents, strict=True)]
        try:
            yield
        finally:
            self._snapshots = []

    def _requests(self, lines: list[str]) -> list[str]:
        """The answers to `lines`, sent in one round trip after whatever the pipeline holds."""
        return self._round_trip(lines)[-len(lines):] if lines else []

    def _execute(self, line: str, reply_needed: bool) -> str:
        if self._noted is not None:
            if reply_needed:
                self._noted.append(line)
            return NOTED_ANSWER
        if self._answers is not None and reply_needed:
            return next(self._answers)
        if self._pipeline_depth and (not reply_needed or self._deferring is not None):
            if reply_needed and self._deferring is not None:
                self._unsent_reads.append((len(self._unsent), self._deferring))
            self._unsent.append(line)
            return NOTED_ANSWER if reply_needed else ""
        return self._round_trip([line])[-1]

    def _round_trip(self, lines: list[str]) -> list[str]:
        batch, self._unsent = self._unsent + lines, []
        deferred, self._unsent_reads = self._unsent_reads, []
        payload = "".join(f"{line}\n" for line in batch)
        if self._transcript is not None:
            self._transcript.write(payload)
        if self.recording is not None:
            self.recording.extend(batch)
        try:
            self._socket.sendall(payload.encode("ascii"))
        except OSError as error:
            raise QemuError(f"qtest: cannot send {_short(batch[0])!r} ({error}); {self._on_failure()}") from None
        self.round_trips += 1
        deadline = time.monotonic() + self.timeout
        replies: list[str] = []
        while len(replies) < len(batch):  # QEMU answers only what was asked: every line that came is ours or IRQ
            replies += self._complete_lines(batch[len(replies)], deadline)
        if len(replies) > len(batch):
            raise QemuError(f"qtest: unexpected line {replies[len(batch)]!r} after the answers to a batch")
        if replies.count("OK") == len(replies):  # only writes: nothing to parse
            answers = [""] * len(replies)
        else:
            answers = [self._check(request, reply) for request, reply in zip(batch, replies, strict=True)]
        for position, receive in deferred:
            receive(int(answers[position], 16))
        return answers

    @staticmethod
    def _check(request: str, reply: str) -> str:
        if reply == "OK" or reply.startswith("OK "):
            return reply[3:]
        raise QtestCommandError(f"qtest {_short(request)!r}: QEMU answered {reply!r}")

    def _complete_lines(self, request: str, deadline: float | None) -> list[str]:
        """Every whole line received but IRQ lines (noted in `irq_levels`), waiting for at least one line; with
        deadline None, [] when none is ready now."""
        while b"\n" not in self._received:
            remaining = 0.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and remaining <= 0:
                raise QemuError(f"qtest: QEMU did not answer {_short(request)!r} within {self.timeout:g} s; "
                                f"{self._on_failure()}")
            self._socket.settimeout(remaining if deadline is not None else 0.0)
            try:
                chunk = self._socket.recv(1 << 20)
            except (socket.timeout, BlockingIOError):
                if deadline is None:
                    return []
                continue
            except OSError as error:
                raise QemuError(f"qtest: connection lost during {_short(request)!r} ({error}); "
                                f"{self._on_failure()}") from None
            if not chunk:
                raise QemuError(f"qtest: QEMU closed the connection during {_short(request)!r}; "
                                f"{self._on_failure()}")
            self._received += chunk
        end = self._received.rindex(b"\n")
        irq = b"IRQ" in self._received[:end]
        lines = self._received[:end].decode("ascii", errors="replace").split("\n")
        del self._received[: end + 1]
        return [line for line in lines if not self._note_irq(line)] if irq else lines

    def _note_irq(self, line: str) -> bool:
        if not line.startswith("IRQ"):
            return False
        words = line.split()
        if len(words) == 3 and words[0] == "IRQ" and words[1] in ("raise", "lower"):
            self.irq_levels[int(words[2])] = words[1] == "raise"
            return True
        return False

    # --- port I/O ------------------------------------------------------------

    def outb(self, port: int, value: int) -> None:
        self._execute(f"outb {port:#x} {value:#x}", reply_needed=False)

    def outw(self, port: int, value: int) -> None:
        self._execute(f"outw {port:#x} {value:#x}", reply_needed=False)

    def outl(self, port: int, value: int) -> None:
        self._execute(f"outl {port:#x} {value:#x}", reply_needed=False)

    def inb(self, port: int) -> int:
        return int(self.command(f"inb {port:#x}"), 16)

    def inw(self, port: int) -> int:
        return int(self.command(f"inw {port:#x}"), 16)

    def inl(self, port: int) -> int:
        return int(self.command(f"inl {port:#x}"), 16)

    def port_in(self, port: int, width: int) -> int:
        """`inb`/`inw`/`inl` chosen by width in bytes (1, 2, 4)."""
        return int(self.command(f"in{_suffix(width, 4)} {port:#x}"), 16)

    def port_out(self, port: int, width: int, value: int) -> None:
        """`outb`/`outw`/`outl` chosen by width in bytes (1, 2, 4)."""
        self._execute(f"out{_suffix(width, 4)} {port:#x} {value:#x}", reply_needed=False)

    # --- guest-physical memory ------------------------------------------------

    def readb(self, addr: int) -> int:
        return self.read_int(addr, 1)

    def readw(self, addr: int) -> int:
        return self.read_int(addr, 2)

    def readl(self, addr: int) -> int:
        return self.read_int(addr, 4)

    def readq(self, addr: int) -> int:
        return self.read_int(addr, 8)

    def writeb(self, addr: int, value: int) -> None:
        self.write_int(addr, 1, value)

    def writew(self, addr: int, value: int) -> None:
        self.write_int(addr, 2, value)

    def writel(self, addr: int, value: int) -> None:
        self.write_int(addr, 4, value)

    def writeq(self, addr: int, value: int) -> None:
        self.write_int(addr, 8, value)

    def read_int(self, addr: int, width: int) -> int:
        """One access of `width` bytes (1, 2, 4, 8), target byte order."""
        return int(self.command(f"read{_suffix(width, 8)} {addr:#x}"), 16)

    def write_int(self, addr: int, width: int, value: int) -> None:
        """One access of `width` bytes (1, 2, 4, 8), target byte order."""
        self._execute(f"write{_suffix(width, 8)} {addr:#x} {value:#x}", reply_needed=False)

    def read(self, addr: int, n: int) -> bytes:
        """`n` bytes of guest memory (b64read when the binary has it)."""
        if n == 0:
            return b""  # QEMU asserts on a zero-length read
        for start, content in self._snapshots:
            if start <= addr and addr + n <= start + len(content):
                return content[addr - start:addr - start + n]
        return self._decode_memory(self.command(f"b64read {addr:#x} {n:#x}" if self.base64 else
                                                f"read {addr:#x} {n:#x}"))

    def _decode_memory(self, answer: str) -> bytes:
        return base64.b64decode(answer) if self.base64 else bytes.fromhex(answer.removeprefix("0x"))

    def write(self, addr: int, data: bytes) -> None:
        """Write `data` to guest memory (b64write when the binary has it)."""
        if not data:
            return  # QEMU refuses an empty payload
        if data.count(0) == len(data):  # zeroed rings and buffers: one short line instead of the bytes
            self.memset(addr, len(data), 0)
        elif self.base64:
            self._execute(f"b64write {addr:#x} {len(data):#x} {base64.b64encode(data).decode('ascii')}",
                          reply_needed=False)
        else:
            self._execute(f"write {addr:#x} {len(data):#x} 0x{data.hex()}", reply_needed=False)

    def memset(self, addr: int, n: int, byte: int) -> None:
        self._execute(f"memset {addr:#x} {n:#x} {byte:#x}", reply_needed=False)

    def _probe_base64(self) -> bool:
        try:
            self.command("b64read 0x0 0x1")
        except QtestCommandError:
            return False
        return True

    # --- interrupts and time -----------------------------------------------------

    def irq_intercept_in(self, qom_path: str) -> None:
        """Report the input IRQ lines of `qom_path` (e.g. "ioapic") as IRQ raise/lower lines."""
        self.command(f"irq_intercept_in {qom_path}")

    def poll_irqs(self) -> dict[int, bool]:
        """Take in IRQ notifications that have already arrived; the current `irq_levels`."""
        self.flush()
        while self._received or self._ready():
            lines = self._complete_lines("(waiting for IRQ lines)", None)  # IRQ lines are noted, not returned
            if lines:
                raise QemuError(f"qtest: unexpected line {lines[0]!r} while no request was pending")
            if not self._ready():
                break
        return dict(self.irq_levels)

    def _ready(self) -> bool:
        self._socket.settimeout(0.0)
        try:
            return bool(self._socket.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, socket.timeout):
            return False
        except OSError:
            return True  # let _complete_lines report the failure

    def wait_irq(self, line: int, raised: bool, timeout: float) -> None:
        """Wait until IRQ `line` is raised (or lowered)."""
        state = "raised" if raised else "lowered"
        wait_for(lambda: self.poll_irqs().get(line, False) == raised, timeout, f"IRQ {line} to be {state}",
                 describe_last=lambda: f"IRQ levels {self.irq_levels}")

    def clock_step(self, ns: int | None = None) -> int:
        """Advance virtual time by `ns` (default: to the next timer); the new clock in ns.

        Only under `-accel qtest`; under TCG virtual time runs by itself once
        the machine is continued.
        """
        if not self.clock_step_supported:
            raise QemuError("qtest clock_step needs -accel qtest, which this QEMU does not have; "
                            "virtual time runs by itself here, wait for the effect with a deadline")
        return int(self.command("clock_step" if ns is None else f"clock_step {ns}"))


SUFFIXES = {1: "b", 2: "w", 4: "l", 8: "q"}


def _suffix(width: int, widest: int) -> str:
    if width not in SUFFIXES or width > widest:
        raise ValueError(f"access width {width}: use one of {[w for w in SUFFIXES if w <= widest]}")
    return SUFFIXES[width]


def _short(line: str) -> str:
    return line if len(line) <= 80 else line[:77] + "..."
