"""The fuzz targets: what each turns its input bytes into, and where the result runs.

Every target maps ANY bytes to a `Scenario` with the deterministic decoders of `vballoon.fuzz.format`,
so a saved input replays without atheris, on the reference and on QEMU alike. The buffer targets spend
their bytes on one buffer (libFuzzer's mutations then reshape the buffer itself); `scenario` and
`qemu_differential` decode the full scenario format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vballoon.fuzz.format import (VERSION, decode, device_byte, device_from_byte, offered_balloon_features,
                                  ScenarioState)
from vballoon.matrix import Variant
from vballoon.reference.device import DEFLATEQ, FREE_PAGE_VQ, INFLATEQ, REPORTING_VQ, STATSQ
from vballoon.scenario.operations import (POOL_PFNS, AddBuffer, FillPage, Negotiate, Operation, ReadConfig, Reset,
                                          Scenario, WriteConfig)
from vballoon.spec import (CMD_ID_DONE, CMD_ID_FIRST, CMD_ID_MIN, CMD_ID_STOP, Feature, decode_pfns, encode_cmd_id,
                           encode_pfns, encode_stats)

HINT_DEVICE = 8
REPORTING_DEVICE = 16
POOL_FILL = 0xA5
"""Pool pages are filled before their buffer so a page the device discards reads back differently."""


def _runnable(variant: Variant, legacy_interface: bool, ops: list[Operation]) -> Scenario:
    """`ops` through the format's admission rules (the same validity as decoded scenarios)."""
    state = ScenarioState(variant)
    admitted = [op for op in map(state.admit, ops) if op is not None]
    return Scenario(variant, legacy_interface, tuple(admitted))


def _negotiated(data: bytes, force: int = 0) -> tuple[Variant, bool, Negotiate]:
    variant, legacy_interface = device_from_byte((data[0] if data else 0) | force)
    return variant, legacy_interface, Negotiate(offered_balloon_features(variant))


def stats_scenario(data: bytes) -> Scenario:
    """byte 0: device; the rest: one stats buffer."""
    variant, legacy, negotiate = _negotiated(data)
    return _runnable(variant, legacy, [negotiate, AddBuffer(STATSQ, data[1:])])


def pfn_scenario(data: bytes) -> Scenario:
    """byte 0: device; byte 1: bit 0 deflate instead of inflate, bit 1 then the other queue; the rest: PFNs (the
    pool pages among them filled first)."""
    variant, legacy, negotiate = _negotiated(data)
    flags = data[1] if len(data) > 1 else 0
    first, second = (DEFLATEQ, INFLATEQ) if flags & 1 else (INFLATEQ, DEFLATEQ)
    named = sorted(set(decode_pfns(data[2:]).pfns).intersection(POOL_PFNS))  # the pool pages the buffer names
    ops: list[Operation] = [negotiate, *(FillPage(pfn, POOL_FILL) for pfn in named), AddBuffer(first, data[2:])]
    ops += [AddBuffer(second, data[2:])] if flags & 2 else []
    return _runnable(variant, legacy, ops)


def hint_scenario(data: bytes) -> Scenario:
    """byte 0: device (free-page-hint forced on); byte 1: pool pages as in buffers (bit i: page i); the rest: out."""
    variant, legacy, negotiate = _negotiated(data, HINT_DEVICE)
    pages = data[1] if len(data) > 1 else 0
    in_pfns = tuple(pfn for i, pfn in enumerate(POOL_PFNS[:4]) if pages >> i & 1)
    ops: list[Operation] = [negotiate, *(FillPage(pfn, POOL_FILL) for pfn in in_pfns)]
    return _runnable(variant, legacy, ops + [AddBuffer(FREE_PAGE_VQ, data[2:], in_pfns)])


REPORT_POISON_VALS = (0, POOL_FILL * 0x01010101, (POOL_FILL ^ 0xFF) * 0x01010101)
"""poison_val by class: zero (QEMU discards the pages), the pages' own pattern, another pattern. What the device
may do to a reported page depends only on that class, so other values would only repeat executions."""


def report_scenario(data: bytes) -> Scenario:
    """byte 0: device (reporting forced on); byte 1: pool pages reported (bit i: page i), bit 4: with PAGE_POISON;
    byte 2: poison_val, an index into REPORT_POISON_VALS. The reported pages are filled with POOL_FILL first."""
    variant, legacy, negotiate = _negotiated(data, REPORTING_DEVICE)
    padded = data + bytes(max(0, 3 - len(data)))
    pages, poison = padded[1], REPORT_POISON_VALS[padded[2] % len(REPORT_POISON_VALS)]
    features = negotiate.features if pages & 16 else negotiate.features & ~(1 << Feature.PAGE_POISON)
    in_pfns = tuple(pfn for i, pfn in enumerate(POOL_PFNS[:4]) if pages >> i & 1)
    ops: list[Operation] = [Negotiate(features, poison)]
    ops += [FillPage(pfn, POOL_FILL) for pfn in in_pfns] + [AddBuffer(REPORTING_VQ, b"", in_pfns)]
    return _runnable(variant, legacy, ops)


def config_scenario(data: bytes) -> Scenario:
    """byte 0: device; the rest: scenario operations of which only config accesses, Negotiate and Reset are kept."""
    decoded = decode(bytes([VERSION]) + data)
    kept = [op for op in decoded.operations if isinstance(op, (WriteConfig, ReadConfig, Negotiate, Reset))]
    variant = decoded.variant
    return _runnable(variant, decoded.legacy_interface, [Negotiate(offered_balloon_features(variant)), *kept])


def differential_scenario(device: int) -> Callable[[bytes], Scenario]:
    """The full format with the device byte replaced: one QEMU serves one device configuration."""
    def scenario(data: bytes) -> Scenario:
        return decode((data[:1] or bytes([VERSION])) + bytes([device]) + data[2:], device=device)
    return scenario


@dataclass(frozen=True)
class Target:
    """One fuzz target: `fuzz/fuzz_<name>.py`."""

    name: str
    summary: str
    scenario_for: Callable[[bytes], Scenario]
    max_len: int
    """libFuzzer's -max_len unless given: room for every layout the decoder reads, not libFuzzer's 4096 bytes
    (a 4 KiB PFN buffer or 64 operations of long buffers cost many times a typical input); `config` and `scenario`
    take `SHORT_SCENARIO_BYTES`."""
    on_qemu: bool = False
    dictionary: tuple[bytes, ...] = ()


DIFFERENTIAL_VARIANT = Variant(transport="transitional", deflate_on_oom=True, free_page_hint=True,
                               free_page_reporting=True)
"""The device the differential target fuzzes by default: every property on, modern interface."""
SHORT_SCENARIO_BYTES = 64
"""max_len of the reference targets that decode operation sequences. In 60 s runs from the seeds, 64 bytes reached
the same edges as 256 (config: 74) and 512 (scenario: 196) with 1.6 and 2.4 times the executions; longer inputs
add only hit-count buckets of the same edges (repeated operations). Three scenario seeds are longer and start
truncated (the corpus replay runs them whole); long scenarios are the differential target's (512 bytes)."""
SCENARIO_FORMAT_TARGETS = ("scenario", "qemu_differential")
"""Targets whose inputs are in the scenario format itself (the others have their own small layouts)."""
STATS_WORDS = tuple(tag.to_bytes(2, "little") for tag in range(17)) + (b"\xff\xff", b"\xff" * 8)
PFN_WORDS = tuple(encode_pfns([pfn]) for pfn in (*POOL_PFNS[:2], 0, 0x8000, 0xFFFFF, 0x80000800, 0xFFFFFFFF))
CMD_ID_WORDS = tuple(encode_cmd_id(i) for i in (CMD_ID_STOP, CMD_ID_DONE, CMD_ID_MIN, CMD_ID_FIRST))

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("stats", "one stats buffer on the reference", stats_scenario, 256,
           dictionary=STATS_WORDS + (encode_stats([(4, 1 << 30)]),)),
    Target("pfn", "inflate/deflate PFN buffers on the reference", pfn_scenario, 512, dictionary=PFN_WORDS),
    Target("hint", "a free page hint command buffer on the reference", hint_scenario, 64, dictionary=CMD_ID_WORDS),
    Target("report", "a free page report buffer on the reference", report_scenario, 3),
    Target("config", "config space accesses on the reference", config_scenario, SHORT_SCENARIO_BYTES),
    Target("scenario", "whole scenarios on the reference", decode, SHORT_SCENARIO_BYTES),
    Target("qemu_differential", "whole scenarios on QEMU over qtest and on the reference",
           differential_scenario(device_byte(DIFFERENTIAL_VARIANT, False)), 512, on_qemu=True),
)}


def target_named(name: str) -> Target:
    """The target `name` (as in fuzz_<name>.py); KeyError lists the known ones."""
    try:
        return TARGETS[name.removeprefix("fuzz_")]
    except KeyError:
        raise KeyError(f"unknown fuzz target {name!r}; known: {', '.join(TARGETS)}") from None

