"""The program headers of a 64-bit little-endian ELF file: what the image builder reads of dropbear (PT_INTERP) and
of the kernel (the PVH note in a PT_NOTE)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

PT_INTERP = 3
PT_NOTE = 4


def program_headers(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(p_type, the segment's bytes in the file) of each program header; nothing when `data` is not an ELF64 LE
    file. A header that points past the end raises struct.error."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        return
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + index * phentsize)
        yield p_type, data[p_offset:p_offset + p_filesz]
