"""Tests of the guest image builder (vballoon.guest.image).

The real builds use the default cache, so CI downloads and builds once.
"""

from __future__ import annotations

import logging
import shutil
import time
import tomllib
from importlib import resources
from pathlib import Path

import paramiko
import pytest

from vballoon.errors import UsageError
from vballoon.guest.image import (
    RECIPE_DIR,
    RESUME_MARKER,
    GuestImage,
    build_image,
    bzimage_version,
    load_order,
    on_demand_order,
    read_modules_dep,
    write_cpio,
)

ROOTS = ("virtio_pci", "virtio_net", "virtio_balloon")
DEPS = {
    "kernel/drivers/virtio/virtio_ring.ko": [],
    "kernel/drivers/virtio/virtio.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
    "kernel/drivers/virtio/virtio_pci.ko": [
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    ],
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko": [],
    "kernel/drivers/virtio/virtio_balloon.ko": [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    ],
    "kernel/drivers/virtio/virtio_mem.ko": ["kernel/drivers/virtio/virtio.ko"],
}
RECIPE_FILES = {"init", "memhog.c", "rootfs/etc/group", "rootfs/etc/passwd", "rootfs/etc/shells"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def read_cpio(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of every record of a newc cpio archive."""
    data = path.read_bytes()
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + name_size - 1].decode()
        body = (name_start + name_size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body : body + size])
        offset = (body + size + 3) & ~3


def assert_loaded_after_dependencies(order: list[str], deps: dict[str, list[str]]) -> None:
    for index, module in enumerate(order):
        for dep in deps[module]:
            assert dep in order[:index], f"{module} loaded before its dependency {dep}"


# ---------------------------------------------------------------- pure logic


def test_the_recipe_is_package_data_a_wheel_carries() -> None:
    recipe = resources.files("vballoon.guest").joinpath("recipe")
    for name in RECIPE_FILES:
        assert recipe.joinpath(name).is_file(), f"{name} is not a resource of vballoon.guest"
    assert {str(p.relative_to(RECIPE_DIR)) for p in RECIPE_DIR.rglob("*") if p.is_file()} == RECIPE_FILES
    patterns = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["vballoon"]
    package = RECIPE_DIR.parents[1]
    declared = {path for pattern in patterns for path in package.glob(pattern)}
    missing = {name for name in RECIPE_FILES if RECIPE_DIR / name not in declared}
    assert not missing, f"pyproject.toml's package-data leaves {sorted(missing)} out of the wheel"


def test_load_order_puts_every_module_after_its_dependencies() -> None:
    order = load_order(DEPS, ROOTS, builtin={"virtio_net"})
    assert_loaded_after_dependencies(order, DEPS)
    assert order[-1] == "kernel/drivers/virtio/virtio_balloon.ko"
    assert "kernel/drivers/virtio/virtio_mem.ko" not in order
    assert len(order) == len(set(order))


def test_load_order_rejects_a_driver_neither_module_nor_built_in() -> None:
    with pytest.raises(UsageError, match="virtio_net"):
        load_order(DEPS, ROOTS, builtin=set())


def test_on_demand_modules_come_with_their_dependencies_less_the_boot_modules_and_absent_ones() -> None:
    """zram needs zsmalloc (modules.dep); lzo_rle is built in here (not in modules.dep), so it is left out."""
    deps = {**DEPS, "kernel/mm/zsmalloc.ko": [], "kernel/drivers/block/zram/zram.ko": ["kernel/mm/zsmalloc.ko"]}
    boot = load_order(deps, ROOTS, builtin={"virtio_net"})
    assert on_demand_order(deps, ("zram", "lzo_rle"), boot) == ["kernel/mm/zsmalloc.ko",
                                                                  "kernel/drivers/block/zram/zram.ko"]
    assert on_demand_order(deps, ("virtio_balloon",), boot) == []


def test_read_modules_dep(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("a.ko: b.ko c.ko\nb.ko:\nc.ko:\n")
    assert read_modules_dep(tmp_path) == {"a.ko": ["b.ko", "c.ko"], "b.ko": [], "c.ko": []}


def test_cpio_keeps_modes_symlinks_and_adds_the_console(tmp_path: Path) -> None:
    staging = tmp_path / "root"
    (staging / "bin").mkdir(parents=True)
    (staging / "bin" / "busybox").write_bytes(b"\x7fELF")
    (staging / "bin" / "busybox").chmod(0o755)
    (staging / "bin" / "sh").symlink_to("/bin/busybox")
    write_cpio(staging, tmp_path / "initrd.cpio")
    entries = read_cpio(tmp_path / "initrd.cpio")
    assert entries["bin/busybox"] == (0o100755, b"\x7fELF")
    assert entries["bin/sh"] == (0o120777, b"/bin/busybox")
    assert entries["dev/console"][0] == 0o020600


def test_missing_kernel_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="^--kernel .*no such file"):
        build_image(kernel=tmp_path / "bzImage", cache_dir=tmp_path)


def test_kernel_that_is_not_a_bzimage_names_the_option(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF" + bytes(0x300))
    with pytest.raises(UsageError, match="^--kernel .*not a bzImage"):
        build_image(kernel=vmlinux, cache_dir=tmp_path)


def test_modules_without_the_balloon_driver_names_the_option(tmp_path: Path) -> None:
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "virtio_net.ko").write_bytes(b"")
    with pytest.raises(UsageError, match="^--modules .*virtio_balloon"):
        build_image(modules=tmp_path / "mods", cache_dir=tmp_path)


def test_unknown_kernel_package_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="^--kernel-package linux-image-does-not-exist"):
        build_image(kernel_package="linux-image-does-not-exist", cache_dir=tmp_path)


# ---------------------------------------------------------------- real builds


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image()


@pytest.fixture(scope="module")
def initramfs(image: GuestImage) -> dict[str, tuple[int, bytes]]:
    return read_cpio(image.initrd)


def test_second_build_is_a_cache_hit(image: GuestImage, caplog: pytest.LogCaptureFixture) -> None:
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="vballoon"):
        again = build_image()
    assert again.cache_hit and again.key == image.key
    assert caplog.messages == [f"cache hit {image.key}"]
    assert time.monotonic() - start < 5


def test_image_describes_the_debian_kernel(image: GuestImage) -> None:
    assert bzimage_version(image.kernel) == image.kernel_version
    assert image.kernel_version.endswith("-cloud-amd64")
    assert image.config_enabled("VIRTIO_BALLOON") is True
    assert image.ssh_user == "root" and "console=ttyS0" in image.kernel_cmdline


def test_initramfs_holds_the_guest(image: GuestImage, initramfs: dict[str, tuple[int, bytes]]) -> None:
    for name in (
        "init", "bin/busybox", "usr/sbin/dropbear", "lib64/ld-linux-x86-64.so.2", "usr/bin/memhog",
        "etc/dropbear/dropbear_ed25519_host_key", "etc/passwd", "etc/vballoon.conf", "dev/console",
    ):
        assert name in initramfs, name
    for applet in ("bin/sh", "bin/cat", "bin/grep", "usr/bin/awk", "bin/sed", "bin/sync", "bin/dmesg", "sbin/insmod"):
        assert initramfs[applet][1] == b"/bin/busybox", applet
    assert initramfs["root/.ssh"][0] & 0o777 == 0o700
    assert initramfs["root/.ssh/authorized_keys"][1].startswith(b"ssh-ed25519 ")
    modules_dir = f"lib/modules/{image.kernel_version}"
    for module in image.modules:
        assert f"{modules_dir}/{module}" in initramfs
    assert {Path(m).name for m in image.modules} >= {f"{root}.ko" for root in ROOTS}
    assert image.init_marker.encode() in initramfs["etc/vballoon.conf"][1]


def test_on_demand_drivers_are_carried_not_loaded(image: GuestImage,
                                                  initramfs: dict[str, tuple[int, bytes]]) -> None:
    """zram and virtio_blk (modules in Debian's cloud kernel) are in the image for a test's modprobe (a swap device,
    a disk to hibernate to) but not loaded at boot; /init has the line it prints before resuming."""
    modules_dir = f"lib/modules/{image.kernel_version}/"
    carried = {Path(name).name for name in initramfs if name.startswith(modules_dir)}
    on_demand = {"zram.ko", "virtio_blk.ko"}
    assert on_demand <= carried, f"expected {on_demand} in the initramfs, got {sorted(carried)}"
    loaded = on_demand & {Path(m).name for m in image.modules}
    assert not loaded, f"expected {on_demand} left for a test to load, got {loaded} loaded at boot"
    assert RESUME_MARKER.encode() in initramfs["etc/vballoon.conf"][1]


def test_modules_load_after_their_dependencies(image: GuestImage, initramfs: dict[str, tuple[int, bytes]]) -> None:
    dep_text = initramfs[f"lib/modules/{image.kernel_version}/modules.dep"][1].decode()
    deps = {m: needs.split() for m, _, needs in (line.partition(":") for line in dep_text.splitlines())}
    assert_loaded_after_dependencies(list(image.modules), deps)


def test_ssh_key_loads_in_paramiko(image: GuestImage, initramfs: dict[str, tuple[int, bytes]]) -> None:
    key = paramiko.Ed25519Key.from_private_key_file(str(image.ssh_key))
    assert initramfs["root/.ssh/authorized_keys"][1].split()[1].decode() == key.get_base64()


def test_custom_kernel_without_modules_carries_none(image: GuestImage, tmp_path: Path) -> None:
    shutil.copyfile(image.kernel, tmp_path / "bzImage")
    custom = build_image(kernel=tmp_path / "bzImage")
    assert custom.modules == () and custom.kernel_config is None
    assert custom.kernel_version == image.kernel_version


def test_folder_of_modules_replaces_the_debian_ones(image: GuestImage, tmp_path: Path) -> None:
    balloon = next(m for m in image.modules if m.endswith("/virtio_balloon.ko"))
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "virtio_balloon.ko").write_bytes(
        read_cpio(image.initrd)[f"lib/modules/{image.kernel_version}/{balloon}"][1]
    )
    custom = build_image(modules=tmp_path / "mods")
    assert custom.modules[-1] == "extra/virtio_balloon.ko"
    assert balloon not in custom.modules
