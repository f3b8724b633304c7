"""QMP access through `qemu.qmp`, with a transcript of everything said.

Every command, reply and event goes to a JSON-lines transcript so a failed
test can show exactly what the host asked QEMU and what QEMU answered.

`qemu.qmp.QMPClient` runs on an event loop this monitor owns, driven one
command (or one batch, `try_commands`) at a time: a query-balloon round trip
costs about 370 µs here where the library's legacy synchronous wrapper (a
`wait_for` task per call, every message formatted for its debug log) cost
464-566 µs, and the differential fuzzer sends several per input.

QEMU 7.2's monitor reads a request one byte per read (monitor_can_read,
monitor/monitor.c): each byte costs its monitor thread about 4 µs, so a
command without arguments is sent without an empty "arguments" member.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence, TypeVar

from qemu.qmp import ExecuteError, Message, QMPClient, QMPError

from vballoon.errors import QemuError
from vballoon.waiting import wait_for

Event = dict[str, Any]
ACCEPT_POLL = 0.01
"""How often `accept` looks whether QEMU is still there."""
T = TypeVar("T")


class _Client(QMPClient):
    """`QMPClient` whose message hooks format a message only when debug logging is on (the library's hooks,
    meant for subclasses to replace, format every message both ways, about 20 µs each)."""

    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


class Monitor:
    """A synchronous QMP session that records a transcript (unless given None for it)."""

    def __init__(self, socket_path: Path, transcript: Path | None, timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._qmp = _Client("vballoon")
        self._timeout = timeout
        self._transcript = transcript.open("a", encoding="utf-8") if transcript else None
        self._events: list[Event] = []
        self._run(self._qmp.start_server(str(socket_path)), None)

    def _run(self, step: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Drive the event loop until `step` is done; asyncio.TimeoutError after `timeout` seconds."""
        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await step
        return self._loop.run_until_complete(bounded())

    def accept(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Wait for QEMU to connect to our socket and negotiate capabilities; QemuError if it does not within
        `timeout`, or as soon as `alive` says QEMU has exited."""
        async def while_alive() -> None:
            accepting = asyncio.ensure_future(self._qmp.accept())
            try:
                while not (await asyncio.wait({accepting}, timeout=ACCEPT_POLL))[0]:
                    if not alive():
                        raise ConnectionAbortedError("QEMU exited first")
                accepting.result()
            finally:
                if not accepting.done():
                    accepting.cancel()
                    await asyncio.wait({accepting})

        try:
            self._run(while_alive(), timeout)
        except (QMPError, OSError, asyncio.TimeoutError) as error:
            raise QemuError(f"QEMU did not connect to QMP ({str(error) or f'not within {timeout:g} s'})") from None
        greeting = self._qmp.greeting
        self._record("greeting", {"QMP": {"version": greeting.QMP.version, "capabilities": greeting.QMP.capabilities}}
                     if greeting else None)

    def command(self, name: str, **arguments: Any) -> Any:
        """Execute a QMP command; a QMP error becomes QemuError with QEMU's text."""
        return self._execute(name, arguments, self._timeout)

    def quit(self, timeout: float) -> None:
        """Ask QEMU to exit, waiting at most `timeout` for its answer (it may close the connection first)."""
        try:
            self._execute("quit", {}, timeout)
        except QemuError:
            pass  # gone already, or not answering: the caller's signals come next

    def _execute(self, name: str, arguments: dict[str, Any], timeout: float) -> Any:
        self._record("command", {"execute": name, "arguments": arguments})
        try:
            reply = self._run(self._qmp.execute(name, arguments or None), timeout)
        except (QMPError, OSError, asyncio.TimeoutError, EOFError) as error:
            raise QemuError(f"QMP {name}: {self._record_failure(name, error)}") from None
        self._record("return", reply)
        return reply

    def try_command(self, name: str, **arguments: Any) -> tuple[Any, str | None]:
        """Execute a command expected to fail sometimes: (result, None) or (None, QEMU's error text)."""
        try:
            return self.command(name, **arguments), None
        except QemuError as error:
            return None, str(error).removeprefix(f"QMP {name}: ")

    def try_commands(self, commands: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[Any, str | None]]:
        """`try_command` for each of `commands`, all sent at once: QEMU runs them one after another and
        answers in order, and the wait is one instead of one per command (about 100 µs less each)."""
        for name, arguments in commands:
            self._record("command", {"execute": name, "arguments": arguments})

        async def all_of() -> list[Any]:
            return await asyncio.gather(*(self._qmp.execute(name, arguments or None) for name, arguments in commands),
                                        return_exceptions=True)

        try:
            replies = self._run(all_of(), self._timeout)
        except asyncio.TimeoutError as error:
            replies = [error] * len(commands)
        answers: list[tuple[Any, str | None]] = []
        for (name, _), reply in zip(commands, replies, strict=True):
            if isinstance(reply, (QMPError, OSError, asyncio.TimeoutError, EOFError)):
                answers.append((None, self._record_failure(name, reply)))
            elif isinstance(reply, BaseException):
                raise reply
            else:
                self._record("return", reply)
                answers.append((reply, None))
        return answers

    def _record_failure(self, name: str, error: BaseException) -> str:
        """QEMU's error text for a refused command, or what broke the connection; recorded."""
        text = error.error.error.desc if isinstance(error, ExecuteError) else f"connection failed ({error!r})"
        self._record("error", {"execute": name, "error": text})
        return text

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

    def drop_events(self) -> None:
        """Forget the events received so far, without reading more from the socket."""
        for message in self._qmp.events.clear():
            self._record("event", dict(message))
        self._events = []

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
        if self._loop.is_closed():
            return
        try:
            self._run(self._qmp.disconnect(), self._timeout)
        except (QMPError, OSError, asyncio.TimeoutError, RuntimeError, EOFError):
            pass  # QEMU may already be gone; the socket is closed either way
        finally:
            self._loop.close()
            if self._transcript is not None:
                self._transcript.close()

    def _pump(self) -> None:
        try:
            self._run(asyncio.sleep(0), None)  # let the client read what QEMU sent
        except (QMPError, OSError, EOFError):
            pass
        for message in self._qmp.events.clear():
            event = dict(message)
            self._record("event", event)
            self._events.append(event)

    def _record(self, kind: str, payload: Any) -> None:
        if self._transcript is None or self._transcript.closed:
            return
        line = {"t": round(time.time(), 3), "kind": kind, "data": payload}
        self._transcript.write(json.dumps(line, default=str) + "\n")
        self._transcript.flush()
