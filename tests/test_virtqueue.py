"""Split virtqueues: layout, driver side, device side, malformed chains."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vballoon.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    USED_F_NO_NOTIFY,
    Buffer,
    BytesMemory,
    Descriptor,
    MalformedRingError,
    MemoryAccessError,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
    UsedElement,
    VirtqueueError,
    need_event,
)

RING = 0x1000
DATA = 0x8000
TABLE = 0x6000


def make_pair(size=8, event_idx=False, endian="little"):
    mem = BytesMemory(0x10000)
    layout = SplitLayout.modern(size, RING)
    driver = SplitDriverQueue(mem, layout, event_idx=event_idx, endian=endian)
    device = SplitDeviceQueue(mem, layout, event_idx=event_idx, endian=endian)
    return mem, driver, device


def test_bytes_memory_bounds_are_checked():
    mem = BytesMemory(16, base=0x100)
    mem.write(0x100, b"abcd")
    assert mem.read(0x102, 2) == b"cd"
    with pytest.raises(MemoryAccessError, match="outside memory"):
        mem.read(0xFF, 2)
    with pytest.raises(MemoryAccessError):
        mem.write(0x10E, b"xyz")


def test_modern_layout_alignment():
    layout = SplitLayout.modern(3, 0x1001)
    assert layout.desc == 0x1010
    assert layout.avail == 0x1010 + 48
    assert layout.used % 4 == 0 and layout.used >= layout.avail + 4 + 6 + 2
    with pytest.raises(VirtqueueError):
        SplitLayout(0, 0, 0, 0)


def test_legacy_layout_matches_vring_size():
    layout = SplitLayout.legacy(128, 0x10000)
    assert layout.avail == 0x10000 + 128 * 16
    assert layout.used == 0x10000 + 0x1000, f"used ring at {layout.used:#x}"
    # The spec's vring_size(128, 4096): 4096 + 6 + 8*128.
    assert SplitLayout.legacy_region_bytes(128) == 4096 + 6 + 8 * 128
    with pytest.raises(VirtqueueError, match="aligned"):
        SplitLayout.legacy(128, 0x10010)


@pytest.mark.parametrize("endian", ["little", "big"])
def test_a_descriptor_is_written_as_the_spec_lays_it_out(endian):
    """virtio 2.7.5: addr (64 bits), len (32), flags (16), next (16), in the ring's byte order."""
    mem, driver, _ = make_pair(endian=endian)
    driver.ring.write_desc(TABLE, 1, Descriptor(0x1122, 16, DESC_F_NEXT, 3))
    expected = b"".join(value.to_bytes(size, endian) for value, size in ((0x1122, 8), (16, 4), (DESC_F_NEXT, 2), (3, 2)))
    got = mem.read(TABLE + 16, 16)
    assert got == expected, f"descriptor 1 of the table: expected {expected.hex()}, got {got.hex()}"


@pytest.mark.parametrize("endian", ["little", "big"])
def test_direct_chain_round_trip(endian):
    mem, driver, device = make_pair(endian=endian)
    mem.write(DATA, b"hello")
    head = driver.add_and_publish([Buffer(DATA, 5)], [Buffer(DATA + 0x100, 64), Buffer(DATA + 0x200, 8)])
    chain = device.pop()
    assert chain is not None and chain.head == head
    assert chain.out_data == b"hello"
    assert chain.in_ == (Buffer(DATA + 0x100, 64), Buffer(DATA + 0x200, 8))
    assert device.pop() is None
    device.push(chain.head, 3)
    used = driver.collect_used()
    assert used == [UsedElement(head, 3)], f"expected [({head}, 3)], got {used}"
    assert driver.collect_used() == [], "a second collect must see nothing new"


def test_used_entries_free_descriptors():
    mem, driver, device = make_pair(size=4)
    heads = [driver.add_and_publish([Buffer(DATA, 4)]) for _ in range(4)]
    assert driver.num_free == 0
    assert driver.avail_idx == 4
    with pytest.raises(VirtqueueError, match="free"):
        driver.add([Buffer(DATA, 4)])
    chains = [device.pop() for _ in heads]
    for chain in reversed(chains):
        device.push(chain.head, 0)
    used = driver.collect_used()
    assert [u.id for u in used] == list(reversed(heads)), f"got {used}"
    assert all(u.length == 0 for u in used)
    assert driver.num_free == 4


def test_indirect_chain():
    mem, driver, device = make_pair()
    mem.write(DATA, b"abcdefgh")
    head = driver.add_and_publish([Buffer(DATA, 4), Buffer(DATA + 4, 4)], [Buffer(DATA + 0x40, 4)], indirect_table=TABLE)
    assert driver.num_free == 7, "an indirect chain takes one ring descriptor"
    chain = device.pop()
    assert chain.head == head and chain.out_data == b"abcdefgh"
    assert chain.in_ == (Buffer(DATA + 0x40, 4),)


def test_direct_descriptors_followed_by_an_indirect_table():
    """The device handles normal chained descriptors followed by one indirect descriptor."""
    mem, driver, device = make_pair()
    mem.write(DATA, b"xy")
    driver.ring.write_desc(TABLE, 0, Descriptor(DATA + 1, 1))
    driver.write_descriptor(0, Descriptor(DATA, 1, DESC_F_NEXT, 1))
    driver.write_descriptor(1, Descriptor(TABLE, 16, DESC_F_INDIRECT))
    driver.publish(0)
    assert device.pop().out_data == b"xy"


def test_empty_chain_is_refused_by_driver():
    _, driver, _ = make_pair()
    with pytest.raises(VirtqueueError):
        driver.add([])


def assert_malformed(device, rule):
    with pytest.raises(MalformedRingError) as info:
        device.pop()
    assert info.value.rule == rule, f"expected rule {rule}, got {info.value.rule} ({info.value})"


def raw_chain(driver, descriptors, head=0):
    for index, desc in descriptors.items():
        driver.write_descriptor(index, desc)
    driver.publish(head)


@pytest.mark.parametrize(
    ("descriptors", "rule"),
    [
        ({0: Descriptor(DATA, 4, DESC_F_NEXT, 1), 1: Descriptor(DATA, 4, DESC_F_NEXT, 0)}, "loop"),
        ({0: Descriptor(DATA, 4, DESC_F_NEXT, 99)}, "next-out-of-range"),
        ({0: Descriptor(DATA, 0)}, "zero-length"),
        ({0: Descriptor(DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1), 1: Descriptor(DATA, 4)}, "order"),
        ({0: Descriptor(TABLE, 0, DESC_F_INDIRECT)}, "indirect-size"),
        ({0: Descriptor(TABLE, 20, DESC_F_INDIRECT)}, "indirect-size"),
        ({0: Descriptor(0xFFFF0, 4)}, "unmapped"),
    ],
)
def test_malformed_chains_are_reported(descriptors, rule):
    _, driver, device = make_pair()
    raw_chain(driver, descriptors)
    assert_malformed(device, rule)


def test_nested_indirect_is_malformed():
    _, driver, device = make_pair()
    driver.ring.write_desc(TABLE, 0, Descriptor(TABLE + 0x100, 16, DESC_F_INDIRECT))
    raw_chain(driver, {0: Descriptor(TABLE, 16, DESC_F_INDIRECT)})
    assert_malformed(device, "nested-indirect")


def test_loop_inside_indirect_table():
    _, driver, device = make_pair()
    driver.ring.write_desc(TABLE, 0, Descriptor(DATA, 4, DESC_F_NEXT, 1))
    driver.ring.write_desc(TABLE, 1, Descriptor(DATA, 4, DESC_F_NEXT, 0))
    raw_chain(driver, {0: Descriptor(TABLE, 32, DESC_F_INDIRECT)})
    assert_malformed(device, "loop")


def test_head_out_of_range_and_avail_jump():
    mem, driver, device = make_pair(size=4)
    driver.publish(7)
    assert_malformed(device, "head-out-of-range")
    _, driver, device = make_pair(size=4)
    driver.ring.write16(driver.layout.avail + 2, 9)
    assert_malformed(device, "avail-idx-jump")


def test_more_chains_in_use_than_queue_size():
    _, driver, device = make_pair(size=2)
    driver.add_and_publish([Buffer(DATA, 4)])
    driver.add_and_publish([Buffer(DATA, 4)])
    device.pop()
    device.pop()
    driver.publish(0)  # the driver republishes a head the device still holds
    assert_malformed(device, "queue-size-exceeded")


def test_driver_rejects_bad_used_entries():
    _, driver, device = make_pair(size=4)
    driver.add_and_publish([Buffer(DATA, 4)])
    device.pop()
    device.push(3, 0)  # 3 is not an outstanding head
    with pytest.raises(VirtqueueError, match="not an outstanding head"):
        driver.collect_used()
    _, driver, _ = make_pair(size=4)
    driver.ring.write16(driver.layout.used + 2, 9)
    with pytest.raises(VirtqueueError, match="moved used"):
        driver.collect_used()


def test_notify_without_event_idx_follows_no_notify_flag():
    _, driver, device = make_pair()
    assert not driver.should_notify(), "nothing published: no notify"
    driver.add_and_publish([Buffer(DATA, 4)])
    assert driver.should_notify()
    driver.ring.write16(driver.layout.used, USED_F_NO_NOTIFY)
    driver.add_and_publish([Buffer(DATA, 4)])
    assert not driver.should_notify()


def test_notify_with_event_idx_follows_avail_event():
    _, driver, device = make_pair(event_idx=True)
    driver.add_and_publish([Buffer(DATA, 4)])
    assert driver.should_notify(), "avail_event 0, idx moved 0->1: notify"
    device.pop()
    assert driver.ring.read16(driver.layout.avail_event_addr) == 1, "device writes avail_event on pop"
    driver.add_and_publish([Buffer(DATA, 4)])
    driver.add_and_publish([Buffer(DATA, 4)])
    assert driver.should_notify(), "idx moved 1->3 past avail_event 1"
    driver.add_and_publish([Buffer(DATA, 4)])
    assert not driver.should_notify(), "avail_event still 1, idx moved 3->4: no notify"


def test_interrupt_decision_on_device_side():
    _, driver, device = make_pair()
    driver.add_and_publish([Buffer(DATA, 4)])
    device.push(device.pop().head, 0)
    assert device.should_interrupt()
    driver.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    assert not device.should_interrupt()

    _, driver, device = make_pair(event_idx=True)
    for _ in range(3):
        driver.add_and_publish([Buffer(DATA, 4)])
    driver.set_used_event(1)
    device.push(device.pop().head, 0)
    assert device.should_interrupt(), "first decision always interrupts"
    device.push(device.pop().head, 0)
    assert device.should_interrupt(), "used idx 1->2 passes used_event 1"
    device.push(device.pop().head, 0)
    assert not device.should_interrupt(), "used idx 2->3 does not pass used_event 1"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_need_event_matches_the_spec_formula(event, new, old):
    expected = (new - event - 1) % 65536 < (new - old) % 65536
    assert need_event(event, new, old) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16 * 8, max_size=16 * 8), st.integers(0, 0xFFFF), st.integers(0, 7))
def test_device_pop_on_random_descriptors_raises_only_ring_errors(table, avail_idx, head):
    mem, driver, device = make_pair()
    mem.write(driver.layout.desc, table)
    driver.ring.write16(driver.ring.avail_slot_addr(0), head)
    driver.ring.write16(driver.layout.avail + 2, avail_idx)
    try:
        device.pop()
    except MalformedRingError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 64), min_size=0, max_size=3),
                          st.lists(st.integers(1, 64), max_size=3), st.booleans()),
                min_size=1, max_size=20))
def test_chains_survive_the_ring_in_order(chains):
    mem, driver, device = make_pair(size=8, event_idx=True)
    for outs, ins, indirect in chains:
        if not outs and not ins:
            continue
        out = [Buffer(DATA + 0x100 * i, n) for i, n in enumerate(outs)]
        in_ = [Buffer(DATA + 0x1000 + 0x100 * i, n) for i, n in enumerate(ins)]
        head = driver.add_and_publish(out, in_, indirect_table=TABLE if indirect else None)
        chain = device.pop()
        assert chain.head == head
        assert chain.out == tuple(out) and chain.in_ == tuple(in_)
        assert len(chain.out_data) == sum(outs)
        device.push(head, sum(ins))
        assert driver.collect_used()[0].length == sum(ins)
    assert driver.num_free == 8
