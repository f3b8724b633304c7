"""The replay of QEMU's balloon trace that guest tests use (BAL-DRV-OP-4, BAL-DRV-OP-7), on traces of our own."""

from __future__ import annotations

from vballoon.guest.pfn_trace import inflate_queue, pfn_messages, replay

INFLATE, DEFLATE = "0x5600aa", "0x5600bb"


def _trace(*steps: tuple[str, list[int]]) -> str:
    """QEMU 7.2's log-backend lines for buffers popped on a queue and the addresses handled from each."""
    lines = []
    for queue, gpas in steps:
        lines.append(f"123@1.0:virtqueue_pop vq {queue} elem 0x1 in_num 0 out_num 1")
        lines += [f"123@1.1:virtio_balloon_handle_output section name: pc.ram gpa: {gpa:#x}" for gpa in gpas]
        lines.append(f"123@1.2:virtqueue_flush vq {queue} count 1")
    return "\n".join(lines)


def test_a_deflate_of_acknowledged_inflated_pages_replays_clean() -> None:
    messages = pfn_messages(_trace((INFLATE, [0x1000, 0x2000]), (DEFLATE, [0x1000]), (INFLATE, [0x3000]),
                                   (DEFLATE, [0x2000, 0x3000])))
    balloon: set[int] = set()
    assert inflate_queue(messages[:2]) == INFLATE
    assert replay(balloon, messages, INFLATE) == [] and balloon == set()


def test_a_deflate_popped_before_its_inflate_is_named() -> None:
    """What QEMU's trace shows of a driver that deflates a page before the device used the inflate naming it
    (BAL-DRV-OP-7): QEMU popped the deflate first."""
    messages = pfn_messages(_trace((DEFLATE, [0x1000]), (INFLATE, [0x1000])))
    assert replay(set(), messages, INFLATE) == ["deflate of 0x1000, not in the balloon"]


def test_an_inflate_of_a_page_in_the_balloon_is_named() -> None:
    messages = pfn_messages(_trace((INFLATE, [0x1000]), (INFLATE, [0x1000])))
    assert replay(set(), messages, INFLATE) == ["inflate of 0x1000, already in the balloon"]
