"""What one vballoon run tests: which QEMU, which kernel, which accelerator; whether guests start warm.

Shared by the pytest plugin, the benchmarks and the CLI so that all three
resolve `--qemu`, `--kernel`, `--modules`, `--accel` and `--cold` the same
way and build each guest image once per run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vballoon.guest.image import GuestImage, build_image
from vballoon.matrix import Variant
from vballoon.qemu.accel import AccelChoice, choose_accel
from vballoon.qemu.process import QemuBinary
from vballoon.qemu.snapshots import SnapshotCache

REPORTS = Path("reports")

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """The resolved options of a run; images and the accelerator are worked out on first use."""

    qemu: QemuBinary
    accel_request: str = "auto"
    kernel: Path | None = None
    modules: Path | None = None
    reports: Path = REPORTS
    snapshots: SnapshotCache | None = None
    """Where guests are saved after their boot and started warm from; None: every guest boots."""
    _images: dict[str, GuestImage] = field(default_factory=dict)
    _accel: AccelChoice | None = None

    @classmethod
    def from_options(cls, qemu: str | None, accel: str, kernel: str | None, modules: str | None,
                     reports: Path = REPORTS, warm: bool = True) -> "Session":
        return cls(QemuBinary.find(qemu), accel, Path(kernel) if kernel else None,
                   Path(modules) if modules else None, reports, SnapshotCache.in_cache() if warm else None)

    @property
    def worker_tag(self) -> str:
        """'-gw0', '-gw1', ... under pytest-xdist, else '': keeps per-worker log folders apart."""
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        return f"-{worker}" if worker else ""

    def image_for(self, variant: Variant) -> GuestImage:
        """The guest image for a variant: the user's kernel if given, else the variant's Debian kernel."""
        package = "custom" if self.kernel else variant.kernel_package
        if package not in self._images:
            self._images[package] = build_image(
                kernel_package=variant.kernel_package, kernel=self.kernel, modules=self.modules)
        return self._images[package]

    def accel(self, image: GuestImage) -> AccelChoice:
        """The accelerator, probed once per run."""
        if self._accel is None:
            self._accel = choose_accel(self.accel_request, self.qemu, image)
            logger.info(f"vballoon: accelerator {self._accel.accel}: {self._accel.reason}")
        return self._accel
