"""The guest helper `memhog` run in the background over SSH: start, wait for its lines, signal, collect."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from vballoon.errors import GuestError
from vballoon.guest.ssh import GuestShell
from vballoon.waiting import wait_for

OUTPUT_DIR = "/run/memhog"
STOP_DEADLINE_S = 30
SSH_POLL_MAX_S = 0.5
"""The longest pause between two reads of a hog's output: each read is one SSH command, about 75 ms of the
guest's CPU under TCG (measured), so polling stays below a sixth of it."""


@dataclass
class BackgroundHog:
    """A memhog started with `start_hog`; its output goes to a file in the guest."""

    shell: GuestShell
    pid: int
    output_file: str

    def output(self) -> str:
        return self.shell.output(f"cat {self.output_file}")

    def running(self) -> bool:
        return self.shell.run(f"kill -0 {self.pid}", check=False).status == 0

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until memhog printed a line matching `pattern`, or fail if it exited first."""
        regex = re.compile(pattern)
        seen = {"text": ""}

        def probe() -> re.Match[str] | None:
            read = self.shell.run(f"kill -0 {self.pid} 2>/dev/null; alive=$?; cat {self.output_file}; exit $alive",
                                  check=False)
            alive, seen["text"] = read.status == 0, read.stdout
            match = regex.search(seen["text"])
            if match is None and not alive:
                raise AssertionError(f"memhog pid {self.pid} exited before printing /{pattern}/; "
                                     f"its output: {seen['text']!r}")
            return match

        return wait_for(probe, timeout, f"memhog to print /{pattern}/", interval=0.2, max_interval=SSH_POLL_MAX_S,
                        describe_last=lambda: repr(seen["text"][-300:]))

    def verify_now(self, timeout: float) -> str:
        """SIGUSR1: the hog verifies its pattern; return its verdict line."""
        count = self.output().count("memhog: verified")
        self.shell.run(f"kill -USR1 {self.pid}")
        wait_for(lambda: self.output().count("memhog: verified") > count, timeout,
                 "memhog to report a verification", interval=0.2, max_interval=SSH_POLL_MAX_S)
        return [line for line in self.output().splitlines() if line.startswith("memhog: verified")][-1]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then wait until the process is gone (its memory freed)."""
        self.shell.run(f"kill -TERM {self.pid}", check=False)
        wait_for(lambda: not self.running(), timeout, f"memhog pid {self.pid} to exit", interval=0.1)


def start_hog(shell: GuestShell, args: str, name: str, oom_score_adj: int = 0,
              cgroup: str | None = None) -> BackgroundHog:
    """Start `memhog ARGS` detached from SSH; `oom_score_adj` 1000 makes it the OOM killer's first choice;
    `cgroup` (a cgroup v2 directory in the guest) puts it in that cgroup before it allocates."""
    output_file = f"{OUTPUT_DIR}/{name}.out"
    join = f"echo $$ > {cgroup}/cgroup.procs || exit 1; " if cgroup else ""
    script = f"{join}echo {oom_score_adj} > /proc/self/oom_score_adj; exec memhog {args}"
    pid = shell.output(f"mkdir -p {OUTPUT_DIR}; sh -c {shlex.quote(script)} </dev/null >{output_file} 2>&1 & echo $!")
    return BackgroundHog(shell, int(pid.strip()), output_file)


def run_hog(shell: GuestShell, args: str, timeout: float = 120.0) -> str:
    """Run `memhog ARGS` to completion; its output (it must exit 0)."""
    return shell.output(f"memhog {args}", timeout=timeout)


def stop_all_hogs(shell: GuestShell) -> None:
    """Kill every memhog left in the guest and remove pattern files and outputs."""
    gone = shell.run(f"killall -KILL memhog 2>/dev/null; rm -rf {OUTPUT_DIR} /dev/shm/*; "
                     f"for i in $(seq {STOP_DEADLINE_S * 10}); do pidof memhog >/dev/null || exit 0; sleep 0.1; done; "
                     "exit 1", timeout=STOP_DEADLINE_S + 30, check=False)
    if gone.status != 0:
        raise GuestError(f"memhog still running {STOP_DEADLINE_S} s after SIGKILL")
