"""Free page hinting: command ids and the device's hint state machine.

The host requests hints (QEMU: after each dirty-bitmap sync during
migration), stops them (before a sync) and declares them done (at the end
of migration).  The driver answers a request with an out buffer holding the
command id, sends pages as in buffers, and ends with a STOP buffer.
"""

from __future__ import annotations

from enum import Enum

from vballoon.spec import CMD_ID_DONE, CMD_ID_MIN, CMD_ID_STOP, next_cmd_id


class HintState(Enum):
    """QEMU's (7.2 and 10.0) free_page_hint_status values."""

    STOP = 0
    REQUESTED = 1
    START = 2
    DONE = 3


_SHOWING_THE_ID = (HintState.REQUESTED, HintState.START)
"""States in which the config space shows the issued id (a constant: read on every config access)."""


class FreePageHinting:
    """Command ids issued by the device and whether hinted pages count."""

    def __init__(self, counter: int = CMD_ID_MIN) -> None:
        self.counter = counter
        """The last id issued; QEMU starts at CMD_ID_MIN, so the first issued is CMD_ID_FIRST."""
        self.state = HintState.STOP
        self.driver_id: int | None = None
        """The last command id the driver sent, until it sends STOP."""
        self.unreleased: set[int] = set()
        """Ids issued for which no STOP has come back (BAL-DEV-FPH-2)."""

    @property
    def config_cmd_id(self) -> int:
        """free_page_hint_cmd_id as the driver reads it.

        The issued id while the device wants hints, STOP when it cannot use
        them (BAL-DEV-FPH-1), DONE when it no longer needs them (BAL-DEV-FPH-6).
        QEMU 7.2 and 10.0 show 0 (STOP) once the driver has started (state START);
        the reference keeps showing the id, which the spec requires.
        """
        if self.state in _SHOWING_THE_ID:
            return self.counter
        return CMD_ID_DONE if self.state is HintState.DONE else CMD_ID_STOP

    def request(self) -> int:
        """Issue a new command id and ask the driver for hints.

        Never reuses an id the driver has not released with STOP
        (BAL-DEV-FPH-2): such ids are skipped after the counter wraps.
        """
        candidate = next_cmd_id(self.counter)
        while candidate in self.unreleased:
            candidate = next_cmd_id(candidate)
        self.counter = candidate
        self.unreleased.add(candidate)
        self.state = HintState.REQUESTED
        return candidate

    def stop(self) -> None:
        """The host cannot use hints for now (BAL-DEV-FPH-1)."""
        self.state = HintState.STOP

    def done(self) -> None:
        """The host no longer needs hints (BAL-DEV-FPH-6); hinted pages are the driver's again (BAL-DEV-FPH-5)."""
        self.state = HintState.DONE

    def receive_cmd_id(self, cmd_id: int) -> None:
        """Take a command id from a driver out buffer.

        STOP releases the id the driver was hinting for and ends hinting; the
        current id starts hinting; any other id is stale: it ends a started
        round and the pages that follow it are ignored (BAL-DEV-FPH-3).
        """
        if cmd_id == CMD_ID_STOP:
            if self.driver_id is not None:
                self.unreleased.discard(self.driver_id)
            self.driver_id = None
            if self.state is HintState.START:
                self.state = HintState.STOP
            return
        self.driver_id = cmd_id
        if self.state is HintState.REQUESTED and cmd_id == self.counter:
            self.state = HintState.START
        elif self.state is HintState.START and cmd_id != self.counter:
            # A different id while started ends this round, as in QEMU 7.2.
            self.state = HintState.STOP

    def accepts_pages(self) -> bool:
        """Hinted pages count only while started under the current id (BAL-DEV-FPH-3)."""
        return self.state is HintState.START and self.driver_id == self.counter

    def reset(self) -> None:
        """Device reset stops hinting (QEMU: virtio_balloon_free_page_stop)."""
        self.state = HintState.STOP
        self.driver_id = None
