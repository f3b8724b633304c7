"""The fuzz input format: a versioned, compact binary encoding of a `vballoon.scenario.operations.Scenario`.

Layout of version 3 (all integers little endian):

    byte 0      format version (3; version 1 and 2 files still decode, see below)
    byte 1      device: bits 0-1 interface (0 pci-modern, 1 pci-transitional, 2 pci-transitional used
                through its legacy interface, 3 pci-legacy), bit 2 deflate-on-oom, bit 3 free-page-hint,
                bit 4 free-page-reporting, bit 5 page-poison off, bit 6 packed ring (packed=on; not on the
                legacy-only transport); bit 7 reserved (0)
    then operations, each an opcode byte (low nibble: kind, high nibble: a small argument) and fields:

    (kind by low nibble: 14 Negotiate, 1 host request, 2, 7 and 13 WriteConfig, 0, 3 and 15 ReadConfig, 4, 6, 8,
    10 and 11 AddBuffer, 12 MalformedChain, 5 FillPage, 9 Reset; the encoder writes the first code)
    Negotiate             arg bit 0: poison_val follows; u8 balloon feature bits 0-5, bit 6 INDIRECT_DESC;
                          [u32 poison_val]
    host request          arg (0-3) says which, with its fields:
      0 SetTarget           zigzag LEB128 pages_below_ram
      1 SetPollingInterval  zigzag LEB128 seconds
      2 Stop, 3 Cont        no fields
    WriteConfig           arg: width code (0: 1, 1: 2, 2: 4 bytes); u8 offset (< 32); value, `width` bytes
    ReadConfig            arg: width code; u8 offset (< 32)
    AddBuffer             arg: index into the queues usable now (inflateq, deflateq, statsq, then free_page_vq
                          and reporting_vq when their feature is negotiated); LEB128 out length, out bytes;
                          u8 count of device-writable pages (0-4), one PFN selector each
    MalformedChain        arg bit 0: queue (inflateq, deflateq), bits 1-3: kind (`MALFORMED_KINDS`, modulo its
                          length; the device's ring layout has some of them); LEB128 out length, out bytes (one
                          zero byte when empty)
    FillPage              arg: pool page (0-7); u8 byte
    Reset                 no fields

Version 2 differs from version 3 in three places: code 12 is AddBuffer, bit 6 of Negotiate's feature byte is
ignored, and bit 6 of the device byte is reserved (ignored; refused by `load`). A malformed chain of the other
ring layout's kinds, or one built of indirect tables without INDIRECT_DESC negotiated, is dropped.

Version 1 differs only in its opcode table: 0 and 15 Negotiate, 1 SetTarget, 6 SetPollingInterval, 7 Stop,
8 Cont, 14 ReadConfig, 2 and 13 WriteConfig, 4 and 10-12 AddBuffer. Its runs of 0x00 and 0xff, which
libFuzzer's mutations insert all the time, decoded as negotiations: inputs grown from the seeds held about
nine per input and one buffer, each negotiation a device reset and five queue setups on both sides. Its four
host requests, each a QMP round trip of about 500 µs on QEMU against about 20 µs for a qtest access, took a
quarter of the codes. Version 2 gives 0x00 and 0xff to ReadConfig, the cheapest operation, and one code
each to Negotiate and the host requests; buffers and config writes take the codes freed.

A PFN selector is one byte: 0-7 a page of the scenario's pool, 0xff a raw u32 PFN follows, anything else
an entry of `INTERESTING_PFNS`.

`decode(data)` turns ANY byte string into a scenario both executors can run (so every libFuzzer mutation
means something): unknown versions and codes wrap around, missing bytes read as zero, and operations the
executors cannot run are dropped (a buffer or a config write before Negotiate, a queue whose feature is
not negotiated, more descriptors than a queue holds, device-writable pages outside RAM) and config accesses
are aligned to their width. `load(path)` is the strict reader for saved files:
a file of a newer version, with reserved bits set or truncated in an operation is refused with one line
naming the file. `encode` writes the canonical form: `decode(encode(s)) == s` for every decoded `s`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from vballoon.errors import DecodeError
from vballoon.matrix import Variant
from vballoon.reference.device import DEFLATEQ, FREE_PAGE_VQ, INFLATEQ, QUEUE_MAX_SIZES, REPORTING_VQ, STATSQ
from vballoon.scenario.malformed import INDIRECT_KINDS, MALFORMED_KINDS, MALFORMED_QUEUES, kinds_for, ring_descriptors
from vballoon.scenario.operations import (HOST_REQUESTS, POOL_FIRST_PFN, POOL_PAGES, POOL_PFNS, AddBuffer,
                                          Cont, FillPage, HostRequest, MalformedChain, Negotiate, Operation, ReadConfig,
                                          Reset, Scenario, SetPollingInterval, SetTarget, Stop, WriteConfig,
                                          uses_packed_rings)
from vballoon.spec import BALLOON_FEATURES, Feature, feature_mask, has_feature

VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
INTERFACES: tuple[tuple[str, bool], ...] = (("modern", False), ("transitional", False), ("transitional", True),
                                            ("legacy", True))
"""(transport, legacy_interface) by the device byte's bits 0-1."""


class HostRequestKind:
    """The opcode kind of the host requests (QMP on QEMU); its argument picks one of `HOST_REQUESTS`."""


KINDS: tuple[type, ...] = (ReadConfig, HostRequestKind, WriteConfig, ReadConfig, AddBuffer, FillPage, AddBuffer,
                           WriteConfig, AddBuffer, Reset, AddBuffer, AddBuffer, MalformedChain, WriteConfig, Negotiate,
                           ReadConfig)
"""Operation kind by opcode low nibble: buffers and config accesses get most codes, host requests (a QMP round
trip each), negotiations (a device reset and five queue setups) and malformed chains (a device error, mostly,
which ends what the device does until the next negotiation) one each."""
VERSION_2_KINDS: tuple[type, ...] = KINDS[:12] + (AddBuffer,) + KINDS[13:]
VERSION_1_KINDS: tuple[type, ...] = (Negotiate, SetTarget, WriteConfig, ReadConfig, AddBuffer, FillPage,
                                     SetPollingInterval, Stop, Cont, Reset, AddBuffer, AddBuffer, AddBuffer,
                                     WriteConfig, ReadConfig, Negotiate)
KINDS_BY_VERSION = {1: VERSION_1_KINDS, 2: VERSION_2_KINDS, 3: KINDS}
OPCODES_BY_VERSION: dict[int, tuple[tuple[type, int], ...]] = {
    version: tuple((kinds[opcode & 0x0F], opcode >> 4) for opcode in range(256))
    for version, kinds in KINDS_BY_VERSION.items()}
"""(kind, argument) by opcode byte, by version."""
WIDTHS = (1, 2, 4)
MAX_WIDTH_CODE = len(WIDTHS) - 1
CONFIG_OFFSETS = 32
"""Config accesses reach past the 16-byte config space, where reads give all ones and writes are ignored."""
MAX_OPERATIONS = 64
MAX_OUT_BYTES = 4096
MAX_IN_PAGES = 4
QUEUE_DESCRIPTORS = 100
"""Descriptors a scenario may put on one queue between negotiations, at most the queue's size (the driver takes
back used descriptors only at a negotiation): 100, or 32 on reporting_vq. The sizes are the ones QEMU's realize
asks for (`QUEUE_MAX_SIZES`), the smallest any QEMU gives (10.0.x raises every queue to 1024), so an input means
the same on every QEMU."""
QUEUE_LIMITS = {name: min(QUEUE_DESCRIPTORS, size) for name, size in QUEUE_MAX_SIZES.items()}
"""`QUEUE_DESCRIPTORS` by queue."""
MAX_HOST_REQUESTS = 8
"""Host requests a version-2 scenario holds; later ones are dropped. Each is a QMP round trip on QEMU (0.4-0.8 ms,
20-40 qtest accesses), and libFuzzer's repeat mutations grew inputs of 30 polling interval changes in a row."""
MIN_POLL_SECONDS = 60
"""Positive polling intervals below this become this: within one input the reference's clock stands still."""
RAW_PFN = 0xFF
RAM_PAGES = 128 << 8
"""Pages of the 128 MiB guest the executors use."""
LOW_RAM_HOLE = (0xA0, 0x100)
"""PFNs 0xa0-0xff: VGA memory and the BIOS ROM, below 1 MiB."""
INTERESTING_PFNS: tuple[int, ...] = (0, 1, 0xFF, 0x100, RAM_PAGES - 1, RAM_PAGES, 0xFFFFF, 0x80000000 | POOL_FIRST_PFN,
                                     0x7FFFFFFF, 0xFFFFFFFF)
"""Page zero, the BIOS area, RAM's last page and the first past it, the firmware's last page, a pool page with
bit 31 set (sign-extended before QEMU 4.1), the largest signed and unsigned PFNs."""
NEGOTIABLE = feature_mask(*(bit for bit in BALLOON_FEATURES if bit != Feature.MUST_TELL_HOST))
"""QEMU never offers MUST_TELL_HOST; unoffered bits are masked so FEATURES_OK always holds."""
INDIRECT_BIT = 0x40
"""Bit 6 of Negotiate's feature byte (version 3): INDIRECT_DESC."""
_INDIRECT = feature_mask(Feature.INDIRECT_DESC)
PACKED_BIT = 0x40
"""Bit 6 of the device byte (version 3): packed=on."""
DEVICE_RESERVED_BITS = 0x80
VERSION_2_DEVICE_RESERVED_BITS = 0xC0


@functools.lru_cache(maxsize=256)
def offered_balloon_features(variant: Variant) -> int:
    """The balloon feature bits QEMU 7.2 and 10.0 offer for `variant` (the reference's), without MUST_TELL_HOST."""
    return variant.reference_properties().offered_features & NEGOTIABLE


@functools.lru_cache(maxsize=256)
def negotiable_features(variant: Variant) -> int:
    """What a Negotiate of a scenario may accept for `variant`: `offered_balloon_features` and INDIRECT_DESC when
    offered."""
    return variant.reference_properties().offered_features & (NEGOTIABLE | _INDIRECT)


def features_from_byte(byte: int, version: int) -> int:
    """The features Negotiate's feature byte asks for (bit 6, INDIRECT_DESC, from version 3 on)."""
    return byte & NEGOTIABLE | (_INDIRECT if byte & INDIRECT_BIT and version >= 3 else 0)


def features_byte(features: int) -> int:
    """The inverse of `features_from_byte` for version 3."""
    return features & NEGOTIABLE | (INDIRECT_BIT if features & _INDIRECT else 0)


# --- the device byte ---------------------------------------------------------------


def device_byte(variant: Variant, legacy_interface: bool) -> int:
    """Byte 1 for a variant seen through one interface."""
    try:
        interface = INTERFACES.index((variant.transport, legacy_interface))
    except ValueError:
        raise DecodeError(f"variant {variant.name} has no {'legacy' if legacy_interface else 'modern'} "
                          "interface") from None
    return (interface | variant.deflate_on_oom << 2 | variant.free_page_hint << 3
            | variant.free_page_reporting << 4 | (not variant.page_poison) << 5 | variant.packed << 6)


@functools.lru_cache(maxsize=512)
def device_from_byte(byte: int, packed_bit: bool = False) -> tuple[Variant, bool]:
    """The variant and interface byte 1 names, bit 6 (packed) only with `packed_bit` (version 3) and not on the
    legacy-only transport, reserved bits ignored; cached, as every input asks."""
    transport, legacy_interface = INTERFACES[byte & 3]
    return Variant(transport=transport, deflate_on_oom=bool(byte & 4), free_page_hint=bool(byte & 8),
                   free_page_reporting=bool(byte & 16), page_poison=not byte & 32,
                   packed=packed_bit and bool(byte & PACKED_BIT) and transport != "legacy"), legacy_interface


# --- validity: what both executors can run ------------------------------------------


def writable_page(pfn: int) -> bool:
    """Whether a device-writable buffer may cover page `pfn`: guest RAM outside the legacy VGA/BIOS hole.

    QEMU maps every descriptor when it pops a chain, and a page it cannot map for writing is a device
    error; the reference does not model mapping, so such pages stay out of scenarios.
    """
    return 0 < pfn < LOW_RAM_HOLE[0] or LOW_RAM_HOLE[1] <= pfn < RAM_PAGES


def _aligned(offset: int, width: int) -> int:
    """A config offset aligned down to the access width, as drivers align them (virtio 4.1.3.1)."""
    return offset - offset % width


@functools.lru_cache(maxsize=128)
def _usable_queues(features: int | None) -> tuple[str, ...]:
    """`ScenarioState.usable_queues` by negotiated features; cached, as every buffer asks."""
    if features is None:
        return ()
    names = [INFLATEQ, DEFLATEQ, STATSQ]
    names += [FREE_PAGE_VQ] if has_feature(features, Feature.FREE_PAGE_HINT) else []
    names += [REPORTING_VQ] if has_feature(features, Feature.REPORTING) else []
    return tuple(names)


@dataclass
class ScenarioState:
    """What decides which operations are valid next: negotiated features and descriptors used per queue."""

    variant: Variant
    features: int | None = None
    descriptors: dict[str, int] = field(default_factory=dict)
    host_requests_left: int | None = MAX_HOST_REQUESTS
    """Host requests still admitted (None: no limit, as in version 1)."""
    packed_rings: bool = False
    """Negotiations take the packed layout (`uses_packed_rings`): the malformed chains are the packed kinds."""
    _offered: int | None = field(default=None, init=False, repr=False, compare=False)
    """`negotiable_features(variant)` once a Negotiate asked for it."""

    def usable_queues(self) -> tuple[str, ...]:
        """Queues a buffer may go to now (none before Negotiate)."""
        return _usable_queues(self.features)

    def admit(self, op: Operation) -> Operation | None:
        """`op` made runnable in this state (or None to drop it); the state follows it. An operation runnable as it
        is comes back itself."""
        kind = type(op)
        if kind is ReadConfig:
            return op if not op.offset % op.width else ReadConfig(_aligned(op.offset, op.width), op.width)
        if kind is WriteConfig:
            if self.features is not None and not op.offset % op.width:
                return op
            return self.config_write(op.offset, op.width, op.value)
        if kind is Negotiate:
            features = self.negotiate(op.features)
            return op if features == op.features else Negotiate(features, op.poison_val)
        if kind is AddBuffer:
            admitted = self.buffer_fields(op.queue, op.out, op.in_pfns)
            if admitted is None:
                return None
            return op if admitted == (op.out, op.in_pfns) else AddBuffer(op.queue, *admitted)
        if kind is MalformedChain:
            out = self.malformed_fields(op.queue, op.kind, op.out)
            return None if out is None else op if out == op.out else MalformedChain(op.queue, op.kind, out)
        if kind is Reset:
            self.features, self.descriptors = None, {}
        elif kind in HOST_REQUESTS:
            return self.host_request(op)
        return op

    def negotiate(self, features: int) -> int:
        """The features a Negotiate of `features` gets (the offered ones), now the state's."""
        if self._offered is None:
            self._offered = negotiable_features(self.variant)
        self.features, self.descriptors = features & self._offered, {}
        return self.features

    def host_request(self, op: HostRequest) -> HostRequest | None:
        """The host request made runnable, counted: None past the limit, a polling interval at least
        MIN_POLL_SECONDS."""
        if self.host_requests_left is not None:
            if not self.host_requests_left:
                return None
            self.host_requests_left -= 1
        if isinstance(op, SetPollingInterval) and 0 < op.seconds < MIN_POLL_SECONDS:
            return SetPollingInterval(MIN_POLL_SECONDS)
        return op

    def malformed_fields(self, queue: str, kind: str, out: bytes) -> bytes | None:
        """The out bytes of a malformed chain made runnable (one zero byte if empty), its ring descriptors counted;
        None to drop it: a queue that takes none or is not usable now, a kind of the other ring layout, indirect
        tables without INDIRECT_DESC, or too few descriptors left."""
        if queue not in MALFORMED_QUEUES or queue not in _usable_queues(self.features) or \
                kind not in kinds_for(self.packed_rings):
            return None
        assert self.features is not None
        if kind in INDIRECT_KINDS and not self.features & _INDIRECT:
            return None
        used = self.descriptors.get(queue, 0) + ring_descriptors(kind)
        if used > QUEUE_LIMITS[queue]:
            return None
        self.descriptors[queue] = used
        return out or bytes(1)

    def config_write(self, offset: int, width: int, value: int) -> WriteConfig | None:
        """The config write made runnable: aligned; None before Negotiate."""
        return None if self.features is None else WriteConfig(_aligned(offset, width), width, value)

    def buffer_fields(self, queue: str, out: bytes, in_pfns: tuple[int, ...]) -> tuple[bytes, tuple[int, ...]] | None:
        """The out bytes and device-writable pages of a buffer on `queue` made runnable, now counted: without pages
        the device cannot write (all on statsq), one byte out if nothing is left; None to drop the buffer (a queue not
        usable now or short of descriptors)."""
        if queue not in _usable_queues(self.features):
            return None
        in_pfns = () if queue == STATSQ or not in_pfns else tuple(filter(writable_page, in_pfns))
        if not out and not in_pfns:
            out = bytes(1)
        used = self.descriptors.get(queue, 0) + bool(out) + len(in_pfns)
        if used > QUEUE_LIMITS[queue]:
            return None
        self.descriptors[queue] = used
        return out, in_pfns


# --- decoding --------------------------------------------------------------------------


class Truncated(DecodeError):
    """The data ended inside an operation."""


PAD = bytes(8)
"""Zeros the decoder reads past the end of the data. An operation starts before the end and reads at most 7 bytes
past it: a buffer of four pages whose first PFN selector, the data's last byte, asks for a raw u32 reads the u32 and
three more selectors."""
SELECTED_PFNS: tuple[int | None, ...] = tuple(
    None if selector == RAW_PFN else POOL_PFNS[selector] if selector < POOL_PAGES
    else INTERESTING_PFNS[(selector - POOL_PAGES) % len(INTERESTING_PFNS)] for selector in range(256))
"""The PFN each selector byte names (None: a raw u32 follows)."""
READS: tuple[tuple[ReadConfig, ...], ...] = tuple(
    tuple(ReadConfig(_aligned(offset, width), width) for offset in range(CONFIG_OFFSETS)) for width in WIDTHS)
"""The config reads by width code and offset, aligned. Decoded scenarios share the operations that take few values
(operations are frozen, and building one costs more than decoding it): these, `NEGOTIATIONS` and the page fills."""
NEGOTIATIONS: tuple[Negotiate, ...] = tuple(Negotiate(features) for features in range(NEGOTIABLE + 1))
"""The negotiations without poison_val, by features."""
_fill_page = functools.cache(FillPage)  # 8 pages times 256 bytes at most


def _short(end: int, size: int, length: int) -> Truncated:
    """Strict decoding's error for a read of `size` bytes ending at `end`, past the `length` bytes of data: short
    by the bytes it missed, or by one when it began past the end (a one-byte read before it ran out first)."""
    return Truncated(f"ends {end - length if end - size <= length else 1} byte(s) short at offset {length}")


def _read_uint(buf: bytes, pos: int, size: int, length: int, strict: bool) -> tuple[int, int]:
    """The `size`-byte integer at `pos` and the position after it; strict: Truncated past `length`."""
    end = pos + size
    if end > length and strict:
        raise _short(end, size, length)
    return int.from_bytes(buf[pos:end], "little"), end


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The LEB128 integer (10 bytes at most) at `pos` and the position after it."""
    byte = buf[pos]
    value, shift, end = byte & 0x7F, 7, pos + 1
    while byte & 0x80 and end < pos + 10:
        byte = buf[end]
        value |= (byte & 0x7F) << shift
        shift += 7
        end += 1
    return value, end


def _out_bytes(buf: bytes, pos: int, length: int, strict: bool) -> tuple[bytes, int]:
    """A LEB128 length and that many bytes at `pos` (at most MAX_OUT_BYTES, from the data only), and the position
    after them."""
    size, pos = _read_varint(buf, pos)
    if pos > length and strict:
        raise _short(pos, 1, length)
    if size > MAX_OUT_BYTES:
        if strict:
            raise DecodeError(f"buffer of {size} bytes, at most {MAX_OUT_BYTES}")
        size = MAX_OUT_BYTES
    end = pos + size
    if end > length:  # the out bytes come from the data only
        if strict:
            raise _short(end, size, length)
        end = max(pos, length)
    return buf[pos:end], end


def _malformed(buf: bytes, pos: int, length: int, state: ScenarioState, arg: int,
               strict: bool) -> tuple[MalformedChain | None, int]:
    """The MalformedChain whose fields start at `pos` (`arg`: its opcode's), admitted, and the position after it."""
    out, pos = _out_bytes(buf, pos, length, strict)
    queue, kind = MALFORMED_QUEUES[arg & 1], MALFORMED_KINDS[(arg >> 1) % len(MALFORMED_KINDS)]
    if strict and arg >> 1 >= len(MALFORMED_KINDS):
        raise DecodeError(f"malformed chain kind {arg >> 1}")
    admitted = state.malformed_fields(queue, kind, out)
    return (None if admitted is None else MalformedChain(queue, kind, admitted)), pos


def _buffer(buf: bytes, pos: int, length: int, state: ScenarioState, arg: int,
            strict: bool) -> tuple[AddBuffer | None, int]:
    """The AddBuffer whose fields start at `pos` (`arg`: its opcode's), admitted, and the position after it."""
    out, end = _out_bytes(buf, pos, length, strict)
    count, pos = buf[end], end + 1
    if count > MAX_IN_PAGES and strict:
        raise DecodeError(f"{count} device-writable pages, at most {MAX_IN_PAGES}")
    in_pfns: tuple[int, ...] = ()
    for _ in range(count % (MAX_IN_PAGES + 1)):
        pfn = SELECTED_PFNS[buf[pos]]
        pos += 1
        if pfn is None:
            pfn, pos = _read_uint(buf, pos, 4, length, strict)
        in_pfns += (pfn,)
    queues = state.usable_queues()  # none before Negotiate: the buffer is dropped
    if not queues:
        return None, pos
    queue = queues[arg % len(queues)]
    admitted = state.buffer_fields(queue, out, in_pfns)
    return (None if admitted is None else AddBuffer(queue, *admitted)), pos


VERSION_PROBLEMS: tuple[str | None, ...] = tuple(
    None if version in SUPPORTED_VERSIONS else f"format version {version} " + (
        f"is newer than this vballoon reads (up to {VERSION}); replay it with a newer vballoon" if version > VERSION
        else f"is unknown (this vballoon reads {', '.join(map(str, SUPPORTED_VERSIONS))})") for version in range(256))
"""Why strict decoding refuses a version byte (None: it does not)."""


def _check_header(data: bytes) -> None:
    """Strict decoding's checks of the version and device bytes."""
    if not data:
        raise DecodeError("empty")
    if VERSION_PROBLEMS[data[0]]:
        raise DecodeError(VERSION_PROBLEMS[data[0]])
    if len(data) < 2:
        raise _short(2, 1, 1)
    if data[1] & (DEVICE_RESERVED_BITS if data[0] >= 3 else VERSION_2_DEVICE_RESERVED_BITS):
        raise DecodeError(f"reserved device bits set in {data[1]:#04x}")
    if data[1] & PACKED_BIT and INTERFACES[data[1] & 3][0] == "legacy":
        raise DecodeError(f"device byte {data[1]:#04x} asks a packed ring of the legacy-only transport")


def decode(data: bytes, *, strict: bool = False, device: int | None = None) -> Scenario:
    """The scenario `data` encodes. Lenient (default): any bytes give a runnable scenario. Strict: DecodeError
    on a version this code does not read, reserved bits, unknown codes or truncation. `device` replaces the
    data's device byte, read as the current version reads it whatever the data's version (a fuzz target that
    fuzzes one device: its packed ring stays packed).

    One loop reads `data` followed by `PAD` (missing bytes read as zero; strict decoding checks the reads that
    may end past the data, and the position after each operation) and admits each operation as it is read:
    the same as `ScenarioState.admit` on the operation as written.
    """
    if strict:
        _check_header(data)
    buf, length = data + PAD, len(data)
    version = buf[0]
    opcodes = OPCODES_BY_VERSION.get(version, OPCODES_BY_VERSION[VERSION])  # lenient: unknown versions as the current
    variant, legacy_interface = (device_from_byte(buf[1], version >= 3) if device is None
                                 else device_from_byte(device, True))
    state = ScenarioState(variant, None, {}, None if version == 1 else MAX_HOST_REQUESTS,  # version 1: no limit
                          uses_packed_rings(variant, legacy_interface))
    operations: list[Operation] = []
    op: Operation | None
    pos = 2
    try:
        while pos < length and len(operations) < MAX_OPERATIONS:
            start = pos
            kind, arg = opcodes[buf[pos]]
            pos += 1
            if kind is ReadConfig or kind is WriteConfig:
                code = arg & 3
                if code > MAX_WIDTH_CODE:
                    if strict:
                        raise DecodeError(f"config access width code {code}")
                    code = MAX_WIDTH_CODE
                offset = buf[pos]
                if offset >= CONFIG_OFFSETS:
                    if strict:
                        raise DecodeError(f"config offset {offset} at offset {pos}")
                    offset %= CONFIG_OFFSETS
                pos += 1
                if kind is ReadConfig:
                    op = READS[code][offset]
                else:
                    width = WIDTHS[code]
                    end = pos + width
                    if end > length and strict:
                        raise _short(end, width, length)
                    op = state.config_write(offset, width, int.from_bytes(buf[pos:end], "little"))
                    pos = end
            elif kind is AddBuffer:
                op, pos = _buffer(buf, pos, length, state, arg, strict)
            elif kind is MalformedChain:
                op, pos = _malformed(buf, pos, length, state, arg, strict)
            elif kind is Negotiate:
                features = state.negotiate(features_from_byte(buf[pos], version))
                if arg & 1:
                    poison_val, pos = _read_uint(buf, pos + 1, 4, length, strict)
                    op = Negotiate(features, poison_val)
                else:
                    op, pos = NEGOTIATIONS[features] if features <= NEGOTIABLE else Negotiate(features), pos + 1
            elif kind is FillPage:  # always runnable
                op = _fill_page(POOL_PFNS[arg % POOL_PAGES], buf[pos])
                pos += 1
            else:
                if kind is HostRequestKind:
                    if arg >= len(HOST_REQUESTS) and strict:
                        raise DecodeError(f"host request code {arg} at offset {start}")
                    kind = HOST_REQUESTS[arg % len(HOST_REQUESTS)]
                if kind is Reset:
                    op = state.admit(Reset())
                elif kind is SetTarget or kind is SetPollingInterval:
                    raw, pos = _read_varint(buf, pos)
                    bound = 1 << 31 if kind is SetTarget else 1 << 33
                    op = state.host_request(kind(max(-bound, min((raw >> 1) ^ -(raw & 1), bound))))  # zigzag
                else:
                    op = state.host_request(kind())
            if pos > length and strict:
                raise _short(pos, 1, length)  # a one-byte read ran out: the longer ones check themselves
            if op is not None:
                operations.append(op)
    except Truncated as error:
        raise Truncated(f"operation {len(operations) + 1} (at offset {start}) {error}") from None
    if strict and pos < length:
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
        return bytes([kind | (op.poison_val is not None) << 4, features_byte(op.features)]) + poison
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
    if isinstance(op, MalformedChain):
        arg = MALFORMED_QUEUES.index(op.queue) | MALFORMED_KINDS.index(op.kind) << 1
        return bytes([kind | arg << 4]) + _varint(len(op.out)) + op.out
    if isinstance(op, FillPage):
        return bytes([kind | POOL_PFNS.index(op.pfn) << 4, op.byte])
    if isinstance(op, SetPollingInterval):
        return bytes([kind]) + _zigzag(op.seconds)
    return bytes([kind])


def encode(scenario: Scenario) -> bytes:
    """The canonical bytes of `scenario` (current version); DecodeError if it cannot be expressed."""
    state = ScenarioState(scenario.variant, packed_rings=uses_packed_rings(scenario.variant, scenario.legacy_interface))
    out = bytearray([VERSION, device_byte(scenario.variant, scenario.legacy_interface)])
    for number, op in enumerate(scenario.operations, 1):
        try:
            out += _encode_operation(op, state)
        except (ValueError, OverflowError) as error:
            raise DecodeError(f"operation {number} {op!r} cannot be encoded: {error}") from None
        state.admit(op)
    return bytes(out)
