"""The error types vballoon raises on purpose.

Every error a user can cause (a bad option, a missing file, a guest that does
not boot) is a `VballoonError` whose message is one line naming the option or
file and what to do; the CLI and the pytest plugin print it without a
traceback.
"""


class VballoonError(Exception):
    """Base of every error vballoon raises deliberately."""


class UsageError(VballoonError):
    """Bad input from the user: an option, a path, a variant name."""


class DecodeError(VballoonError):
    """A wire buffer or saved input that cannot be decoded."""


class GuestError(VballoonError):
    """The guest did not boot, did not answer, or a command in it failed."""


class QemuError(VballoonError):
    """QEMU could not start, crashed, or answered QMP with an error."""
