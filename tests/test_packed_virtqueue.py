"""Packed virtqueues (virtio 2.8): layout, driver side against device side, wrap-around, indirect tables, event
suppression, malformed rings."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vballoon.reference.device import BalloonDevice, DeviceProperties
from vballoon.reference.driver import ReferenceDriver
from vballoon.spec import Feature, feature_mask, has_feature
from vballoon.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    Buffer,
    BytesMemory,
    MalformedRingError,
    PackedDescriptor,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
    UsedElement,
    VirtqueueError,
    open_device_queue,
    open_driver_queue,
    packed_need_event,
)

RING = 0x1000
DATA = 0x8000
TABLE = 0x6000
USED_BITS = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED


def make_pair(size=8, event_idx=False, endian="little"):
    mem = BytesMemory(0x10000)
    layout = PackedLayout.modern(size, RING)
    return mem, PackedDriverQueue(mem, layout, event_idx=event_idx, endian=endian), \
        PackedDeviceQueue(mem, layout, event_idx=event_idx, endian=endian)


def assert_malformed(device, rule):
    with pytest.raises(MalformedRingError) as info:
        device.pop()
    assert info.value.rule == rule, f"expected rule {rule}, got {info.value.rule} ({info.value})"


def test_layout_alignments_and_sizes():
    """virtio 2.8.10.1: descriptor ring 16-aligned, 16 x size bytes; each event suppression structure 4-aligned, 4
    bytes."""
    layout = PackedLayout.modern(3, 0x1001)
    assert (layout.desc, layout.driver, layout.device) == (0x1010, 0x1010 + 48, 0x1010 + 52), f"got {layout}"
    assert layout.areas == (layout.desc, layout.driver, layout.device)
    assert layout.end == layout.device + 4 and layout.collect_range == (layout.desc, 48)
    assert PackedLayout.region_bytes(3) == 48 + 8
    with pytest.raises(VirtqueueError, match="outside 1..32768"):
        PackedLayout(32769, 0, 0, 0)


def test_layout_picks_the_queue_classes():
    mem = BytesMemory(0x10000)
    packed, split = PackedLayout.modern(4, RING), SplitLayout.modern(4, RING)
    assert isinstance(open_driver_queue(mem, packed), PackedDriverQueue)
    assert isinstance(open_device_queue(mem, packed), PackedDeviceQueue)
    assert isinstance(open_driver_queue(mem, split), SplitDriverQueue)
    assert isinstance(open_device_queue(mem, split), SplitDeviceQueue)


@pytest.mark.parametrize("endian", ["little", "big"])
def test_chain_round_trip_and_the_used_descriptor(endian):
    """The device sees the chain once published; its used descriptor carries id and length, AVAIL and USED both set
    to the device's wrap counter (1 on the first lap), over the chain's first descriptor."""
    mem, driver, device = make_pair(endian=endian)
    mem.write(DATA, b"hello")
    head = driver.add([Buffer(DATA, 5)], [Buffer(DATA + 0x100, 64), Buffer(DATA + 0x200, 8)])
    assert device.pop() is None, "a chain added but not published must not be available"
    driver.publish(head)
    chain = device.pop()
    assert chain is not None and chain.head == head and chain.out_data == b"hello"
    assert chain.in_ == (Buffer(DATA + 0x100, 64), Buffer(DATA + 0x200, 8))
    assert device.pop() is None
    assert [driver.read_descriptor(i).id for i in range(3)] == [head] * 3, "the id goes in every descriptor"
    device.push(chain.head, 3)
    used = driver.read_descriptor(0)
    assert (used.id, used.length, used.flags & USED_BITS) == (head, 3, USED_BITS), f"used descriptor {used}"
    assert driver.collect_used() == [UsedElement(head, 3)]
    assert driver.collect_used() == [], "a second collect must see nothing new"
    assert (driver.next_used, device.used_idx, driver.num_free) == (3, 3, 8), "both skip the chain's 3 descriptors"


def test_wrap_around_flips_both_counters_and_the_used_bits():
    """With a queue of 3 and chains of 2, every lap flips the wrap counters; used descriptors carry the counter of
    their lap (0: AVAIL and USED clear)."""
    mem, driver, device = make_pair(size=3)
    mem.write(DATA, b"ab")
    laps = []
    for _ in range(9):
        head = driver.add_and_publish([Buffer(DATA, 1), Buffer(DATA + 1, 1)])
        chain = device.pop()
        assert chain is not None and chain.head == head and chain.out_data == b"ab"
        position, wrap = device.used_idx, device.used_wrap
        device.push(head, 0)
        flags = driver.read_descriptor(position).flags & USED_BITS
        assert flags == (USED_BITS if wrap else 0), f"used descriptor at {position} in lap {wrap}: flags {flags:#x}"
        assert driver.collect_used() == [UsedElement(head, 0)]
        laps.append(driver.used_wrap)
    assert laps.count(False) and laps.count(True), f"the used wrap counter never flipped: {laps}"
    assert (driver.avail_wrap, driver.next_avail) == (device.avail_wrap, device.last_avail_idx)


def test_out_of_order_completion_and_id_reuse():
    """The device uses chains in any order; used descriptors go in ring order, each skips its chain's length."""
    _, driver, device = make_pair(size=4)
    first = driver.add_and_publish([Buffer(DATA, 4), Buffer(DATA, 4)])
    second = driver.add_and_publish([Buffer(DATA, 4)])
    assert driver.num_free == 1
    with pytest.raises(VirtqueueError, match="only 1 free"):
        driver.add([Buffer(DATA, 1), Buffer(DATA, 1)])
    chains = [device.pop(), device.pop()]
    device.push(chains[1].head, 0)
    device.push(chains[0].head, 0)
    assert [u.id for u in driver.collect_used()] == [second, first]
    assert driver.num_free == 4 and driver.next_used == 3


def test_indirect_table_is_one_ring_descriptor():
    """A packed indirect table holds packed descriptors; only WRITE counts in it, its length ends the chain."""
    mem, driver, device = make_pair()
    mem.write(DATA, b"abcdefgh")
    head = driver.add_and_publish([Buffer(DATA, 4), Buffer(DATA + 4, 4)], [Buffer(DATA + 0x40, 4)],
                                  indirect_table=TABLE)
    assert driver.num_free == 7, "an indirect chain takes one ring descriptor"
    ring = driver.read_descriptor(0)
    assert (ring.addr, ring.length, ring.flags & DESC_F_INDIRECT) == (TABLE, 48, DESC_F_INDIRECT)
    chain = device.pop()
    assert chain.head == head and chain.out_data == b"abcdefgh" and chain.in_ == (Buffer(DATA + 0x40, 4),)
    device.push(head, 4)
    assert driver.collect_used() == [UsedElement(head, 4)] and driver.next_used == 1


def test_device_ignores_next_and_indirect_inside_an_indirect_table():
    """virtio 2.8.7: flags other than WRITE are reserved in an indirect table and ignored by the device."""
    mem, driver, device = make_pair()
    driver.ring.write_desc_fields(TABLE, 0, DATA, 2, 0, DESC_F_NEXT | DESC_F_INDIRECT)
    driver.ring.write_desc_fields(TABLE, 1, DATA + 2, 2, 0, 0)
    mem.write(DATA, b"wxyz")
    driver.write_descriptor(0, PackedDescriptor(TABLE, 32, 5, DESC_F_INDIRECT | PACKED_DESC_F_AVAIL))
    chain = device.pop()
    assert chain.head == 5 and chain.out_data == b"wxyz", f"got {chain}"


def test_the_buffer_id_is_the_last_descriptors():
    """virtio 2.8.6: 'Buffer ID is included in the last descriptor in the list.'"""
    _, driver, device = make_pair()
    driver.write_descriptor(1, PackedDescriptor(DATA, 4, 6, PACKED_DESC_F_AVAIL))
    driver.write_descriptor(0, PackedDescriptor(DATA, 4, 0, DESC_F_NEXT | PACKED_DESC_F_AVAIL))
    assert device.pop().head == 6


@pytest.mark.parametrize(("flags", "available"), [
    (PACKED_DESC_F_AVAIL, True),
    (0, False),
    (USED_BITS, False),
    (PACKED_DESC_F_USED, False),
])
def test_availability_follows_the_wrap_counter(flags, available):
    """virtio 2.8.1: available when AVAIL matches the device's wrap counter (1) and USED does not."""
    _, driver, device = make_pair()
    driver.write_descriptor(0, PackedDescriptor(DATA, 4, 0, flags))
    assert (device.pop() is not None) == available, f"flags {flags:#x}"


@pytest.mark.parametrize(("descriptors", "rule"), [
    ({i: PackedDescriptor(DATA, 4, 0, DESC_F_NEXT | PACKED_DESC_F_AVAIL) for i in range(4)}, "loop"),
    ({0: PackedDescriptor(DATA, 0, 0, PACKED_DESC_F_AVAIL)}, "zero-length"),
    ({0: PackedDescriptor(DATA, 4, 0, DESC_F_WRITE | DESC_F_NEXT | PACKED_DESC_F_AVAIL),
      1: PackedDescriptor(DATA, 4, 0, PACKED_DESC_F_AVAIL)}, "order"),
    ({0: PackedDescriptor(TABLE, 0, 0, DESC_F_INDIRECT | PACKED_DESC_F_AVAIL)}, "indirect-size"),
    ({0: PackedDescriptor(TABLE, 20, 0, DESC_F_INDIRECT | PACKED_DESC_F_AVAIL)}, "indirect-size"),
    ({0: PackedDescriptor(DATA, 4, 0, DESC_F_NEXT | PACKED_DESC_F_AVAIL),
      1: PackedDescriptor(TABLE, 16, 0, DESC_F_INDIRECT | PACKED_DESC_F_AVAIL)}, "indirect-in-chain"),
    ({0: PackedDescriptor(0xFFFF0, 4, 0, PACKED_DESC_F_AVAIL)}, "unmapped"),
    ({0: PackedDescriptor(0xFFFF0, 32, 0, DESC_F_INDIRECT | PACKED_DESC_F_AVAIL)}, "unmapped"),
])
def test_malformed_rings_are_reported(descriptors, rule):
    """Each rule of QEMU's virtqueue_packed_pop (a chain longer than the queue is its "Looped descriptor")."""
    _, driver, device = make_pair(size=4)
    for index, desc in descriptors.items():
        driver.write_descriptor(index, desc)
    assert_malformed(device, rule)


def test_more_descriptors_in_use_than_the_queue_size():
    _, driver, device = make_pair(size=2)
    driver.add_and_publish([Buffer(DATA, 4)])
    driver.add_and_publish([Buffer(DATA, 4)])
    device.pop()
    device.pop()
    driver.write_descriptor(0, PackedDescriptor(DATA, 4, 0, PACKED_DESC_F_USED))  # available in lap 0
    assert_malformed(device, "queue-size-exceeded")


def test_driver_rejects_bad_used_descriptors_and_device_bad_pushes():
    _, driver, device = make_pair(size=4)
    driver.add_and_publish([Buffer(DATA, 4)])
    device.pop()
    with pytest.raises(VirtqueueError, match="has not popped"):
        device.push(3, 0)
    driver.write_descriptor(0, PackedDescriptor(0, 0, 3, USED_BITS))  # id 3 is not outstanding
    with pytest.raises(VirtqueueError, match="not an outstanding published buffer"):
        driver.collect_used()
    _, driver, _ = make_pair(size=4)
    with pytest.raises(VirtqueueError, match="not a chain added"):
        driver.publish(0)


def test_driver_notifies_as_the_device_event_structure_says():
    """virtio 2.8.10: ENABLE notifies, DISABLE does not, DESC (EVENT_IDX) once the named descriptor is passed."""
    _, driver, device = make_pair(size=8, event_idx=True)
    assert not driver.should_notify(), "nothing published: no notify"
    driver.add_and_publish([Buffer(DATA, 4)])
    assert driver.should_notify(), "flags 0 (ENABLE) after initialisation"
    driver.ring.write_event(driver.layout.device, RING_EVENT_FLAGS_DISABLE, 0)
    driver.add_and_publish([Buffer(DATA, 4)])
    assert not driver.should_notify()
    driver.ring.write_event(driver.layout.device, RING_EVENT_FLAGS_DESC, 1 << 15 | 3)
    driver.add_and_publish([Buffer(DATA, 4)])
    assert not driver.should_notify(), "descriptor 2 made available: the event names 3"
    driver.add_and_publish([Buffer(DATA, 4), Buffer(DATA, 4)])
    assert driver.should_notify(), "descriptors 3 and 4 made available: passes 3"


def test_device_interrupts_as_the_driver_event_structure_says():
    _, driver, device = make_pair(size=4, event_idx=True)
    for _ in range(4):
        driver.add_and_publish([Buffer(DATA, 4)])
    chains = [device.pop() for _ in range(4)]
    device.push(chains[0].head, 0)
    assert device.should_interrupt(), "ENABLE"
    driver.set_driver_event(RING_EVENT_FLAGS_DISABLE)
    device.push(chains[1].head, 0)
    assert not device.should_interrupt(), "DISABLE"
    driver.set_driver_event(RING_EVENT_FLAGS_DESC, 1 << 15 | 3)
    device.push(chains[2].head, 0)
    assert not device.should_interrupt(), "used 2->3 does not use descriptor 3"
    device.push(chains[3].head, 0)
    assert device.should_interrupt(), "used 3->0 (next lap) used descriptor 3"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0x7FFF), st.booleans(), st.booleans(), st.integers(0, 7), st.integers(1, 7))
def test_packed_need_event_is_the_split_formula_on_positions_of_one_lap(offset, event_wrap, wrap, new, moved):
    """QEMU's vring_packed_need_event: an event in the other lap counts one queue size back."""
    size, old = 8, new - moved
    expected_event = offset if event_wrap == wrap else offset - size
    expected = (new - expected_event - 1) % 65536 < (new - old) % 65536
    assert packed_need_event(offset | event_wrap << 15, wrap, new, old, size) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(("add", "pop", "push", "collect")), st.integers(1, 3), st.booleans()),
                max_size=60))
def test_any_sequence_keeps_driver_and_device_consistent(steps):
    """Adds (direct chains of 1-3 descriptors or indirect), pops, pushes (oldest or newest popped first) and collects
    in any order over a queue of 5: every used id was popped, every popped chain is used once with its length, and
    both sides agree on positions and wrap counters once everything is used."""
    mem, driver, device = make_pair(size=5)
    mem.write(DATA, bytes(range(16)))
    published: dict[int, tuple[int, bool]] = {}
    popped: list[int] = []
    pushed: dict[int, int] = {}
    for action, count, flag in steps:
        if action == "add":
            indirect = flag and count > 1
            if driver.num_free < (1 if indirect else count):
                continue
            buffers = [Buffer(DATA + i, 1) for i in range(count)]
            head = driver.add_and_publish(buffers, indirect_table=TABLE + 0x100 * len(published) if indirect else None)
            published[head] = (count, indirect)
        elif action == "pop" and (chain := device.pop()) is not None:
            assert chain.head in published and len(chain.out) == published[chain.head][0], f"chain {chain}"
            popped.append(chain.head)
        elif action == "push" and popped:
            head = popped.pop(-1 if flag else 0)
            device.push(head, count)
            pushed[head] = count
        elif action == "collect":
            for used in driver.collect_used():
                assert pushed.pop(used.id) == used.length, f"used {used} was not pushed with that length"
                del published[used.id]
    while (chain := device.pop()) is not None:
        popped.append(chain.head)
    for head in popped:
        device.push(head, 0)
        pushed[head] = 0
    for used in driver.collect_used():
        assert pushed.pop(used.id) == used.length
        del published[used.id]
    assert not published and not pushed, f"left over: published {published}, pushed {pushed}"
    assert driver.num_free == 5 and device.in_use == 0
    assert (driver.next_used, driver.used_wrap) == (device.used_idx, device.used_wrap)
    assert (driver.next_avail, driver.avail_wrap) == (device.last_avail_idx, device.avail_wrap)


@pytest.mark.parametrize("indirect", [False, True])
def test_reference_device_and_driver_take_the_packed_layout_when_offered(indirect):
    """A reference device offering RING_PACKED (QEMU's packed=on) gets packed rings from the reference driver, which
    takes the layout whenever offered; inflate, deflate, stats and reports work over them. Through the legacy
    interface (32 feature bits) RING_PACKED is never offered."""
    ring_features = feature_mask(Feature.RING_PACKED, Feature.INDIRECT_DESC, Feature.EVENT_IDX)
    device = BalloonDevice(DeviceProperties(ram_size=16 << 20, free_page_reporting=True, ring_features=ring_features))
    driver = ReferenceDriver(device)
    assert driver.negotiate() and has_feature(device.driver_features, Feature.RING_PACKED)
    assert all(isinstance(queue, PackedDriverQueue) for queue in driver.queues.values()), f"{driver.queues}"
    assert all(isinstance(queue.ring, PackedDeviceQueue) for queue in device.queues), f"{device.queues}"
    for _ in range(3):  # buffer ids come back and are used again
        driver.inflate([1, 2, 3], indirect=indirect)
        assert [used.length for used in driver.collect("inflateq")] == [0]
        driver.deflate([2])
        assert len(driver.collect("deflateq")) == 1
    driver.report_pages([5])
    driver.send_stats([(0, 1)])
    assert device.ballooned == {1, 3} and device.reported == {5} and not device.errors, \
        f"ballooned {device.ballooned}, reported {device.reported}, errors {device.errors}"
    assert device.stats.buffers_seen == 1
    legacy = DeviceProperties(modern=False, ring_features=ring_features)
    assert not has_feature(legacy.offered_features, Feature.RING_PACKED)
