"""SSH into a guest with paramiko: key from the image, one channel per command.

dropbear in the guest answers exec channels; each `run` opens a channel,
reads stdout and stderr to EOF and then takes the exit status (about 80 ms a
command under TCG).
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from vballoon.errors import GuestError
from vballoon.waiting import DeadlineExceeded, wait_for


@dataclass(frozen=True)
class CommandResult:
    """What a guest command left behind."""

    command: str
    status: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"guest command {self.command!r} exited {self.status}\n"
            f"--- stdout ---\n{self.stdout.rstrip()}\n--- stderr ---\n{self.stderr.rstrip()}"
        )


class GuestShell:
    """Commands run in the guest over SSH."""

    def __init__(self, port: int, key_file: Path, user: str = "root", host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.user = user
        self._key = paramiko.Ed25519Key.from_private_key_file(str(key_file))
        self._client: paramiko.SSHClient | None = None

    def connect(self, timeout: float) -> None:
        """Connect, retrying until the guest answers or `timeout` seconds pass."""
        errors: list[str] = []

        def attempt() -> paramiko.SSHClient | None:
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect(
                    self.host, self.port, username=self.user, pkey=self._key,
                    look_for_keys=False, allow_agent=False, timeout=5, banner_timeout=10, auth_timeout=10,
                )
            except (paramiko.SSHException, OSError, EOFError) as error:
                client.close()
                errors.append(f"{type(error).__name__}: {error}")
                return None
            return client

        try:
            self._client = wait_for(attempt, timeout, f"SSH on {self.host}:{self.port}",
                                    interval=0.2, describe_last=lambda: errors[-1] if errors else "nothing")
        except DeadlineExceeded as error:
            raise GuestError(str(error)) from None

    def run(self, command: str, timeout: float = 60.0, check: bool = True, stdin: bytes | None = None) -> CommandResult:
        """Run `command` with `sh -c`; a non-zero exit raises GuestError showing status, stdout and stderr."""
        if self._client is None:
            raise GuestError("SSH is not connected; the guest was never reached")
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"SSH connection to the guest was lost before running {command!r}")
        try:
            channel = transport.open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
            if stdin is not None:
                channel.sendall(stdin)
            channel.shutdown_write()
            stdout, stderr = _read_all(channel, time.monotonic() + timeout)
            status = channel.recv_exit_status()
            channel.close()
        except (socket.timeout, TimeoutError):
            raise GuestError(f"guest command {command!r} did not finish within {timeout:g} s") from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise GuestError(f"guest command {command!r} failed over SSH: {error}") from None
        result = CommandResult(command, status, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
        if check and status != 0:
            raise GuestError(result.describe())
        return result

    def output(self, command: str, timeout: float = 60.0) -> str:
        """stdout of a command that must succeed."""
        return self.run(command, timeout).stdout

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _read_all(channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes]:
    """Read stdout and stderr to EOF before the deadline, waking on data with select."""
    stdout, stderr = bytearray(), bytearray()
    while not (channel.exit_status_ready() and channel.eof_received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        select.select([channel], [], [], min(remaining, 1.0))
        while channel.recv_ready():
            stdout += channel.recv(65536)
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(65536)
    while channel.recv_ready():
        stdout += channel.recv(65536)
    while channel.recv_stderr_ready():
        stderr += channel.recv_stderr(65536)
    return bytes(stdout), bytes(stderr)
