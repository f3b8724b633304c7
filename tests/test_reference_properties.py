"""Property tests of the reference device: stats parsing, hint ids, random driver sessions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vballoon.reference import BalloonDevice, DeviceProperties, FreePageHinting, PageOutcome
from vballoon.reference.driver import ReferenceDriver
from vballoon.reference.invariants import check_device, check_hinting
from vballoon.reference.stats import StatsState
from vballoon.spec import (
    CMD_ID_MIN,
    CMD_ID_STOP,
    PAGE_SIZE,
    STAT_UNSET,
    ConfigField,
    Feature,
    Status,
    encode_stats,
    has_feature,
)

STATELESS = settings(max_examples=200, deadline=None)
RAM = 64 << 20

unique_entries = st.dictionaries(st.integers(0, 9), st.integers(0, (1 << 64) - 1), max_size=10)


def parsed(entries, stat_count=10):
    state = StatsState(lambda: 0.0, stat_count)
    state.receive(encode_stats(entries), "little", legacy=False)
    return state.values


@pytest.mark.req("BAL-DEV-ST-2")
@STATELESS
@given(unique_entries, st.randoms(use_true_random=False))
def test_stats_parsing_is_order_independent(entries, rnd):
    items = list(entries.items())
    shuffled = items[:]
    rnd.shuffle(shuffled)
    assert parsed(items) == parsed(shuffled), f"order changed the result: {items} vs {shuffled}"


@pytest.mark.req("BAL-DEV-ST-1")
@STATELESS
@given(unique_entries, st.lists(st.tuples(st.integers(10, 0xFFFF), st.integers(0, (1 << 64) - 1)), max_size=5),
       st.randoms(use_true_random=False))
def test_unknown_stats_tags_are_ignored(entries, unknown, rnd):
    mixed = list(entries.items()) + unknown
    rnd.shuffle(mixed)
    expected = [entries.get(tag, STAT_UNSET) for tag in range(10)]
    assert parsed(mixed) == expected, f"unknown tags {unknown} changed the stats"


hint_ops = st.lists(
    st.one_of(
        st.just(("request",)), st.just(("stop",)), st.just(("done",)), st.just(("reset",)),
        st.just(("send_current",)), st.just(("send_stop",)),
        st.tuples(st.just("send_other"), st.integers(2, 0xFFFFFFFF)),
    ),
    max_size=40,
)


@pytest.mark.req("BAL-DEV-FPH-2", "BAL-DEV-FPH-3")
@STATELESS
@given(st.integers(CMD_ID_MIN, 0xFFFFFFFF), hint_ops)
def test_hint_ids_never_reused_before_stop_and_stale_ids_never_accepted(start, ops):
    hinting = FreePageHinting(counter=start)
    awaiting_stop: set[int] = set()
    driver_id = None
    for op in ops:
        kind = op[0]
        if kind == "request":
            issued = hinting.request()
            assert issued not in awaiting_stop, f"id {issued:#x} reused before STOP"
            awaiting_stop.add(issued)
        elif kind == "stop":
            hinting.stop()
        elif kind == "done":
            hinting.done()
        elif kind == "reset":
            hinting.reset()
            driver_id = None
        elif kind == "send_stop":
            hinting.receive_cmd_id(CMD_ID_STOP)
            awaiting_stop.discard(driver_id)
            driver_id = None
        else:
            driver_id = hinting.counter if kind == "send_current" else op[1]
            hinting.receive_cmd_id(driver_id)
        if hinting.accepts_pages():
            assert driver_id == hinting.counter, f"pages accepted under stale id {driver_id}"
        check_hinting(hinting)


class BalloonSession(RuleBasedStateMachine):
    """A conforming driver doing random things to the reference device through real rings."""

    @initialize(
        deflate_on_oom=st.booleans(), free_page_hint=st.booleans(), free_page_reporting=st.booleans(),
        page_poison=st.booleans(), modern=st.booleans(),
    )
    def create(self, **props):
        self.now = 0.0
        self.device = BalloonDevice(DeviceProperties(ram_size=RAM, **props), lambda: self.now)
        self.driver = ReferenceDriver(self.device)
        self.inflated: set[int] = set()
        self.balloon: set[int] = set()
        self.broken = False
        self.ready = False

    def has(self, feature):
        return self.ready and has_feature(self.device.driver_features, feature)

    @rule(data=st.data(), poison=st.sampled_from([0, 0xAAAAAAAA]))
    def negotiate(self, data, poison):
        offered = self.device.offered_features
        bits = [f for f in (Feature.STATS_VQ, Feature.DEFLATE_ON_OOM, Feature.FREE_PAGE_HINT,
                            Feature.PAGE_POISON, Feature.REPORTING, Feature.EVENT_IDX, Feature.INDIRECT_DESC)
                if has_feature(offered, f)]
        chosen = data.draw(st.sets(st.sampled_from(bits))) if bits else set()
        features = sum(1 << f for f in chosen) | (offered & (1 << Feature.VERSION_1))
        assert self.driver.negotiate(features, poison_val=poison), "a subset of offered features must be accepted"
        self.balloon = set()
        self.broken = False
        self.ready = True

    @rule()
    def reset(self):
        self.device.write_status(0)
        self.ready = self.broken = False
        self.balloon = set()

    @rule(size=st.integers(1, RAM * 2))
    def set_target(self, size):
        self.device.set_target(size)

    @precondition(lambda self: self.ready and not self.broken)
    @rule(pfns=st.sets(st.integers(0, 63), min_size=1, max_size=8), indirect=st.booleans())
    def inflate(self, pfns, indirect):
        if indirect and not self.has(Feature.INDIRECT_DESC):
            indirect = False
        self.driver.inflate(sorted(pfns), indirect=indirect)
        self.driver.collect("inflateq")
        self.inflated |= pfns
        self.balloon |= pfns
        self.driver.set_actual(len(self.balloon))

    @precondition(lambda self: self.ready and not self.broken and self.balloon)
    @rule(data=st.data())
    def deflate(self, data):
        pfns = data.draw(st.sets(st.sampled_from(sorted(self.balloon)), min_size=1))
        self.driver.deflate(sorted(pfns))
        self.driver.collect("deflateq")
        self.inflated -= pfns
        self.balloon -= pfns
        self.driver.set_actual(len(self.balloon))

    @precondition(lambda self: self.has(Feature.STATS_VQ) and not self.broken)
    @rule(entries=unique_entries, seconds=st.integers(0, 5))
    def stats(self, entries, seconds):
        if entries and self.device.held_stats is None:
            self.driver.send_stats(entries.items())
        self.now += seconds
        self.device.run_timers()
        self.driver.collect("statsq")

    @rule(interval=st.integers(0, 3))
    def polling(self, interval):
        self.device.set_stats_polling_interval(interval)

    @precondition(lambda self: self.device.properties.free_page_hint)
    @rule(action=st.sampled_from(["request", "stop", "done"]))
    def host_hints(self, action):
        {"request": self.device.request_free_page_hints, "stop": self.device.stop_free_page_hints,
         "done": self.device.free_page_hints_done}[action]()

    @precondition(lambda self: self.has(Feature.FREE_PAGE_HINT) and not self.broken)
    @rule(pfns=st.sets(st.integers(64, 127), max_size=4))
    def driver_hints(self, pfns):
        cmd_id = self.device.read_config(ConfigField.FREE_PAGE_HINT_CMD_ID, 4)
        self.driver.send_cmd_id(cmd_id if cmd_id >= CMD_ID_MIN else CMD_ID_STOP)
        if pfns:
            self.driver.hint_pages(sorted(pfns))
        self.driver.send_cmd_id(CMD_ID_STOP)
        self.driver.collect("free_page_vq")

    @precondition(lambda self: self.has(Feature.REPORTING) and not self.broken)
    @rule(pfns=st.sets(st.integers(64, 127), min_size=1, max_size=4))
    def report(self, pfns):
        poisoned = self.has(Feature.PAGE_POISON)
        fill = self.device.poison_pattern() if poisoned else b"\x5a" * PAGE_SIZE
        for pfn in pfns:  # BAL-DRV-FPR-2: poison before reporting
            self.device.ram.write(pfn * PAGE_SIZE, fill)
        self.driver.report_pages(sorted(pfns))
        self.driver.collect("reporting_vq")
        expected = {PageOutcome.UNCHANGED, PageOutcome.POISON if poisoned else PageOutcome.ZERO}
        for pfn in pfns:
            got = self.device.allowed_page_outcomes(pfn)
            assert got == expected, f"page {pfn}: expected {expected}, got {got}"
            assert self.device.page_content_allowed(pfn, fill)

    @precondition(lambda self: self.ready and not self.broken)
    @rule()
    def malformed_chain(self):
        ring = self.driver.queues["inflateq"]
        ring.publish(ring.layout.size)  # a head outside the descriptor table
        self.device.notify(0)
        self.broken = True
        modern = self.has(Feature.VERSION_1)
        assert bool(self.device.status & Status.DEVICE_NEEDS_RESET) == modern, "NEEDS_RESET iff modern"

    @invariant()
    def device_invariants(self):
        check_device(self.device)

    @invariant()
    def actual_within_ram(self):
        assert self.device.actual <= self.device.ram.num_pages, f"actual {self.device.actual} beyond RAM"
        assert 0 <= self.device.query_balloon() <= RAM

    @invariant()
    def ballooned_set_consistent(self):
        assert self.device.ballooned == self.inflated, f"device {self.device.ballooned} vs driver {self.inflated}"
        assert self.device.broken == self.broken

    @invariant()
    def no_page_both_zeroed_and_poisoned(self):
        for pfn, outcomes in self.device.ram.pages_with_latitude().items():
            assert not {PageOutcome.ZERO, PageOutcome.POISON} <= outcomes, f"page {pfn} both zeroed and poisoned"

    @invariant()
    def ring_pages_untouched(self):
        first = self.driver.first_driver_pfn
        assert all(pfn < first for pfn in self.device.ram.pages_with_latitude()), "device claimed a ring page"


BalloonSession.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_balloon_session = pytest.mark.req(
    "BAL-DEV-OP-1", "BAL-DEV-FPR-1", "BAL-DEV-FPR-2", "BAL-DEV-FPH-2", "BAL-DEV-FPH-3", "BAL-DRV-ACT-1"
)(BalloonSession.TestCase)
