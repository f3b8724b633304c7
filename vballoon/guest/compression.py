"""The compressions a kernel build writes, told apart by their magic: the bzImage's payload (Kconfig's KERNEL_*
choice, lzo aside) and compressed modules (.ko.gz, .ko.xz, .ko.zst)."""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Any

import lz4.block
import zstandard

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # what a block of `lz4 -l` (the kernel's cmd_lz4) decompresses to, at most
SIZE_APPEND = 4  # the uncompressed size the kernel's build appends to a payload (size_append)


class DecompressError(ValueError):
    """Data in no format vballoon reads, or corrupt; the message says which."""


def _whole(decompressor: Any, data: bytes) -> bytes:
    """What a streaming decompressor gives for `data`, which must hold its stream's end (a cut-short file or
    payload would otherwise pass as a shorter one)."""
    out = decompressor.decompress(data)
    if not decompressor.eof:
        raise EOFError("the stream ends early")
    return out


def _gzip(data: bytes) -> bytes:
    return _whole(zlib.decompressobj(16 + zlib.MAX_WBITS), data)


def _bzip2(data: bytes) -> bytes:
    return _whole(bz2.BZ2Decompressor(), data)


def _lzma(data: bytes) -> bytes:
    return _whole(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), data)


def _xz(data: bytes) -> bytes:
    return _whole(lzma.LZMADecompressor(format=lzma.FORMAT_XZ), data)


def _lz4_legacy(data: bytes) -> bytes:
    """lz4's legacy stream (what Debian's cloud kernels use): the magic, then blocks each led by its compressed
    size, a repeated magic starting another stream (lib/decompress_unlz4.c); python-lz4 reads the blocks."""
    blocks, at = [], 4
    while len(data) - at > SIZE_APPEND:
        (size,) = struct.unpack_from("<I", data, at)
        at += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        blocks.append(lz4.block.decompress(data[at:at + size], uncompressed_size=LZ4_LEGACY_BLOCK))
        at += size
    return b"".join(blocks)


def _zstd(data: bytes) -> bytes:
    return _whole(zstandard.ZstdDecompressor().decompressobj(), data)


DECOMPRESSORS: dict[bytes, tuple[str, Callable[[bytes], bytes]]] = {
    b"\x1f\x8b": ("gzip", _gzip),
    b"BZh": ("bzip2", _bzip2),
    b"\x5d\x00\x00": ("lzma", _lzma),
    b"\xfd7zXZ\x00": ("xz", _xz),
    b"\x28\xb5\x2f\xfd": ("zstd", _zstd),
    struct.pack("<I", LZ4_LEGACY_MAGIC): ("lz4", _lz4_legacy),
}


def decompress(data: bytes) -> bytes:
    """`data` decompressed by the format its magic names; trailing bytes after the stream are ignored."""
    kind = next(((name, function) for magic, (name, function) in DECOMPRESSORS.items() if data.startswith(magic)),
                None)
    if kind is None:
        raise DecompressError(f"compression with magic {data[:4].hex()} is not one vballoon reads")
    name, function = kind
    try:
        return function(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, zstandard.ZstdError,
            lz4.block.LZ4BlockError, struct.error) as error:
        raise DecompressError(f"{name} data that does not decompress ({error})") from None
