"""The uncompressed kernel inside a bzImage, for QEMU to boot through its PVH entry point.

Under TCG the bzImage's own decompressor is the slowest part of a boot: Debian 12's xz kernel took 4.8 s of a
7.1 s boot to /init on QEMU 7.2 (2 cores, nothing else running), and a system_reset pays it again (10.5 s to
/init). The same kernel's vmlinux, decompressed once on the host, boots to /init in 2.4 s and 2.8 s after a reset:
QEMU loads an ELF kernel that carries a PVH entry note (Xen's XEN_ELFNOTE_PHYS32_ENTRY, built with CONFIG_PVH) and
jumps to it with the memory map, command line and initrd, skipping the decompressor and the real-mode setup.
The balloon driver and everything after the kernel's first instruction are the same.

The payload's place comes from the boot protocol's setup header (payload_offset at 0x248 and payload_length at
0x24c, protocol 2.08 and later, arch/x86/boot/header.S); its format from its magic (vballoon.guest.compression).
"""

from __future__ import annotations

import struct
from pathlib import Path

from vballoon.guest import compression, elf

SETUP_SECTS = 0x1F1
PROTOCOL_VERSION = 0x206
PAYLOAD = 0x248
MIN_PROTOCOL = 0x0208
XEN_ELFNOTE_PHYS32_ENTRY = 18
VMLINUX = "vmlinux"
"""The uncompressed kernel's file name beside the bzImage in an image."""


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


def has_pvh_entry(kernel: bytes) -> bool:
    """Whether an ELF kernel has Xen's PHYS32_ENTRY note in a PT_NOTE segment (what QEMU's loader reads)."""
    try:
        return any(_has_entry_note(segment) for p_type, segment in elf.program_headers(kernel)
                   if p_type == elf.PT_NOTE)
    except struct.error:  # a header that runs past the end of the image
        return False


def _has_entry_note(notes: bytes) -> bool:
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, note_type = struct.unpack_from("<III", notes, at)
        if notes[at + 12:at + 12 + namesz].rstrip(b"\0") == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_pvh_kernel(bzimage: Path, dest: Path) -> str | None:
    """Write the bzImage's kernel, uncompressed, to `dest` if QEMU can boot it through PVH; None when written,
    else why not (the caller boots the bzImage)."""
    compressed = payload(bzimage.read_bytes())
    if isinstance(compressed, str):
        return compressed
    try:
        kernel = compression.decompress(compressed)
    except compression.DecompressError as error:
        return f"its payload: {error}"
    if not has_pvh_entry(kernel):
        return "its kernel has no PVH entry note (CONFIG_PVH is off)"
    dest.write_bytes(kernel)
    return None
