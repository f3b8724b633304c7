"""One QEMU process, started, watched and stopped the same way for every kind of machine.

`QemuMachine` owns the process, its runtime dir (sockets, firmware, other
temporary files), its logs and its QMP monitor. A kind of machine says only
what QEMU runs (`_arguments`) and what it connects around the launch
(`_before_launch`, `_after_launch`, `_before_stop`), as in QEMU's own
python/qemu/machine; the guest machine, the qtest machine and the KVM probe
are such kinds.

- QEMU runs in its own process group with PR_SET_PDEATHSIG, so it dies when
  vballoon does.
- `stop` asks QEMU to quit over QMP, then sends SIGTERM, then SIGKILL, each
  given `stop_timeout`, and removes the runtime dir whatever happens. A
  machine is a context manager: whatever ends the `with` block (a failed
  assertion, a timeout, Ctrl-C) stops it, and a failed start stops what it
  started.
- The logs stay in the log dir for the caller to keep or delete:
  serial.log, qemu-stderr.log, qmp-transcript.jsonl, qemu-command-line.txt,
  qtest-transcript.txt.
- QEMU runs with vballoon's sanitizer options merged into the user's
  (`vballoon.qemu.sanitizers.sanitizer_environment`), so a sanitizer-built QEMU
  runs unchanged.
- QEMU's stderr is read, from any offset, for crash evidence (`CRASH_LINE`, and
  sanitizer reports) and for the errors QEMU printed (`ERROR_LINE`: virtio_error
  and others). A LeakSanitizer report comes only as QEMU exits: `exit_problems`
  reads what QEMU printed after `stop` began.
- The start (`boot`, with `qemu-start`: launch to QMP ready) and the stop
  (`qemu-stop`) go on the run's timeline (vballoon.timeline), named after the
  log folder.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from vballoon import timeline
from vballoon.errors import QemuError, UsageError
from vballoon.qemu.monitor import Monitor
from vballoon.qemu.sanitizers import sanitizer_environment, sanitizer_reports

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0

CRASH_LINE = re.compile(r"^(ERROR:.*(assertion failed|code should not be reached).*|.*Assertion .* failed.*|"
                        r".*Segmentation fault.*|.*Aborted.*)$", re.MULTILINE)
"""A stderr line that means QEMU crashed (sanitizer reports are found by `sanitizer_reports`)."""
ERROR_LINE = re.compile(r"^qemu-system-[^:]+: (?!warning:|terminating on signal|Unable to write to socket|"
                        r".*Assertion .* failed)(.*)$", re.MULTILINE)
"""A stderr line where QEMU reports an error (group 1: its text). Not warnings, not the line QEMU prints when
stopped by a signal, not a cancelled migration's closed stream, not an assertion (that is a crash)."""


@dataclass(frozen=True)
class QemuBinary:
    """A qemu-system-x86_64 to test, checked once."""

    path: Path
    version: tuple[int, int, int]
    version_text: str

    @classmethod
    def find(cls, given: str | None) -> "QemuBinary":
        """Resolve `--qemu`; a missing or non-executable binary is a one-line UsageError."""
        candidate = given or shutil.which("qemu-system-x86_64")
        if candidate is None:
            raise UsageError("--qemu: qemu-system-x86_64 is not on PATH; install qemu-system-x86 "
                             "(make does) or pass --qemu PATH to your build")
        path = Path(candidate).resolve()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise UsageError(f"--qemu {candidate}: not an executable file; pass the path of qemu-system-x86_64")
        try:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as error:
            raise UsageError(f"--qemu {candidate}: does not run ({error}); pass a working qemu-system-x86_64") from None
        match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
        if not match:
            raise UsageError(f"--qemu {candidate}: '--version' printed no QEMU version; is it qemu-system-x86_64?")
        return cls(path, (int(match[1]), int(match[2]), int(match[3])), out.splitlines()[0])

    def command_line(self, *arguments: str) -> list[str]:
        """This QEMU without a display, default devices or user config, running `arguments`."""
        return [str(self.path), "-nodefaults", "-no-user-config", "-display", "none", *arguments]


@dataclass
class MachineLogs:
    """Where a machine's evidence is written."""

    directory: Path
    serial: Path = field(init=False)
    stderr: Path = field(init=False)
    qmp: Path = field(init=False)
    qtest: Path = field(init=False)
    command_line: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.serial = self.directory / "serial.log"
        self.stderr = self.directory / "qemu-stderr.log"
        self.qmp = self.directory / "qmp-transcript.jsonl"
        self.qtest = self.directory / "qtest-transcript.txt"
        self.command_line = self.directory / "qemu-command-line.txt"

    def describe(self) -> str:
        """The logs written so far, for an error message."""
        names = {"serial log": self.serial, "QEMU stderr": self.stderr, "QMP transcript": self.qmp,
                 "qtest transcript": self.qtest, "command line": self.command_line}
        written = [f"{name} {path}" for name, path in names.items() if path.exists()]
        return ", ".join(written) or f"no logs yet in {self.directory}"


@dataclass(frozen=True)
class LogMark:
    """Where a stretch of a machine's life begins in its logs (byte offsets)."""

    stderr: int = 0
    serial: int = 0


FROM_START = LogMark()


def die_with_parent() -> None:
    """Runs in the child before exec: QEMU gets SIGKILL when vballoon dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def log_since(path: Path, offset: int) -> str:
    """The text a log file gained after byte `offset` ('' when there is no file)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def wait_or_signal(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Give `process` `timeout` to exit, then SIGTERM its process group and as long again, then SIGKILL it."""
    for next_signal in (signal.SIGTERM, signal.SIGKILL):
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, next_signal)
    process.wait()


def crash_lines(stderr: str) -> list[str]:
    """What in QEMU's stderr shows a crash, in order: each sanitizer report as its headline and first frame,
    and each assertion, segfault or abort line outside those reports."""
    reports = sanitizer_reports(stderr)
    in_report = {index for report in reports for index in report.lines}
    found = [(report.lines.start, report.describe()) for report in reports]
    found += [(index, line.strip()) for index, line in enumerate(stderr.splitlines())
              if index not in in_report and CRASH_LINE.match(line)]
    return [text for _, text in sorted(found)]


def error_lines(stderr: str) -> list[str]:
    """The texts QEMU printed as `qemu-system-x86_64: <text>` errors, in order."""
    return [match.group(1).strip() for match in ERROR_LINE.finditer(stderr)]


class QemuMachine:
    """A QEMU process with QMP, its runtime dir and its logs; subclasses say what it runs."""

    stop_timeout = STOP_TIMEOUT
    """How long each step of `stop` (QMP quit, SIGTERM) is given before the next."""

    def __init__(self, qemu: QemuBinary, log_dir: Path, trace_events: tuple[str, ...] = (),
                 extra_args: tuple[str, ...] = (), keep_transcripts: bool = True) -> None:
        self.qemu = qemu
        self.logs = MachineLogs(log_dir)
        self.trace_events = trace_events
        self.extra_args = extra_args
        self.keep_transcripts = keep_transcripts
        """The QMP (and qtest) transcripts; off for long runs of many inputs (a fuzzer's QEMU)."""
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: Monitor | None = None
        self._runtime_dir: Path | None = None
        self._expected_errors: list[str] = []
        self._stop_mark = 0
        """Where stderr stood when `stop` began: what follows is what QEMU printed on its way out."""

    # --- what a kind of machine adds ------------------------------------------

    def _arguments(self) -> list[str]:
        """The machine, its devices and its connections, as QEMU arguments."""
        raise NotImplementedError

    def _before_launch(self) -> None:
        """Prepare what QEMU needs at start (files and listening sockets in the runtime dir)."""

    def _after_launch(self) -> None:
        """Connect what QEMU opened besides QMP; wait until the machine is ready for use."""

    def _before_stop(self) -> None:
        """Close the connections `_after_launch` made."""

    # --- lifecycle --------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Launch QEMU and connect to it; if anything fails, what was started is stopped."""
        try:
            self._runtime_dir = Path(tempfile.mkdtemp(prefix="vballoon-qemu-"))
            with self.timeline_span("boot"):
                self._launch()
                self._after_launch()
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> None:
        """Start QEMU with a fresh QMP socket and wait until it connects there."""
        self._before_launch()
        qmp_socket = self.runtime_dir / "qmp.sock"
        self._qmp = Monitor(qmp_socket, self.logs.qmp if self.keep_transcripts else None)
        args = self.command_line(qmp_socket)
        self.logs.command_line.write_text(" ".join(args) + "\n")
        started = time.time()
        with self.logs.stderr.open("ab") as stderr:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                            env=sanitizer_environment(os.environ), preexec_fn=die_with_parent,
                                            start_new_session=True)
        try:
            self._qmp.accept(START_TIMEOUT, alive=self.running)
        except QemuError as error:
            raise QemuError(f"{error}; {self.exit_description()}") from None
        self.timeline_record("qemu-start", started, time.time())

    def command_line(self, qmp_socket: Path) -> list[str]:
        """The full QEMU command line, with QMP on `qmp_socket`."""
        traces = [arg for event in self.trace_events for arg in ("-trace", event)]
        return self.qemu.command_line("-chardev", f"socket,id=qmp,path={qmp_socket}", "-mon", "chardev=qmp,mode=control",
                                      *self._arguments(), *traces, *self.extra_args)

    def stop(self) -> None:
        """End QEMU: QMP quit, then SIGTERM, then SIGKILL, each given `stop_timeout`; the runtime dir goes
        whatever happens."""
        started = time.time()
        if self.running():
            self._stop_mark = self.mark().stderr
        try:
            self._before_stop()
            self._end_process()
        finally:
            if self._runtime_dir is not None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
                self._runtime_dir = None
                self.timeline_record("qemu-stop", started, time.time())

    def _end_process(self) -> None:
        monitor, self._qmp = self._qmp, None
        try:
            if monitor is not None and self.running():
                monitor.quit(self.stop_timeout)
        finally:
            if monitor is not None:
                monitor.close()
            if self.process is not None:
                wait_or_signal(self.process, self.stop_timeout)

    def timeline_span(self, kind: str) -> AbstractContextManager[None]:
        """Time the `with` block as a `kind` event of this machine on the run's timeline."""
        return timeline.span(kind, self.logs.directory.name, machine=type(self).__name__)

    def timeline_record(self, kind: str, start: float, end: float) -> None:
        """A `kind` event of this machine from `start` to `end` (time.time()) on the run's timeline."""
        timeline.record(kind, self.logs.directory.name, start, end, machine=type(self).__name__)

    @property
    def runtime_dir(self) -> Path:
        """Sockets and temporary files of the running QEMU, removed when it stops."""
        if self._runtime_dir is None:
            raise QemuError(f"QEMU is not running ({self.logs.describe()})")
        return self._runtime_dir

    @property
    def qmp(self) -> Monitor:
        """The QMP monitor; QemuError when QEMU is not running."""
        if self._qmp is None:
            raise QemuError(f"QEMU is not running; no QMP ({self.logs.describe()})")
        return self._qmp

    @property
    def pid(self) -> int:
        if self.process is None:
            raise QemuError(f"QEMU was not started ({self.logs.describe()})")
        return self.process.pid

    def running(self) -> bool:
        """Whether QEMU was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    # --- health -------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise QemuError if QEMU has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise QemuError(self.exit_description())

    def exit_description(self) -> str:
        """How QEMU ended (or that it still runs), its last stderr lines and where the logs are."""
        if self.process is None:
            return f"QEMU was not started ({self.logs.describe()})"
        try:
            code = self.process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            return f"QEMU is still running but not answering ({self.logs.describe()})"
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"QEMU {how}; stderr tail: {tail(self.logs.stderr, 5)!r} ({self.logs.describe()})"

    def mark(self) -> LogMark:
        """Where the logs stand now: `problems(since=...)` then looks at what comes after."""
        sizes = [path.stat().st_size if path.exists() else 0 for path in (self.logs.stderr, self.logs.serial)]
        return LogMark(*sizes)

    def stderr_since(self, offset: int = 0) -> str:
        return log_since(self.logs.stderr, offset)

    def crash_evidence(self, since: int = 0) -> list[str]:
        """Exit by a signal or a failure status; sanitizer reports, assertion, segfault or abort lines on stderr
        after `since`."""
        found: list[str] = []
        if self.process is not None and self.process.poll() not in (None, 0):
            found.append(self.exit_description())
        return found + [f"QEMU stderr: {line}" for line in crash_lines(self.stderr_since(since))]

    def exit_problems(self) -> list[str]:
        """After `stop`: the crash evidence QEMU printed on its way out (a LeakSanitizer report, a crash in
        its cleanup). Not its exit status: a QEMU that did not quit in time was sent a signal."""
        return [f"QEMU stderr at exit: {line}" for line in crash_lines(self.stderr_since(self._stop_mark))]

    def device_errors(self, since: int = 0) -> list[str]:
        """The errors QEMU printed after `since` (virtio_error and others), in order."""
        return error_lines(self.stderr_since(since))

    def expect_device_error(self, text: str) -> None:
        """A QEMU error containing `text` is what the test provokes: not a problem."""
        self._expected_errors.append(text)

    def problems(self, since: LogMark = FROM_START) -> list[str]:
        """Crash evidence, and errors nobody said to expect, after `since`; one line each."""
        unexpected = [f"QEMU stderr: qemu-system-x86_64: {line}" for line in self.device_errors(since.stderr)
                      if not any(text in line for text in self._expected_errors)]
        return self.crash_evidence(since.stderr) + unexpected

    def assert_healthy(self, since: LogMark = FROM_START) -> None:
        """Raise QemuError with the evidence and the log paths if `problems` finds any."""
        found = self.problems(since)
        if found:
            raise QemuError("; ".join(found[:5]) + f" ({self.logs.describe()})")
