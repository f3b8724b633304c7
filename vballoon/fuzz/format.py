"""The fuzz input format: a versioned, compact binary encoding of a `vballoon.transport.Scenario`.

Layout of version 2 (all integers little endian):

    byte 0      format version (2; version 1 files still decode, see below)
    byte 1      device: bits 0-1 interface (0 pci-modern, 1 pci-transitional, 2 pci-transitional used
                through its legacy interface, 3 pci-legacy), bit 2 deflate-on-oom, bit 3 free-page-hint,
                bit 4 free-page-reporting, bit 5 page-poison off; bits 6-7 reserved (0)
    then operations, each an opcode byte (low nibble: kind, high nibble: a small argument) and fields:

    (kind by low nibble: 14 Negotiate, 1 host request, 2, 7 and 13 WriteConfig, 0, 3 and 15 ReadConfig, 4, 6, 8
    and 10-12 AddBuffer, 5 FillPage, 9 Reset; the encoder writes the first code)
    Negotiate             arg bit 0: poison_val follows; u8 balloon feature bits 0-5; [u32 poison_val]
    host request          arg (0-3) says which, with its fields:
      0 SetTarget           zigzag LEB128 pages_below_ram
      1 SetPollingInterval  zigzag LEB128 seconds
      2 Stop, 3 Cont        no fields
    WriteConfig           arg: width code (0: 1, 1: 2, 2: 4 bytes); u8 offset (< 32); value, `width` bytes
    ReadConfig            arg: width code; u8 offset (< 32)
    AddBuffer             arg: index into the queues usable now (inflateq, deflateq, statsq, then free_page_vq
                          and reporting_vq when their feature is negotiated); LEB128 out length, out bytes;
                          u8 count of device-writable pages (0-4), one PFN selector each
    FillPage              arg: pool page (0-7); u8 byte
    Reset                 no fields

Version 1 differs only in its opcode table: 0 and 15 Negotiate, 1 SetTarget, 6 SetPollingInterval, 7 Stop,
8 Cont, 14 ReadConfig, 2 and 13 WriteConfig, 4 and 10-12 AddBuffer. Its runs of 0x00 and 0xff, which
libFuzzer's mutations insert all the time, decoded as negotiations: inputs grown from the seeds held about
nine per input and one buffer, each negotiation a device reset and five queue setups on both sides. Its four
host requests, each a QMP round trip of about 500 µs on QEMU against about 20 µs for a qtest access, took a
quarter of the codes. Version 2 gives 0x00 and 0xff to ReadConfig, the cheapest operation, and one code
each to Negotiate and the host requests; buffers and config writes take the codes freed.

A PFN selector is one byte: 0-7 a page of the scenario's pool, 0xff a raw u32 PFN follows, anything else
an entry of `INTERESTING_PFNS`.

`decode(data)` turns ANY byte string into a scenario both transports can run (so every libFuzzer mutation
means something): unknown versions and codes wrap around, missing bytes read as zero, and operations the
transports cannot run are dropped (a buffer or a config write before Negotiate, a queue whose feature is
not negotiated, more descriptors than a queue holds, device-writable pages outside RAM) and config accesses
are aligned to their width. `load(path)` is the strict reader for saved files:
a file of a newer version, with reserved bits set or truncated in an operation is refused with one line
naming the file. `encode` writes the canonical form: `decode(encode(s)) == s` for every decoded `s`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from vballoon.errors import DecodeError
from vballoon.matrix import Variant
from vballoon.reference.device import DEFLATEQ, FREE_PAGE_VQ, INFLATEQ, QUEUE_MAX_SIZES, REPORTING_VQ, STATSQ
from vballoon.spec import BALLOON_FEATURES, Feature, feature_mask, has_feature
from vballoon.transport import (HOST_REQUESTS, MEMORY_MIB, POOL_FIRST_PFN, POOL_PFNS, AddBuffer, Cont, FillPage,
                                Negotiate, Operation, ReadConfig, Reset, Scenario, SetPollingInterval, SetTarget, Stop,
                                WriteConfig, reference_properties)

VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
INTERFACES: tuple[tuple[str, bool], ...] = (("modern", False), ("transitional", False), ("transitional", True),
                                            ("legacy", True))
"""(transport, legacy_interface) by the device byte's bits 0-1."""


class HostRequestKind:
    """The opcode kind of the host requests (QMP on QEMU); its argument picks one of `HOST_REQUESTS`."""


KINDS: tuple[type, ...] = (ReadConfig, HostRequestKind, WriteConfig, ReadConfig, AddBuffer, FillPage, AddBuffer,
                           WriteConfig, AddBuffer, Reset, AddBuffer, AddBuffer, AddBuffer, WriteConfig, Negotiate,
                           ReadConfig)
"""Operation kind by opcode low nibble: buffers and config accesses get most codes, host requests (a QMP round
trip each) and negotiations (a device reset and five queue setups) one each."""
VERSION_1_KINDS: tuple[type, ...] = (Negotiate, SetTarget, WriteConfig, ReadConfig, AddBuffer, FillPage,
                                     SetPollingInterval, Stop, Cont, Reset, AddBuffer, AddBuffer, AddBuffer,
                                     WriteConfig, ReadConfig, Negotiate)
KINDS_BY_VERSION = {1: VERSION_1_KINDS, 2: KINDS}
WIDTHS = (1, 2, 4)
CONFIG_OFFSETS = 32
"""Config accesses reach past the 16-byte config space, where reads give all ones and writes are ignored."""
MAX_OPERATIONS = 64
MAX_OUT_BYTES = 4096
MAX_IN_PAGES = 4
QUEUE_DESCRIPTORS = 100
"""Descriptors a scenario may put on one queue between negotiations, at most the queue's size (the driver takes
back used descriptors only at a negotiation): 100, or 32 on reporting_vq (`QUEUE_MAX_SIZES`)."""
MAX_HOST_REQUESTS = 8
"""Host requests a version-2 scenario holds; later ones are dropped. Each is a QMP round trip on QEMU (0.4-0.8 ms,
20-40 qtest accesses), and libFuzzer's repeat mutations grew inputs of 30 polling interval changes in a row."""
MIN_POLL_SECONDS = 60
"""Positive polling intervals below this become this: within one input the reference's clock stands still."""
RAW_PFN = 0xFF
RAM_PAGES = 128 << 8
"""Pages of the 128 MiB guest the transports use."""
LOW_RAM_HOLE = (0xA0, 0x100)
"""PFNs 0xa0-0xff: VGA memory and the BIOS ROM, below 1 MiB."""
INTERESTING_PFNS: tuple[int, ...] = (0, 1, 0xFF, 0x100, RAM_PAGES - 1, RAM_PAGES, 0xFFFFF, 0x80000000 | POOL_FIRST_PFN,
                                     0x7FFFFFFF, 0xFFFFFFFF)
"""Page zero, the BIOS area, RAM's last page and the first past it, the firmware's last page, a pool page with
bit 31 set (sign-extended before QEMU 4.1), the largest signed and unsigned PFNs."""
NEGOTIABLE = feature_mask(*(bit for bit in BALLOON_FEATURES if bit != Feature.MUST_TELL_HOST))
"""QEMU never offers MUST_TELL_HOST; unoffered bits are masked so FEATURES_OK always holds."""
DEVICE_RESERVED_BITS = 0xC0


@functools.lru_cache(maxsize=256)
def offered_balloon_features(variant: Variant) -> int:
    """The balloon feature bits QEMU 7.2 offers for `variant` (the reference's), without MUST_TELL_HOST."""
    return reference_properties(variant, False, MEMORY_MIB << 20).offered_features & NEGOTIABLE


# --- the device byte ---------------------------------------------------------------


def device_byte(variant: Variant, legacy_interface: bool) -> int:
    """Byte 1 for a variant seen through one interface."""
    try:
        interface = INTERFACES.index((variant.transport, legacy_interface))
    except ValueError:
        raise DecodeError(f"variant {variant.name} has no {'legacy' if legacy_interface else 'modern'} "
                          "interface") from None
    return (interface | variant.deflate_on_oom << 2 | variant.free_page_hint << 3
            | variant.free_page_reporting << 4 | (not variant.page_poison) << 5)


@functools.lru_cache(maxsize=256)
def device_from_byte(byte: int) -> tuple[Variant, bool]:
    """The variant and interface byte 1 names (reserved bits ignored); cached, as every input asks."""
    transport, legacy_interface = INTERFACES[byte & 3]
    return Variant(transport=transport, deflate_on_oom=bool(byte & 4), free_page_hint=bool(byte & 8),
                   free_page_reporting=bool(byte & 16), page_poison=not byte & 32), legacy_interface


# --- validity: what both transports can run -----------------------------------------


def writable_page(pfn: int) -> bool:
    """Whether a device-writable buffer may cover page `pfn`: guest RAM outside the legacy VGA/BIOS hole.

    QEMU maps every descriptor when it pops a chain, and a page it cannot map for writing is a device
    error; the reference does not model mapping, so such pages stay out of scenarios.
    """
    return 0 < pfn < LOW_RAM_HOLE[0] or LOW_RAM_HOLE[1] <= pfn < RAM_PAGES


@dataclass
class ScenarioState:
    """What decides which operations are valid next: negotiated features and descriptors used per queue."""

    variant: Variant
    features: int | None = None
    descriptors: dict[str, int] = field(default_factory=dict)
    host_requests_left: int | None = MAX_HOST_REQUESTS
    """Host requests still admitted (None: no limit, as in version 1)."""

    def usable_queues(self) -> tuple[str, ...]:
        """Queues a buffer may go to now (none before Negotiate)."""
        if self.features is None:
            return ()
        names = [INFLATEQ, DEFLATEQ, STATSQ]
        names += [FREE_PAGE_VQ] if has_feature(self.features, Feature.FREE_PAGE_HINT) else []
        names += [REPORTING_VQ] if has_feature(self.features, Feature.REPORTING) else []
        return tuple(names)

    def admit(self, op: Operation) -> Operation | None:
        """`op` made runnable in this state (or None to drop it); the state follows it."""
        if isinstance(op, Negotiate):
            op = Negotiate(op.features & offered_balloon_features(self.variant), op.poison_val)
            self.features, self.descriptors = op.features, {}
        elif isinstance(op, Reset):
            self.features, self.descriptors = None, {}
        elif isinstance(op, (WriteConfig, AddBuffer)) and self.features is None:
            return None
        elif isinstance(op, (WriteConfig, ReadConfig)) and op.offset % op.width:
            return dataclasses.replace(op, offset=op.offset - op.offset % op.width)  # drivers align (virtio 4.1.3.1)
        elif isinstance(op, AddBuffer):
            if op.queue not in self.usable_queues():
                return None
            in_pfns = () if op.queue == STATSQ else tuple(filter(writable_page, op.in_pfns))
            op = AddBuffer(op.queue, op.out if op.out or in_pfns else bytes(1), in_pfns)
            used = self.descriptors.get(op.queue, 0) + bool(op.out) + len(op.in_pfns)
            if used > min(QUEUE_DESCRIPTORS, QUEUE_MAX_SIZES[op.queue]):
                return None
            self.descriptors[op.queue] = used
        if isinstance(op, HOST_REQUESTS) and self.host_requests_left is not None:
            if not self.host_requests_left:
                return None
            self.host_requests_left -= 1
        if isinstance(op, SetPollingInterval) and 0 < op.seconds < MIN_POLL_SECONDS:
            op = SetPollingInterval(MIN_POLL_SECONDS)
        return op


# --- decoding --------------------------------------------------------------------------


class Truncated(DecodeError):
    """The data ended inside an operation."""


class _Reader:
    """Bytes consumed from the front; past the end: zeros (lenient) or `Truncated` (strict)."""

    def __init__(self, data: bytes, strict: bool) -> None:
        self.data = data
        self.pos = 0
        self.strict = strict

    def more(self) -> bool:
        return self.pos < len(self.data)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        if len(chunk) < n:
            if self.strict:
                raise Truncated(f"ends {n - len(chunk)} byte(s) short at offset {len(self.data)}")
            chunk += bytes(n - len(chunk))
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def varint(self) -> int:
        value = shift = 0
        for _ in range(10):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return value

    def zigzag(self) -> int:
        raw = self.varint()
        return (raw >> 1) ^ -(raw & 1)


def _width(code: int, strict: bool) -> int:
    if code >= len(WIDTHS):
        if strict:
            raise DecodeError(f"config access width code {code}")
        code = len(WIDTHS) - 1
    return WIDTHS[code]


def _pfn(reader: _Reader) -> int:
    selector = reader.u8()
    if selector < len(POOL_PFNS):
        return POOL_PFNS[selector]
    if selector == RAW_PFN:
        return reader.uint(4)
    return INTERESTING_PFNS[(selector - len(POOL_PFNS)) % len(INTERESTING_PFNS)]


def _operation(reader: _Reader, state: ScenarioState, kinds: tuple[type, ...]) -> Operation:
    """One operation as written, before `ScenarioState.admit`; `kinds`: the version's opcode table."""
    opcode = reader.u8()
    cls, arg = kinds[opcode & 0x0F], opcode >> 4
    if cls is HostRequestKind:
        if arg >= len(HOST_REQUESTS) and reader.strict:
            raise DecodeError(f"host request code {arg} at offset {reader.pos - 1}")
        cls = HOST_REQUESTS[arg % len(HOST_REQUESTS)]
    if cls is Negotiate:
        features = reader.u8()
        return Negotiate(features & NEGOTIABLE, reader.uint(4) if arg & 1 else None)
    if cls is SetTarget:
        return SetTarget(max(-(1 << 31), min(reader.zigzag(), 1 << 31)))
    if cls in (WriteConfig, ReadConfig):
        width = _width(arg & 3, reader.strict)
        offset = reader.u8()
        if offset >= CONFIG_OFFSETS:
            if reader.strict:
                raise DecodeError(f"config offset {offset} at offset {reader.pos - 1}")
            offset %= CONFIG_OFFSETS
        return WriteConfig(offset, width, reader.uint(width)) if cls is WriteConfig else ReadConfig(offset, width)
    if cls is AddBuffer:
        queues = state.usable_queues() or (INFLATEQ,)
        queue = queues[arg % len(queues)]
        length = reader.varint()
        if length > MAX_OUT_BYTES and reader.strict:
            raise DecodeError(f"buffer of {length} bytes, at most {MAX_OUT_BYTES}")
        if reader.strict:
            out = reader.take(length)
        else:
            out = reader.data[reader.pos:reader.pos + min(length, MAX_OUT_BYTES)]
            reader.pos += len(out)
        count = reader.u8()
        if count > MAX_IN_PAGES and reader.strict:
            raise DecodeError(f"{count} device-writable pages, at most {MAX_IN_PAGES}")
        return AddBuffer(queue, bytes(out), tuple(_pfn(reader) for _ in range(count % (MAX_IN_PAGES + 1))))
    if cls is FillPage:
        return FillPage(POOL_PFNS[arg % len(POOL_PFNS)], reader.u8())
    if cls is SetPollingInterval:
        return SetPollingInterval(max(-(1 << 33), min(reader.zigzag(), 1 << 33)))
    return cls()


def decode(data: bytes, *, strict: bool = False) -> Scenario:
    """The scenario `data` encodes. Lenient (default): any bytes give a runnable scenario. Strict: DecodeError
    on a version this code does not read, reserved bits, unknown codes or truncation."""
    reader = _Reader(data, strict)
    if strict:
        if not data:
            raise DecodeError("empty")
        if data[0] not in SUPPORTED_VERSIONS:
            newer = data[0] > VERSION
            raise DecodeError(f"format version {data[0]} " + (
                f"is newer than this vballoon reads (up to {VERSION}); replay it with a newer vballoon" if newer
                else f"is unknown (this vballoon reads {', '.join(map(str, SUPPORTED_VERSIONS))})"))
    kinds = KINDS_BY_VERSION.get(reader.u8(), KINDS)  # the lenient decoder reads unknown versions as the current
    device = reader.u8()
    if strict and device & DEVICE_RESERVED_BITS:
        raise DecodeError(f"reserved device bits set in {device:#04x}")
    variant, legacy_interface = device_from_byte(device)
    state = ScenarioState(variant, host_requests_left=None if kinds is VERSION_1_KINDS else MAX_HOST_REQUESTS)
    operations: list[Operation] = []
    while reader.more() and len(operations) < MAX_OPERATIONS:
        start = reader.pos
        try:
            op = _operation(reader, state, kinds)
        except Truncated as error:
            raise Truncated(f"operation {len(operations) + 1} (at offset {start}) {error}") from None
        admitted = state.admit(op)
        if admitted is not None:
            operations.append(admitted)
    if strict and reader.more():
        raise DecodeError(f"more than {MAX_OPERATIONS} operations")
    return Scenario(variant, legacy_interface, tuple(operations))


def load(path: Path) -> Scenario:
    """A saved input read strictly; DecodeError with one line naming `path` when it cannot be replayed."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DecodeError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return decode(data, strict=True)
    except DecodeError as error:
        raise DecodeError(f"{path}: not a replayable vballoon fuzz input: {error}") from None


# --- encoding --------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _zigzag(value: int) -> bytes:
    return _varint(value << 1 if value >= 0 else (-value << 1) - 1)


def _pfn_bytes(pfn: int) -> bytes:
    if pfn in POOL_PFNS:
        return bytes([POOL_PFNS.index(pfn)])
    if pfn in INTERESTING_PFNS:
        return bytes([len(POOL_PFNS) + INTERESTING_PFNS.index(pfn)])
    return bytes([RAW_PFN]) + pfn.to_bytes(4, "little")


def _encode_operation(op: Operation, state: ScenarioState) -> bytes:
    if type(op) in HOST_REQUESTS:
        kind = KINDS.index(HostRequestKind) | HOST_REQUESTS.index(type(op)) << 4
    else:
        kind = KINDS.index(type(op))
    if isinstance(op, Negotiate):
        poison = b"" if op.poison_val is None else op.poison_val.to_bytes(4, "little")
        return bytes([kind | (op.poison_val is not None) << 4, op.features]) + poison
    if isinstance(op, SetTarget):
        return bytes([kind]) + _zigzag(op.pages_below_ram)
    if isinstance(op, WriteConfig):
        return bytes([kind | WIDTHS.index(op.width) << 4, op.offset]) + op.value.to_bytes(op.width, "little")
    if isinstance(op, ReadConfig):
        return bytes([kind | WIDTHS.index(op.width) << 4, op.offset])
    if isinstance(op, AddBuffer):
        arg = state.usable_queues().index(op.queue)
        return (bytes([kind | arg << 4]) + _varint(len(op.out)) + op.out + bytes([len(op.in_pfns)])
                + b"".join(_pfn_bytes(pfn) for pfn in op.in_pfns))
    if isinstance(op, FillPage):
        return bytes([kind | POOL_PFNS.index(op.pfn) << 4, op.byte])
    if isinstance(op, SetPollingInterval):
        return bytes([kind]) + _zigzag(op.seconds)
    return bytes([kind])


def encode(scenario: Scenario) -> bytes:
    """The canonical bytes of `scenario` (current version); DecodeError if it cannot be expressed."""
    state = ScenarioState(scenario.variant)
    out = bytearray([VERSION, device_byte(scenario.variant, scenario.legacy_interface)])
    for number, op in enumerate(scenario.operations, 1):
        try:
            out += _encode_operation(op, state)
        except (ValueError, OverflowError) as error:
            raise DecodeError(f"operation {number} {op!r} cannot be encoded: {error}") from None
        state.admit(op)
    return bytes(out)
