"""QEMU's human monitor reached through QMP `human-monitor-command`, and trace events switched on for a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vballoon.qemu.machine import Machine


def hmp(vm: Machine, command_line: str) -> str:
    """Run one HMP command; its text output."""
    return str(vm.qmp.command("human-monitor-command", **{"command-line": command_line}))


@contextmanager
def trace_events_on(vm: Machine, *events: str) -> Iterator[int]:
    """Switch QEMU trace events on for the `with` block; yields the stderr offset where their lines begin."""
    start = vm.logs.stderr.stat().st_size
    for event in events:
        hmp(vm, f"trace-event {event} on")
    try:
        yield start
    finally:
        for event in events:
            hmp(vm, f"trace-event {event} off")
