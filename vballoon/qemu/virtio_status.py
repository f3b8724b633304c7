"""Host-side view of a virtio device through QEMU's `x-query-virtio-status`.

QEMU decodes feature bits into strings such as
"VIRTIO_BALLOON_F_STATS_VQ: Guest memory stats VQ available" and leaves the
bits it has no name for in `unknown-dev-features`; this module turns both back
into bit numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vballoon.errors import GuestError, QemuError

# The names QEMU 7.2 prints, by bit number (hw/virtio/virtio.c, virtio-balloon.c).
FEATURE_BITS = {
    "VIRTIO_BALLOON_F_MUST_TELL_HOST": 0,
    "VIRTIO_BALLOON_F_STATS_VQ": 1,
    "VIRTIO_BALLOON_F_DEFLATE_ON_OOM": 2,
    "VIRTIO_BALLOON_F_FREE_PAGE_HINT": 3,
    "VIRTIO_BALLOON_F_PAGE_POISON": 4,
    "VIRTIO_BALLOON_F_REPORTING": 5,
    "VIRTIO_F_NOTIFY_ON_EMPTY": 24,
    "VIRTIO_F_ANY_LAYOUT": 27,
    "VIRTIO_RING_F_INDIRECT_DESC": 28,
    "VIRTIO_RING_F_EVENT_IDX": 29,
    "VIRTIO_F_BAD_FEATURE": 30,
    "VIRTIO_F_VERSION_1": 32,
    "VIRTIO_F_IOMMU_PLATFORM": 33,
    "VIRTIO_F_RING_PACKED": 34,
    "VIRTIO_F_ORDER_PLATFORM": 36,
    "VIRTIO_F_SR_IOV": 37,
    "VIRTIO_F_RING_RESET": 40,
}


@dataclass(frozen=True)
class VirtioStatus:
    """Feature bits and status of one virtio device as QEMU sees it."""

    host_features: frozenset[int]
    guest_features: frozenset[int]
    status: tuple[str, ...]
    raw: dict[str, Any]


def feature_bits(decoded: dict[str, Any]) -> frozenset[int]:
    """Bit numbers from one of QEMU's decoded feature objects."""
    bits: set[int] = set()
    for name in [*decoded.get("dev-features", []), *decoded.get("transports", [])]:
        key = name.split(":", 1)[0].strip()
        if key not in FEATURE_BITS:
            raise QemuError(f"x-query-virtio-status names feature {key!r}, unknown to vballoon")
        bits.add(FEATURE_BITS[key])
    unknown = int(decoded.get("unknown-dev-features", 0))
    bits |= {bit for bit in range(64) if unknown >> bit & 1}
    return frozenset(bits)


def parse_status(reply: dict[str, Any]) -> VirtioStatus:
    return VirtioStatus(
        host_features=feature_bits(reply["host-features"]),
        guest_features=feature_bits(reply["guest-features"]),
        status=tuple(s.split(":", 1)[0] for s in reply["status"].get("statuses", [])),
        raw=reply,
    )


def sysfs_feature_bits(text: str) -> frozenset[int]:
    """Bits from `/sys/bus/virtio/devices/*/features`: one '0'/'1' character per bit, bit 0 first."""
    text = text.strip()
    if not text or set(text) - {"0", "1"}:
        raise GuestError(f"sysfs features string {text!r} is not a string of 0 and 1")
    return frozenset(i for i, char in enumerate(text) if char == "1")
