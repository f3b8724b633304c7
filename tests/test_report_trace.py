"""Free page reports and discards read from QEMU's trace (BAL-DRV-FPR-2, BAL-DRV-FPR-5), on QEMU 7.2's log lines."""

from __future__ import annotations

import pytest

from vballoon.qemu.report_trace import discarded_lengths, reported_blocks

# Lines as QEMU 7.2 writes them with -trace virtqueue_pop,ram_block_discard_range while the guest reports.
TRACE = """\
4071@1701.1:virtqueue_pop vq 0x7f4b019130a8 elem 0x562b211a5cb0 in_num 0 out_num 1
4071@1701.2:virtqueue_pop vq 0x7f4b01913010 elem 0x562b211a5cb0 in_num 32 out_num 0
4071@1701.3:ram_block_discard_range pc.ram@0x7f4a9d200000 + 0x400000: madvise: 1 fallocate: 0 ret: 0
4071@1701.4:ram_block_discard_range mem0@0x7f287ba00000 + 0x200000: madvise: 1 fallocate: 1 ret: 0
4071@1701.5:virtqueue_pop vq 0x7f4b01913010 elem 0x562b211a5cb0 in_num 3 out_num 0
"""

pytestmark = pytest.mark.req("BAL-DRV-FPR-2", "BAL-DRV-FPR-5")


def test_reported_blocks_count_the_entries_of_in_only_buffers() -> None:
    """The stats buffer (in_num 0, out_num 1) is not a report; the two reports carry 32 and 3 blocks."""
    assert reported_blocks(TRACE) == 35


def test_discarded_lengths_are_read_in_order() -> None:
    assert discarded_lengths(TRACE) == [0x400000, 0x200000]


def test_a_trace_without_reports_counts_nothing() -> None:
    assert reported_blocks(TRACE.splitlines()[0]) == 0 and discarded_lengths("") == []
