"""Tests of `vballoon qemu build` (vballoon.qemu_build) that build no QEMU.

Source trees are small fake QEMU trees (a configure script, VERSION,
meson.build) in temporary folders, under real git where the identity needs
it; a failing build runs the real venv, pip and configure steps.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vballoon.cli import main
from vballoon.errors import UsageError, VballoonError
from vballoon.qemu_build import (
    FLAVOURS,
    build_flavour,
    cache_key,
    configure_options,
    host_source_version,
    link_host_firmware,
    source_identity,
)
from vballoon.upstream import CONFIGURE_OPTIONS, QEMU_BINARY, write_metadata


def qemu_tree(folder: Path, configure: str = "exit 0\n", knows: str = "") -> Path:
    """A fake QEMU source tree whose configure runs `configure` (sh) and mentions the options in `knows`."""
    folder.mkdir(parents=True)
    script = folder / "configure"
    script.write_text(f"#!/bin/sh\n# knows: {knows}\n{configure}")
    script.chmod(0o755)
    (folder / "VERSION").write_text("9.8.7\n")
    (folder / "meson.build").write_text("project('qemu', ['c'], meson_version: '>=1.5.0')\n")
    return folder


def git(tree: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(tree), "-c", "user.name=vballoon", "-c", "user.email=vballoon@localhost",
                    *args], capture_output=True, check=True)


# ---------------------------------------------------------------- configure options


def test_a_tree_that_knows_every_option_gets_them_as_written(tmp_path: Path) -> None:
    tree = qemu_tree(tmp_path / "qemu", knows="--enable-asan --enable-ubsan --disable-relocatable")
    for flavour, extra in FLAVOURS.items():
        assert configure_options(tree, flavour) == (*CONFIGURE_OPTIONS, *extra), flavour


def test_an_older_tree_gets_its_own_spelling_of_the_sanitizers_and_no_relocatable_option(tmp_path: Path) -> None:
    """Broken once on purpose: OLDER_SPELLINGS emptied, the older tree got --enable-asan and this failed."""
    tree = qemu_tree(tmp_path / "qemu", knows="--enable-sanitizers")
    options = configure_options(tree, "asan")
    assert "--enable-asan" not in options and "--enable-ubsan" not in options, options
    assert options.count("--enable-sanitizers") == 1, f"expected --enable-sanitizers once, got {options}"
    assert "--extra-cflags=-fsanitize=undefined" in options, f"expected UBSan's flags passed directly, got {options}"
    assert "--disable-relocatable" not in options, options
    assert "--disable-werror" in options and "--target-list=x86_64-softmmu" in options, options
    gcov = configure_options(tree, "gcov")
    assert "--enable-gcov" in gcov and "--enable-sanitizers" not in gcov, gcov


@pytest.mark.skipif(not Path("/usr/share/seabios/bios-256k.bin").is_file(), reason="qemu-system-x86 is not installed")
def test_a_build_tree_reads_the_hosts_firmware_through_its_bundle(tmp_path: Path) -> None:
    """Without link_host_firmware the gcov build's check failed with QEMU's "could not load PC BIOS
    'bios-256k.bin'"; with exists() for lexists() this failed on the bundle's link to a target not built."""
    bundle = tmp_path / "qemu-bundle"
    (bundle / "usr/share/qemu").mkdir(parents=True)
    (bundle / "usr/share/qemu/trace-events-all").write_text("built\n")
    (bundle / "usr/share/qemu/keymaps").symlink_to(tmp_path / "pc-bios/keymaps-not-built")
    link_host_firmware(tmp_path)
    assert (bundle / "usr/share/seabios/bios-256k.bin").is_file(), "the host's seabios is not in the bundle"
    assert (bundle / "usr/share/seabios").readlink() == Path("/usr/share/seabios")
    for name in (p.name for p in Path("/usr/share/qemu").iterdir() if p.name not in ("trace-events-all", "keymaps")):
        assert (bundle / "usr/share/qemu" / name).readlink() == Path("/usr/share/qemu") / name, name
    assert (bundle / "usr/share/qemu/trace-events-all").read_text() == "built\n", "a built file was replaced"
    assert (bundle / "usr/share/qemu/keymaps").readlink() == tmp_path / "pc-bios/keymaps-not-built", \
        "a build's link to a target not built was replaced"
    link_host_firmware(tmp_path)


# ---------------------------------------------------------------- cache keys


def test_the_host_source_version_is_dpkgs_source_version_of_the_installed_package() -> None:
    expected = subprocess.run(["dpkg-query", "-W", "-f=${source:Version}", "qemu-system-x86"],
                              capture_output=True, text=True, check=True).stdout
    assert host_source_version() == expected
    assert cache_key("gcov", expected) == f"qemu-{expected.replace(':', '_')}-gcov"


def test_a_git_trees_key_follows_its_commit_its_edits_and_the_flavour(tmp_path: Path) -> None:
    tree = qemu_tree(tmp_path / "qemu")
    git(tree, "init", "-q")
    git(tree, "add", ".")
    git(tree, "commit", "-q", "-m", "one")
    version, first = source_identity(tree)
    assert len(first) == 12 and version, (version, first)
    assert source_identity(tree) == (version, first), "the same tree gave two identities"
    key = cache_key("gcov", version, tree, first)
    assert key.startswith(f"qemu-{version}-") and key.endswith("-gcov"), key
    assert cache_key("asan", version, tree, first) != key
    (tree / "meson.build").write_text("project('qemu', ['c'], meson_version: '>=1.5.0')\n# an edit\n")
    edited = source_identity(tree)
    assert edited[1] != first and edited[0].endswith("-dirty"), f"an uncommitted edit kept the identity {edited}"
    (tree / "meson.build").write_text("project('qemu', ['c'], meson_version: '>=1.5.0')\n# another edit\n")
    assert source_identity(tree)[1] != edited[1], "two different uncommitted edits share an identity"
    git(tree, "commit", "-q", "-am", "two")
    assert source_identity(tree)[1] not in (first, edited[1]), "a new commit kept an old identity"


def test_a_tree_without_git_is_identified_by_its_files(tmp_path: Path) -> None:
    tree = qemu_tree(tmp_path / "qemu")
    version, first = source_identity(tree)
    assert version == "9.8.7"
    (tree / "build").mkdir()
    (tree / "build" / "out.o").write_text("object")
    assert source_identity(tree)[1] == first, "a file in the tree's build folder changed its identity"
    (tree / "hw.c").write_text("int x;\n")
    assert source_identity(tree)[1] != first, "a new source file kept the identity"


def test_a_cached_build_is_a_hit_without_building(tmp_path: Path) -> None:
    tree = qemu_tree(tmp_path / "qemu", configure="echo must not run; exit 1\n")
    version, digest = source_identity(tree)
    entry = tmp_path / "cache" / "builds" / cache_key("asan", version, tree.resolve(), digest)
    (entry / "build").mkdir(parents=True)
    write_metadata(entry, "qemu", version, {"qemu": f"build/{QEMU_BINARY}", "build": "build", "source": str(tree)})
    built = build_flavour("asan", tree, cache_dir=tmp_path / "cache")
    assert (built.binary, built.build_dir, built.source_dir) == (entry / "build" / QEMU_BINARY, entry / "build",
                                                                  tree.resolve())
    assert (built.version, built.flavour) == (version, "asan")


# ---------------------------------------------------------------- bad input and failures


def test_a_failing_configure_is_one_line_naming_the_step_and_its_kept_log(tmp_path: Path) -> None:
    """Broken once on purpose: cache_entry's in-place branch kept the entry on failure, and this failed."""
    configure = 'echo "configure $* in $PWD"\necho "ERROR: fake configure refuses" >&2\nexit 1\n'
    tree = qemu_tree(tmp_path / "qemu", configure=configure)
    with pytest.raises(VballoonError) as error:
        build_flavour("gcov", tree, cache_dir=tmp_path / "cache")
    version, digest = source_identity(tree)
    key = cache_key("gcov", version, tree.resolve(), digest)
    failed = tmp_path / "cache" / "builds" / f"failed-{key}"
    assert str(error.value) == (f"qemu 9.8.7 (gcov): configure failed (exit 1): ERROR: fake configure refuses; "
                                f"log kept in {failed / 'configure.log'}")
    configured = (failed / "configure.log").read_text()
    assert "--enable-gcov" in configured and f"in {tmp_path / 'cache' / 'builds' / key / 'build'}" in configured, \
        f"expected an out-of-tree configure with --enable-gcov, got {configured}"
    left = sorted(p.name for p in (tmp_path / "cache" / "builds").iterdir())
    assert left == [f"failed-{key}"], f"a failed build left {left}"
    assert sorted(p.name for p in tree.iterdir()) == ["VERSION", "configure", "meson.build"], "the source tree changed"


def test_a_build_without_the_flavours_flags_is_one_line_naming_the_check(tmp_path: Path) -> None:
    """Broken once on purpose: FLAVOUR_FLAGS["gcov"] emptied, the build was accepted and this failed."""
    configure = "printf 'rule touch\\n  command = touch $out\\nbuild qemu-system-x86_64: touch\\n' > build.ninja\n"
    tree = qemu_tree(tmp_path / "qemu", configure=configure)
    with pytest.raises(VballoonError, match=r"^qemu 9\.8\.7 \(gcov\): check-flavour failed \(configure did not enable "
                                            r"--coverage\): .*; log kept in .*/failed-qemu-9\.8\.7-\w+-gcov/"):
        build_flavour("gcov", tree, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "builds").iterdir()][0].startswith("failed-"), "a half entry stayed"


def test_bad_flavours_and_trees_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match=r"^--flavour tsan: unknown; choose one of asan, gcov$"):
        build_flavour("tsan", tmp_path, cache_dir=tmp_path)
    assert main(["qemu", "build", "--flavour", "gcov", "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"vballoon: error: --source {tmp_path}: not a QEMU source tree (no configure and VERSION); "
                   "pass the top folder of a QEMU checkout or tarball\n"), err
    assert not (tmp_path / "builds").exists()
