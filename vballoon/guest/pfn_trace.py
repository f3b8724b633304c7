"""The PFNs QEMU received on the balloon's inflate and deflate queues, read from its trace (BAL-DRV-OP-1, BAL-DRV-OP-4).

`virtio_balloon_handle_output` names each guest-physical address QEMU
processed but not the queue; the `virtqueue_pop` line just before it (same
BQL-held handler) names the queue. The inflate queue is learnt from a pure
inflate: the queue its addresses came on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRACE_EVENTS = ("virtqueue_pop", "virtio_balloon_handle_output")
QUEUE_POP = re.compile(r"virtqueue_pop vq (0x[0-9a-f]+) ")
HANDLE_OUTPUT = re.compile(r"virtio_balloon_handle_output section name: \S+ gpa: (0x[0-9a-f]+)")


@dataclass(frozen=True)
class PfnMessage:
    """One guest-physical address QEMU took off a balloon queue."""

    queue: str
    gpa: int


def pfn_messages(trace: str) -> list[PfnMessage]:
    """Every balloon address in a trace, in order, with the queue it came on."""
    messages: list[PfnMessage] = []
    queue = ""
    for line in trace.splitlines():
        popped = QUEUE_POP.search(line)
        if popped:
            queue = popped[1]
            continue
        handled = HANDLE_OUTPUT.search(line)
        if handled:
            messages.append(PfnMessage(queue, int(handled[1], 16)))
    return messages


def inflate_queue(messages: list[PfnMessage]) -> str:
    """The queue of a pure inflate's messages; AssertionError if they came on more than one."""
    queues = {m.queue for m in messages}
    assert len(queues) == 1, f"expected an inflate's addresses on one queue, got queues {sorted(queues)}"
    return queues.pop()


def replay(balloon: set[int], messages: list[PfnMessage], inflate: str) -> list[str]:
    """Apply messages to the set of ballooned addresses; the inconsistencies found (empty when all matched).

    An inflate must name an address outside the balloon, a deflate one inside it.
    """
    problems: list[str] = []
    for message in messages:
        if message.queue == inflate:
            if message.gpa in balloon:
                problems.append(f"inflate of {message.gpa:#x}, already in the balloon")
            balloon.add(message.gpa)
        else:
            if message.gpa not in balloon:
                problems.append(f"deflate of {message.gpa:#x}, not in the balloon")
            balloon.discard(message.gpa)
    return problems
