"""Ring layouts of QEMU's balloon over qtest: the packed ring (virtio 2.8) and indirect descriptors, with the used
descriptors QEMU writes read back from guest RAM."""

from __future__ import annotations

import pytest

from fixtures.qtest_device import INTERFACES, RING_LAYOUTS, DeviceVariant, over
from vballoon.errors import UsageError
from vballoon.matrix import RING_SETTINGS
from vballoon.qemu.qtest_machine import INFLATEQ, QtestBalloon, QtestMachine
from vballoon.spec import PAGE_SIZE, PFN_SHIFT, Feature, encode_pfns, feature_mask, has_feature
from vballoon.virtqueue import (DESC_F_INDIRECT, DESC_F_WRITE, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED, Buffer,
                                Descriptor, PackedDriverQueue, SplitDriverQueue)

PATTERN = 0xA5
USED_BITS = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED
SMALL_QUEUE = 4
"""A packed inflateq this small wraps every few chains."""
PACKED = tuple(case for case in RING_LAYOUTS if case.variant.packed)
WITH_INDIRECT = INTERFACES + tuple(case for case in PACKED if case.variant.indirect_desc)
RING_BITS = frozenset(RING_SETTINGS.values())


def pfn_of(page: int) -> int:
    return page >> PFN_SHIFT


def assert_inflated(machine: QtestMachine, pages: list[int], requirement: str) -> None:
    for page in pages:
        data = machine.qtest.read(page, PAGE_SIZE)
        assert data == bytes(PAGE_SIZE), \
            f"{requirement}: inflated page {page:#x} should read zero (QEMU discards it), has {sorted(set(data))}"


@pytest.mark.req("BAL-DEV-LEG-FEAT-1", "BAL-DEV-OP-1")
@over(INTERFACES + RING_LAYOUTS)
def test_ring_features_follow_the_properties_and_each_layout_inflates(
        balloon: QtestBalloon, qtest_machine: QtestMachine, device_variant: DeviceVariant) -> None:
    """packed=on offers RING_PACKED (modern interface only: the legacy one has 32 feature bits), indirect_desc=off
    withdraws INDIRECT_DESC, as the reference device standing for the variant says; without MUST_TELL_HOST the
    driver takes the offered layout and inflates and deflates over it."""
    offered = {bit for bit in RING_BITS if has_feature(balloon.offered, bit)}
    expected = set(device_variant.variant.offered_features(device_variant.legacy_interface) & RING_BITS)
    assert offered == expected, f"ring features offered: expected {sorted(expected)}, got {sorted(offered)}"
    features = balloon.start()
    packed = has_feature(features, Feature.RING_PACKED)
    assert packed == (Feature.RING_PACKED in expected), f"driver took features {features:#x}"
    queue = balloon.driver.queues[INFLATEQ]
    assert isinstance(queue, PackedDriverQueue if packed else SplitDriverQueue), f"{type(queue).__name__}"
    page = balloon.new_page(PATTERN)
    assert balloon.inflate([pfn_of(page)]).length == 0
    assert_inflated(qtest_machine, [page], "BAL-DEV-OP-1")
    assert balloon.deflate([pfn_of(page)]).length == 0


@pytest.mark.req("VQ-DEV-PACKED-2", "BAL-DEV-OP-1", "BAL-LEG-USED")
@over(PACKED)
def test_used_descriptors_follow_chains_and_wrap_counters(balloon: QtestBalloon,
                                                         qtest_machine: QtestMachine) -> None:
    """Chains of one and two descriptors over a packed inflateq of 4, for three laps: QEMU writes each used
    descriptor where the previous chain ended, with the chain's buffer id, length 0, and AVAIL and USED both equal
    to its wrap counter, which flips after every lap.

    Broken on purpose once: the expected first wrap counter set to 0; the first chain failed on its flags."""
    driver = balloon.driver
    assert driver.negotiate(balloon.default_features), f"FEATURES_OK refused; status {driver.status:#x}"
    queue = driver.create_queue(INFLATEQ, SMALL_QUEUE)
    assert isinstance(queue, PackedDriverQueue), f"{type(queue).__name__}: RING_PACKED not negotiated"
    driver.driver_ok()
    position, wrap, laps = 0, True, 0
    for chain in range(8):
        page = balloon.new_page(PATTERN)
        pfn = encode_pfns([pfn_of(page)], driver.endian)
        parts = [pfn] if chain % 2 == 0 else [pfn[:2], pfn[2:]]
        used = balloon.exchange(INFLATEQ, parts)
        written = queue.read_descriptor(position)
        expected_flags = USED_BITS if wrap else 0
        assert (written.id, written.length, written.flags & USED_BITS) == (used.id, 0, expected_flags), \
            f"VQ-DEV-PACKED-2: chain {chain} (lap {laps}): expected a used descriptor at {position} with id " \
            f"{used.id}, len 0, AVAIL|USED {expected_flags:#x}; got {written}"
        position += len(parts)
        if position >= SMALL_QUEUE:
            position, wrap, laps = position - SMALL_QUEUE, not wrap, laps + 1
        assert (queue.next_used, queue.used_wrap) == (position, wrap), \
            f"the driver expects the next used descriptor at {queue.next_used} (wrap {queue.used_wrap})"
        assert_inflated(qtest_machine, [page], "BAL-DEV-OP-1")
    assert laps >= 3, f"only {laps} laps of the ring"


@pytest.mark.req("VQ-DEV-PACKED-1")
@over(PACKED[:1])
def test_a_chain_is_used_only_once_its_first_descriptor_is_available(balloon: QtestBalloon,
                                                                   qtest_machine: QtestMachine) -> None:
    """A chain written but for its first descriptor's flags is not used on a notification; made available, it is.

    Broken on purpose once: publish before the first notify; the page was inflated and the test failed."""
    balloon.start()
    queue = balloon.driver.queues[INFLATEQ]
    page = balloon.new_page(PATTERN)
    pfns = balloon.new_page()
    qtest_machine.qtest.write(pfns, encode_pfns([pfn_of(page)], balloon.driver.endian))
    head = queue.add([Buffer(pfns, 4)])
    balloon.driver.notify(INFLATEQ)  # handled within the write: the qtest machine has no ioeventfd
    assert queue.collect_used() == [], "VQ-DEV-PACKED-1: QEMU used a chain whose first descriptor is not available"
    assert qtest_machine.qtest.read(page, PAGE_SIZE) == bytes([PATTERN]) * PAGE_SIZE, \
        "VQ-DEV-PACKED-1: QEMU inflated a page named by a chain not made available"
    queue.publish(head)
    balloon.driver.notify(INFLATEQ)
    (used,) = balloon.driver.wait_used(INFLATEQ, 1)
    assert used.id == head, f"expected buffer id {head} used, got {used.id}"
    assert_inflated(qtest_machine, [page], "BAL-DEV-OP-1")


@pytest.mark.req("BAL-DEV-OP-1", "BAL-LEG-USED")
@over(WITH_INDIRECT)
def test_inflate_and_deflate_through_indirect_tables(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """With INDIRECT_DESC negotiated, PFN arrays behind an indirect table (split or packed) are inflated and
    deflated; each chain takes one ring descriptor."""
    features = balloon.start(balloon.default_features | balloon.offered & feature_mask(Feature.INDIRECT_DESC))
    assert has_feature(features, Feature.INDIRECT_DESC), f"INDIRECT_DESC not offered: {balloon.offered:#x}"
    pages = [balloon.new_page(PATTERN) for _ in range(3)]
    free_before = balloon.driver.queues[INFLATEQ].num_free
    used = balloon.inflate([pfn_of(page) for page in pages], indirect=True)
    assert used.length == 0, f"BAL-LEG-USED: used length {used.length}"
    assert balloon.driver.queues[INFLATEQ].num_free == free_before
    assert_inflated(qtest_machine, pages, "BAL-DEV-OP-1")
    assert balloon.deflate([pfn_of(page) for page in pages], indirect=True).length == 0


@pytest.mark.req("VQ-DEV-IND-1")
@over(INTERFACES)
def test_write_flag_on_the_descriptor_of_an_indirect_table_is_ignored(balloon: QtestBalloon,
                                                                      qtest_machine: QtestMachine) -> None:
    """A split ring descriptor with INDIRECT and WRITE: the table's out buffer is still a PFN array to inflate.

    Broken on purpose once: WRITE set on the table's entry instead; the PFN became an in buffer, nothing was
    inflated and the test failed."""
    features = balloon.start(balloon.default_features | balloon.offered & feature_mask(Feature.INDIRECT_DESC))
    assert has_feature(features, Feature.INDIRECT_DESC), f"INDIRECT_DESC not offered: {balloon.offered:#x}"
    queue = balloon.driver.queues[INFLATEQ]
    assert isinstance(queue, SplitDriverQueue)
    page = balloon.new_page(PATTERN)
    pfns, table = balloon.new_page(), balloon.new_page()
    qtest_machine.qtest.write(pfns, encode_pfns([pfn_of(page)], balloon.driver.endian))
    head = queue.add([Buffer(pfns, 4)], indirect_table=table)
    queue.write_descriptor(head, Descriptor(table, 16, DESC_F_INDIRECT | DESC_F_WRITE))
    queue.publish(head)
    balloon.driver.notify(INFLATEQ)
    (used,) = balloon.driver.wait_used(INFLATEQ, 1)
    assert used.id == head, f"expected head {head} used, got {used.id}"
    assert_inflated(qtest_machine, [page], "VQ-DEV-IND-1")


@pytest.mark.req("BAL-DEV-OP-1")
@over(tuple(case for case in RING_LAYOUTS if not case.variant.indirect_desc))
def test_indirect_is_refused_by_the_host_driver_when_not_negotiated(balloon: QtestBalloon) -> None:
    """indirect_desc=off: the device does not offer INDIRECT_DESC, the host driver refuses indirect tables with a
    one-line error, and inflating directly still works."""
    balloon.start()
    page = balloon.new_page(PATTERN)
    with pytest.raises(UsageError, match="VIRTIO_F_INDIRECT_DESC is not negotiated"):
        balloon.inflate([pfn_of(page)], indirect=True)
    assert balloon.inflate([pfn_of(page)]).length == 0
    assert balloon.deflate([pfn_of(page)]).length == 0
