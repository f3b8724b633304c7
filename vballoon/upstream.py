"""Fetch Debian 13 (trixie)'s QEMU and kernel on a Debian 12 host: `vballoon upstream fetch`.

APT runs with a state of its own under the cache (sources list, lists,
archives, package cache, no dpkg status), so the host's /etc/apt and
/var/lib/apt are only read for configuration, never written. QEMU is built
from trixie's source package with Debian's patches applied, only
qemu-system-x86_64, and runs from the cache with the host's firmware (the
host's qemu-system-x86 package supplies /usr/share/qemu, seabios and ipxe).
The kernel is trixie's image package laid out as boot/vmlinuz-<release> and a
modules_install tree, checked by building the guest image from it.

Entries are keyed by package and version (upstream/qemu-1_10.0.13+ds-0+deb13u1,
upstream/linux-image-<release>-<version>); each is built in a temporary folder
in the cache and renamed into place, so a failure or Ctrl-C leaves no half
entry. A build step that fails keeps its logs in upstream/failed-<entry>/.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from vballoon.errors import VballoonError
from vballoon.guest.image import DEFAULT_KERNEL_PACKAGE, build_image, default_cache_dir

MIRRORS = (
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian-security", "trixie-security"),
)
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
QEMU_SOURCE = "qemu"
QEMU_BINARY = "qemu-system-x86_64"
# Debian's source tarballs drop QEMU's bundled meson and Debian 12's meson is 1.0: meson comes from PyPI, in the
# release series a tree's meson.build asks for (QEMU bundles that series).
MESON_VERSION = re.compile(r"meson_version\s*:\s*'>=\s*([0-9.]+)'")
# Not relocatable: the binary is moved out of its build tree and must read the
# firmware from these absolute paths, not from ../share/qemu next to itself.
CONFIGURE_OPTIONS = (
    "--target-list=x86_64-softmmu", "--prefix=/usr",
    "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu",
    "--disable-relocatable", "--disable-install-blobs", "--disable-docs", "--enable-slirp",
    "--enable-trace-backends=log",
)
INSTALL_HINT = "make upstream installs the build packages it needs"
# The machine the suites boot, with the devices they add: answering QMP proves the firmware was found.
PROBE_ARGS = (
    "-machine", "q35", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
    "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=", "-device", "virtio-balloon-pci",
)
PROBE_QMP = '{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n{"execute": "quit"}\n'
PROBE_TIMEOUT = 60.0
METADATA = "upstream.json"
OPTION_ORDER = ("qemu", "kernel", "modules")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One fetched package in the cache and the vballoon options that point into it."""

    directory: Path
    package: str
    version: str
    cache_hit: bool
    options: dict[str, Path]


def _run(what: str, args: list[str], cwd: Path | None = None, label: str | None = None) -> str:
    """Run a command and return its stdout; a failure is one line naming `what` and the command's first error."""
    label = label or Path(args[0]).name
    try:
        done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError:
        raise VballoonError(f"{what}: {args[0]} not found; {INSTALL_HINT}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or ["no message"]
        first_error = next((line for line in lines if line.startswith("E: ")), lines[-1])
        raise VballoonError(f"{what}: {label} failed: {first_error}")
    return done.stdout


class PrivateApt:
    """apt-get and apt-cache over trixie, with a sources list, lists, archives and cache of their own."""

    def __init__(self, root: Path, mirrors: tuple[tuple[str, str], ...] = MIRRORS) -> None:
        self.root = root
        self.mirrors = mirrors

    def options(self) -> list[str]:
        """The -o options that keep every piece of APT state under root."""
        settings = {
            "Dir::State": self.root,
            "Dir::State::Lists": self.root / "lists",
            "Dir::State::status": "/dev/null",
            "Dir::Etc::sourcelist": self.root / "sources.list",
            "Dir::Etc::sourceparts": "-",
            "Dir::Etc::preferences": "/dev/null",
            "Dir::Etc::preferencesparts": "-",
            "Dir::Cache": self.root / "cache",
            "Dir::Cache::Archives": self.root / "archives",
            "APT::Sandbox::User": "root",
        }
        return [arg for name, value in settings.items() for arg in ("-o", f"{name}={value}")]

    def command(self, tool: str, *args: str) -> list[str]:
        """The command line of an APT tool (apt-get, apt-cache, apt-config) over the private state."""
        return [tool, "-q", *self.options(), *args]

    def run(self, what: str, tool: str, *args: str, cwd: Path | None = None) -> str:
        """Run an APT tool over the private state; a failure is one line naming `what` and APT's error."""
        return _run(what, self.command(tool, *args), cwd=cwd, label=f"{tool} {args[0]}")

    def update(self, what: str) -> None:
        """Write the sources list and download trixie's lists; any failed index is an error."""
        for folder in ("lists/partial", "archives/partial", "cache"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list").write_text("".join(
            f"{kind} [signed-by={KEYRING}] {url} {suite} main\n"
            for url, suite in self.mirrors for kind in ("deb", "deb-src")
        ))
        self.run(what, "apt-get", "update", "--error-on=any")


Unpack = Callable[[PrivateApt, str, Path], Path]


def _newer(first: str, second: str) -> str:
    """The newer of two Debian versions, as dpkg compares them."""
    later = subprocess.run(["dpkg", "--compare-versions", second, "gt", first], check=False).returncode == 0
    return second if later else first


def newest_source(apt: PrivateApt, package: str) -> str:
    """The newest version of a source package in the lists (the one `apt-get source` takes)."""
    text = apt.run(package, "apt-cache", "showsrc", "--only-source", package)
    versions = re.findall(r"^Version: (\S+)$", text, re.M)
    if not versions:
        raise VballoonError(f"{package}: trixie's lists have no source package {package}")
    return functools.reduce(_newer, versions)


def kernel_candidate(apt: PrivateApt, package: str) -> tuple[str, str]:
    """The concrete linux-image package behind `package` (a metapackage or itself) and its version."""
    text = apt.run(package, "apt-cache", "show", "--no-all-versions", package)
    fields = dict(re.findall(r"^(Version|Depends): (.*)$", text, re.M))
    image = re.search(r"(?:^|, )(linux-image-\S+) \(= (\S+)\)", fields.get("Depends", ""))
    return (image[1], image[2]) if image else (package, fields["Version"])


def entry_name(package: str, version: str) -> str:
    """The cache folder of a package version: the epoch's colon becomes '_' (no Debian version has one)."""
    return f"{package}-{version}".replace(":", "_")


def write_metadata(directory: Path, package: str, version: str, options: dict[str, str]) -> None:
    """Mark a folder as a complete entry: package, version and the option paths relative to it."""
    metadata = {"package": package, "version": version, "options": options}
    (directory / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")


def _is_entry(directory: Path) -> bool:
    return (directory / METADATA).is_file()


def _load(directory: Path, cache_hit: bool) -> Entry:
    metadata = json.loads((directory / METADATA).read_text())
    options = {name: directory / path for name, path in metadata["options"].items()}
    return Entry(directory, metadata["package"], metadata["version"], cache_hit, options)


def cache_entry(upstream: Path, name: str, make: Callable[[Path, Path], None], in_place: bool = False) -> Entry:
    """upstream/name from the cache, else made by `make(work, entry)`.

    work is a temporary folder in upstream, removed however `make` ends. entry
    is work/entry, renamed to upstream/name once made; in_place, entry is
    upstream/name itself (for builds whose files must stay at the paths they
    were built at), removed when `make` fails: either way no half entry stays.
    """
    directory = upstream / name
    if _is_entry(directory):
        logger.info(f"cache hit {name}")
        return _load(directory, cache_hit=True)
    upstream.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=upstream, prefix=f".build-{name}-") as tmp:
        work = Path(tmp)
        if in_place:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            try:
                make(work, directory)
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
        else:
            (work / "entry").mkdir()
            make(work, work / "entry")
            try:
                (work / "entry").rename(directory)
            except OSError:
                if not _is_entry(directory):
                    raise
    logger.info(f"{name} is ready in {directory}")
    return _load(directory, cache_hit=False)


# ---------------------------------------------------------------- QEMU


def unpack_source(apt: PrivateApt, version: str, work: Path) -> Path:
    """Download trixie's qemu source package at version and unpack it with Debian's patches applied."""
    download = work / "download"
    download.mkdir()
    apt.run(QEMU_SOURCE, "apt-get", "source", "--download-only", f"{QEMU_SOURCE}={version}", cwd=download)
    (dsc,) = download.glob("*.dsc")
    tree = work / "src"
    _run(QEMU_SOURCE, ["dpkg-source", "--no-copy", "-x", str(dsc), str(tree)])
    shutil.rmtree(download)
    return tree


@dataclass(frozen=True)
class BuildLogs:
    """Where the steps of one build write their output, and where it is kept when a step fails."""

    what: str
    folder: Path
    failed: Path

    def step(self, name: str, args: list[str], cwd: Path | None = None, stdin: str | None = None,
             timeout: float | None = None, env: dict[str, str] | None = None) -> str:
        """Run a step with its output in <folder>/<name>.log and return that output."""
        log_file = self.folder / f"{name}.log"
        try:
            with log_file.open("w") as out:
                done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, input=stdin,
                                      text=True, timeout=timeout, env=env, check=False)
        except FileNotFoundError:
            raise VballoonError(f"{self.what}: {args[0]} not found; {INSTALL_HINT}") from None
        except subprocess.TimeoutExpired:
            self.fail(name, f"no answer in {timeout:.0f} s")
        if done.returncode != 0:
            self.fail(name, f"exit {done.returncode}")
        return log_file.read_text(errors="replace")

    def fail(self, name: str, status: str) -> NoReturn:
        """Keep the logs in `failed` (replacing an older failure's) and raise one line naming the step's log.

        The line quotes the log's first error (a compiler's or meson's "error:"), else its last line.
        """
        lines = [line.strip() for line in (self.folder / f"{name}.log").read_text(errors="replace").splitlines()
                 if line.strip()] or ["no output"]
        first_error = next((line for line in lines if re.search(r"\berror:", line, re.I)), lines[-1])
        shutil.rmtree(self.failed, ignore_errors=True)
        shutil.move(self.folder, self.failed)
        raise VballoonError(f"{self.what}: {name} failed ({status}): {first_error}; "
                            f"log kept in {self.failed / f'{name}.log'}")


def meson_requirement(tree: Path) -> str:
    """The pip requirement of meson for a QEMU tree: the release series its meson.build asks for at least."""
    found = MESON_VERSION.search((tree / "meson.build").read_text(errors="replace")) \
        if (tree / "meson.build").is_file() else None
    if found is None:
        raise VballoonError(f"{tree}: no meson.build with a meson_version; is it a QEMU source tree?")
    return f"meson~={found[1]}"


def build_qemu(tree: Path, build: Path, work: Path, logs: BuildLogs, options: tuple[str, ...] = CONFIGURE_OPTIONS) -> Path:
    """Configure tree out of tree in `build` with meson from PyPI (a venv in work), build qemu-system-x86_64 there.

    A configure script that takes --meson= (QEMU before the mkvenv era) gets
    the venv's meson and keeps its own python; a newer one gets the venv's
    python and finds meson in it.
    """
    venv = work / "venv"
    python = venv / "bin" / "python3"
    logs.step("venv", [sys.executable, "-m", "venv", str(venv)])
    logs.step("meson", [str(python), "-m", "pip", "install", meson_requirement(tree)])
    configure = tree / "configure"
    takes_meson = "--meson=" in configure.read_text(errors="replace") if configure.is_file() else False
    interpreter = f"--meson={venv / 'bin' / 'meson'}" if takes_meson else f"--python={python}"
    build.mkdir(parents=True, exist_ok=True)
    logger.info(f"configuring QEMU ({logs.folder / 'configure.log'})")
    logs.step("configure", [str(configure), *options, interpreter], cwd=build)
    jobs = len(os.sched_getaffinity(0))
    logger.info(f"building {QEMU_BINARY} with ninja -j{jobs} ({logs.folder / 'build.log'})")
    logs.step("build", ["ninja", "-C", str(build), f"-j{jobs}", QEMU_BINARY])
    return build / QEMU_BINARY


def check_qemu(binary: Path, logs: BuildLogs) -> None:
    """The binary answers QMP on q35 with virtio-net and virtio-balloon-pci and lists the balloon's trace events.

    A sanitizer build checks no leaks here: a leak at exit is a finding of the suites, not a broken build.
    """
    environment = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0"}
    answers = logs.step("check-qmp", [str(binary), *PROBE_ARGS], stdin=PROBE_QMP, timeout=PROBE_TIMEOUT,
                        env=environment)
    if '"status": "prelaunch"' not in answers:
        logs.fail("check-qmp", "no answer to query-status")
    events = logs.step("check-trace", [str(binary), "-trace", "help"])
    if not re.search(r"^virtio_balloon_", events, re.M):
        logs.fail("check-trace", "no virtio_balloon_* trace events")


def fetch_qemu(apt: PrivateApt, upstream: Path, version: str, unpack: Unpack = unpack_source) -> Entry:
    """The cached qemu-system-x86_64 of trixie's qemu at version, built unless cached."""
    name = entry_name(QEMU_SOURCE, version)
    failed = upstream / f"failed-{name}"

    def make(work: Path, entry: Path) -> None:
        logger.info(f"fetching {QEMU_SOURCE} {version} (source package, about 40 MB)")
        tree = unpack(apt, version, work)
        logs = BuildLogs(f"{QEMU_SOURCE} {version}", entry / "logs", failed)
        logs.folder.mkdir()
        shutil.move(build_qemu(tree, tree / "build", work, logs), entry / QEMU_BINARY)
        check_qemu(entry / QEMU_BINARY, logs)
        write_metadata(entry, QEMU_SOURCE, version, {"qemu": QEMU_BINARY})
        shutil.rmtree(failed, ignore_errors=True)

    return cache_entry(upstream, name, make)


# ---------------------------------------------------------------- kernel


def lay_out_kernel(deb: Path, work: Path, out: Path) -> str:
    """Unpack a linux-image .deb into out/boot/{vmlinuz,config}-<release> and out/modules/lib/modules/<release>."""
    root = work / "root"
    _run(deb.name, ["dpkg-deb", "-x", str(deb), str(root)])
    trees = [tree for modules in (root / "usr" / "lib" / "modules", root / "lib" / "modules") if modules.is_dir()
             for tree in modules.iterdir()]
    if len(trees) != 1 or not (root / "boot" / f"vmlinuz-{trees[0].name}").is_file():
        raise VballoonError(f"{deb.name}: no boot/vmlinuz-<release> with one lib/modules/<release>; "
                            "--kernel-package must name a linux-image package")
    release = trees[0].name
    (out / "boot").mkdir(parents=True)
    for kind in ("vmlinuz", "config"):
        (root / "boot" / f"{kind}-{release}").rename(out / "boot" / f"{kind}-{release}")
    (out / "modules" / "lib" / "modules").mkdir(parents=True)
    trees[0].rename(out / "modules" / "lib" / "modules" / release)
    return release


def fetch_kernel(apt: PrivateApt, upstream: Path, package: str, version: str, cache_dir: Path) -> Entry:
    """The cached kernel and modules of a trixie linux-image package at version, fetched unless cached."""

    def make(work: Path, entry: Path) -> None:
        logger.info(f"fetching {package} {version}")
        apt.run(package, "apt-get", "download", f"{package}={version}", cwd=work)
        (deb,) = work.glob("*.deb")
        release = lay_out_kernel(deb, work, entry)
        options = {"kernel": f"boot/vmlinuz-{release}", "modules": "modules"}
        image = build_image(kernel=entry / options["kernel"], modules=entry / "modules", cache_dir=cache_dir)
        logger.info(f"kernel {release} checked: guest image {image.key} loads {len(image.modules)} modules")
        write_metadata(entry, package, version, options)

    return cache_entry(upstream, entry_name(package, version), make)


# ---------------------------------------------------------------- both


def fetch(only: str | None = None, qemu_version: str | None = None,
          kernel_package: str = DEFAULT_KERNEL_PACKAGE, cache_dir: Path | None = None) -> list[Entry]:
    """Fetch trixie's QEMU and kernel (or `only` one) into cache_dir/upstream; return the QEMU entry first.

    APT's lists are updated to learn today's versions, except when the only
    thing asked for is a QEMU version already in the cache.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    upstream = cache_dir / "upstream"
    apt = PrivateApt(upstream / "apt")
    want_qemu, want_kernel = only in (None, "qemu"), only in (None, "kernel")
    pinned_hit = qemu_version is not None and _is_entry(upstream / entry_name(QEMU_SOURCE, qemu_version))
    if want_kernel or not pinned_hit:
        asked = [name for name, wanted in ((QEMU_SOURCE, want_qemu), (kernel_package, want_kernel)) if wanted]
        apt.update(", ".join(asked))
    kernel = None
    if want_kernel:
        kernel = fetch_kernel(apt, upstream, *kernel_candidate(apt, kernel_package), cache_dir)
    qemu = None
    if want_qemu:
        qemu = fetch_qemu(apt, upstream, qemu_version or newest_source(apt, QEMU_SOURCE))
    return [entry for entry in (qemu, kernel) if entry is not None]


def format_options(entries: list[Entry], style: str = "options") -> str:
    """`--qemu P --kernel P --modules P` on one line, or (style "env") VBALLOON_QEMU=P lines."""
    paths = {name: path for entry in entries for name, path in entry.options.items()}
    ordered = [(name, shlex.quote(str(paths[name]))) for name in OPTION_ORDER if name in paths]
    if style == "env":
        return "\n".join(f"VBALLOON_{name.upper()}={path}" for name, path in ordered)
    return " ".join(f"--{name} {path}" for name, path in ordered)
