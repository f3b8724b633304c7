"""What an executor shows of its device after an operation: `Observation`, and the `Answer` to one operation."""

from __future__ import annotations

from dataclasses import dataclass

Answer = tuple[int | None, str | None]
"""What one operation returns: the value a config read gave (else None), and the error text of a request the
device refused (else None)."""
NO_ANSWER: Answer = (None, None)


@dataclass(frozen=True)
class Observation:
    """What an executor shows after one operation."""

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
