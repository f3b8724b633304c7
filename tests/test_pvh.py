"""Tests of the PVH kernel extraction (vballoon.guest.pvh): made-up bzImages in every payload format, and the
Debian kernel of the guest image, whose extracted kernel must be the one QEMU boots."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import struct
from pathlib import Path

import lz4.block
import pytest
import zstandard

from vballoon.guest import compression, elf, pvh
from vballoon.errors import UsageError
from vballoon.guest.image import GuestImage, _copy_module, build_image
from vballoon.matrix import Variant
from vballoon.qemu.machine import MachineSpec, guest_arguments
from vballoon.session import Session

SETUP_SECTORS = 1


def elf_with_notes(*notes: tuple[bytes, int, bytes]) -> bytes:
    """A little-endian ELF64 header, one PT_NOTE program header and the notes (name, type, desc) it covers."""
    body = b""
    for name, note_type, desc in notes:
        name0 = name + b"\0"
        body += struct.pack("<III", len(name0), len(desc), note_type)
        body += name0.ljust((len(name0) + 3) // 4 * 4, b"\0") + desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    program = struct.pack("<IIQQQQQQ", elf.PT_NOTE, 4, 64 + 56, 0, 0, len(body), len(body), 4)
    return bytes(header) + program + body


PVH_ELF = elf_with_notes((b"Xen", 6, b"linux\0"), (b"Xen", pvh.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000000)))
PLAIN_ELF = elf_with_notes((b"GNU", 3, bytes(20)), (b"Xen", 6, b"linux\0"))


def lz4_legacy(data: bytes) -> bytes:
    """What `lz4 -l` writes: the magic, then blocks of at most 8 MiB each led by its compressed size."""
    out = struct.pack("<I", compression.LZ4_LEGACY_MAGIC)
    for at in range(0, len(data), compression.LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(data[at:at + compression.LZ4_LEGACY_BLOCK], store_size=False, mode="high_compression")
        out += struct.pack("<I", len(block)) + block
    return out


COMPRESSORS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "zstd": lambda data: zstandard.ZstdCompressor(level=19).compress(data),
    "lz4": lz4_legacy,
    "lz4-two-streams": lambda data: lz4_legacy(data[:1 << 20]) + lz4_legacy(data[1 << 20:]),
}


def bzimage(compressed: bytes, protocol: int = 0x020F) -> bytes:
    """A boot sector and one setup sector whose header places `compressed` and its appended size after them."""
    setup = bytearray((SETUP_SECTORS + 1) * 512)
    setup[pvh.SETUP_SECTS] = SETUP_SECTORS
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, pvh.PROTOCOL_VERSION, protocol)
    payload = compressed + struct.pack("<I", 1 << 20)  # the build's size_append
    struct.pack_into("<II", setup, pvh.PAYLOAD, 0x100, len(payload))
    return bytes(setup) + bytes(0x100) + payload + bytes(64)


@pytest.mark.parametrize("name", COMPRESSORS)
def test_every_payload_format_gives_back_the_kernel(name: str, tmp_path: Path) -> None:
    kernel = PVH_ELF + bytes(range(256)) * 40_000  # 10 MiB: two lz4 blocks
    (tmp_path / "bzImage").write_bytes(bzimage(COMPRESSORS[name](kernel)))
    reason = pvh.extract_pvh_kernel(tmp_path / "bzImage", tmp_path / "vmlinux")
    assert reason is None, f"{name}: expected the kernel extracted, got {reason!r}"
    assert (tmp_path / "vmlinux").read_bytes() == kernel


def test_a_kernel_without_the_pvh_note_is_not_extracted(tmp_path: Path) -> None:
    """Broken on purpose: the same ELF without Xen's PHYS32_ENTRY note (only its guest-os note) is refused."""
    (tmp_path / "bzImage").write_bytes(bzimage(gzip.compress(PLAIN_ELF)))
    reason = pvh.extract_pvh_kernel(tmp_path / "bzImage", tmp_path / "vmlinux")
    assert reason == "its kernel has no PVH entry note (CONFIG_PVH is off)"
    assert not (tmp_path / "vmlinux").exists()


@pytest.mark.parametrize(("image", "expected"), [
    (bzimage(b"\x89LZO" + bytes(64)), "its payload: compression with magic 894c5a4f is not one vballoon reads"),
    (bzimage(b"\x1f\x8b" + bytes(64)), "its payload: gzip data that does not decompress"),
    (bzimage(gzip.compress(PVH_ELF), protocol=0x0207), "boot protocol 2.7 has no payload fields"),
    (bzimage(gzip.compress(PVH_ELF))[:0x240], "its setup header ends at byte 576"),
    (bzimage(gzip.compress(PVH_ELF[:0x50])), "its kernel has no PVH entry note"),
], ids=["lzo", "corrupt-gzip", "old-protocol", "cut-header", "cut-elf"])
def test_what_cannot_be_extracted_says_why(image: bytes, expected: str, tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(image)
    reason = pvh.extract_pvh_kernel(tmp_path / "bzImage", tmp_path / "vmlinux")
    assert reason is not None and reason.startswith(expected), f"expected {expected!r}, got {reason!r}"
    assert not (tmp_path / "vmlinux").exists()


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image()


def test_the_debian_kernel_boots_through_pvh(image: GuestImage) -> None:
    """Debian's cloud kernel (lz4, CONFIG_PVH=y) is extracted at build time, and that is what QEMU is given."""
    assert image.boot == "pvh" and image.booted == image.kernel.with_name(pvh.VMLINUX), (
        f"expected the image to boot its uncompressed kernel, got {image.booted} ({image.boot})")
    assert pvh.has_pvh_entry(image.booted.read_bytes())


def test_a_guest_boots_the_pvh_kernel_unless_its_spec_asks_for_the_bzimage(session: Session, tmp_path: Path) -> None:
    """MachineSpec.pvh picks what -kernel names: S3 guests boot the bzImage."""
    variant = Variant.from_name("pci-modern")
    image = session.image_for(variant)
    spec = MachineSpec(variant, image, session.qemu, "tcg", tmp_path)

    def kernel(arguments: list[str]) -> str:
        return arguments[arguments.index("-kernel") + 1]

    assert kernel(guest_arguments(spec, 0, tmp_path / "serial.log")) == str(image.kernel.with_name(pvh.VMLINUX))
    assert kernel(guest_arguments(dataclasses.replace(spec, pvh=False), 0, tmp_path / "serial.log")) == str(image.kernel)


@pytest.mark.parametrize("suffix", [".ko.gz", ".ko.xz", ".ko.zst"])
def test_compressed_modules_are_copied_plain(suffix: str, tmp_path: Path) -> None:
    """--modules trees ship .ko.gz, .ko.xz (Debian 13) or .ko.zst: each is copied as a plain .ko through the same
    decompressors as the kernel (no zstd command needed)."""
    module = b"\x7fELF" + bytes(range(256)) * 64
    pack = {".ko.gz": COMPRESSORS["gzip"], ".ko.xz": COMPRESSORS["xz"], ".ko.zst": COMPRESSORS["zstd"]}[suffix]
    (tmp_path / f"virtio_balloon{suffix}").write_bytes(pack(module))
    copied = _copy_module(tmp_path / f"virtio_balloon{suffix}", tmp_path / "out")
    assert copied.name == "virtio_balloon.ko" and copied.read_bytes() == module


def test_a_corrupt_module_names_the_option_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "virtio_balloon.ko.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(16))
    with pytest.raises(UsageError, match=r"^--modules: .*virtio_balloon\.ko\.zst: zstd data that does not decompress"):
        _copy_module(tmp_path / "virtio_balloon.ko.zst", tmp_path / "out")
