"""The reference virtio-balloon device: pure Python, deterministic, written from the spec.

Where the spec lets a device choose (MAY/SHOULD), the reference records the
set of allowed outcomes instead of picking one, so a comparison accepts any
conforming device.
"""

from vballoon.reference.device import (
    DEFLATEQ,
    FREE_PAGE_VQ,
    INFLATEQ,
    QUEUE_MAX_SIZES,
    REPORTING_VQ,
    STATSQ,
    BalloonChange,
    BalloonDevice,
    DeviceProperties,
    DeviceShape,
    DriverViolation,
)
from vballoon.reference.errors import DeviceError, RequestRejected
from vballoon.reference.hinting import FreePageHinting, HintState
from vballoon.reference.ram import GuestRam, PageOutcome, poison_page

__all__ = [
    "DEFLATEQ",
    "FREE_PAGE_VQ",
    "INFLATEQ",
    "QUEUE_MAX_SIZES",
    "REPORTING_VQ",
    "STATSQ",
    "BalloonChange",
    "BalloonDevice",
    "DeviceError",
    "DeviceProperties",
    "DeviceShape",
    "DriverViolation",
    "FreePageHinting",
    "GuestRam",
    "HintState",
    "PageOutcome",
    "RequestRejected",
    "poison_page",
]
