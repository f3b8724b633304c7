"""QEMU's human monitor reached through QMP `human-monitor-command`, and trace events switched on for a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vballoon.qemu.machine import Machine


def hmp(vm: Machine, command_line: str) -> str:
    """Run one HMP command; its text output."""
    return str(vm.qmp.command("human-monitor-command", **{"command-line": command_line}))


def guest_qwords(vm: Machine, gpa: int, count: int = 1) -> list[int]:
    """`count` little-endian 64-bit words of guest-physical memory from `gpa`, read by HMP `xp`."""
    text = hmp(vm, f"xp /{count}gx {gpa:#x}")
    return [int(word, 16) for line in text.splitlines() if ":" in line for word in line.split(":", 1)[1].split()]


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
