"""Expectations taken from the versions under test: the QEMU probe, the Linux driver's stats, differences named."""

from __future__ import annotations

from pathlib import Path

import pytest

from vballoon.differences import describe_mapping_difference
from vballoon.guest.image import _user_kernel_config, release_version
from vballoon.guest.linux_stats import GAUGES, DriverStats
from vballoon.guest.procfs import GuestMemory
from vballoon.qemu.profile import PROBED_QUEUES, QemuProfile, qemu_profile
from vballoon.reference import QUEUE_MAX_SIZES, BalloonDevice, DeviceProperties
from vballoon.session import Session
from vballoon.spec import PAGE_SIZE, STATS

VMSTAT = {"pgfault": 100, "pgmajfault": 3, "pswpin": 0, "pswpout": 0, "oom_kill": 1, "allocstall_dma": 1,
          "allocstall_dma32": 2, "allocstall_normal": 4, "allocstall_movable": 8, "pgscan_kswapd": 10,
          "pgscan_direct": 20, "pgsteal_kswapd": 5, "pgsteal_direct": 6}
HUGETLB = {"htlb_buddy_alloc_success": 0, "htlb_buddy_alloc_fail": 0}
OLD_TAGS = frozenset(info.qom_key for info in STATS[:10])
ALL_TAGS = frozenset(info.qom_key for info in STATS)


def test_a_mapping_difference_names_each_key_with_both_values() -> None:
    text = describe_mapping_difference({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4})
    assert text == "b: expected 2, got 5; c: expected 3, got absent; d: expected absent, got 4", text


def test_equal_mappings_have_no_difference() -> None:
    assert describe_mapping_difference({"a": 1}, {"a": 1}) == ""


@pytest.mark.parametrize("release, version", [
    ("6.12.118+deb13-cloud-amd64", (6, 12, 118)), ("6.1.0-41-cloud-amd64", (6, 1, 0)), ("6.13-rc1", (6, 13)),
    ("custom", ()),
])
def test_release_version(release: str, version: tuple[int, ...]) -> None:
    assert release_version(release) == version, f"{release}: expected {version}, got {release_version(release)}"


@pytest.mark.parametrize("release, sets", [
    ("6.1.0-41-cloud-amd64", [10]),      # update_balloon_stats of 6.1: tags 0-9
    ("6.12.118+deb13-cloud-amd64", [16]),  # 6.12 adds tags 10-15 from /proc/vmstat
    ("6.6.0-custom", [10, 16]),           # between the versions read: either, consistently
])
def test_the_driver_fills_the_tags_of_its_version(release: str, sets: list[int]) -> None:
    stats = DriverStats.of(release, GuestMemory({}, {**VMSTAT, **HUGETLB}))
    allowed = stats.allowed_sets(ALL_TAGS)
    assert sorted(len(s) for s in allowed) == sets, f"{release}: expected sets of {sets} stats, got {allowed}"


def test_a_ten_stat_qemu_hides_tags_10_to_15_of_a_newer_driver() -> None:
    stats = DriverStats.of("6.12.118", GuestMemory({}, {**VMSTAT, **HUGETLB}))
    assert stats.allowed_sets(OLD_TAGS) == (OLD_TAGS,), f"expected the ten QEMU 7.2 names, got {stats}"


def test_config_options_seen_in_vmstat_decide_the_counters() -> None:
    without_events = DriverStats.of("6.12.118", GuestMemory({}, {}))
    assert without_events.allowed_sets(ALL_TAGS) == (GAUGES,), "without CONFIG_VM_EVENT_COUNTERS only gauges"
    without_hugetlb = DriverStats.of("6.12.118", GuestMemory({}, VMSTAT))
    (only,) = without_hugetlb.allowed_sets(ALL_TAGS)
    assert "stat-htlb-pgalloc" not in only and "stat-oom-kills" in only, f"got {sorted(only)}"


def test_counter_sources_sum_zones_and_convert_pages() -> None:
    memory = GuestMemory({}, {**VMSTAT, **HUGETLB})
    sources = {s.qom_key: s for s in DriverStats.of("6.12.118", memory).counters(ALL_TAGS)}
    assert sources["stat-alloc-stalls"].value(memory) == 15, "ALLOC_STALL sums every zone's allocstall"
    assert sources["stat-async-scans"].value(memory) == 10 * PAGE_SIZE, "pgscan_kswapd is in pages"
    assert sources["stat-oom-kills"].value(memory) == 1


def test_profile_counts_the_stats_qemu_names_in_tag_order() -> None:
    names = tuple(info.qom_key for info in STATS[:10]) + ("stat-from-the-future",)
    profile = QemuProfile((10, 1, 0), names, (("inflateq", 256),), frozenset(), frozenset(), False)
    assert profile.stat_count == 10, f"expected the 10 names vballoon knows counted, got {profile.stat_count}"


def test_the_installed_qemu_describes_itself(session: Session) -> None:
    """A real probe: the stats QEMU names and its queue sizes, which the reference then copies."""
    profile = qemu_profile(session.qemu)
    assert profile.stat_count in (10, 16), f"expected QEMU 7.2's 10 or 10.0's 16 stats, got {profile.stat_names}"
    assert [name for name, _ in profile.queue_sizes] == list(PROBED_QUEUES), f"got {profile.queue_sizes}"
    assert all(size > 0 for _, size in profile.queue_sizes), f"got {profile.queue_sizes}"
    assert profile.has_command("query-balloon") and "page-poison" in profile.balloon_properties, profile.describe()
    device = BalloonDevice(DeviceProperties(free_page_hint=True, free_page_reporting=True,
                                            shape=profile.device_shape))
    assert [q.max_size for q in device.queues] == [size for _, size in profile.queue_sizes], \
        f"expected the reference to take QEMU's queue sizes {profile.queue_sizes}"
    assert len(device.guest_stats()["stats"]) == len(profile.stat_names)


def test_the_realize_sizes_are_the_default_shape() -> None:
    assert dict(DeviceProperties().shape.queue_max_sizes) == QUEUE_MAX_SIZES


def test_a_user_kernel_config_is_found_beside_it_or_in_its_build_tree(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.12.1").write_bytes(b"")
    (boot / "config-6.12.1").write_text("CONFIG_PAGE_POISONING=y\n")
    assert _user_kernel_config(boot / "vmlinuz-6.12.1", "6.12.1") == boot / "config-6.12.1"
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "arch/x86/boot/bzImage").write_bytes(b"")
    assert _user_kernel_config(tree / "arch/x86/boot/bzImage", "6.13.0") is None
    (tree / ".config").write_text("CONFIG_VIRTIO_BALLOON=y\n")
    assert _user_kernel_config(tree / "arch/x86/boot/bzImage", "6.13.0") == tree / ".config"


def test_a_check_needing_a_missing_qmp_command_skips_naming_it(session: Session,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU without x-query-virtio-status (older than 7.1) skips the check that needs it, saying so."""
    import fixtures.variant_gates as gates

    bare = QemuProfile(session.qemu.version, (), (), frozenset({"query-balloon"}), frozenset(), False)
    monkeypatch.setattr(gates, "qemu_profile", lambda qemu: bare)
    with pytest.raises(pytest.skip.Exception, match="has no QMP command x-query-virtio-status: the view"):
        gates.require_qmp_command(session.qemu, "x-query-virtio-status", "the view")
    monkeypatch.undo()
    gates.require_qmp_command(session.qemu, "x-query-virtio-status", "the view")  # the installed QEMU has it
