"""Differential check: generated operation sequences on QEMU's balloon and on the reference device.

A hypothesis state machine applies each generated operation to a fresh QEMU
(over qtest) and to the reference, and fails on any QEMU observation outside
the reference's allowed outcomes; the failure shrinks for at most
`vballoon.fuzz.shrinking.SHRINK_SECONDS` (VBALLOON_SHRINK_SECONDS) and its message holds
the standalone reproducer of the smallest case found. A difference that a listed deviation explains is
collected, ends that example (the two devices no longer agree on state) and
turns the test into an expected failure naming the deviation. What is observed of QEMU after each
operation, against what the fuzzing differential observes once per input: `vballoon.scenario.differential_run`.

One QEMU per example: starting one costs about 70 ms, while a device reset
would not give a fresh device (guest-stats, last-update, the polling timer,
num_pages, actual and discarded RAM all survive it in QEMU 7.2 and 10.0).
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from vballoon.errors import UsageError
from vballoon.fuzz.shrinking import ShrinkClock, run_bounded, shrink_seconds
from vballoon.reference.device import DEFLATEQ, FREE_PAGE_VQ, INFLATEQ, REPORTING_VQ, STATSQ
from vballoon.requirements import Deviation, deviation_for
from vballoon.session import Session
from vballoon.spec import (BALLOON_FEATURES, CMD_ID_DONE, CMD_ID_FIRST, CMD_ID_MIN, CMD_ID_STOP, Feature,
                           encode_cmd_id, encode_pfns, encode_stats, feature_mask, has_feature)
from vballoon.scenario.differential_run import DifferentialRun
from vballoon.scenario.malformed import INDIRECT_KINDS, MALFORMED_QUEUES, kinds_for
from vballoon.scenario.operations import (POOL_PFNS, AddBuffer, Cont, FillPage, MalformedChain, Negotiate, Operation,
                                          ReadConfig, Reset, SetPollingInterval, SetTarget, Stop, WriteConfig,
                                          scenario_to_json, uses_packed_rings)

DIFFERENTIAL_SETTINGS = settings(max_examples=25, stateful_step_count=15, deadline=None, derandomize=True,
                                 database=None, suppress_health_check=[HealthCheck.too_slow],
                                 report_multiple_bugs=False)
"""One failure shrunk and reported: shrinking starts at the first failure, and its bound is the test's alone."""
CASES = TRANSPORTS + (DeviceVariant(replace(TRANSPORTS[0].variant, free_page_hint=True, free_page_reporting=True,
                                            deflate_on_oom=True)),)
RAM_PAGES = 128 << 8
OUTSIDE_RAM_PFNS = (RAM_PAGES, 0xFFFFF, 0x80000000 | POOL_PFNS[0], 0xFFFFFFFF)
"""First page past RAM, the firmware's last page, a pool page with bit 31 set, all ones."""
pool_pfns = st.sampled_from(POOL_PFNS)
pfn_lists = st.lists(st.one_of(pool_pfns, st.sampled_from((0, *OUTSIDE_RAM_PFNS))), min_size=1, max_size=6)
stat_tags = st.sampled_from((*range(10), 10, 15, 16, 99, 0xFFFF))
stat_values = st.sampled_from((0, 1, 4096, 1 << 40, (1 << 64) - 2))
polling_intervals = st.sampled_from((0, 3600, -1, 1 << 32, (1 << 32) - 1))
cmd_ids = st.sampled_from((CMD_ID_STOP, CMD_ID_DONE, CMD_ID_MIN, CMD_ID_FIRST))
config_writes = st.sampled_from([(offset, width) for width in (1, 2, 4) for offset in range(4, 16, width)])
config_reads = st.sampled_from([(offset, width) for width in (1, 2, 4) for offset in range(0, 16, width)])


def differential_machine(session: Session, case: DeviceVariant, deviations_seen: dict[Deviation, str],
                         clock: ShrinkClock) -> type[RuleBasedStateMachine]:
    """The state machine class for one device variant; `deviations_seen` collects deviation -> what was seen,
    `clock` hears of each failure.

    Each example's QEMU logs live in a temporary directory removed with it:
    a failure carries its reproducer in the message.
    """
    offered_balloon_bits = [bit for bit in (*BALLOON_FEATURES, Feature.INDIRECT_DESC)
                            if bit in case.variant.offered_features() and bit != Feature.MUST_TELL_HOST]
    malformed_kinds = kinds_for(uses_packed_rings(case.variant, case.legacy_interface))
    malformed_setup = {bit for bit in offered_balloon_bits if bit in (Feature.STATS_VQ, Feature.INDIRECT_DESC)}

    class DifferentialMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.resources = ExitStack()
            log_dir = Path(self.resources.enter_context(tempfile.TemporaryDirectory(prefix="vballoon-diff-")))
            self.run = self.resources.enter_context(
                DifferentialRun(session.qemu, case.variant, case.legacy_interface, log_dir))
            self.features: int | None = None
            self.poison_val = 0
            self.diverged = False

        def teardown(self) -> None:
            self.resources.close()

        def apply(self, op: Operation) -> None:
            if self.diverged:
                return
            step = self.run.step(op)
            judged = [(d, deviation_for(d.requirement, session.qemu.version, difference=d.what) if d.requirement
                       else None) for d in step.differences]
            unknown = [d for d, deviation in judged if deviation is None]
            if unknown:
                clock.failed()
                raise AssertionError(
                    f"QEMU differs from the reference after {op!r}:\n" + "\n".join(f"  {d}" for d in unknown)
                    + f"\nstandalone reproducer:\n{self.run.reproducer()}")
            for difference, deviation in judged:
                assert deviation is not None
                deviations_seen.setdefault(deviation, f"{difference} in scenario {scenario_to_json(self.run.scenario)}")
            self.diverged = bool(judged)

        @initialize(fills=st.lists(st.integers(0, 255), min_size=len(POOL_PFNS), max_size=len(POOL_PFNS)),
                    poison_val=st.sampled_from((0, 0xAAAAAAAA)))
        def fill_pool(self, fills: list[int], poison_val: int) -> None:
            self.poison_val = poison_val
            for pfn, byte in zip(POOL_PFNS, fills, strict=True):
                self.apply(FillPage(pfn, byte))

        @rule(chosen=st.sets(st.sampled_from(offered_balloon_bits)))
        def negotiate(self, chosen: set[Feature]) -> None:
            """poison_val is the example's one value: the reference judges a page reported under PAGE_POISON
            against the poison_val in effect now, not the one in effect when it was reported."""
            self.features = feature_mask(*chosen)
            self.apply(Negotiate(self.features, self.poison_val))

        @rule(pages=st.one_of(st.integers(0, 64), st.sampled_from((RAM_PAGES, RAM_PAGES + 1, -256))))
        def set_target(self, pages: int) -> None:
            self.apply(SetTarget(pages))

        @precondition(lambda self: self.features is not None)  # the reference takes a device without VERSION_1
        @rule(where=config_writes, value=st.integers(0, 0xFFFFFFFF))  # negotiated as legacy, whatever the interface
        def write_config(self, where: tuple[int, int], value: int) -> None:
            offset, width = where
            self.apply(WriteConfig(offset, width, value & ((1 << 8 * width) - 1)))

        @rule(where=config_reads)
        def read_config(self, where: tuple[int, int]) -> None:
            self.apply(ReadConfig(*where))

        @rule(pfn=pool_pfns, byte=st.integers(0, 255))
        def fill_page(self, pfn: int, byte: int) -> None:
            self.apply(FillPage(pfn, byte))

        @precondition(lambda self: self.features is not None)
        @rule(queue=st.sampled_from((INFLATEQ, DEFLATEQ)), pfns=pfn_lists, trailing=st.integers(0, 3))
        def pfn_buffer(self, queue: str, pfns: list[int], trailing: int) -> None:
            self.apply(AddBuffer(queue, encode_pfns(pfns) + bytes(trailing)))

        @precondition(lambda self: self.features is not None)
        @rule(entries=st.lists(st.tuples(stat_tags, stat_values), max_size=6), trailing=st.integers(0, 9))
        def stats_buffer(self, entries: list[tuple[int, int]], trailing: int) -> None:
            data = encode_stats(entries) + bytes(trailing)
            self.apply(AddBuffer(STATSQ, data or bytes(1)))

        @precondition(lambda self: self.features is not None and has_feature(self.features, Feature.FREE_PAGE_HINT))
        @rule(cmd_id=cmd_ids, pages=st.lists(pool_pfns, max_size=2, unique=True))
        def hint_buffer(self, cmd_id: int, pages: list[int]) -> None:
            self.apply(AddBuffer(FREE_PAGE_VQ, encode_cmd_id(cmd_id), tuple(pages)))

        @precondition(lambda self: self.features is not None and has_feature(self.features, Feature.REPORTING))
        @rule(pages=st.lists(pool_pfns, min_size=1, max_size=3, unique=True))
        def report_buffer(self, pages: list[int]) -> None:
            self.apply(AddBuffer(REPORTING_VQ, in_pfns=tuple(pages)))

        @rule(queue=st.sampled_from(MALFORMED_QUEUES), kind=st.sampled_from(malformed_kinds), pfns=pfn_lists)
        def malformed_chain(self, queue: str, kind: str, pfns: list[int]) -> None:
            """A chain that breaks a ring rule of the ring layout (VQ-DEV-STATUS-1, VQ-DEV-PACKED-1); indirect tables
            only with INDIRECT_DESC. A device not negotiated yet is negotiated first (STATS_VQ, INDIRECT_DESC where
            offered): without it the rule would wait on `negotiate`, and a run's few examples met few chains."""
            if self.features is None:
                self.negotiate(malformed_setup)
            assert self.features is not None
            if kind not in INDIRECT_KINDS or has_feature(self.features, Feature.INDIRECT_DESC):
                self.apply(MalformedChain(queue, kind, encode_pfns(pfns)))

        @rule(seconds=polling_intervals)
        def set_polling_interval(self, seconds: int) -> None:
            self.apply(SetPollingInterval(seconds))

        @rule()
        def stop(self) -> None:
            self.apply(Stop())

        @rule()
        def cont(self) -> None:
            self.apply(Cont())

        @rule()
        def reset(self) -> None:
            self.features = None
            self.apply(Reset())

    return DifferentialMachine


@pytest.mark.req("BAL-DEV-OP-1", "BAL-LEG-USED", "BAL-CFG-LEG-LE", "BAL-DRV-ACT-1", "BAL-DEV-ST-1", "BAL-DEV-ST-2",
                 "BAL-DEV-FPH-3", "BAL-DEV-FPR-1", "BAL-DEV-FPR-2", "BAL-DEV-LEG-ACT", "BAL-DEV-LEG-ST-FIRST",
                 "VQ-DEV-STATUS-1", "VQ-DEV-PACKED-1")
@over(CASES)
def test_qemu_stays_within_the_reference(session: Session, device_variant: DeviceVariant,
                                         shrink_bound: float) -> None:
    """Every generated scenario's observations on QEMU are among the reference device's allowed outcomes."""
    deviations_seen: dict[Deviation, str] = {}
    clock = ShrinkClock(shrink_bound)
    run_bounded(differential_machine(session, device_variant, deviations_seen, clock), DIFFERENTIAL_SETTINGS, clock)
    if deviations_seen:
        ordered = sorted(deviations_seen, key=lambda deviation: deviation.requirement)
        named = "; ".join(f"{deviation.requirement} ({deviation.behaviour})" for deviation in ordered)
        first = deviations_seen[ordered[0]]
        pytest.xfail(f"known deviations of QEMU {'.'.join(map(str, session.qemu.version))} seen: {named}\nfirst seen: {first}")


@pytest.fixture(scope="module")
def shrink_bound() -> float:
    """The seconds a failure may shrink (VBALLOON_SHRINK_SECONDS, else SHRINK_SECONDS); a bad value is one line."""
    try:
        return shrink_seconds()
    except UsageError as error:
        pytest.exit(str(error), returncode=4)
