"""The reference device, behaviour by behaviour, driven through the virtqueue driver side."""

import pytest

from vballoon.errors import VballoonError
from vballoon.reference import (
    BalloonChange,
    BalloonDevice,
    DeviceProperties,
    DeviceShape,
    GuestRam,
    HintState,
    PageOutcome,
    QUEUE_MAX_SIZES,
    RequestRejected,
    poison_page,
)
from vballoon.reference.driver import ReferenceDriver
from vballoon.reference.invariants import check_device
from vballoon.spec import (
    CMD_ID_DONE,
    CMD_ID_FIRST,
    CMD_ID_STOP,
    PAGE_SIZE,
    STAT_UNSET,
    ConfigField,
    Feature,
    Status,
    StatTag,
    encode_stats,
    feature_mask,
)
from vballoon.virtqueue import Buffer, Descriptor, DESC_F_NEXT, MemoryAccessError

RAM = 64 << 20
PAGES = RAM // PAGE_SIZE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock=None, **props):
    device = BalloonDevice(DeviceProperties(ram_size=RAM, **props), clock or FakeClock())
    driver = ReferenceDriver(device)
    return device, driver


def ready(clock=None, features=None, poison_val=None, **props):
    device, driver = make(clock, **props)
    assert driver.negotiate(features, poison_val=poison_val), "negotiation failed"
    return device, driver


# --- features, status, queues ----------------------------------------------------


def test_offered_features_follow_properties():
    device, _ = make()
    offered = device.offered_features
    expected = feature_mask(Feature.STATS_VQ, Feature.PAGE_POISON, Feature.VERSION_1, Feature.INDIRECT_DESC, Feature.EVENT_IDX)
    assert offered == expected, f"expected {expected:#x}, got {offered:#x}"
    everything = DeviceProperties(deflate_on_oom=True, free_page_hint=True, free_page_reporting=True, modern=False)
    bits = everything.offered_features
    assert bits & 0x3F == 0b111110, f"MUST_TELL_HOST never offered, others on: got {bits & 0x3F:#b}"
    assert not bits >> Feature.VERSION_1 & 1, "a legacy device does not offer VERSION_1"


def test_queue_indices_skip_absent_queues():
    device, _ = make(free_page_reporting=True)
    assert device.properties.queue_names == ("inflateq", "deflateq", "statsq", "reporting_vq")
    assert device.queue_index("reporting_vq") == 3, "absent free_page_vq takes no index"
    device, _ = make(free_page_hint=True, free_page_reporting=True)
    assert [q.max_size for q in device.queues] == [128, 128, 128, 1024, 32]


def test_features_ok_does_not_stick_with_unoffered_features():
    device, driver = make(page_poison=False)
    ok = driver.negotiate(feature_mask(Feature.VERSION_1, Feature.PAGE_POISON))
    assert not ok and not device.status & Status.FEATURES_OK, "FEATURES_OK stuck with an unoffered feature"


def test_features_are_frozen_after_features_ok():
    device, _ = ready()
    before = device.driver_features
    device.write_driver_features(0)
    assert device.driver_features == before


def test_status_zero_resets_but_keeps_target_and_actual():
    device, driver = ready(poison_val=7)
    device.set_target(RAM - 10 * PAGE_SIZE)
    driver.set_actual(10)
    device.write_status(0)
    assert device.status == 0 and device.driver_features == 0 and device.poison_val == 0
    assert (device.num_pages, device.actual) == (10, 10), "QEMU 7.2 keeps num_pages and actual across reset"
    assert all(q.ring is None for q in device.queues)


def test_queue_size_register_bounds():
    device, _ = make()
    device.set_queue_size(0, 64)
    device.set_queue_size(0, 0)
    device.set_queue_size(0, 4096)
    assert device.queues[0].size == 64, f"expected 64, got {device.queues[0].size}"


def test_legacy_queue_pfn_zero_disables():
    device, driver = ready(modern=False)
    device.set_queue_pfn(0, 0)
    driver.queues["inflateq"].add_and_publish([Buffer(0x1000, 4)])
    device.notify(0)
    assert device.ballooned == set(), "a disabled queue is not processed"


# --- config space --------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "size"),
    [({}, 16), ({"page_poison": False}, 8), ({"page_poison": False, "free_page_hint": True}, 12),
     ({"page_poison": False, "qemu_4_0_config_size": True}, 16)],
)
def test_config_size_per_feature_set(props, size):
    device, _ = make(**props)
    assert device.config_size == size, f"{props}: expected {size}, got {device.config_size}"
    assert device.read_config(size, 1) == 0xFF, "reads past the end return all ones"
    assert device.read_config(size - 2, 4) == 0xFFFFFFFF


@pytest.mark.req("BAL-CFG-LEG-LE")
def test_config_reads_any_width_little_endian():
    device, _ = make()
    device.set_target(RAM - 0x1234 * PAGE_SIZE)
    assert device.read_config(ConfigField.NUM_PAGES, 4) == 0x1234
    assert device.read_config(ConfigField.NUM_PAGES, 2) == 0x1234
    assert device.read_config(ConfigField.NUM_PAGES + 1, 1) == 0x12
    for access in (device.read_config, lambda offset, width: device.write_config(offset, width, 0)):
        with pytest.raises(RequestRejected, match="width 3: use 1, 2 or 4"):
            access(0, 3)


@pytest.mark.req("BAL-DRV-ACT-1")
def test_actual_write_emits_balloon_change():
    device, driver = ready()
    driver.set_actual(256)
    driver.set_actual(256)
    assert device.take_events() == [BalloonChange(RAM - 256 * PAGE_SIZE)], "one event per change"
    assert device.query_balloon() == RAM - 256 * PAGE_SIZE
    assert device.read_config(ConfigField.ACTUAL, 4) == 256


def test_modern_partial_actual_write_applies_at_once():
    device, _ = ready()
    device.write_config(ConfigField.ACTUAL, 1, 5)
    assert device.actual == 5 and device.staged_actual is None


@pytest.mark.req("BAL-DEV-LEG-ACT", "BAL-DRV-LEG-ACT")
def test_legacy_actual_is_used_only_after_its_last_byte():
    device, _ = ready(modern=False)
    device.write_config(ConfigField.ACTUAL, 2, 0x0304)
    assert device.actual == 0, f"legacy actual used before its last byte: got {device.actual}"
    assert device.staged_actual == bytes([4, 3, 0, 0])
    device.write_config(ConfigField.ACTUAL + 2, 2, 0)
    assert device.actual == 0x0304 and device.staged_actual is None
    assert [v.requirement for v in device.driver_violations] == ["BAL-DRV-LEG-ACT"]


def test_driver_cannot_write_num_pages_or_cmd_id():
    device, _ = ready(free_page_hint=True)
    device.write_config(ConfigField.NUM_PAGES, 4, 99)
    device.write_config(ConfigField.FREE_PAGE_HINT_CMD_ID, 4, 99)
    device.write_config(64, 4, 99)
    assert device.config().num_pages == 0 and device.config().free_page_hint_cmd_id == 0


@pytest.mark.req("BAL-DRV-PP-2", "BAL-DRV-PP-3")
def test_poison_val_before_and_after_driver_ok():
    device, _ = ready(poison_val=0xAAAAAAAA)
    assert device.read_config(ConfigField.POISON_VAL, 4) == 0xAAAAAAAA
    assert device.driver_violations == [], "writing poison_val before DRIVER_OK is what the driver must do"
    device.write_config(ConfigField.POISON_VAL, 4, 0x55555555)
    assert device.poison_val == 0x55555555
    assert [v.requirement for v in device.driver_violations] == ["BAL-DRV-PP-3"]


def test_poison_val_ignored_without_page_poison():
    features = feature_mask(Feature.VERSION_1, Feature.STATS_VQ)
    device, _ = ready(features=features)
    device.write_config(ConfigField.POISON_VAL, 4, 0xAA)
    assert device.poison_val == 0, "QEMU keeps poison_val 0 without PAGE_POISON"


# --- target, inflate, deflate ----------------------------------------------------------


def test_set_target_validation_and_clamp():
    device, _ = make()
    for bad in (0, -1):
        with pytest.raises(RequestRejected, match="must be a positive size"):
            device.set_target(bad)
    device.set_target(RAM * 2)
    assert device.num_pages == 0, "a target above RAM is clamped to RAM"
    device.set_target(RAM - 5 * PAGE_SIZE + 1)
    assert device.num_pages == 4, f"(ram - target) >> 12: got {device.num_pages}"
    assert device.config_changes == 2


@pytest.mark.req("BAL-DEV-OP-1", "BAL-LEG-USED")
@pytest.mark.parametrize("indirect", [False, True])
def test_inflate_deflate(indirect):
    device, driver = ready()
    device.ram.write(5 * PAGE_SIZE, b"\x77" * PAGE_SIZE)
    head = driver.inflate([5, 6, PAGES + 3], indirect=indirect)
    assert device.ballooned == {5, 6}
    assert device.skipped_pfns == [PAGES + 3], "PFNs outside RAM are skipped"
    used = driver.collect("inflateq")
    assert [(u.id, u.length) for u in used] == [(head, 0)], f"acked with used length 0, got {used}"
    assert device.allowed_page_outcomes(5) == {PageOutcome.UNCHANGED, PageOutcome.ZERO}
    assert device.page_content_allowed(5, b"\x77" * PAGE_SIZE)
    assert device.page_content_allowed(5, bytes(PAGE_SIZE))
    assert not device.page_content_allowed(5, b"\x01" * PAGE_SIZE)
    driver.deflate([5])
    assert device.ballooned == {6}
    device.ram.write(5 * PAGE_SIZE, b"\x01")
    assert device.allowed_page_outcomes(5) == {PageOutcome.UNCHANGED}, "a write makes the page defined again"
    check_device(device)


@pytest.mark.req("BAL-DRV-OP-7")
def test_deflating_a_page_never_inflated_is_a_driver_violation():
    device, driver = ready()
    driver.deflate([9])
    assert [v.requirement for v in device.driver_violations] == ["BAL-DRV-OP-7"]


def test_legacy_big_endian_pfns():
    device, driver = ready(modern=False, guest_endian="big")
    driver.inflate([0x0102])
    assert device.ballooned == {0x0102}, f"got {device.ballooned}"


# --- malformed rings and device errors ----------------------------------------------


def test_malformed_chain_sets_needs_reset_and_stops_the_device():
    device, driver = ready()
    ring = driver.queues["inflateq"]
    ring.write_descriptor(0, Descriptor(0x1000, 4, DESC_F_NEXT, 0))
    ring.publish(0)
    device.notify(0)
    assert device.status & Status.DEVICE_NEEDS_RESET, "a looped chain must set DEVICE_NEEDS_RESET"
    assert device.broken and "loop" in device.errors[0]
    device.write_status(device.status | Status.DRIVER_OK)
    assert device.status & Status.DEVICE_NEEDS_RESET, "the driver cannot clear NEEDS_RESET"
    driver.inflate([1])
    assert device.ballooned == set(), "a broken device processes nothing"
    check_device(device)
    assert driver.negotiate(), "reset recovers the device"
    assert not device.status & Status.DEVICE_NEEDS_RESET


def test_legacy_device_error_breaks_without_status_bit():
    device, driver = ready(modern=False, free_page_hint=True)
    driver.send("free_page_vq", b"\x01\x02")
    assert device.broken and not device.status & Status.DEVICE_NEEDS_RESET


# --- statistics ----------------------------------------------------------------------


@pytest.mark.req("BAL-DEV-ST-1", "BAL-DEV-ST-2")
def test_stats_parsed_in_any_order_unknown_tags_ignored():
    """A ten-tag device (QEMU 7.2's shape) ignores tag 10 and tag 200 alike."""
    clock = FakeClock()
    device, driver = ready(clock, shape=DeviceShape(stat_count=10))
    driver.send_stats([(StatTag.MEMTOT, 4096), (200, 1), (StatTag.SWAP_IN, 7), (StatTag.OOM_KILL, 3)])
    stats = device.guest_stats()
    assert stats["last-update"] == 1000
    assert stats["stats"]["stat-total-memory"] == 4096
    assert stats["stats"]["stat-swap-in"] == 7
    assert stats["stats"]["stat-free-memory"] == STAT_UNSET
    assert "stat-oom-kills" not in stats["stats"], "tag 10 is not recognised by a ten-tag device"


def test_stats_duplicates_last_wins_and_partial_entry_ignored():
    device, driver = ready()
    driver.send(
        "statsq", encode_stats([(StatTag.MEMFREE, 1), (StatTag.MEMFREE, 2)]) + b"\x05\x00\x09"
    )
    assert device.guest_stats()["stats"]["stat-free-memory"] == 2
    assert [v.requirement for v in device.driver_violations] == ["BAL-DRV-ST-5"]


def test_sixteen_tag_device_recognises_linux_tags():
    """The default shape is QEMU 10.0's: 16 tags, tag 16 and above ignored."""
    device, driver = ready()
    driver.send_stats([(StatTag.DIRECT_RECLAIM, 5), (16, 9)])
    stats = device.guest_stats()["stats"]
    assert stats["stat-direct-reclaims"] == 5, f"expected tag 15 stored, got {stats}"
    assert len(stats) == 16, f"expected 16 stats, got {sorted(stats)}"
    with pytest.raises(RequestRejected):
        BalloonDevice(DeviceProperties(shape=DeviceShape(stat_count=17)))


def test_queue_sizes_come_from_the_shape():
    """A device shaped like QEMU 10.0.x (every queue 1024) offers those sizes; the default is realize's."""
    device, _ = make(free_page_reporting=True, shape=DeviceShape(queue_max_sizes=tuple(
        (name, 1024) for name in QUEUE_MAX_SIZES)))
    assert [q.max_size for q in device.queues] == [1024] * 4, f"got {[q.max_size for q in device.queues]}"
    device, _ = make(free_page_reporting=True)
    assert [q.max_size for q in device.queues] == [128, 128, 128, 32], f"got {[q.max_size for q in device.queues]}"


@pytest.mark.req("BAL-DRV-ST-1", "BAL-DRV-ST-3")
def test_stats_buffer_held_until_poll_and_empty_buffer_clears():
    clock = FakeClock()
    device, driver = ready(clock)
    device.set_stats_polling_interval(5)
    driver.send_stats([(StatTag.MEMFREE, 10)])
    assert driver.collect("statsq") == [], "the device holds the buffer"
    device.run_timers()
    assert driver.collect("statsq") == [], "timer not due yet"
    clock.now += 5
    device.run_timers()
    assert len(driver.collect("statsq")) == 1, "the poll returns the held buffer"
    clock.now += 10
    device.run_timers()
    assert device.stats.poll_deadline is None, "no rearm until the driver refills"
    driver.send("statsq", in_=[Buffer(0x1000, 16)])  # no out bytes: no entries
    assert device.guest_stats() == {"last-update": 1015, "stats": {k: STAT_UNSET for k in device.guest_stats()["stats"]}}
    driver.send_stats([(StatTag.MEMFREE, 1)])
    assert [v.requirement for v in device.driver_violations] == ["BAL-DRV-ST-1"]
    assert len(driver.collect("statsq")) == 1, "a second buffer returns the held one"


def test_poll_without_buffer_rearms():
    clock = FakeClock()
    device, _ = ready(clock)
    device.set_stats_polling_interval(2)
    assert device.stats.poll_deadline == clock.now, "a new timer fires at once"
    device.run_timers()
    assert device.stats.poll_deadline == clock.now + 2


def test_polling_interval_validation():
    clock = FakeClock()
    device, _ = ready(clock)
    with pytest.raises(RequestRejected, match="must not be negative"):
        device.set_stats_polling_interval(-1)
    with pytest.raises(RequestRejected, match="must fit in 32 bits"):
        device.set_stats_polling_interval(1 << 32)
    device.set_stats_polling_interval(3)
    device.set_stats_polling_interval(3)
    device.set_stats_polling_interval(7)
    assert device.stats.poll_deadline == clock.now + 7, "changing a running timer restarts it"
    device.set_stats_polling_interval(0)
    assert device.stats.poll_interval == 0 and device.stats.poll_deadline is None


@pytest.mark.req("BAL-DEV-LEG-ST-FIRST", "BAL-LEG-ST-END")
def test_legacy_first_stats_buffer_values_are_ignored():
    device, driver = ready(modern=False, guest_endian="big")
    driver.send_stats([(StatTag.MEMFREE, 1)])
    assert device.guest_stats()["stats"]["stat-free-memory"] == STAT_UNSET
    device.set_stats_polling_interval(1)
    device.run_timers()
    driver.send_stats([(StatTag.MEMFREE, 2)])
    assert device.guest_stats()["stats"]["stat-free-memory"] == 2


# --- free page hinting -----------------------------------------------------------------


def hinting_device():
    return ready(free_page_hint=True)


@pytest.mark.req("BAL-DEV-FPH-1", "BAL-DEV-FPH-6", "BAL-DEV-FPH-3", "BAL-DEV-FPH-4")
def test_hint_round():
    device, driver = hinting_device()
    cmd = ConfigField.FREE_PAGE_HINT_CMD_ID
    assert device.read_config(cmd, 4) == CMD_ID_STOP
    first = device.request_free_page_hints()
    assert first == CMD_ID_FIRST, f"first id {first:#x}"
    assert device.read_config(cmd, 4) == first
    driver.hint_pages([10])
    assert device.hinted == set(), "pages before the id buffer are ignored"
    driver.send_cmd_id(first)
    assert device.hinting.state is HintState.START
    driver.hint_pages([11, 12])
    assert device.hinted == {11, 12}
    assert PageOutcome.ANY in device.allowed_page_outcomes(11)
    assert device.page_content_allowed(11, b"\x42" * PAGE_SIZE)
    device.stop_free_page_hints()
    device.stop_free_page_hints()
    assert device.read_config(cmd, 4) == CMD_ID_STOP
    driver.send_cmd_id(CMD_ID_STOP)
    device.free_page_hints_done()
    device.free_page_hints_done()
    assert device.read_config(cmd, 4) == CMD_ID_DONE
    assert device.config_changes == 3


@pytest.mark.req("BAL-DEV-FPH-3")
def test_stale_id_pages_ignored():
    device, driver = hinting_device()
    first = device.request_free_page_hints()
    second = device.request_free_page_hints()
    driver.send_cmd_id(first)
    driver.hint_pages([3])
    assert device.hinted == set(), "pages under a stale id must be ignored"
    driver.send_cmd_id(second)
    driver.hint_pages([4])
    driver.send_cmd_id(first)
    assert device.hinting.state is HintState.STOP, "a different id ends a started round"
    driver.hint_pages([5])
    assert device.hinted == {4}


@pytest.mark.req("BAL-DRV-FPH-1")
def test_short_cmd_id_buffer_is_a_device_error():
    device, driver = hinting_device()
    driver.send("free_page_vq", b"\x01\x00\x00")
    assert device.status & Status.DEVICE_NEEDS_RESET
    assert "incorrect cmd id" in device.errors[0]


def test_a_broken_device_gives_no_held_stats_buffer_back():
    """The reference as QEMU 7.2: its stats poll timer still fires after virtio_error, but virtqueue_fill drops
    the element (no spec rule; the differential fuzzer compares used entries)."""
    clock = FakeClock()
    device, driver = ready(clock, free_page_hint=True)
    device.set_stats_polling_interval(5)
    driver.send_stats([(StatTag.MEMFREE, 10)])
    driver.send("free_page_vq", b"\x01")  # a 1-byte command id: virtio_error
    clock.now += 5
    device.run_timers()
    assert device.broken, f"expected the 1-byte command id to break the device, errors {device.errors}"
    used = driver.collect("statsq")
    assert used == [], f"expected no statsq entry from a broken device (QEMU drops the element), got {used}"


@pytest.mark.req("BAL-DEV-FPH-2")
def test_ids_not_reused_before_stop_after_wrap():
    device, driver = hinting_device()
    device.hinting.counter = 0xFFFFFFFE
    a = device.request_free_page_hints()
    driver.send_cmd_id(a)
    b = device.request_free_page_hints()
    c = device.request_free_page_hints()
    assert (a, b, c) == (0xFFFFFFFF, 0x80000000, 0x80000001), f"got {a:#x} {b:#x} {c:#x}"
    device.hinting.counter = 0xFFFFFFFF
    d = device.request_free_page_hints()
    assert d == 0x80000002, f"ids awaiting STOP are skipped, got {d:#x}"
    driver.send_cmd_id(CMD_ID_STOP)
    assert a not in device.hinting.unreleased, "STOP releases the id the driver used"
    check_device(device)


# --- free page reporting -------------------------------------------------------------


@pytest.mark.req("BAL-DEV-FPR-1")
def test_report_without_poison_allows_zero():
    features = feature_mask(Feature.VERSION_1, Feature.STATS_VQ, Feature.REPORTING)
    device, driver = ready(features=features, free_page_reporting=True)
    driver.report_pages([20])
    assert device.reported == {20}
    assert device.allowed_page_outcomes(20) == {PageOutcome.UNCHANGED, PageOutcome.ZERO}
    assert [u.length for u in driver.collect("reporting_vq")] == [0]


@pytest.mark.req("BAL-DEV-FPR-2", "BAL-DEV-PP-1")
def test_report_with_poison_allows_only_poison():
    device, driver = ready(free_page_reporting=True, poison_val=0xAAAAAAAA)
    pattern = poison_page(0xAAAAAAAA)
    device.ram.write(20 * PAGE_SIZE, pattern)
    driver.report_pages([20, 21])
    assert device.allowed_page_outcomes(20) == {PageOutcome.UNCHANGED, PageOutcome.POISON}
    assert device.page_content_allowed(21, pattern)
    assert not device.page_content_allowed(21, b"\x01" * PAGE_SIZE)


@pytest.mark.req("BAL-DEV-FPR-2")
def test_reported_page_keeps_the_poison_val_of_its_report_across_a_new_negotiation():
    """A device that filled a reported page with poison_val X conforms even after the driver later negotiates
    poison_val Y: the page was filled before Y existed."""
    device, driver = ready(free_page_reporting=True, poison_val=0xAAAAAAAA)
    driver.report_pages([21])
    assert driver.negotiate(poison_val=0x55555555), "renegotiation failed"
    assert device.page_content_allowed(21, poison_page(0xAAAAAAAA)), "the pattern of the report's poison_val"
    assert not device.page_content_allowed(21, poison_page(0x55555555)), "a poison_val set after the report"
    with pytest.raises(ValueError, match="poison pattern"):
        device.ram.allow([22], frozenset({PageOutcome.POISON}))


def test_partial_pages_in_a_report_are_not_touched():
    device, driver = ready(free_page_reporting=True)
    driver.send("reporting_vq", in_=[Buffer(30 * PAGE_SIZE + 8, 2 * PAGE_SIZE)])
    assert device.reported == {31}, f"only the whole page inside the range, got {device.reported}"


# --- guest RAM ---------------------------------------------------------------------------


def test_guest_ram_is_sparse_and_bounds_checked():
    ram = GuestRam(1 << 40)
    ram.write((1 << 40) - 2, b"ab")
    assert ram.read((1 << 40) - 3, 3) == b"\0ab"
    with pytest.raises(MemoryAccessError):
        ram.read(1 << 40, 1)
    with pytest.raises(MemoryAccessError):
        GuestRam(100)
    assert issubclass(MemoryAccessError, VballoonError)


def test_guest_ram_refuses_every_access_outside_it():
    """Within one page and across pages, reads and writes, below zero and past the end."""
    ram = GuestRam(4 * PAGE_SIZE)
    for access in (lambda: ram.read(-1, 1), lambda: ram.read(4 * PAGE_SIZE - 1, 2), lambda: ram.read(0, -1),
                   lambda: ram.write(-2, b"ab"), lambda: ram.write(4 * PAGE_SIZE, b"a"),
                   lambda: ram.write(4 * PAGE_SIZE - 1, b"ab"), lambda: ram.write(3 * PAGE_SIZE, bytes(PAGE_SIZE + 1))):
        with pytest.raises(MemoryAccessError, match="outside guest RAM"):
            access()
    assert ram.read(0, 4 * PAGE_SIZE) == bytes(4 * PAGE_SIZE), "a refused write changed nothing"


# --- the reference's own invariants ------------------------------------------------------


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: setattr(d, "num_pages", PAGES + 1), "num_pages"),
    (lambda d: d.ballooned.add(PAGES), "page set outside RAM"),
    (lambda d: d.hinted.add(PAGES), "page set outside RAM"),
    (lambda d: d.reported.add(PAGES), "page set outside RAM"),
    (lambda d: setattr(d, "driver_features", d.driver_features | 1 << Feature.MUST_TELL_HOST), "unoffered features"),
    (lambda d: setattr(d, "poison_val", 0x5A), "poison_val set without PAGE_POISON"),
    (lambda d: setattr(d, "status", d.status | Status.DEVICE_NEEDS_RESET), "NEEDS_RESET on a working device"),
    (lambda d: setattr(d.hinting, "counter", 0), "below"),
    (lambda d: setattr(d.hinting, "state", HintState.REQUESTED), "not tracked as issued"),
    (lambda d: (d.request_free_page_hints(), setattr(d.hinting, "state", HintState.START)), "without the driver"),
    (lambda d: d.hinting.unreleased.add(1), "issued id below CMD_ID_MIN"),
], ids=["num_pages", "ballooned", "hinted", "reported", "features", "poison_val", "needs_reset", "counter",
        "requested", "started", "unreleased"])
def test_the_invariants_catch_each_inconsistent_state(corrupt, message):
    """The fuzz targets' oracle (`check_device`, after every operation) fails on each state no operation may leave:
    it passes on a device that negotiated every feature but PAGE_POISON, and fails once one thing is made
    inconsistent."""
    device, driver = make(free_page_hint=True, free_page_reporting=True)
    assert driver.negotiate(device.offered_features & ~feature_mask(Feature.PAGE_POISON)), "negotiation failed"
    check_device(device)
    corrupt(device)
    with pytest.raises(AssertionError, match=message):
        check_device(device)


def test_driver_needs_room_for_its_rings():
    with pytest.raises(VballoonError):
        ReferenceDriver(BalloonDevice(DeviceProperties(ram_size=1 << 20)))


def test_driver_scratch_area_wraps_around():
    device, driver = ready()
    for _ in range(5):  # 5 x 300 KB exceeds the 1 MiB scratch area
        driver.send("inflateq", b"\xff" * 300_000)
        driver.collect("inflateq")
    assert len(device.skipped_pfns) == 5 * 75_000 and device.ballooned == set()
    assert driver.first_driver_pfn == (RAM >> 12) - 512


@pytest.mark.req("BAL-DEV-FPH-2")
def test_driver_stop_ends_a_started_round_and_releases_its_id():
    device, driver = hinting_device()
    cmd_id = device.request_free_page_hints()
    driver.send_cmd_id(cmd_id)
    driver.send_cmd_id(CMD_ID_STOP)
    assert device.hinting.state is HintState.STOP, f"got {device.hinting.state}"
    assert cmd_id not in device.hinting.unreleased
    driver.hint_pages([40])
    assert device.hinted == set(), "pages after STOP are ignored"
