"""Choosing the accelerator: KVM only when a probe guest really boots under it.

On some hosts /dev/kvm opens but a KVM guest hangs early in boot, so the
device node alone proves nothing. `--accel auto` boots the image's kernel
under KVM and waits a short deadline for the init's first line on the
serial console; anything else falls back to TCG, and the reason is reported.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vballoon.errors import UsageError
from vballoon.guest.image import GuestImage
from vballoon.qemu.machine import QemuBinary
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


def probe_kvm(qemu: QemuBinary, image: GuestImage) -> tuple[bool, str]:
    """Boot the image under KVM without devices; True if the init marker appears in time."""
    with tempfile.TemporaryDirectory(prefix="vballoon-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        args = [
            str(qemu.path), "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", image.kernel_cmdline, "-serial", f"file:{serial}",
        ]
        with subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) as process:
            try:
                wait_for(lambda: process.poll() is not None or
                         (serial.exists() and image.init_marker in serial.read_text(errors="replace")),
                         KVM_PROBE_DEADLINE, "the KVM probe guest to reach /init")
            except DeadlineExceeded:
                process.kill()
                return False, f"no sign of /init within {KVM_PROBE_DEADLINE:g} s"
            exited = process.poll()
            process.kill()
            _, stderr = process.communicate()
            if exited is not None and image.init_marker not in serial.read_text(errors="replace"):
                first = stderr.decode(errors="replace").strip().splitlines()[:1]
                return False, f"QEMU exited with status {exited}: {first[0] if first else 'no message'}"
            return True, f"within {KVM_PROBE_DEADLINE:g} s"
