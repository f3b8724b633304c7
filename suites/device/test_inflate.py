"""Inflate and deflate buffers, from pages of RAM to PFNs no RAM backs, sent to QEMU's balloon over qtest."""

from __future__ import annotations

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from vballoon.qemu.qtest_machine import INFLATEQ, QtestBalloon, QtestMachine
from vballoon.qemu.virtio_pci import MMIO_WINDOW
from vballoon.spec import PAGE_SIZE, PFN_SHIFT, Status, encode_pfns
from vballoon.virtqueue import Buffer
from vballoon.waiting import wait_for

PATTERN = 0xAA
SENTINEL = 0x55
BIOS_ROM_TOP_PFN = 0xFFFFF  # last page below 4 GiB: the firmware image


def page_bytes(machine: QtestMachine, address: int) -> bytes:
    return machine.qtest.read(address, PAGE_SIZE)


def fill_counts(data: bytes) -> str:
    return ", ".join(f"{byte:#04x}x{data.count(byte)}" for byte in sorted(set(data)))


@pytest.mark.req("BAL-DEV-OP-1", "BAL-LEG-USED")
@over(TRANSPORTS)
def test_inflated_pages_read_back_zero_and_neighbours_keep_their_content(
        balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """QEMU 7.2 and 10.0 discard inflated anonymous RAM (it MAY modify it): the pages read zero, the others are untouched."""
    balloon.start()
    pages = [balloon.new_page(PATTERN if i % 2 else SENTINEL) for i in range(5)]
    inflated = pages[1::2]
    used = balloon.inflate([p >> PFN_SHIFT for p in inflated])
    assert used.length == 0, f"BAL-LEG-USED: QEMU writes used length 0 for inflate buffers, got {used.length}"
    for page in inflated:
        data = page_bytes(qtest_machine, page)
        assert data == bytes(PAGE_SIZE), f"BAL-DEV-OP-1: inflated page {page:#x} should read zero, has {fill_counts(data)}"
    for page in pages[0::2]:
        data = page_bytes(qtest_machine, page)
        assert data == bytes([SENTINEL]) * PAGE_SIZE, f"page {page:#x} was not inflated but changed: {fill_counts(data)}"


@pytest.mark.req("BAL-DEV-OP-1")
@over(TRANSPORTS)
def test_pfns_split_across_descriptors_and_a_partial_tail(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """The PFN array is the concatenation of the out buffers; a trailing partial PFN is ignored."""
    balloon.start()
    first, second, tail_page = (balloon.new_page(PATTERN) for _ in range(3))
    array = encode_pfns([first >> PFN_SHIFT, second >> PFN_SHIFT], balloon.driver.endian)
    partial_tail = encode_pfns([tail_page >> PFN_SHIFT], balloon.driver.endian)[:3]
    balloon.exchange(INFLATEQ, [array[:3], array[3:], partial_tail])
    for page in (first, second):
        assert page_bytes(qtest_machine, page) == bytes(PAGE_SIZE), \
            f"BAL-DEV-OP-1: page {page:#x}, named across two descriptors, should read zero"
    assert page_bytes(qtest_machine, tail_page) == bytes([PATTERN]) * PAGE_SIZE, \
        "the 3 trailing bytes are not a PFN; that page must keep its content"


@pytest.mark.req("BAL-LEG-USED")
@pytest.mark.parametrize("pfn_name", ["above-ram", "mmio-bar", "firmware-rom", "all-ones", "bit-31-alias"])
@over(TRANSPORTS)
def test_pfns_outside_ram_are_skipped_but_acked(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                pfn_name: str) -> None:
    """PFNs of MMIO, ROM or no memory are skipped (trace virtio_balloon_bad_addr) and the buffer still used, length 0.

    bit-31-alias: PFN 0x80000000 | p must not touch page p (QEMU < 4.1 sign-extended such PFNs).
    """
    balloon.start()
    sentinel = balloon.new_page(SENTINEL)
    pfn = {
        "above-ram": qtest_machine.ram_bytes >> PFN_SHIFT,
        "mmio-bar": MMIO_WINDOW[0] >> PFN_SHIFT,
        "firmware-rom": BIOS_ROM_TOP_PFN,
        "all-ones": 0xFFFFFFFF,
        "bit-31-alias": 0x80000000 | sentinel >> PFN_SHIFT,
    }[pfn_name]
    used = balloon.inflate([pfn])
    assert used.length == 0, f"BAL-LEG-USED: used length {used.length} for a skipped PFN"
    qtest_machine.check_alive()
    assert page_bytes(qtest_machine, sentinel) == bytes([SENTINEL]) * PAGE_SIZE, \
        f"inflating PFN {pfn:#x} changed RAM page {sentinel:#x}"
    trace = f"virtio_balloon_bad_addr {pfn << PFN_SHIFT:#x}"
    wait_for(lambda: trace in qtest_machine.logs.stderr.read_text(errors="replace"), 5.0,
             f"the trace line {trace!r} on QEMU's stderr")


@pytest.mark.req("BAL-LEG-USED")
@over(TRANSPORTS)
def test_deflate_is_acked_and_handled(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """A deflate of an inflated page is used with length 0, and QEMU handled the PFN (one trace line per queue)."""
    balloon.start()
    page = balloon.new_page(PATTERN)
    balloon.inflate([page >> PFN_SHIFT])
    used = balloon.deflate([page >> PFN_SHIFT])
    assert used.length == 0, f"BAL-LEG-USED: used length {used.length} for a deflate buffer"
    trace = f"virtio_balloon_handle_output section name: pc.ram gpa: {page:#x}"
    wait_for(lambda: qtest_machine.logs.stderr.read_text(errors="replace").count(trace) == 2, 5.0,
             f"two trace lines {trace!r} (inflate, then deflate)")


@pytest.mark.req("BAL-DEV-OP-1", "BAL-LEG-USED")
@over(TRANSPORTS)
def test_duplicated_pfns_are_acked_once(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """A PFN named twice in one buffer is discarded like once; the buffer is used once, length 0."""
    balloon.start()
    page = balloon.new_page(PATTERN)
    used = balloon.inflate([page >> PFN_SHIFT] * 3)
    assert used.length == 0, f"BAL-LEG-USED: used length {used.length}"
    assert page_bytes(qtest_machine, page) == bytes(PAGE_SIZE), f"BAL-DEV-OP-1: page {page:#x} should read zero"
    assert balloon.driver.queues[INFLATEQ].collect_used() == [], "the buffer must be used exactly once"


@pytest.mark.req("BAL-LEG-USED")
@over(TRANSPORTS)
def test_device_writable_buffer_on_inflateq_is_acked_untouched(balloon: QtestBalloon,
                                                               qtest_machine: QtestMachine) -> None:
    """PFNs in a device-writable (in) buffer are not read: QEMU takes only out buffers, uses the chain, length 0."""
    balloon.start()
    page = balloon.new_page(PATTERN)
    array = balloon.driver.allocator.alloc(4)
    qtest_machine.qtest.write(array, encode_pfns([page >> PFN_SHIFT], balloon.driver.endian))
    used = balloon.exchange(INFLATEQ, [], [Buffer(array, 4)])
    assert used.length == 0, f"BAL-LEG-USED: used length {used.length} for a chain without out buffers"
    assert page_bytes(qtest_machine, page) == bytes([PATTERN]) * PAGE_SIZE, \
        f"a PFN in an in buffer was acted on: page {page:#x} changed"


@pytest.mark.req("BAL-DEV-OP-1")
@over(TRANSPORTS)
def test_pfn_zero_is_discarded_and_acked(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """PFN 0 is ordinary low RAM on q35: acked with length 0 and, like any inflated page, it MAY read zero."""
    balloon.start()
    qtest_machine.qtest.memset(0, PAGE_SIZE, PATTERN)
    used = balloon.inflate([0])
    assert used.length == 0, f"used length {used.length}"
    data = page_bytes(qtest_machine, 0)
    assert data in (bytes(PAGE_SIZE), bytes([PATTERN]) * PAGE_SIZE), \
        f"BAL-DEV-OP-1: page 0 may only be unchanged or zero, has {fill_counts(data)}"


@pytest.mark.req("BAL-DEV-OP-1")
@over(TRANSPORTS)
def test_a_zero_length_descriptor_is_a_device_error(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                    device_variant: DeviceVariant) -> None:
    """A 0-byte buffer on the inflateq breaks virtio's ring rules (no balloon statement covers them; this is the
    closest): QEMU reports "zero sized buffers are not allowed", stops the device without discarding anything
    and, with VERSION_1, sets DEVICE_NEEDS_RESET; QEMU keeps running."""
    qtest_machine.expect_device_error("zero sized buffers are not allowed")
    balloon.start()
    page = balloon.new_page(PATTERN)
    balloon.post(INFLATEQ, [b"", encode_pfns([page >> PFN_SHIFT], balloon.driver.endian)])
    wait_for(lambda: any("zero sized buffers" in e for e in qtest_machine.device_errors()), 5.0,
             "QEMU's device error", describe_last=lambda: str(qtest_machine.device_errors()))
    needs_reset = bool(balloon.driver.status & Status.DEVICE_NEEDS_RESET)
    assert needs_reset == (not device_variant.legacy_interface), f"status {balloon.driver.status:#x}"
    assert page_bytes(qtest_machine, page) == bytes([PATTERN]) * PAGE_SIZE, "a refused chain discarded a page"
    assert qtest_machine.crash_evidence() == [], "a device error must not crash QEMU"
