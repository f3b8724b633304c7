"""Build the guest image: a kernel plus an initramfs that boots into dropbear.

The image is assembled from Debian packages fetched with `apt-get download`:
the kernel (`linux-image-cloud-amd64` by default), `busybox-static`,
`dropbear-bin` with the libraries its loader names, the virtio modules the
kernel's own `modules.dep` asks for, and the static guest helper `memhog`
compiled from `recipe/memhog.c`. The guest's `/init` is `recipe/init`;
`recipe/rootfs/` is copied in as is (`recipe/` is package data beside this
module, so an installed vballoon builds images without its source tree).

Images are cached under a key derived from every input (package versions or
file hashes, the recipe files, this module's source); a build writes to a
temporary folder and renames it into place, so an interrupted build leaves no
half image behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vballoon.digests import file_sha256
from vballoon.errors import UsageError, VballoonError
from vballoon.guest import compression, elf, pvh

RECIPE_DIR = Path(__file__).resolve().parent / "recipe"
DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
USERLAND_PACKAGES = ("busybox-static", "dropbear-bin")
# The drivers the guest needs; their dependencies come from modules.dep.
ROOT_DRIVERS = ("virtio_pci", "virtio_net", "virtio_balloon")
# Modules copied in, with their dependencies, for tests to `modprobe` when they need them (not loaded at boot):
# zram for a swap device, Linux 6.1's default zram compressor (crypto lzo-rle, which zram asks the crypto API
# for by name, so modules.dep does not list it), and virtio_blk for a disk to hibernate to (loaded by /init when the
# kernel command line asks it to resume, vballoon.resume=DISK). A kernel with one built in or without it gets what
# it has.
ON_DEMAND_DRIVERS = ("zram", "lzo_rle", "virtio_blk")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
INIT_MARKER = "vballoon-guest: init started"
READY_MARKER = "vballoon-guest: sshd ready"
RESUME_MARKER = "vballoon-guest: resuming from"
"""Printed by /init, with the disk, just before it asks the kernel to resume from a hibernation image."""
SSH_USER = "root"
# Fastest measured under TCG; callers append options such as init_on_free=1.
BASE_CMDLINE = (
    "console=ttyS0 quiet panic=-1 mitigations=off nokaslr "
    "i8042.noaux i8042.nokbd i8042.nopnp cryptomgr.notests"
)
HDRS_OFFSET = 0x202
APT_LISTS = Path("/var/lib/apt/lists")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what QEMU boots and how to reach it."""

    kernel: Path
    """The bzImage: its setup header names the kernel release."""
    initrd: Path
    ssh_key: Path
    kernel_version: str
    key: str
    cache_hit: bool
    modules: tuple[str, ...]
    kernel_config: dict[str, str] | None = field(default=None, compare=False, repr=False)
    ssh_user: str = SSH_USER
    kernel_cmdline: str = BASE_CMDLINE
    ready_marker: str = READY_MARKER
    init_marker: str = INIT_MARKER
    boot: str = "pvh"
    """"pvh" when the image holds the kernel uncompressed beside the bzImage (vmlinux, vballoon.guest.pvh), else why
    the bzImage is booted."""

    @property
    def booted(self) -> Path:
        """What QEMU boots: the uncompressed kernel through its PVH entry, else the bzImage."""
        return self.kernel.with_name(pvh.VMLINUX) if self.boot == "pvh" else self.kernel

    def config_enabled(self, option: str) -> bool | None:
        """Whether `CONFIG_<option>` is y or m; None when the config is unknown."""
        if self.kernel_config is None:
            return None
        return self.kernel_config.get(f"CONFIG_{option}") in ("y", "m")


def default_cache_dir() -> Path:
    """`$VBALLOON_CACHE`, else `~/.cache/vballoon`."""
    return Path(os.environ.get("VBALLOON_CACHE") or Path.home() / ".cache" / "vballoon")


def build_image(
    kernel_package: str = DEFAULT_KERNEL_PACKAGE,
    kernel: Path | None = None,
    modules: Path | None = None,
    cache_dir: Path | None = None,
) -> GuestImage:
    """Return the guest image for these inputs, building it unless cached.

    `kernel` is a user's bzImage that replaces the Debian kernel; `modules` is a
    `modules_install` tree or a folder of .ko files that replaces the Debian
    modules of the same name. A custom kernel without `modules` must have the
    virtio drivers built in: the image then carries no modules.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if kernel is not None:
        kernel = _checked_bzimage(Path(kernel))
    if modules is not None:
        modules = _checked_modules_dir(Path(modules))
    kernel_deb, packages = _resolve_packages(None if kernel is not None else kernel_package, cache_dir)
    key = _cache_key(packages, kernel, modules)
    images = cache_dir / "images"
    image_dir = images / key
    if (image_dir / "image.json").is_file():
        logger.info(f"cache hit {key}")
        return _load_image(image_dir, cache_hit=True)
    logger.info(f"building guest image {key}")
    debs = _download(packages, cache_dir / "debs")
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=images, prefix=".build-") as tmp:
        work = Path(tmp)
        out = work / "image"
        out.mkdir()
        _assemble(work, out, debs, kernel_deb, kernel, modules, key)
        try:
            out.rename(image_dir)
        except OSError:
            if not (image_dir / "image.json").is_file():
                raise
            logger.info(f"image {key} was built concurrently; using that one")
    logger.info(f"built guest image {key} in {image_dir}")
    return _load_image(image_dir, cache_hit=False)


# ---------------------------------------------------------------- inputs


def _checked_bzimage(path: Path) -> Path:
    """The path of a readable bzImage, or a UsageError naming --kernel."""
    if not path.is_file():
        raise UsageError(f"--kernel {path}: no such file; pass the path of a bzImage (arch/x86/boot/bzImage)")
    with path.open("rb") as f:
        f.seek(HDRS_OFFSET)
        if f.read(4) != b"HdrS":
            raise UsageError(
                f"--kernel {path}: not a bzImage (no 'HdrS' at 0x202); pass arch/x86/boot/bzImage, not vmlinux"
            )
    return path.resolve()


def _checked_modules_dir(path: Path) -> Path:
    """A folder holding virtio_balloon.ko(.xz/.gz/.zst), or a UsageError naming --modules."""
    if not path.is_dir():
        raise UsageError(f"--modules {path}: no such folder; pass a modules_install tree or a folder of .ko files")
    if not any(_module_name(p) == "virtio_balloon" for p in _module_files(path)):
        raise UsageError(
            f"--modules {path}: no virtio_balloon.ko(.xz/.zst) in it; build CONFIG_VIRTIO_BALLOON=m "
            "and pass the INSTALL_MOD_PATH tree or the folder of .ko files"
        )
    return path.resolve()


def bzimage_version(path: Path) -> str:
    """The kernel release a bzImage announces in its setup header."""
    data = path.read_bytes()[:0x10000]
    (offset,) = struct.unpack_from("<H", data, 0x20E)
    text = data[offset + 0x200 :].split(b"\0", 1)[0].decode(errors="replace")
    return text.split()[0]


def release_version(release: str) -> tuple[int, ...]:
    """(6, 12, 118) from a kernel release such as '6.12.118+deb13-cloud-amd64'; () when it names no version."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    return tuple(int(part) for part in match.groups() if part is not None) if match else ()


def _run(args: list[str], cwd: Path | str | None = None) -> str:
    """Run a command and return its stdout; raise VballoonError with its stderr."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False, cwd=cwd)
    except FileNotFoundError:
        raise VballoonError(f"{args[0]} not found; install it (see the Makefile's guest image target)") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise VballoonError(f"{' '.join(args[:3])} failed: {last}")
    return done.stdout


def _kernel_package(name: str) -> str:
    """The concrete linux-image package behind `name` (a metapackage or itself)."""
    try:
        text = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", name])
    except VballoonError:
        raise UsageError(
            f"--kernel-package {name}: apt does not know it; run apt-get update or name a linux-image-* package"
        ) from None
    for line in text.splitlines():
        kind, _, dep = line.strip().partition(": ")
        if kind == "Depends" and dep.startswith("linux-image-"):
            return dep
    return name


def _userland_closure() -> list[str]:
    """The userland packages and every package they depend on, recursively."""
    text = _run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", *USERLAND_PACKAGES]
    )
    return [line for line in text.splitlines() if line and not line.startswith((" ", "<"))]


def _package_versions(names: list[str]) -> dict[str, str]:
    """The candidate version apt would download for each package."""
    try:
        text = _run(["apt-cache", "show", "--no-all-versions", *names])
    except VballoonError as error:
        raise UsageError(f"--kernel-package: apt cannot show {' '.join(names)} ({error}); run apt-get update") from None
    versions: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version): (.*)$", stanza, re.M))
        if fields:
            versions[fields["Package"]] = fields["Version"]
    return versions


def _resolve_packages(kernel_package: str | None, cache_dir: Path) -> tuple[str | None, dict[str, str]]:
    """The concrete kernel package (None without one) and the version of every package to fetch.

    Each apt-cache call re-reads apt's lists (over half a second), so the
    answer is remembered until those lists change.
    """
    lists = sorted(APT_LISTS.glob("*_Packages*"))
    stamp = json.dumps([kernel_package, [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in lists]])
    memo = cache_dir / "apt" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.json"
    if memo.is_file():
        known = json.loads(memo.read_text())
        return known["kernel_package"], known["packages"]
    kernel_deb = _kernel_package(kernel_package) if kernel_package else None
    packages = _package_versions([*([kernel_deb] if kernel_deb else []), *_userland_closure()])
    memo.parent.mkdir(parents=True, exist_ok=True)
    partial = memo.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"kernel_package": kernel_deb, "packages": packages}))
    partial.replace(memo)
    return kernel_deb, packages


def _tree_digest(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file under root."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _cache_key(packages: dict[str, str], kernel: Path | None, modules: Path | None) -> str:
    inputs = {
        "packages": packages,
        "kernel": file_sha256(kernel) if kernel else None,
        "kernel_config": file_sha256(config) if kernel and (config := _user_kernel_config(
            kernel, bzimage_version(kernel))) else None,
        "modules": _tree_digest(modules) if modules else None,
        "recipe": _tree_digest(RECIPE_DIR),
        "builder": file_sha256(Path(__file__)),
        "kernel extraction": [file_sha256(Path(m.__file__)) for m in (pvh, compression, elf)],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- downloads


def _deb_glob(name: str, version: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_*.deb"


def _download(packages: dict[str, str], debs: Path) -> dict[str, Path]:
    """Fetch each package at its version into the deb cache; return the .deb paths."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [n for n, v in packages.items() if not any(debs.glob(_deb_glob(n, v)))]
    if missing:
        logger.info(f"downloading {' '.join(missing)}")
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            _run(
                ["apt-get", "download", "-o", "APT::Sandbox::User=root",
                 *(f"{n}={packages[n]}" for n in missing)],
                cwd=tmp,
            )
            for deb in Path(tmp).glob("*.deb"):
                deb.rename(debs / deb.name)
    return {n: next(debs.glob(_deb_glob(n, v))) for n, v in packages.items()}


# ---------------------------------------------------------------- modules


def _module_name(path: Path | str) -> str:
    return Path(path).name.split(".ko", 1)[0].replace("-", "_")


def _plain_module_file(path: Path | str) -> str:
    """The file name of a module once decompressed: foo.ko.xz -> foo.ko."""
    return Path(path).name.split(".ko", 1)[0] + ".ko"


def _module_files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*.ko*") if p.name.endswith(MODULE_SUFFIXES))


def _copy_module(src: Path, dst_dir: Path) -> Path:
    """Copy a module into dst_dir as a plain .ko, decompressing it if needed."""
    dst = dst_dir / _plain_module_file(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith((".ko.xz", ".ko.gz", ".ko.zst")):
        data = src.read_bytes()
        try:
            dst.write_bytes(compression.decompress(data))
        except compression.DecompressError as error:
            raise UsageError(f"--modules: {src}: {error}") from None
    else:
        shutil.copyfile(src, dst)
    return dst


def _user_modules(modules: Path) -> tuple[str, list[tuple[Path, Path]], Path | None]:
    """Version, (file, folder relative to lib/modules/<ver>) pairs, modules.builtin."""
    versions_dir = modules / "lib" / "modules"
    if versions_dir.is_dir():
        versions = [d for d in versions_dir.iterdir() if d.is_dir()]
        if len(versions) != 1:
            raise UsageError(f"--modules {modules}: lib/modules must hold exactly one kernel version")
        tree = versions[0]
        files = [(p, p.parent.relative_to(tree)) for p in _module_files(tree)]
        builtin = tree / "modules.builtin"
        return tree.name, files, builtin if builtin.is_file() else None
    files = [(p, Path("extra")) for p in _module_files(modules)]
    balloon = next(p for p, _ in files if _module_name(p) == "virtio_balloon")
    vermagic = _run(["modinfo", "-F", "vermagic", str(balloon)]).split()
    if not vermagic:
        raise UsageError(f"--modules {modules}: {balloon.name} has no vermagic; rebuild it against your kernel")
    return vermagic[0], files, None


def _module_tree(
    work: Path, kernel_root: Path | None, debian_version: str | None, modules: Path | None
) -> tuple[Path, str] | None:
    """A depmod-ed tree (root, version) of every module the guest may use, or None."""
    if modules is None:
        return (kernel_root, debian_version) if kernel_root and debian_version else None
    version, files, builtin = _user_modules(modules)
    if kernel_root is not None and debian_version is not None:
        if version != debian_version:
            raise UsageError(
                f"--modules {modules}: modules are for {version} but the Debian kernel is {debian_version}; "
                "pass --kernel too or rebuild the modules"
            )
        root = kernel_root
        replaced = {_module_name(p) for p, _ in files}
        for old in list(_module_files(root / "lib" / "modules" / version)):
            if _module_name(old) in replaced:
                old.unlink()
    else:
        root = work / "modules"
    target = root / "lib" / "modules" / version
    for src, rel in files:
        _copy_module(src, target / rel)
    if builtin is not None:
        shutil.copyfile(builtin, target / "modules.builtin")
    return root, version


def read_modules_dep(tree: Path) -> dict[str, list[str]]:
    """modules.dep of a depmod-ed lib/modules/<ver> folder: module path -> its dependencies."""
    deps: dict[str, list[str]] = {}
    for line in (tree / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    return deps


def load_order(deps: dict[str, list[str]], roots: Iterable[str], builtin: set[str]) -> list[str]:
    """Module paths to insmod, each after everything it depends on.

    A root listed in `builtin` needs no module. A root that is neither a module
    nor known to be built in raises UsageError.
    """
    by_name = {_module_name(path): path for path in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for root in roots:
        if root in by_name:
            visit(by_name[root])
        elif root not in builtin:
            raise UsageError(
                f"--modules: the kernel has neither {root}.ko nor a built-in {root}; "
                f"build it as a module or built in and pass the modules with --modules DIR"
            )
    return order


def on_demand_order(deps: dict[str, list[str]], roots: Iterable[str], loaded: Iterable[str]) -> list[str]:
    """Module paths for the `roots` that are modules, with their dependencies, less those in `loaded`; roots that
    are built in or missing are left out (a test that needs one says so in the guest)."""
    names = {_module_name(path) for path in deps}
    boot = set(loaded)
    return [path for path in load_order(deps, [root for root in roots if root in names], builtin=set())
            if path not in boot]


def _builtin_names(tree: Path) -> set[str] | None:
    path = tree / "modules.builtin"
    if not path.is_file():
        return None
    return {_module_name(line) for line in path.read_text().split()}


# ---------------------------------------------------------------- assembly


def _elf_interpreter(binary: Path) -> str:
    """The PT_INTERP path of a 64-bit little-endian ELF executable."""
    for p_type, segment in elf.program_headers(binary.read_bytes()):
        if p_type == elf.PT_INTERP:
            return segment.rstrip(b"\0").decode()
    raise VballoonError(f"{binary} is not dynamically linked")


def _inside(sysroot: Path, path: str) -> Path:
    """Follow symlinks of an absolute path as if sysroot were /."""
    current = sysroot / path.lstrip("/")
    while current.is_symlink():
        target = os.readlink(current)
        current = sysroot / target.lstrip("/") if target.startswith("/") else current.parent / target
    return current


class _Sysroot:
    """Extracted Debian packages and the dynamic loader inside them."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.interpreter = _elf_interpreter(root / binary)
        self.loader = _inside(root, self.interpreter)
        self.library_path = ":".join(
            str(root / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu") if (root / d).is_dir()
        )

    def run(self, binary: str, *args: str) -> str:
        """Run a binary of the sysroot with the sysroot's loader and libraries."""
        return _run([str(self.loader), "--library-path", self.library_path, str(self.root / binary), *args])

    def libraries(self, binary: str) -> list[str]:
        """Absolute guest paths of the ELF interpreter and every library it maps for binary."""
        listing = _run([str(self.loader), "--library-path", self.library_path, "--list", str(self.root / binary)])
        paths = [self.interpreter]
        for line in listing.splitlines():
            if "not found" in line:
                raise VballoonError(f"{binary}: {line.strip()}")
            match = re.search(r"(?:=> )?(/\S+) \(0x", line)
            if match:
                found = Path(match.group(1))
                inside = found.is_relative_to(self.root)
                paths.append("/" + str(found.relative_to(self.root)) if inside else str(found))
        return paths

    def copy_path(self, guest_path: str, staging: Path) -> None:
        """Copy a file into staging at the same path, recreating its symlink chain."""
        current = guest_path
        while True:
            source = self.root / current.lstrip("/")
            if not source.exists() and not source.is_symlink():
                source = Path(current)
            dest = staging / current.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not source.is_symlink():
                shutil.copy2(source, dest)
                return
            target = os.readlink(source)
            if not dest.is_symlink():
                dest.symlink_to(target)
            current = target if target.startswith("/") else str(Path(current).parent / target)


def _install_busybox(sysroot: _Sysroot, staging: Path) -> None:
    busybox = staging / "bin" / "busybox"
    busybox.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sysroot.root / "bin" / "busybox", busybox)
    for applet in _run([str(busybox), "--list-full"]).split():
        link = staging / applet
        if link != busybox and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")


def _install_dropbear(sysroot: _Sysroot, staging: Path, out: Path) -> None:
    """dropbear, its libraries, a host key, and root's authorized client key."""
    dropbear = "usr/sbin/dropbear"
    sysroot.copy_path("/" + dropbear, staging)
    for library in sysroot.libraries(dropbear):
        sysroot.copy_path(library, staging)
    keys = staging / "etc" / "dropbear"
    keys.mkdir(parents=True, exist_ok=True)
    sysroot.run("usr/bin/dropbearkey", "-t", "ed25519", "-f", str(keys / "dropbear_ed25519_host_key"))
    client = Ed25519PrivateKey.generate()
    private = client.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = client.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    key_file = out / "id_ed25519"
    key_file.write_bytes(private)
    key_file.chmod(0o600)
    ssh_dir = staging / "root" / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    (ssh_dir / "authorized_keys").write_bytes(public + b" vballoon\n")
    (ssh_dir / "authorized_keys").chmod(0o600)


def _install_modules(tree: tuple[Path, str] | None, staging: Path) -> list[str]:
    """Copy the root and on-demand drivers and their dependencies in; return the root drivers' load order."""
    if tree is None:
        logger.info("custom kernel without --modules: the virtio drivers must be built in; the image has no modules")
        return []
    root, version = tree
    _run(["depmod", "-b", str(root), version])
    source = root / "lib" / "modules" / version
    builtin = _builtin_names(source)
    deps = read_modules_dep(source)
    if builtin is None:
        logger.info(f"{version} has no modules.builtin: drivers missing from --modules are taken as built in")
        available = {_module_name(p) for p in deps}
        builtin = set(ROOT_DRIVERS) - available
    order = load_order(deps, ROOT_DRIVERS, builtin)
    target = staging / "lib" / "modules" / version
    for module in order + on_demand_order(deps, ON_DEMAND_DRIVERS, order):
        _copy_module(source / module, (target / module).parent)
    order = [str(Path(m).parent / _plain_module_file(m)) for m in order]
    if (source / "modules.builtin").is_file():
        shutil.copyfile(source / "modules.builtin", target / "modules.builtin")
    _run(["depmod", "-b", str(staging), version])
    return order


def compile_memhog(dest: Path) -> None:
    """Build the guest helper (static, so the host can run it too: it makes reference patterns)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _run(["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", "-o", str(dest), str(RECIPE_DIR / "memhog.c")])


def _write_guest_config(staging: Path, version: str, order: list[str]) -> None:
    """/etc/vballoon.conf, sourced by /init: markers, kernel version, modules to load."""
    values = {
        "KERNEL_VERSION": version,
        "INIT_MARKER": INIT_MARKER,
        "READY_MARKER": READY_MARKER,
        "RESUME_MARKER": RESUME_MARKER,
        "MODULES": " ".join(order),
    }
    text = "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items())
    (staging / "etc" / "vballoon.conf").write_text(text)


def _cpio_record(ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc cpio record owned by root with mtime 0."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
    return header + b"\0" * (-len(header) % 4) + data + b"\0" * (-len(data) % 4)


def write_cpio(staging: Path, dest: Path) -> None:
    """Pack staging as an uncompressed newc cpio, plus the /dev/console node."""
    paths = sorted(staging.rglob("*"))
    with dest.open("wb") as out:
        for ino, path in enumerate(paths, start=1):
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                data = os.readlink(path).encode()
            elif stat.S_ISREG(info.st_mode):
                data = path.read_bytes()
            else:
                data = b""
            out.write(_cpio_record(ino, str(path.relative_to(staging)), info.st_mode, data))
        out.write(_cpio_record(len(paths) + 1, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
        out.write(_cpio_record(0, "TRAILER!!!", 0))


def _assemble(
    work: Path,
    out: Path,
    debs: dict[str, Path],
    kernel_deb: str | None,
    kernel: Path | None,
    modules: Path | None,
    key: str,
) -> None:
    """Build bzImage, vmlinux (where PVH can boot it), initrd.cpio, id_ed25519, kernel.config and image.json
    into out."""
    sysroot_dir = work / "sysroot"
    for name, deb in debs.items():
        if name != kernel_deb:
            _run(["dpkg-deb", "-x", str(deb), str(sysroot_dir)])
    sysroot = _Sysroot(sysroot_dir, "usr/sbin/dropbear")
    kernel_root = debian_version = None
    if kernel_deb is not None:
        kernel_root = work / "kernel"
        _run(["dpkg-deb", "-x", str(debs[kernel_deb]), str(kernel_root)])
        (debian_version,) = (d.name for d in (kernel_root / "lib" / "modules").iterdir())
        shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{debian_version}", out / "bzImage")
        shutil.copyfile(kernel_root / "boot" / f"config-{debian_version}", out / "kernel.config")
    else:
        assert kernel is not None
        shutil.copyfile(kernel, out / "bzImage")
    tree = _module_tree(work, kernel_root, debian_version, modules)
    version = debian_version or bzimage_version(out / "bzImage")
    if kernel is not None:
        config = _user_kernel_config(kernel, version)
        if config is None:
            logger.warning(f"--kernel {kernel}: no config-{version} beside it and no .config in its build tree: "
                           "expectations that need the kernel's config (CONFIG_PAGE_POISONING for +pgpoison) "
                           "assume Debian's")
        else:
            shutil.copyfile(config, out / "kernel.config")
    if tree is not None and tree[1] != version:
        raise UsageError(f"--modules {modules}: modules are for {tree[1]} but --kernel is {version}")
    staging = work / "root"
    shutil.copytree(RECIPE_DIR / "rootfs", staging, symlinks=True)
    shutil.copy2(RECIPE_DIR / "init", staging / "init")
    (staging / "init").chmod(0o755)
    for mount_point in ("proc", "sys", "dev", "tmp", "run"):
        (staging / mount_point).mkdir(exist_ok=True)
    _install_busybox(sysroot, staging)
    _install_dropbear(sysroot, staging, out)
    order = _install_modules(tree, staging)
    compile_memhog(staging / "usr" / "bin" / "memhog")
    _write_guest_config(staging, version, order)
    write_cpio(staging, out / "initrd.cpio")
    no_pvh = pvh.extract_pvh_kernel(out / "bzImage", out / pvh.VMLINUX)
    if no_pvh is not None:
        logger.info(f"the guest boots the bzImage (slower under TCG: its decompressor runs in the guest): {no_pvh}")
    metadata = {"key": key, "kernel_version": version, "modules": order, "boot": no_pvh or "pvh"}
    (out / "image.json").write_text(json.dumps(metadata, indent=1) + "\n")


def _user_kernel_config(kernel: Path, version: str) -> Path | None:
    """The config of a user's kernel: `config-<version>` beside it (a /boot or `vballoon upstream fetch` layout),
    or the `.config` of the build tree holding arch/x86/boot/bzImage."""
    candidates = [kernel.parent / f"config-{version}"]
    if kernel.resolve().parent.match("arch/x86/boot"):
        candidates.append(kernel.resolve().parents[3] / ".config")
    return next((path for path in candidates if path.is_file()), None)


def _read_config(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    return dict(re.findall(r"^(CONFIG_\w+)=(.*)$", path.read_text(), re.M))


def _load_image(image_dir: Path, cache_hit: bool) -> GuestImage:
    metadata = json.loads((image_dir / "image.json").read_text())
    return GuestImage(
        kernel=image_dir / "bzImage",
        initrd=image_dir / "initrd.cpio",
        ssh_key=image_dir / "id_ed25519",
        kernel_version=metadata["kernel_version"],
        key=metadata["key"],
        cache_hit=cache_hit,
        modules=tuple(metadata["modules"]),
        kernel_config=_read_config(image_dir / "kernel.config"),
        boot=metadata["boot"],
    )
