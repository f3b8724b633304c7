"""QMP access through `qemu.qmp`, with a transcript of everything said.

Every command, reply and event goes to a JSON-lines transcript so a failed
test can show exactly what the host asked QEMU and what QEMU answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vballoon.errors import QemuError
from vballoon.waiting import wait_for

Event = dict[str, Any]


class Monitor:
    """A synchronous QMP session that records a transcript."""

    def __init__(self, socket_path: Path, transcript: Path, timeout: float = 30.0) -> None:
        self._qmp = QEMUMonitorProtocol(str(socket_path), server=True, nickname="vballoon")
        self._qmp.settimeout(timeout)
        self._transcript = transcript.open("a", encoding="utf-8")
        self._events: list[Event] = []

    def accept(self, timeout: float) -> None:
        """Wait for QEMU to connect to our socket and negotiate capabilities."""
        try:
            greeting = self._qmp.accept(timeout)
        except (QMPError, OSError, asyncio.TimeoutError) as error:
            raise QemuError(f"QEMU did not connect to QMP within {timeout:g} s ({error or 'timeout'})") from None
        self._record("greeting", greeting)

    def command(self, name: str, **arguments: Any) -> Any:
        """Execute a QMP command; a QMP error becomes QemuError with QEMU's text."""
        self._record("command", {"execute": name, "arguments": arguments})
        try:
            reply = self._qmp.cmd(name, **arguments)
        except ExecuteError as error:
            description = error.error.error.desc
            self._record("error", {"execute": name, "error": description})
            raise QemuError(f"QMP {name}: {description}") from None
        except (QMPError, OSError, asyncio.TimeoutError, EOFError) as error:
            self._record("error", {"execute": name, "error": repr(error)})
            raise QemuError(f"QMP {name}: connection failed ({error!r})") from None
        self._record("return", reply)
        return reply

    def try_command(self, name: str, **arguments: Any) -> tuple[Any, str | None]:
        """Execute a command expected to fail sometimes: (result, None) or (None, QEMU's error text)."""
        try:
            return self.command(name, **arguments), None
        except QemuError as error:
            return None, str(error).removeprefix(f"QMP {name}: ")

    def events(self) -> list[Event]:
        """Events received so far (kept; `take_events` drains them)."""
        self._pump()
        return list(self._events)

    def take_events(self, name: str | None = None) -> list[Event]:
        """Remove and return the received events (of one name, if given)."""
        self._pump()
        taken = [e for e in self._events if name is None or e["event"] == name]
        self._events = [e for e in self._events if e not in taken]
        return taken

    def wait_event(self, name: str, timeout: float, match: Callable[[Event], bool] = lambda e: True) -> Event:
        """Wait until an event `name` satisfying `match` arrives; it is removed from the queue."""

        def probe() -> Event | None:
            for event in self.events():
                if event["event"] == name and match(event):
                    self._events.remove(event)
                    return event
            return None

        return wait_for(probe, timeout, f"QMP event {name}")

    def close(self) -> None:
        try:
            self._qmp.close()
        except (QMPError, OSError, asyncio.TimeoutError, RuntimeError, EOFError):
            pass  # QEMU may already be gone; the socket is closed either way
        self._transcript.close()

    def _pump(self) -> None:
        try:
            for event in self._qmp.get_events(wait=False):
                self._record("event", event)
                self._events.append(event)
        except (QMPError, OSError, asyncio.TimeoutError, EOFError):
            pass

    def _record(self, kind: str, payload: Any) -> None:
        if self._transcript.closed:
            return
        line = {"t": round(time.time(), 3), "kind": kind, "data": payload}
        self._transcript.write(json.dumps(line, default=str) + "\n")
        self._transcript.flush()
