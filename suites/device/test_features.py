"""Feature offer, FEATURES_OK and config size of QEMU's balloon, driven over qtest."""

from __future__ import annotations

import itertools

import pytest

from fixtures.qtest_device import ALL_PROPERTIES, TRANSPORTS, DeviceVariant, over
from fixtures.variant_gates import require_qmp_command
from vballoon.matrix import MODELLED_BITS
from vballoon.qemu.qtest_machine import QtestBalloon, QtestMachine
from vballoon.spec import BALLOON_FEATURES, CONFIG_SIZE_FULL, Feature, config_size, feature_mask, has_feature

UNOFFERED_EXTRAS = feature_mask(Feature.MUST_TELL_HOST, Feature.RING_PACKED)


def bits(mask: int) -> list[int]:
    return [bit for bit in range(64) if mask >> bit & 1]


def guest_features(machine: QtestMachine) -> int:
    """The features QEMU holds as negotiated (x-query-virtio-status; the test skips without it)."""
    require_qmp_command(machine.qemu, "x-query-virtio-status", "the features QEMU holds as negotiated")
    return feature_mask(*machine.host_balloon.virtio_status().guest_features)


@pytest.mark.req("BAL-DEV-LEG-FEAT-1")
@over(ALL_PROPERTIES)
def test_offered_features_follow_the_properties(balloon: QtestBalloon, device_variant: DeviceVariant) -> None:
    """QEMU offers what the variant's properties ask for, and never requires MUST_TELL_HOST."""
    offered = frozenset(bits(balloon.offered)) & MODELLED_BITS
    expected = device_variant.variant.offered_features(device_variant.legacy_interface)
    assert offered == expected, f"offered bits: expected {sorted(expected)}, got {sorted(offered)}"
    assert not has_feature(balloon.offered, Feature.MUST_TELL_HOST), \
        "BAL-DEV-LEG-FEAT-1: QEMU must not make MUST_TELL_HOST a condition; it offered it"


@pytest.mark.req("BAL-CFG-LEG-LE")
@over(ALL_PROPERTIES)
def test_config_size_follows_the_offered_features(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    """The config space is 8, 12 or 16 bytes by QEMU's rule (bytes past it read as all ones); fields are little endian."""
    expected_size = config_size(balloon.offered)
    num_pages = 0x0102
    qtest_machine.host_balloon.set_target(qtest_machine.ram_bytes - (num_pages << 12))
    raw = bytes(balloon.driver.config_read(i, 1) for i in range(CONFIG_SIZE_FULL + 4))
    assert raw[:4] == num_pages.to_bytes(4, "little"), \
        f"BAL-CFG-LEG-LE: num_pages {num_pages:#x} should read {num_pages.to_bytes(4, 'little').hex()}, got {raw[:4].hex()}"
    assert raw[expected_size:] == b"\xff" * (len(raw) - expected_size), \
        f"config size {expected_size}: bytes past it should read 0xff, got {raw.hex()}"
    config = balloon.read_config(expected_size)
    assert config.num_pages == num_pages


@pytest.mark.req("BAL-DEV-LEG-FEAT-1", "BAL-DEV-FEAT-MTH")
@over(TRANSPORTS)
def test_features_ok_holds_for_every_subset(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                            device_variant: DeviceVariant) -> None:
    """Every subset of the offered balloon bits (with VERSION_1 on modern) is accepted; QEMU keeps exactly it."""
    offered_balloon_bits = [b for b in BALLOON_FEATURES if has_feature(balloon.offered, b)]
    transport = 0 if device_variant.legacy_interface else feature_mask(Feature.VERSION_1)
    for size in range(len(offered_balloon_bits) + 1):
        for subset in itertools.combinations(offered_balloon_bits, size):
            wanted = feature_mask(*subset) | transport
            assert balloon.driver.negotiate(wanted), \
                f"FEATURES_OK refused for {bits(wanted)}; status {balloon.driver.status:#x}"
            held = guest_features(qtest_machine)
            assert held == wanted, f"after negotiating {bits(wanted)} QEMU holds {bits(held)}"


@pytest.mark.req("BAL-DEV-LEG-FEAT-1")
@over(TRANSPORTS)
def test_unoffered_bits_are_dropped_not_refused(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                                device_variant: DeviceVariant) -> None:
    """A driver that also writes bits QEMU did not offer (MUST_TELL_HOST, RING_PACKED) keeps FEATURES_OK in 7.2;
    QEMU silently masks the extras (virtio_set_features_nocheck)."""
    extras = UNOFFERED_EXTRAS & ~balloon.offered
    if device_variant.legacy_interface:
        extras &= 0xFFFFFFFF
    wanted = balloon.default_features | extras
    kept = balloon.driver.negotiate(wanted)
    held = guest_features(qtest_machine)
    assert kept, f"FEATURES_OK refused for {bits(wanted)}"
    assert held == balloon.default_features, \
        f"QEMU should hold the offered part {bits(balloon.default_features)}, holds {bits(held)}"
