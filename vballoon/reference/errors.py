"""Errors of the reference device."""

from vballoon.errors import VballoonError


class DeviceError(VballoonError):
    """The driver broke a rule badly enough that the device stops working.

    A modern device sets DEVICE_NEEDS_RESET and both kinds stop processing
    queues until reset, as QEMU's (7.2 and 10.0) virtio_error does.
    """


class RequestRejected(VballoonError):
    """A host-side request (QMP balloon, a QOM property) refused with QEMU's message."""
