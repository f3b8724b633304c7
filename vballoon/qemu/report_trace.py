"""Free page reports in QEMU's trace (BAL-DRV-FPR-2, BAL-DRV-FPR-5, BAL-DEV-FPR-2): the blocks the guest reported
(`virtqueue_pop` of in buffers, one entry per free block) and the ranges QEMU discarded
(`ram_block_discard_range`, which reporting and inflating both go through)."""

from __future__ import annotations

import re

TRACE_EVENTS = ("virtqueue_pop", "ram_block_discard_range")
QUEUE_POP = re.compile(r"virtqueue_pop vq 0x[0-9a-f]+ elem \S+ in_num (\d+) out_num \d+")
DISCARD = re.compile(r"ram_block_discard_range \S+@0x[0-9a-f]+ \+ (0x[0-9a-f]+)")


def reported_blocks(trace: str) -> int:
    """In entries of the buffers popped: the reported free blocks. The inflate, deflate and stats queues carry
    out buffers only; free page hints, in buffers too, flow only while QEMU asks for them (a migration)."""
    return sum(int(m[1]) for m in QUEUE_POP.finditer(trace))


def discarded_lengths(trace: str) -> list[int]:
    """The length in bytes of every range QEMU discarded, in order."""
    return [int(m[1], 16) for m in DISCARD.finditer(trace)]
