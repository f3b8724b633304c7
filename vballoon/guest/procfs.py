"""The guest's own view of its memory: /proc/meminfo and /proc/vmstat, read in one SSH command."""

from __future__ import annotations

from dataclasses import dataclass

from vballoon.guest.ssh import GuestShell

SEPARATOR = "--vmstat--"


@dataclass(frozen=True)
class GuestMemory:
    """/proc/meminfo in bytes and /proc/vmstat counters, read at one moment."""

    meminfo: dict[str, int]
    vmstat: dict[str, int]

    def mem(self, key: str) -> int:
        """A /proc/meminfo field in bytes, e.g. mem("MemTotal")."""
        return self.meminfo[key]


def parse_meminfo(text: str) -> dict[str, int]:
    """`MemTotal:  480284 kB` lines to {"MemTotal": 491810816} (bytes; unitless fields as given)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        if words:
            fields[name.strip()] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return fields


def parse_vmstat(text: str) -> dict[str, int]:
    """`pgfault 2366` lines to {"pgfault": 2366}."""
    return {name: int(value) for name, value in (line.split() for line in text.splitlines() if line.strip())}


def read_guest_memory(shell: GuestShell) -> GuestMemory:
    """Both files from one command, so they describe (nearly) the same moment."""
    out = shell.output(f"cat /proc/meminfo; echo {SEPARATOR}; cat /proc/vmstat")
    meminfo, _, vmstat = out.partition(SEPARATOR + "\n")
    return GuestMemory(parse_meminfo(meminfo), parse_vmstat(vmstat))
