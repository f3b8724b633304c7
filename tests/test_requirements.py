"""Tests of the requirement catalogue, the deviations file and the req marker check."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from vballoon import requirements as reqs
from vballoon.errors import UsageError

RANGES = {"BAL-DRV-FPH": 10, "BAL-DEV-FPH": 6, "BAL-DRV-FPR": 6, "BAL-DRV-ST": 8,
          "BAL-DRV-OP": 7, "BAL-DRV-PP": 3}
LEGACY_IDS = {"BAL-DEV-LEG-FEAT-1", "BAL-DEV-LEG-FEAT-2", "BAL-CFG-LEG-LE", "BAL-LEG-USED",
              "BAL-DRV-LEG-ACT", "BAL-DEV-LEG-ACT", "BAL-LEG-ST-END",
              "BAL-DEV-LEG-ST-FIRST", "BAL-LEG-FPH-END"}


def packaged_text(name: str) -> str:
    return resources.files("vballoon").joinpath("data", name).read_text(encoding="utf-8")


def write_catalogue(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "requirements.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_catalogue_has_every_statement_once_in_spec_order() -> None:
    ids = [req_id for req_id in reqs.catalogue() if req_id.startswith("BAL-")]
    assert len(ids) == 65, f"expected 65 balloon requirements, got {len(ids)}"
    assert len(set(ids)) == 65, f"expected unique IDs, got duplicates in {ids}"
    assert (ids[0], ids[-1]) == ("BAL-DRV-FEAT-MTH", "BAL-DEV-FPR-2"), \
        f"expected the feature-bit statement first and free page reporting last, got {ids[0]}, {ids[-1]}"


@pytest.mark.parametrize("prefix,count", sorted(RANGES.items()))
def test_numbered_ranges_are_expanded_in_order(prefix: str, count: int) -> None:
    numbered = [req_id for req_id in reqs.catalogue() if re.fullmatch(rf"{prefix}-\d+", req_id)]
    expected = [f"{prefix}-{n}" for n in range(1, count + 1)]
    assert numbered == expected, f"expected {expected}, got {numbered}"


def test_every_entry_uses_valid_values() -> None:
    for req in reqs.catalogue().values():
        assert req.binds in reqs.BINDS, f"{req.id}: expected binds in {reqs.BINDS}, got {req.binds!r}"
        assert req.level in reqs.LEVELS, f"{req.id}: expected level in {reqs.LEVELS}, got {req.level!r}"
        assert req.testable in reqs.TESTABLE, \
            f"{req.id}: expected testable in {reqs.TESTABLE}, got {req.testable!r}"
        assert req.level in req.quote, f"{req.id}: expected the quote to contain {req.level!r}, got {req.quote!r}"
        chapter = "2." if req.id.startswith("VQ-") else "5.5."
        assert req.section.startswith(chapter), f"{req.id}: expected a {chapter}x section, got {req.section!r}"


def test_legacy_flags_match_legacy_sections() -> None:
    catalogue = reqs.catalogue()
    legacy = {req.id for req in catalogue.values() if req.legacy}
    assert legacy == LEGACY_IDS, f"expected legacy {sorted(LEGACY_IDS)}, got {sorted(legacy)}"
    for req_id in legacy:
        assert "Legacy Interface" in catalogue[req_id].section, \
            f"{req_id}: expected a Legacy Interface section, got {catalogue[req_id].section!r}"


def test_must_tell_host_statements_are_not_applicable_with_a_reason() -> None:
    not_applicable = {req.id: req.why for req in reqs.catalogue().values() if not req.is_testable}
    expected = {"BAL-DRV-FEAT-MTH", "BAL-DEV-FEAT-MTH", "BAL-DRV-OP-MTH", "BAL-DEV-OP-2"}
    assert set(not_applicable) == expected, f"expected {sorted(expected)}, got {sorted(not_applicable)}"
    for req_id, why in not_applicable.items():
        assert why and "MUST_TELL_HOST" in why, f"{req_id}: expected a MUST_TELL_HOST reason, got {why!r}"


def test_stats_size_entry_records_the_erratum() -> None:
    req = reqs.catalogue()["BAL-DRV-ST-5"]
    assert "multiple of 6" in req.quote, f"expected the spec's wording in the quote, got {req.quote!r}"
    assert req.note and "10" in req.note, f"expected a note on 10-byte entries, got {req.note!r}"


BROKEN = [
    ("invalid TOML", lambda t: t + "\n[[requirement]\n", "invalid TOML"),
    ("one entry short", lambda t: t[: t.rindex("[[requirement]]")],
     f"expected {reqs.STATEMENT_COUNT} requirements, got {reqs.STATEMENT_COUNT - 1}"),
    ("duplicate ID", lambda t: t.replace('id = "BAL-DRV-OP-2"', 'id = "BAL-DRV-OP-1"'),
     "duplicate requirement ID 'BAL-DRV-OP-1'"),
    ("bad binds", lambda t: t.replace('binds = "both"', 'binds = "host"', 1), "binds 'host' is not one of"),
    ("bad level", lambda t: t.replace('level = "MAY"', 'level = "MIGHT"', 1), "level 'MIGHT' is not one of"),
    ("bad testable", lambda t: t.replace('testable = "guest"', 'testable = "manual"', 1),
     "testable 'manual' is not one of"),
    ("legacy not bool", lambda t: t.replace("legacy = true", 'legacy = "yes"', 1),
     "legacy must be a non-empty bool"),
    ("missing key", lambda t: re.sub(r'\nhow = "[^"]*"', "", t, count=1), "missing key 'how'"),
    ("unknown key", lambda t: t.replace('legacy = false', 'legacy = false\nlegcy = false', 1),
     "unknown key 'legcy'"),
    ("why without n/a", lambda t: t.replace('testable = "not-applicable"', 'testable = "qtest"', 1),
     "'why' is required exactly when testable is 'not-applicable'"),
]


@pytest.mark.parametrize("mutate,problem", [(m, p) for _, m, p in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_catalogue_gives_one_line_error_naming_file(tmp_path: Path, mutate, problem: str) -> None:
    path = write_catalogue(tmp_path, mutate(packaged_text("requirements.toml")))
    with pytest.raises(UsageError) as caught:
        reqs.load_catalogue(path)
    message = str(caught.value)
    assert "\n" not in message, f"expected one line, got {message!r}"
    assert message.startswith(str(path)), f"expected the message to start with {path}, got {message!r}"
    assert problem in message, f"expected {problem!r} in the message, got {message!r}"


def test_missing_catalogue_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(UsageError, match=re.escape(f"{path}: file not found")):
        reqs.load_catalogue(path)


def test_packaged_deviations_are_the_confirmed_ones() -> None:
    """QEMU's four (device side: two balloon, two ring: indirect after the head, a lost DEVICE_NEEDS_RESET); Linux's
    legacy byte-wise write of actual, poison_val lost across sleep, and a hinting round started with the id read
    a second time (DONE in its first out buffer)."""
    found = {dev.requirement for dev in reqs.deviations()}
    expected = {"BAL-DEV-LEG-ACT", "BAL-DEV-LEG-ST-FIRST", "BAL-DRV-FPH-2", "BAL-DRV-LEG-ACT", "BAL-DRV-PP-2",
                "VQ-DEV-IND-2", "VQ-DEV-STATUS-1"}
    assert found == expected, f"expected deviations for {sorted(expected)}, got {sorted(found)}"
    for dev in reqs.deviations():
        evidence = "drivers/virtio/" if reqs.catalogue()[dev.requirement].binds == "driver" else "hw/virtio/"
        assert evidence in dev.source, f"{dev.requirement}: expected evidence in {evidence}, got {dev.source!r}"


def test_deviation_for_matches_requirement_and_version() -> None:
    dev = reqs.deviation_for("BAL-DEV-LEG-ACT", (7, 2, 0))
    assert dev is not None and dev.requirement == "BAL-DEV-LEG-ACT", \
        f"expected the legacy actual deviation for QEMU 7.2.0, got {dev}"
    assert reqs.deviation_for("BAL-DRV-OP-1", (7, 2, 0)) is None, \
        "expected no deviation for BAL-DRV-OP-1"


@pytest.mark.parametrize("version,admitted", [
    ((2, 0, 0), True), ((7, 2, 0), True), ((7, 2, 9), True), ((5, 1, 0), True),
    ((1, 9, 9), False), ((7, 3, 0), False), ((8, 0, 0), False),
])
def test_version_bounds_compare_given_prefix(version: reqs.Version, admitted: bool) -> None:
    bounds = reqs.parse_versions(">=2.0 <=7.2")
    got = all(bound.admits(version) for bound in bounds)
    assert got is admitted, f"expected >=2.0 <=7.2 to {'admit' if admitted else 'reject'} {version}, got {got}"


def test_every_packaged_deviation_ends_at_a_version_read() -> None:
    """No deviation covers every future version: each has an upper bound, driver ones a Linux one too."""
    for dev in reqs.deviations():
        assert dev.affects((10, 0, 13), (6, 12, 118)), f"{dev.requirement}: expected QEMU 10.0/Linux 6.12 covered"
        assert not dev.affects((10, 1, 0), (6, 12, 118)), f"{dev.requirement}: expected QEMU 10.1 to be strict"
        if dev.linux_versions is not None:
            assert not dev.affects((7, 2, 22), (6, 13)), f"{dev.requirement}: expected Linux 6.13 to be strict"
            assert not dev.affects((7, 2, 22), None), f"{dev.requirement}: expected strict without a known kernel"


@pytest.mark.parametrize("spec", ["", "7.2", ">=seven", ">=1.2.3.4", "~7.2", "all known", ">=7.2"])
def test_malformed_version_range_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        reqs.parse_versions(spec)


@pytest.mark.parametrize("entry,problem", [
    ('requirement = "BAL-NOPE"', "unknown requirement ID 'BAL-NOPE'"),
    ('requirement = "BAL-DEV-LEG-ACT"\nqemu_versions = "newer"', "qemu_versions: bound 'newer' has no comparator"),
    ('requirement = "BAL-DEV-LEG-ACT"\nqemu_versions = ">=7.2"', "qemu_versions: '>=7.2' has no upper bound"),
    ('requirement = "BAL-DRV-LEG-ACT"', "linux_versions is required exactly for a driver requirement"),
    ('linux_versions = "<=6.12"', "linux_versions is required exactly for a driver requirement"),
    ('requirement = "BAL-DRV-LEG-ACT"\nlinux_versions = "6.12"', "linux_versions: bound '6.12' has no comparator"),
])
def test_broken_deviation_file_gives_one_line_error(tmp_path: Path, entry: str, problem: str) -> None:
    fields = {"requirement": '"BAL-DEV-LEG-ACT"', "qemu_versions": '"<=10.0"', "behaviour": '"b"',
              "source": '"s"', "observation": '"o"'}
    for line in entry.splitlines():
        key, value = line.split(" = ", 1)
        fields[key] = value
    path = tmp_path / "known-deviations.toml"
    path.write_text("[[deviation]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items()))
    with pytest.raises(UsageError) as caught:
        reqs.load_deviations(path, reqs.catalogue())
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)), \
        f"expected one line starting with {path}, got {message!r}"
    assert problem in message, f"expected {problem!r} in the message, got {message!r}"


def test_unknown_ids_keeps_order_and_skips_known() -> None:
    got = reqs.unknown_ids(["BAL-X", "BAL-DRV-OP-1", "BAL-Y"])
    assert got == ["BAL-X", "BAL-Y"], f"expected ['BAL-X', 'BAL-Y'], got {got}"


def test_check_marker_args_returns_ids() -> None:
    got = reqs.check_marker_args(("BAL-DEV-ST-1", "BAL-DEV-ST-2"))
    assert got == ["BAL-DEV-ST-1", "BAL-DEV-ST-2"], f"expected both IDs back, got {got}"


def test_check_marker_args_names_unknown_id() -> None:
    expected = ("unknown requirement ID 'BAL-TYPO' in @pytest.mark.req; "
                "see vballoon/data/requirements.toml")
    with pytest.raises(UsageError) as caught:
        reqs.check_marker_args(("BAL-DEV-ST-1", "BAL-TYPO"))
    assert str(caught.value) == expected, f"expected {expected!r}, got {str(caught.value)!r}"


@pytest.mark.parametrize("args,problem", [((), "at least one requirement ID"), ((5,), "is not a string")])
def test_check_marker_args_refuses_empty_and_non_strings(args: tuple, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        reqs.check_marker_args(args)
