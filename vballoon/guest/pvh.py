"""The uncompressed kernel inside a bzImage, for QEMU to boot through its PVH entry point.

Under TCG the bzImage's own decompressor is the slowest part of a boot: Debian 12's xz kernel took 4.8 s of a
7.1 s boot to /init on QEMU 7.2 (2 cores, nothing else running), and a system_reset pays it again (10.5 s to
/init). The same kernel's vmlinux, decompressed once on the host, boots to /init in 2.4 s and 2.8 s after a reset:
QEMU loads an ELF kernel that carries a PVH entry note (Xen's XEN_ELFNOTE_PHYS32_ENTRY, built with CONFIG_PVH) and
jumps to it with the memory map, command line and initrd, skipping the decompressor and the real-mode setup.
The balloon driver and everything after the kernel's first instruction are the same.

The payload's place comes from the boot protocol's setup header (payload_offset at 0x248 and payload_length at
0x24c, protocol 2.08 and later, arch/x86/boot/header.S); its format from its magic (the compressors Kconfig's
KERNEL_* choice offers and Python reads: gzip, bzip2, lzma, xz, lz4 and zstd; not lzo).
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import lz4.block
import zstandard

SETUP_SECTS = 0x1F1
PROTOCOL_VERSION = 0x206
PAYLOAD = 0x248
MIN_PROTOCOL = 0x0208
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # what a block of `lz4 -l` (the kernel's cmd_lz4) decompresses to, at most
SIZE_APPEND = 4  # the uncompressed size the kernel's build appends to the payload (size_append)


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


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
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


DECOMPRESSORS: dict[bytes, tuple[str, Callable[[bytes], bytes]]] = {
    b"\x1f\x8b": ("gzip", _gzip),
    b"BZh": ("bzip2", _bzip2),
    b"\x5d\x00\x00": ("lzma", _lzma),
    b"\xfd7zXZ\x00": ("xz", _xz),
    b"\x28\xb5\x2f\xfd": ("zstd", _zstd),
    struct.pack("<I", LZ4_LEGACY_MAGIC): ("lz4", _lz4_legacy),
}


def payload(bzimage: bytes) -> bytes | str:
    """The compressed kernel in a bzImage, or why it cannot be found."""
    if len(bzimage) < PAYLOAD + 8:
        return f"its setup header ends at byte {len(bzimage)}, before the payload fields"
    (protocol,) = struct.unpack_from("<H", bzimage, PROTOCOL_VERSION)
    if protocol < MIN_PROTOCOL:
        return f"boot protocol {protocol >> 8}.{protocol & 0xFF} has no payload fields (2.08 and later do)"
    offset, length = struct.unpack_from("<II", bzimage, PAYLOAD)
    start = ((bzimage[SETUP_SECTS] or 4) + 1) * 512 + offset
    return bzimage[start:start + length]


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a little-endian ELF64 image has a PT_NOTE with Xen's PHYS32_ENTRY note (what QEMU's loader reads)."""
    try:
        return _has_pvh_note(elf)
    except struct.error:  # a header or note that runs past the end of the image
        return False


def _has_pvh_note(elf: bytes) -> bool:
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + index * phentsize)
        if p_type != PT_NOTE:
            continue
        at, end = p_offset, p_offset + p_filesz
        while at + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, at)
            name = elf[at + 12:at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_pvh_kernel(bzimage: Path, dest: Path) -> str | None:
    """Write the bzImage's kernel, uncompressed, to `dest` if QEMU can boot it through PVH; None when written,
    else why not (the caller boots the bzImage)."""
    compressed = payload(bzimage.read_bytes())
    if isinstance(compressed, str):
        return compressed
    kind = next(((name, decompress) for magic, (name, decompress) in DECOMPRESSORS.items()
                 if compressed.startswith(magic)), None)
    if kind is None:
        return f"its payload's compression (magic {compressed[:4].hex()}) is not one vballoon reads"
    name, decompress = kind
    try:
        elf = decompress(compressed)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, zstandard.ZstdError,
            lz4.block.LZ4BlockError) as error:
        return f"its {name} payload does not decompress ({error})"
    if not has_pvh_entry(elf):
        return "its kernel has no PVH entry note (CONFIG_PVH is off)"
    dest.write_bytes(elf)
    return None
