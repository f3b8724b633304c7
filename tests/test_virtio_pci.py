"""The virtio-pci driver over qtest, against the QEMU under test, on every transport and interface."""

from __future__ import annotations

import pytest

from fixtures.qtest_device import TRANSPORTS, DeviceVariant, over
from vballoon.qemu.qtest_machine import INFLATEQ, STATSQ, QtestBalloon
from vballoon.errors import QemuError, UsageError
from vballoon.qemu.qtest_machine import QtestMachine
from vballoon.qemu.virtio_pci import (BALLOON_DEVICE_ID_MODERN, BALLOON_DEVICE_ID_TRANSITIONAL, COMMAND_BUS_MASTER,
                                      COMMAND_IO, COMMAND_MEMORY, IO_WINDOW, MMIO_WINDOW, PCI_BAR0, PCI_COMMAND,
                                      PCI_SUBSYSTEM_ID, VIRTIO_VENDOR_ID, CfgType, GuestAllocator, ModernInterface, PciAddress,
                                      PciFunction,
                                      enumerate_bus, virtio_caps)
from vballoon.spec import ConfigField, Feature, StatTag, Status, encode_stats, feature_mask, has_feature
from vballoon.waiting import wait_for

VIRTIO_ID_BALLOON = 5
INTX_LINES = range(16, 24)  # the IOAPIC inputs PCI INTx is routed to on q35


@over(TRANSPORTS)
def test_enumeration_finds_the_balloon_once(balloon: QtestBalloon, device_variant: DeviceVariant) -> None:
    functions = enumerate_bus(balloon.qtest)
    virtio = [f for f in functions if f.vendor_id == VIRTIO_VENDOR_ID]
    assert len(virtio) == 1, f"expected one virtio function on bus 0, got {[str(f.address) for f in virtio]}"
    expected = BALLOON_DEVICE_ID_MODERN if device_variant.variant.transport == "modern" \
        else BALLOON_DEVICE_ID_TRANSITIONAL
    assert virtio[0].device_id == expected, f"device id: expected {expected:#x}, got {virtio[0].device_id:#x}"
    if expected == BALLOON_DEVICE_ID_TRANSITIONAL:
        subsystem = virtio[0].config_read(PCI_SUBSYSTEM_ID, 2)
        assert subsystem == VIRTIO_ID_BALLOON, f"legacy subsystem id: expected 5, got {subsystem}"
    assert str(functions[0].address) == "00:00.0", "the q35 host bridge comes first"


@over(TRANSPORTS)
def test_bars_are_assigned_and_decoding_enabled(balloon: QtestBalloon, device_variant: DeviceVariant) -> None:
    function = balloon.driver.function
    command = function.config_read(PCI_COMMAND, 2)
    assert command & (COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER) == 0x7, f"command register {command:#x}"
    bars = function.size_bars()
    transport = device_variant.variant.transport
    io_bars = [b for b in bars if b.is_io]
    assert bool(io_bars) == (transport != "modern"), f"legacy I/O BAR presence on {transport}: {bars}"
    assert any(b.is_64bit for b in bars) == (transport != "legacy"), f"modern 64-bit BAR on {transport}: {bars}"
    for bar in bars:
        address = function.config_read(PCI_BAR0 + 4 * bar.index, 4) & ~0xF
        window = IO_WINDOW if bar.is_io else MMIO_WINDOW
        assert window[0] <= address & ~0x3 < window[1] and address % bar.size == 0, \
            f"BAR {bar.index} at {address:#x}, size {bar.size:#x}, outside {window} or unaligned"


@over(TRANSPORTS)
def test_capability_list_matches_the_transport(balloon: QtestBalloon, device_variant: DeviceVariant) -> None:
    types = {cap.cfg_type for cap in virtio_caps(balloon.driver.function)}
    if device_variant.variant.transport == "legacy":
        assert types == set(), f"a legacy-only device has no virtio capabilities, got {types}"
    else:
        wanted = {CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR, CfgType.DEVICE, CfgType.PCI}
        assert wanted <= types, f"missing virtio capabilities {wanted - types}"


@over(TRANSPORTS)
def test_negotiated_features_reach_the_device(balloon: QtestBalloon, qtest_machine: QtestMachine,
                                             device_variant: DeviceVariant) -> None:
    legacy = device_variant.legacy_interface
    assert has_feature(balloon.offered, Feature.STATS_VQ)
    assert has_feature(balloon.offered, Feature.VERSION_1) == (not legacy), f"offered {balloon.offered:#x}"
    wanted = feature_mask(Feature.STATS_VQ) | (0 if legacy else feature_mask(Feature.VERSION_1))
    assert balloon.driver.negotiate(wanted), f"FEATURES_OK refused; status {balloon.driver.status:#x}"
    guest = qtest_machine.host_balloon.virtio_status().guest_features
    assert guest == {Feature.STATS_VQ} | (set() if legacy else {Feature.VERSION_1}), f"QEMU holds {sorted(guest)}"


@over(TRANSPORTS)
def test_inflate_is_acked_through_the_used_ring(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    balloon.start()
    assert balloon.driver.status & Status.DRIVER_OK
    pages = [balloon.new_page(0xAA) >> 12 for _ in range(3)]
    used = balloon.inflate(pages)
    assert used.length == 0
    queue = qtest_machine.qmp.command("x-query-virtio-queue-status", path=qtest_machine.host_balloon.virtio_path(),
                                      queue=INFLATEQ)
    assert (queue["last-avail-idx"], queue["used-idx"]) == (1, 1), f"QEMU's view of the inflateq: {queue}"


@over(TRANSPORTS)
def test_inflate_raises_intx_until_isr_is_read(balloon: QtestBalloon) -> None:
    balloon.qtest.irq_intercept_in("ioapic")
    balloon.start()
    balloon.inflate([balloon.new_page() >> 12])
    raised = wait_for(lambda: [line for line in INTX_LINES if balloon.qtest.poll_irqs().get(line)], 5.0,
                      "an INTx line of the IOAPIC to be raised")
    assert len(raised) == 1, f"expected one INTx line raised, got {raised}"
    assert balloon.driver.read_isr() & 1, "ISR bit 0 (queue interrupt) must be set"
    balloon.qtest.wait_irq(raised[0], False, 5.0)


@over(TRANSPORTS)
def test_config_reads_every_width_after_qmp_balloon(balloon: QtestBalloon, qtest_machine: QtestMachine) -> None:
    balloon.start()
    qtest_machine.host_balloon.set_target(qtest_machine.ram_bytes - (0x1234 << 12))
    num_pages = 0x1234
    driver = balloon.driver
    assert driver.config_read(ConfigField.NUM_PAGES, 4) == num_pages
    assert driver.config_read(ConfigField.NUM_PAGES, 2) == num_pages
    assert driver.config_read(ConfigField.NUM_PAGES + 2, 2) == 0
    assert [driver.config_read(ConfigField.NUM_PAGES + i, 1) for i in range(4)] == [0x34, 0x12, 0, 0]


@over(TRANSPORTS)
def test_actual_written_at_every_width_reads_back(balloon: QtestBalloon) -> None:
    balloon.start()
    driver = balloon.driver
    driver.config_write(ConfigField.ACTUAL, 4, 0x01020304)
    assert balloon.config_field(ConfigField.ACTUAL) == 0x01020304
    driver.config_write(ConfigField.ACTUAL + 2, 2, 0x0506)
    assert balloon.config_field(ConfigField.ACTUAL) == 0x05060304
    driver.config_write(ConfigField.ACTUAL + 1, 1, 0x07)
    assert balloon.config_field(ConfigField.ACTUAL) == 0x05060704


@over(TRANSPORTS[:1])
def test_waiting_for_an_unused_buffer_times_out(balloon: QtestBalloon) -> None:
    balloon.start()
    balloon.post(STATSQ, [encode_stats([(StatTag.MEMFREE, 1)])])  # kept by the device: polling is off
    with pytest.raises(QemuError, match="1 used entries on queue 2"):
        balloon.driver.wait_used(STATSQ, 1, timeout=0.2)


@over(TRANSPORTS[-1:])
def test_legacy_queues_have_the_device_size(balloon: QtestBalloon) -> None:
    balloon.driver.negotiate(feature_mask(Feature.STATS_VQ))
    with pytest.raises(UsageError, match="device's size 128"):
        balloon.driver.setup_queue(INFLATEQ, size=64)


def test_guest_allocator_aligns_and_refuses_overflow() -> None:
    allocator = GuestAllocator(0x1001, 0x3000)
    assert allocator.alloc(10, align=0x1000) == 0x2000
    assert allocator.alloc(6) == 0x2010
    with pytest.raises(UsageError, match="exhausted"):
        allocator.alloc(0x1000)


@over(TRANSPORTS[:1])
def test_empty_slot_reads_all_ones(balloon: QtestBalloon) -> None:
    empty_slot = PciFunction(balloon.qtest, PciAddress(0, 20, 0))
    assert empty_slot.config_read(0, 4) == 0xFFFFFFFF


@over(TRANSPORTS[:2])
def test_modern_common_config_counts_queues_and_config_changes(balloon: QtestBalloon,
                                                               qtest_machine: QtestMachine) -> None:
    interface = balloon.driver.interface
    assert isinstance(interface, ModernInterface)
    assert interface.num_queues() == 3, "inflateq, deflateq and statsq without hinting or reporting"
    balloon.start()  # QEMU counts config changes only once DRIVER_OK is set
    generation = interface.config_generation()
    qtest_machine.host_balloon.set_target(qtest_machine.ram_bytes // 2)
    assert interface.config_generation() != generation, "a new num_pages must change config_generation"
