"""Build qemu-system-x86_64 from a source tree with a flavour: `vballoon qemu build --flavour asan|gcov`.

A flavour is a set of configure options: asan (AddressSanitizer and
UndefinedBehaviorSanitizer) or gcov (line and branch coverage). The default
source is the host's own QEMU: Debian's source package at the version of the
installed qemu-system-x86, fetched with a private APT state over the host's
release and unpacked with Debian's patches. A source tree of the user's is
built out of tree and never copied.

Each build is an entry of the cache, builds/<key>/ (src/ for a Debian
source, build/, logs/), keyed by the source's identity and the flavour. It
is built in place, not renamed into place: a gcov binary writes its .gcda
files beside the objects, at the absolute paths they were compiled at. A
failed step keeps its logs in builds/failed-<key>/ and removes the entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vballoon.errors import UsageError, VballoonError
from vballoon.guest.image import default_cache_dir
from vballoon.upstream import (
    CONFIGURE_OPTIONS,
    QEMU_BINARY,
    QEMU_SOURCE,
    BuildLogs,
    Entry,
    PrivateApt,
    build_qemu,
    cache_entry,
    check_qemu,
    entry_name,
    unpack_source,
    write_metadata,
)

FLAVOURS: dict[str, tuple[str, ...]] = {
    "asan": ("--enable-asan", "--enable-ubsan", "--disable-werror"),
    "gcov": ("--enable-gcov", "--disable-werror"),
}
# Options a tree's configure may not know, and what stands for them there. Older configure scripts (QEMU 7.2
# among them) enable both sanitizers with one option and probe UBSan with a program GCC 12 rejects
# (-Werror=maybe-uninitialized), so UBSan's flags go in directly; they predate relocatable builds, whose
# binaries always read the configured firmware path.
OLDER_SPELLINGS: dict[str, tuple[str, ...]] = {
    "--enable-asan": ("--enable-sanitizers",),
    "--enable-ubsan": ("--enable-sanitizers", "--extra-cflags=-fsanitize=undefined",
                       "--extra-ldflags=-fsanitize=undefined"),
    "--disable-relocatable": (),
}
# What each flavour's compile commands carry once configured: a configure probe that fails says nothing.
FLAVOUR_FLAGS: dict[str, tuple[str, ...]] = {
    "asan": ("-fsanitize=address", "-fsanitize=undefined"),
    "gcov": ("--coverage",),
}
HOST_PACKAGE = "qemu-system-x86"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltQemu:
    """A flavoured qemu-system-x86_64 in the cache, with the build and source trees it was built from."""

    binary: Path
    build_dir: Path
    source_dir: Path
    version: str
    flavour: str


def configure_options(tree: Path, flavour: str) -> tuple[str, ...]:
    """vballoon's configure options plus the flavour's, each in the spelling the tree's configure knows."""
    known = "".join(path.read_text(errors="replace") for path in (tree / "configure",
                                                                   tree / "scripts" / "meson-buildoptions.sh")
                    if path.is_file())
    options: list[str] = []
    for option in (*CONFIGURE_OPTIONS, *FLAVOURS[flavour]):
        name = option.split("=", 1)[0]
        spelled = (option,) if name not in OLDER_SPELLINGS or name in known else OLDER_SPELLINGS[name]
        options.extend(spelling for spelling in spelled if spelling not in options)
    return tuple(options)


def check_flavour(build: Path, flavour: str, logs: BuildLogs) -> None:
    """The build's compile commands carry the flavour's flags (a failed configure probe drops them silently)."""
    commands = (build / "build.ninja").read_text(errors="replace")
    missing = [flag for flag in FLAVOUR_FLAGS[flavour] if flag not in commands]
    (logs.folder / "check-flavour.log").write_text(f"{flavour} flags missing from build.ninja: {missing}\n")
    if missing:
        logs.fail("check-flavour", f"configure did not enable {' '.join(missing)}")


def link_host_firmware(build: Path) -> None:
    """Let the binary read the host's firmware from its build tree.

    A binary run from its build tree reads each folder F of the firmware path
    at build/qemu-bundle/F (QEMU's get_relocated_path), where a build installs
    only its own files (links, some to targets not built): a host firmware
    folder missing there is linked whole, and a host file missing from a bundle
    folder that exists is linked alone.
    """
    (firmware_path,) = [option.split("=", 1)[1] for option in CONFIGURE_OPTIONS if option.startswith("--firmwarepath=")]
    for folder in map(Path, firmware_path.split(":")):
        bundled = build / "qemu-bundle" / folder.relative_to("/")
        if not folder.is_dir():
            continue
        if not os.path.lexists(bundled):
            bundled.parent.mkdir(parents=True, exist_ok=True)
            bundled.symlink_to(folder)
        elif not bundled.is_symlink():
            for host_file in folder.iterdir():
                if not os.path.lexists(bundled / host_file.name):
                    (bundled / host_file.name).symlink_to(host_file)


def host_source_version() -> str:
    """The source version of the installed qemu-system-x86 (a binNMU's +bN dropped), as `apt-get source` takes it."""
    done = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status} ${source:Version}", HOST_PACKAGE],
                          capture_output=True, text=True, check=False)
    status, _, version = done.stdout.partition(" ")
    if done.returncode != 0 or status != "installed":
        raise VballoonError(f"{HOST_PACKAGE} is not installed: install it (make deps) or pass --source DIR")
    return version


def host_apt(root: Path) -> PrivateApt:
    """A private APT state over the host's Debian release (its main, updates and security suites)."""
    os_release = Path("/etc/os-release").read_text()
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", os_release, re.M)
    if found is None:
        raise VballoonError("/etc/os-release names no VERSION_CODENAME: not a Debian host; pass --source DIR")
    codename = found[1]
    return PrivateApt(root, mirrors=((DEBIAN_MIRROR, codename), (DEBIAN_MIRROR, f"{codename}-updates"),
                                     (DEBIAN_SECURITY, f"{codename}-security")))


def _git(source: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else ""


def source_identity(source: Path) -> tuple[str, str]:
    """The version of a user's QEMU tree (`git describe`, else its VERSION file) and a digest of its state.

    The digest covers the tree's path, its commit and uncommitted changes
    (git), or every file's size and mtime outside build folders (no git).
    """
    if not (source / "configure").is_file() or not (source / "VERSION").is_file():
        raise UsageError(f"--source {source}: not a QEMU source tree (no configure and VERSION); "
                         "pass the top folder of a QEMU checkout or tarball")
    is_git = (source / ".git").exists()
    version = (is_git and _git(source, "describe", "--always", "--dirty").strip()) \
        or (source / "VERSION").read_text().strip()
    digest = hashlib.sha256(f"{source.resolve()}\n{version}\n".encode())
    if is_git:
        digest.update(_git(source, "diff", "HEAD").encode())
    else:
        for folder, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("build"))
            for name in sorted(files):
                info = os.stat(os.path.join(folder, name), follow_symlinks=False)
                digest.update(f"{os.path.join(folder, name)} {info.st_size} {info.st_mtime_ns}\n".encode())
    return version, digest.hexdigest()[:12]


def cache_key(flavour: str, version: str, source: Path | None = None, digest: str = "") -> str:
    """builds/<key>: qemu-<Debian version>-<flavour>, or <tree folder>-<version>-<digest>-<flavour>."""
    stem = entry_name(QEMU_SOURCE, version) if source is None else f"{source.resolve().name}-{version}-{digest}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{stem}-{flavour}")


def _built(entry: Entry, flavour: str) -> BuiltQemu:
    return BuiltQemu(entry.options["qemu"], entry.options["build"], entry.options["source"], entry.version, flavour)


def build_flavour(flavour: str, source: Path | None = None, cache_dir: Path | None = None) -> BuiltQemu:
    """The cached qemu-system-x86_64 of `source` (default: the host's QEMU) built with a flavour, built unless cached."""
    if flavour not in FLAVOURS:
        raise UsageError(f"--flavour {flavour}: unknown; choose one of {', '.join(FLAVOURS)}")
    builds = (Path(cache_dir) if cache_dir else default_cache_dir()) / "builds"
    if source is None:
        version, tree = host_source_version(), None
        key = cache_key(flavour, version)
    else:
        tree = Path(source).resolve()
        version, digest = source_identity(tree)
        key = cache_key(flavour, version, tree, digest)
    failed = builds / f"failed-{key}"

    def make(work: Path, entry: Path) -> None:
        logs = BuildLogs(f"{QEMU_SOURCE} {version} ({flavour})", entry / "logs", failed)
        logs.folder.mkdir()
        if tree is None:
            apt = host_apt(work / "apt")
            apt.update(QEMU_SOURCE)
            logger.info(f"fetching {QEMU_SOURCE} {version} (source package, about 25 MB)")
        sources = tree or unpack_source(apt, version, entry)
        build_qemu(sources, entry / "build", work, logs, configure_options(sources, flavour))
        check_flavour(entry / "build", flavour, logs)
        link_host_firmware(entry / "build")
        check_qemu(entry / "build" / QEMU_BINARY, logs)
        write_metadata(entry, QEMU_SOURCE, version,
                       {"qemu": f"build/{QEMU_BINARY}", "build": "build", "source": str(sources.relative_to(entry)
                                                                                        if tree is None else tree)})
        shutil.rmtree(failed, ignore_errors=True)

    return _built(cache_entry(builds, key, make, in_place=True), flavour)
