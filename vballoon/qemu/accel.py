"""Choosing the accelerator: KVM only when a probe guest really boots under it.

On some hosts /dev/kvm opens but a KVM guest hangs early in boot, so the
device node alone proves nothing. `--accel auto` boots the image's kernel
under KVM and waits a short deadline for the init's first line on the
serial console; anything else falls back to TCG, and the reason is reported.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vballoon.errors import QemuError, UsageError
from vballoon.guest.image import GuestImage
from vballoon.qemu.process import QemuBinary, QemuMachine, log_since
from vballoon.waiting import DeadlineExceeded, wait_for

ACCELS = ("auto", "kvm", "tcg")
# Under working KVM the kernel reaches /init in about a second; under TCG in
# about 3.6 s. Ten seconds separates a working KVM from a hanging one.
KVM_PROBE_DEADLINE = 10.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str


def choose_accel(requested: str, qemu: QemuBinary, image: GuestImage) -> AccelChoice:
    """Resolve `--accel auto|kvm|tcg` to the accelerator to use, with the reason."""
    if requested not in ACCELS:
        raise UsageError(f"--accel {requested}: use one of {', '.join(ACCELS)}")
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --accel tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if requested == "kvm":
            raise UsageError("--accel kvm: /dev/kvm is missing or not accessible; use --accel tcg or auto")
        return AccelChoice("tcg", "/dev/kvm is missing or not accessible")
    booted, detail = probe_kvm(qemu, image)
    if booted:
        return AccelChoice("kvm", f"a probe guest reached /init under KVM ({detail})")
    if requested == "kvm":
        raise UsageError(f"--accel kvm: a probe guest did not boot under KVM ({detail}); use --accel tcg or auto")
    return AccelChoice("tcg", f"KVM probe failed: {detail}")


class KvmProbe(QemuMachine):
    """The image's kernel booting under KVM, with no devices but a serial console."""

    def __init__(self, qemu: QemuBinary, image: GuestImage, log_dir: Path) -> None:
        super().__init__(qemu, log_dir, keep_transcripts=False)
        self.image = image

    def _arguments(self) -> list[str]:
        return ["-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256M", "-no-reboot",
                "-kernel", str(self.image.booted), "-initrd", str(self.image.initrd),
                "-append", self.image.kernel_cmdline, "-serial", f"file:{self.logs.serial}"]

    def reached_init(self) -> bool:
        return self.image.init_marker in log_since(self.logs.serial, 0)


def probe_kvm(qemu: QemuBinary, image: GuestImage) -> tuple[bool, str]:
    """Boot the image under KVM without devices; True if the init marker appears in time."""
    with tempfile.TemporaryDirectory(prefix="vballoon-kvm-probe-") as logs:
        probe = KvmProbe(qemu, image, Path(logs))
        try:
            with probe:
                wait_for(lambda: not probe.running() or probe.reached_init(), KVM_PROBE_DEADLINE,
                         "the KVM probe guest to reach /init")
                if probe.reached_init():
                    return True, f"within {KVM_PROBE_DEADLINE:g} s"
        except DeadlineExceeded:
            return False, f"no sign of /init within {KVM_PROBE_DEADLINE:g} s"
        except QemuError:
            pass  # QEMU exited at start: its status and first stderr line say why
        first = probe.stderr_since().strip().splitlines()[:1]
        status = probe.process.returncode if probe.process is not None else "unknown"
        return False, f"QEMU exited with status {status}: {first[0] if first else 'no message'}"
