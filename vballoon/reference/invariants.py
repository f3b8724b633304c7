"""The reference device's self-check: states no sequence of driver and host actions may lead to.

Kept apart from the device model so that fuzz targets instrument the model, the code under test, and not
this oracle (`vballoon.fuzz.harness.INSTRUMENTED`): it runs after every operation, and coverage of its
assertions would guide nothing while costing every execution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vballoon.reference.hinting import FreePageHinting, HintState
from vballoon.spec import CMD_ID_MIN, PFN_SHIFT, Feature, Status

if TYPE_CHECKING:
    from vballoon.reference.device import BalloonDevice

_POISON_BIT = 1 << Feature.PAGE_POISON
_FEATURES_OK, _NEEDS_RESET = Status.FEATURES_OK, Status.DEVICE_NEEDS_RESET
_REQUESTED, _START = HintState.REQUESTED, HintState.START  # plain names: looked up after every operation


def check_device(device: BalloonDevice) -> None:
    """Raise AssertionError if the device's state is inconsistent."""
    ram_pages = device.ram.size >> PFN_SHIFT
    assert device.num_pages <= ram_pages, f"num_pages {device.num_pages} above RAM pages {ram_pages}"
    if device.ballooned or device.hinted or device.reported:
        for pages in (device.ballooned, device.hinted, device.reported):
            assert not pages or 0 <= min(pages) and max(pages) < ram_pages, "page set outside RAM"
    status, features = device.status, device.driver_features
    if status & _FEATURES_OK:
        assert not features & ~device.properties.offered_features, "FEATURES_OK with unoffered features"
    if not features & _POISON_BIT:
        assert device.poison_val == 0, "poison_val set without PAGE_POISON"
    assert not status & _NEEDS_RESET or device.broken, "NEEDS_RESET on a working device"
    check_hinting(device.hinting)


def check_hinting(hinting: FreePageHinting) -> None:
    """Raise AssertionError if the free page hinting state is inconsistent."""
    assert hinting.counter >= CMD_ID_MIN, f"command id counter {hinting.counter:#x} below {CMD_ID_MIN:#x}"
    state = hinting.state
    if state is _REQUESTED or state is _START:
        assert hinting.counter in hinting.unreleased, f"current id {hinting.counter:#x} is not tracked as issued"
    if state is _START:
        assert hinting.driver_id == hinting.counter, "started without the driver sending the current id"
    assert not hinting.unreleased or min(hinting.unreleased) >= CMD_ID_MIN, "an issued id below CMD_ID_MIN"
