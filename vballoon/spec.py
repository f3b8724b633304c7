"""Wire constants and codecs of the virtio memory balloon, each defined once.

Feature bits, device status bits, statistics tags, the configuration layout
and the buffer formats of the inflate/deflate, stats and free-page-hint
queues.  Decoders accept any `bytes` and either return a result or raise
`DecodeError`; they never raise anything else.

Endianness: a modern device (VERSION_1 negotiated) uses little endian
everywhere.  A legacy device uses guest-native endianness for buffers
(BAL-LEG-ST-END, BAL-LEG-FPH-END) but little endian for its configuration
space (BAL-CFG-LEG-LE).  Codecs therefore take an `endian` argument that
defaults to "little", which is also the guest-native order on x86;
`buffer_endian()` picks the right one for a negotiated feature set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Literal

from vballoon.errors import DecodeError

Endian = Literal["little", "big"]

_STRUCT_PREFIX: dict[str, str] = {"little": "<", "big": ">"}


def struct_prefix(endian: Endian) -> str:
    """The `struct` byte-order prefix for `endian`; DecodeError if unknown."""
    try:
        return _STRUCT_PREFIX[endian]
    except KeyError:
        raise DecodeError(f"unknown endianness {endian!r}: use 'little' or 'big'") from None


# --- feature bits ------------------------------------------------------------


class Feature(IntEnum):
    """Feature bit numbers: balloon bits 0-5, then transport/ring bits."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    REPORTING = 5
    NOTIFY_ON_EMPTY = 24  # legacy only
    ANY_LAYOUT = 27  # legacy only
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    RING_RESET = 40


BALLOON_FEATURES: tuple[Feature, ...] = (
    Feature.MUST_TELL_HOST,
    Feature.STATS_VQ,
    Feature.DEFLATE_ON_OOM,
    Feature.FREE_PAGE_HINT,
    Feature.PAGE_POISON,
    Feature.REPORTING,
)


def feature_mask(*features: Feature | int) -> int:
    """The 64-bit mask with the given feature bits set."""
    mask = 0
    for bit in features:
        mask |= 1 << int(bit)
    return mask


def has_feature(features: int, feature: Feature | int) -> bool:
    """Whether bit `feature` is set in the mask `features`."""
    return bool(features >> int(feature) & 1)


def buffer_endian(features: int, guest_endian: Endian = "little") -> Endian:
    """Byte order of queue buffers: little with VERSION_1, else guest-native.

    BAL-LEG-ST-END, BAL-LEG-FPH-END: legacy buffers use guest-native order.
    """
    return "little" if has_feature(features, Feature.VERSION_1) else guest_endian


# --- device status -------------------------------------------------------------


class Status:
    """Device status register bits, as plain ints: the reference tests them on every operation, and
    `IntFlag` arithmetic costs a microsecond or more per operator."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


# --- statistics ----------------------------------------------------------------


class StatTag(IntEnum):
    """Statistics tags; 0-9 are in the spec, 10-15 in Linux and QEMU only."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILL = 10
    ALLOC_STALL = 11
    ASYNC_SCAN = 12
    DIRECT_SCAN = 13
    ASYNC_RECLAIM = 14
    DIRECT_RECLAIM = 15


@dataclass(frozen=True)
class StatInfo:
    """One statistic: its tag, unit ("bytes" or "count"), QOM key, and origin."""

    tag: StatTag
    unit: Literal["bytes", "count"]
    qom_key: str
    in_spec: bool

    @property
    def name(self) -> str:
        return self.tag.name


def _stat(tag: StatTag, unit: Literal["bytes", "count"], qom_key: str) -> StatInfo:
    return StatInfo(tag, unit, qom_key, in_spec=tag < SPEC_STAT_COUNT)


SPEC_STAT_COUNT = 10
"""Tags 0-9 are defined by the virtio spec."""
LINUX_S_NR = 16
"""VIRTIO_BALLOON_S_NR in Linux 6.12's uapi header and QEMU 10.0 (10 in Linux 6.1 and QEMU 7.2): tags that some
device may store. Which of them the QEMU under test stores, it says itself (vballoon.qemu.profile)."""

STATS: tuple[StatInfo, ...] = (
    _stat(StatTag.SWAP_IN, "bytes", "stat-swap-in"),
    _stat(StatTag.SWAP_OUT, "bytes", "stat-swap-out"),
    _stat(StatTag.MAJFLT, "count", "stat-major-faults"),
    _stat(StatTag.MINFLT, "count", "stat-minor-faults"),
    _stat(StatTag.MEMFREE, "bytes", "stat-free-memory"),
    _stat(StatTag.MEMTOT, "bytes", "stat-total-memory"),
    _stat(StatTag.AVAIL, "bytes", "stat-available-memory"),
    _stat(StatTag.CACHES, "bytes", "stat-disk-caches"),
    _stat(StatTag.HTLB_PGALLOC, "count", "stat-htlb-pgalloc"),
    _stat(StatTag.HTLB_PGFAIL, "count", "stat-htlb-pgfail"),
    _stat(StatTag.OOM_KILL, "count", "stat-oom-kills"),
    _stat(StatTag.ALLOC_STALL, "count", "stat-alloc-stalls"),
    _stat(StatTag.ASYNC_SCAN, "bytes", "stat-async-scans"),
    _stat(StatTag.DIRECT_SCAN, "bytes", "stat-direct-scans"),
    _stat(StatTag.ASYNC_RECLAIM, "bytes", "stat-async-reclaims"),
    _stat(StatTag.DIRECT_RECLAIM, "bytes", "stat-direct-reclaims"),
)

STAT_UNSET = (1 << 64) - 1
"""Value QEMU reports for a statistic the driver did not supply."""

STAT_ENTRY_SIZE = 10
"""A stats entry is le16 tag + le64 value, packed (BAL-DRV-ST-5 erratum: 10, not 6)."""


@dataclass(frozen=True)
class DecodedStats:
    """A decoded stats buffer: entries in buffer order and ignored trailing bytes."""

    entries: tuple[tuple[int, int], ...]
    trailing_bytes: int


def encode_stats(entries: Iterable[tuple[int, int]], endian: Endian = "little") -> bytes:
    """Pack (tag, value) entries as a stats buffer (BAL-DRV-ST-5)."""
    fmt = struct_prefix(endian) + "HQ"
    try:
        return b"".join(struct.pack(fmt, tag, value) for tag, value in entries)
    except struct.error as exc:
        raise DecodeError(f"stats entry out of range (tag le16, value le64): {exc}") from None


def decode_stats(data: bytes, endian: Endian = "little") -> DecodedStats:
    """Split a stats buffer into entries; a trailing partial entry is ignored.

    Entries are read while 10 whole bytes remain, as QEMU 7.2 and 10.0 do.
    """
    fmt = struct_prefix(endian) + "HQ"
    whole = len(data) - len(data) % STAT_ENTRY_SIZE
    entries = tuple(struct.iter_unpack(fmt, data[:whole]))
    return DecodedStats(entries, len(data) - whole)


# --- inflate/deflate PFN arrays ----------------------------------------------

PFN_SHIFT = 12
PAGE_SIZE = 1 << PFN_SHIFT
PFN_SIZE = 4
"""Each PFN is a le32 (legacy: guest-native u32)."""


@dataclass(frozen=True)
class DecodedPfns:
    """A decoded PFN array and the count of trailing bytes ignored."""

    pfns: tuple[int, ...]
    trailing_bytes: int


def encode_pfns(pfns: Iterable[int], endian: Endian = "little") -> bytes:
    """Pack page frame numbers as 32-bit integers."""
    fmt = struct_prefix(endian) + "I"
    try:
        return b"".join(struct.pack(fmt, pfn) for pfn in pfns)
    except struct.error as exc:
        raise DecodeError(f"PFN does not fit in 32 bits: {exc}") from None


def decode_pfns(data: bytes, endian: Endian = "little") -> DecodedPfns:
    """Read 32-bit PFNs while 4 whole bytes remain, as QEMU 7.2 and 10.0 do."""
    count = len(data) // PFN_SIZE
    return DecodedPfns(struct.unpack(f"{struct_prefix(endian)}{count}I", data[:count * PFN_SIZE]),
                       len(data) - count * PFN_SIZE)


# --- free page hint command ids --------------------------------------------------

CMD_ID_STOP = 0
CMD_ID_DONE = 1
CMD_ID_MIN = 0x80000000
"""Lowest id QEMU issues; QEMU starts its counter here."""
CMD_ID_FIRST = 0x80000001
"""First id QEMU 7.2 and 10.0 issue: the counter is incremented before use."""
CMD_ID_MAX = 0xFFFFFFFF
CMD_ID_SIZE = 4


def next_cmd_id(current: int) -> int:
    """The id QEMU issues after `current`: +1, wrapping from 2^32-1 to CMD_ID_MIN."""
    return CMD_ID_MIN if current == CMD_ID_MAX else current + 1


def encode_cmd_id(cmd_id: int, endian: Endian = "little") -> bytes:
    """Pack a free-page-hint command id (BAL-DRV-FPH-1: a 4-byte out buffer)."""
    try:
        return struct.pack(struct_prefix(endian) + "I", cmd_id)
    except struct.error as exc:
        raise DecodeError(f"command id does not fit in 32 bits: {exc}") from None


def decode_cmd_id(data: bytes, endian: Endian = "little") -> int:
    """Read the command id from the first 4 bytes; DecodeError if fewer.

    QEMU 7.2 and 10.0 read the first 4 bytes of the out buffer and ignores the rest;
    fewer than 4 bytes is a device error ("received an incorrect cmd id").
    """
    if len(data) < CMD_ID_SIZE:
        raise DecodeError(f"command id buffer has {len(data)} bytes, needs {CMD_ID_SIZE}")
    (cmd_id,) = struct.unpack_from(struct_prefix(endian) + "I", data)
    return cmd_id


# --- configuration space --------------------------------------------------------


class ConfigField(IntEnum):
    """Byte offsets of the le32 configuration fields."""

    NUM_PAGES = 0
    ACTUAL = 4
    FREE_PAGE_HINT_CMD_ID = 8
    POISON_VAL = 12


CONFIG_FIELD_SIZE = 4
CONFIG_SIZE_BASE = 8
"""num_pages and actual only."""
CONFIG_SIZE_HINT = 12
"""Up to free_page_hint_cmd_id."""
CONFIG_SIZE_FULL = 16
"""Up to poison_val."""
CONFIG_SIZES = (CONFIG_SIZE_BASE, CONFIG_SIZE_HINT, CONFIG_SIZE_FULL)


def config_size(offered_features: int, qemu_4_0_config_size: bool = False) -> int:
    """Config space size as QEMU 7.2 and 10.0 pick it (virtio_balloon_config_size).

    16 if PAGE_POISON is offered or the qemu-4-0-config-size quirk is on,
    12 if FREE_PAGE_HINT is offered, else 8.
    """
    if qemu_4_0_config_size or has_feature(offered_features, Feature.PAGE_POISON):
        return CONFIG_SIZE_FULL
    if has_feature(offered_features, Feature.FREE_PAGE_HINT):
        return CONFIG_SIZE_HINT
    return CONFIG_SIZE_BASE


@dataclass(frozen=True)
class BalloonConfig:
    """The configuration space fields (BAL-CFG-LEG-LE: always little endian)."""

    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    def encode(self, size: int = CONFIG_SIZE_FULL) -> bytes:
        """The first `size` bytes (8, 12 or 16) of the config space."""
        if size not in CONFIG_SIZES:
            raise DecodeError(f"config size {size} is not one of {CONFIG_SIZES}")
        try:
            full = struct.pack(
                "<4I", self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val
            )
        except struct.error as exc:
            raise DecodeError(f"config field does not fit in 32 bits: {exc}") from None
        return full[:size]

    @classmethod
    def decode(cls, data: bytes) -> BalloonConfig:
        """Parse 8, 12 or 16 config bytes; absent fields read as 0."""
        if len(data) not in CONFIG_SIZES:
            raise DecodeError(f"config space of {len(data)} bytes; expected one of {CONFIG_SIZES}")
        padded = bytes(data) + bytes(CONFIG_SIZE_FULL - len(data))
        return cls(*struct.unpack("<4I", padded))
