"""Smoke tier: every variant boots, negotiates what the oracle predicts, and starts with an empty balloon."""

from __future__ import annotations

import pytest

from fixtures.variant_gates import require_qmp_command
from vballoon.matrix import MODELLED_BITS, Variant
from vballoon.qemu.machine import Machine
from vballoon.qemu.virtio_status import sysfs_feature_bits
from vballoon.session import Session

VIRTIO_ID_BALLOON = 5
pytestmark = pytest.mark.cold_boot  # what the guest negotiated at probe and its first state: a booted guest's


def guest_balloon_features(vm: Machine) -> frozenset[int]:
    """Features the guest driver negotiated, read from the guest's sysfs."""
    script = ("for d in /sys/bus/virtio/devices/*; do "
              "[ \"$(cat $d/device)\" = 0x0005 ] && cat $d/features; done")
    return sysfs_feature_bits(vm.ssh.output(script))


def names(bits: frozenset[int]) -> list[int]:
    return sorted(bits)


@pytest.mark.req("BAL-DRV-FEAT-POISON", "BAL-DRV-FEAT-REPORT", "BAL-DEV-LEG-FEAT-1")
def test_negotiated_features_match_oracle(shared_vm: Machine, variant: Variant) -> None:
    """The guest accepts exactly the features Linux (6.1, 6.12) should accept of what QEMU offers."""
    expected = variant.accepted_features()
    in_guest = guest_balloon_features(shared_vm)
    assert in_guest & MODELLED_BITS == expected, (
        f"guest sysfs features: expected {names(expected)}, got {names(in_guest & MODELLED_BITS)} "
        f"(BAL-DRV-FEAT-POISON/BAL-DRV-FEAT-REPORT, variant {variant.name})")


@pytest.mark.req("BAL-DRV-FEAT-POISON", "BAL-DRV-FEAT-REPORT", "BAL-DEV-LEG-FEAT-1")
def test_qemu_sees_the_negotiation_the_guest_made(shared_vm: Machine, variant: Variant, session: Session) -> None:
    """QEMU's view (x-query-virtio-status): it offers what the variant's properties say and holds the features
    the guest accepted."""
    require_qmp_command(session.qemu, "x-query-virtio-status", "QEMU's view of the negotiated features")
    in_guest = guest_balloon_features(shared_vm)
    status = shared_vm.host_balloon.virtio_status()
    assert status.host_features & MODELLED_BITS == variant.offered_features(), (
        f"QEMU host-features: expected {names(variant.offered_features())}, "
        f"got {names(status.host_features & MODELLED_BITS)} (variant {variant.name})")
    assert status.guest_features == in_guest, (
        f"BAL-DEV-LEG-FEAT-1: QEMU's guest-features {names(status.guest_features)} differ from the guest's sysfs "
        f"{names(in_guest)}: host and guest disagree on what was negotiated")
    assert "VIRTIO_CONFIG_S_DRIVER_OK" in status.status, (
        f"device status: expected DRIVER_OK set, got {status.status}")


@pytest.mark.req("BAL-DRV-ACT-1")
def test_balloon_starts_empty(shared_vm: Machine) -> None:
    """Before any target is set, query-balloon reports the whole guest RAM."""
    ram = shared_vm.memory_mib << 20
    actual = shared_vm.host_balloon.query_balloon()
    assert actual == ram, f"query-balloon actual: expected {ram} (all RAM, balloon empty), got {actual}"
