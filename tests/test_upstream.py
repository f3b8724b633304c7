"""Tests of `vballoon upstream fetch` (vballoon.upstream) that build no QEMU.

APT runs for real over a private state in a temporary folder (an update
downloads trixie's lists, about 21 MB in 2-3 s); builds run on fake source
trees; apt-get, apt-cache, dpkg-source and ninja are wrapped by shims that
record their command lines and run the real tool.
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vballoon.cli import main
from vballoon.errors import VballoonError
from vballoon.upstream import (
    QEMU_BINARY,
    Entry,
    PrivateApt,
    Unpack,
    entry_name,
    fetch_qemu,
    format_options,
    lay_out_kernel,
    newest_source,
    write_metadata,
)

HOST_APT_STATE = ("/etc/apt", "/var/lib/apt", "/var/cache/apt")
# make test does not install the build packages (make upstream does): a shim of a missing tool records and fails.
REAL_TOOLS = {tool: shutil.which(tool) for tool in ("apt-get", "apt-cache", "dpkg-source", "ninja")}


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put shims first on PATH that append each command line (tab-separated) to the returned file, then run the tool."""
    shims = tmp_path / "shims"
    shims.mkdir()
    record = tmp_path / "calls.log"
    record.touch()
    for tool, real in REAL_TOOLS.items():
        run = f'exec {real} "$@"' if real else "exit 127"
        shim = shims / tool
        shim.write_text(f"#!/bin/sh\nprintf '%s\\t' {tool} \"$@\" >> {record}\necho >> {record}\n{run}\n")
        shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    return record


def recorded(record: Path) -> list[list[str]]:
    return [line.rstrip("\t").split("\t") for line in record.read_text().splitlines()]


def assert_private(call: list[str], apt_root: Path) -> None:
    """An APT command line carries every private -o option and names no host APT state."""
    options = PrivateApt(apt_root).options()
    assert call[2:2 + len(options)] == options, f"expected the private -o options in {call}"
    assert f"Dir::State::Lists={apt_root / 'lists'}" in call and "Dir::Etc::sourceparts=-" in call
    named = [arg for arg in call if any(state in arg for state in HOST_APT_STATE)]
    assert not named, f"{call[:2]} names host APT state: {named}"


def prepare_entry(upstream: Path, version: str) -> Path:
    """A complete QEMU entry as a build leaves it (the binary is a stand-in: a hit does not run it)."""
    entry = upstream / entry_name("qemu", version)
    entry.mkdir(parents=True)
    (entry / QEMU_BINARY).write_text("#!/bin/sh\nexit 1\n")
    (entry / QEMU_BINARY).chmod(0o755)
    write_metadata(entry, "qemu", version, {"qemu": QEMU_BINARY})
    return entry


def fake_source(configure: str) -> Unpack:
    """An unpack step that writes a source tree whose configure script is `configure` (sh)."""

    def unpack(apt: PrivateApt, version: str, work: Path) -> Path:
        tree = work / "src"
        tree.mkdir()
        script = tree / "configure"
        script.write_text("#!/bin/sh\n" + configure)
        script.chmod(0o755)
        (tree / "meson.build").write_text("project('qemu', ['c'], meson_version: '>=1.5.0')\n")
        return tree

    return unpack


# ---------------------------------------------------------------- private APT state


def test_apt_resolves_every_state_path_inside_the_private_folder(tmp_path: Path) -> None:
    apt = PrivateApt(tmp_path / "apt")
    names = {"LISTS": "Dir::State::Lists/d", "SOURCES": "Dir::Etc::sourcelist/f", "ARCHIVES": "Dir::Cache::Archives/d",
             "CACHE": "Dir::Cache/d", "PKGCACHE": "Dir::Cache::pkgcache/f", "SRCPKGCACHE": "Dir::Cache::srcpkgcache/f",
             "EXTENDED": "Dir::State::extended_states/f", "STATUS": "Dir::State::status/f"}
    shell = subprocess.run(apt.command("apt-config", "shell", *[a for pair in names.items() for a in pair]),
                           capture_output=True, text=True, check=True).stdout
    paths = dict(line.split("=", 1) for line in shell.splitlines())
    paths = {name: value.strip("'") for name, value in paths.items()}
    for name, path in paths.items():
        assert not path.startswith(HOST_APT_STATE), f"{names[name]} resolves to host state {path}"
    for name in ("LISTS", "SOURCES", "ARCHIVES", "CACHE", "EXTENDED"):
        assert Path(paths[name]).is_relative_to(tmp_path / "apt"), f"{names[name]} is {paths[name]}, not private"
    assert paths["STATUS"] == "/dev/null"


def test_an_unreachable_mirror_is_one_line_naming_the_package(tmp_path: Path) -> None:
    apt = PrivateApt(tmp_path / "apt", mirrors=(("file:/nonexistent-vballoon-mirror", "trixie"),))
    with pytest.raises(VballoonError) as error:
        apt.update("qemu")
    message = str(error.value)
    assert message.startswith("qemu: apt-get update failed: E: "), message
    assert "nonexistent-vballoon-mirror" in message and "\n" not in message, message


def test_an_unknown_qemu_version_is_one_line_and_leaves_no_entry(
        tmp_path: Path, calls: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VBALLOON_CACHE", str(tmp_path / "cache"))
    status = main(["upstream", "fetch", "--only", "qemu", "--qemu-version", "1:0.0-none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    errors = [line for line in err if line.startswith("vballoon: error:")]
    assert errors == [err[-1]], f"expected one error line, last, got {err}"
    assert err[-1].startswith("vballoon: error: qemu: apt-get source failed: E: ")
    assert "1:0.0-none" in err[-1] and not any("Traceback" in line for line in err)
    upstream = tmp_path / "cache" / "upstream"
    assert sorted(p.name for p in upstream.iterdir()) == ["apt"], "a failed fetch left something in the cache"
    apt_calls = [call for call in recorded(calls) if call[0].startswith("apt")]
    assert [call[2 + len(PrivateApt(upstream / "apt").options())] for call in apt_calls] == ["update", "source"]
    for call in apt_calls:
        assert_private(call, upstream / "apt")


# ---------------------------------------------------------------- builds


@pytest.mark.skipif(REAL_TOOLS["ninja"] is None, reason="ninja is not installed; make upstream installs it")
def test_a_failing_build_keeps_its_logs_and_leaves_no_entry(tmp_path: Path, calls: Path) -> None:
    configure = (
        'echo "configure $*"\n'
        "echo 'echo hw/virtio/virtio-balloon.c:1: error: fake compiler refuses; exit 1' > cc.sh\n"
        "printf 'rule cc\\n  command = sh cc.sh\\nbuild qemu-system-x86_64: cc\\n' > build.ninja\n"
    )
    upstream = tmp_path / "upstream"
    with pytest.raises(VballoonError) as error:
        fetch_qemu(PrivateApt(upstream / "apt"), upstream, "1:0-fake", unpack=fake_source(configure))
    failed = upstream / "failed-qemu-1_0-fake"
    assert str(error.value) == ("qemu 1:0-fake: build failed (exit 1): hw/virtio/virtio-balloon.c:1: error: "
                                f"fake compiler refuses; log kept in {failed / 'build.log'}")
    assert "fake compiler refuses" in (failed / "build.log").read_text()
    configured = (failed / "configure.log").read_text()
    assert "--disable-relocatable" in configured and f"--python={tmp_path}" in configured, configured
    assert sorted(p.name for p in upstream.iterdir()) == ["failed-qemu-1_0-fake"], "a half entry or build dir is left"
    assert [call[0] for call in recorded(calls)] == ["ninja"]


def test_an_interrupted_build_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    def interrupted(apt: PrivateApt, version: str, work: Path) -> Path:
        (work / "src").mkdir()
        (work / "src" / "half-unpacked.c").write_text("int x;\n")
        raise KeyboardInterrupt

    upstream = tmp_path / "upstream"
    with pytest.raises(KeyboardInterrupt):
        fetch_qemu(PrivateApt(upstream / "apt"), upstream, "1:0-fake", unpack=interrupted)
    assert list(upstream.iterdir()) == [], "an interrupted build left files in the cache"


# ---------------------------------------------------------------- cache hits


def test_a_pinned_version_in_the_cache_is_a_hit_without_apt(
        tmp_path: Path, calls: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VBALLOON_CACHE", str(tmp_path))
    entry = prepare_entry(tmp_path / "upstream", "1:9.9+ds-1")
    assert main(["upstream", "fetch", "--only", "qemu", "--qemu-version", "1:9.9+ds-1"]) == 0
    out, err = capsys.readouterr()
    assert out == f"--qemu {entry / QEMU_BINARY}\n"
    assert err == "cache hit qemu-1_9.9+ds-1\n"
    assert recorded(calls) == [], "a pinned cache hit ran APT or a build tool"


def test_todays_version_in_the_cache_is_a_hit_without_source_or_build(
        tmp_path: Path, calls: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VBALLOON_CACHE", str(tmp_path))
    apt = PrivateApt(tmp_path / "upstream" / "apt")
    apt.update("qemu")
    entry = prepare_entry(tmp_path / "upstream", newest_source(apt, "qemu"))
    calls.write_text("")
    assert main(["upstream", "fetch", "--only", "qemu", "--format", "env"]) == 0
    assert capsys.readouterr().out == f"VBALLOON_QEMU={entry / QEMU_BINARY}\n"
    made = recorded(calls)
    subcommands = [call[2 + len(apt.options())] for call in made]
    assert subcommands == ["update", "showsrc"], f"a hit ran more than the update and the version lookup: {made}"
    for call in made:
        assert_private(call, apt.root)


# ---------------------------------------------------------------- kernel layout and output


def kernel_deb(tmp_path: Path, release: str, with_modules: bool = True) -> Path:
    """A linux-image .deb laid out as Debian 13's: boot/ files and xz modules under usr/lib/modules."""
    package = tmp_path / "package"
    if with_modules:
        module = package / "usr/lib/modules" / release / "kernel/drivers/virtio/virtio_balloon.ko.xz"
        module.parent.mkdir(parents=True)
        module.write_bytes(lzma.compress(b"\x7fELF fake module"))
    (package / "boot").mkdir(parents=True)
    (package / "boot" / f"vmlinuz-{release}").write_bytes(b"fake bzImage")
    (package / "boot" / f"config-{release}").write_text("CONFIG_VIRTIO_BALLOON=m\n")
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN" / "control").write_text(
        "Package: linux-image-test\nVersion: 6.12.1-1\nArchitecture: amd64\nMaintainer: vballoon\nDescription: test\n")
    deb = tmp_path / "linux-image-test.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(package), str(deb)], capture_output=True, check=True)
    (tmp_path / "work").mkdir()
    return deb


def test_a_kernel_package_is_laid_out_as_boot_files_and_a_modules_install_tree(tmp_path: Path) -> None:
    release = "6.12.1+deb13-cloud-amd64"
    out = tmp_path / "out"
    assert lay_out_kernel(kernel_deb(tmp_path, release), tmp_path / "work", out) == release
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [f"boot/config-{release}", f"boot/vmlinuz-{release}",
                     f"modules/lib/modules/{release}/kernel/drivers/virtio/virtio_balloon.ko.xz"]


def test_a_package_without_modules_is_one_line_naming_the_option(tmp_path: Path) -> None:
    deb = kernel_deb(tmp_path, "6.12.1+deb13-cloud-amd64", with_modules=False)
    with pytest.raises(VballoonError, match=r"^linux-image-test.deb: .*--kernel-package must name a linux-image"):
        lay_out_kernel(deb, tmp_path / "work", tmp_path / "out")


def test_options_and_env_lines_name_qemu_then_kernel_then_modules(tmp_path: Path) -> None:
    kernel = Entry(tmp_path / "k", "linux-image-x", "1", False,
                   {"kernel": tmp_path / "k" / "boot" / "vmlinuz-x", "modules": tmp_path / "k" / "modules"})
    qemu = Entry(tmp_path / "q", "qemu", "1:10", True, {"qemu": tmp_path / "q" / QEMU_BINARY})
    assert format_options([kernel, qemu]) == (f"--qemu {tmp_path}/q/{QEMU_BINARY} --kernel {tmp_path}/k/boot/vmlinuz-x "
                                              f"--modules {tmp_path}/k/modules")
    assert format_options([qemu, kernel], "env").splitlines() == [
        f"VBALLOON_QEMU={tmp_path}/q/{QEMU_BINARY}", f"VBALLOON_KERNEL={tmp_path}/k/boot/vmlinuz-x",
        f"VBALLOON_MODULES={tmp_path}/k/modules"]
