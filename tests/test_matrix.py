"""The variant matrix: names round-trip, tiers cover what they claim, the negotiation oracle follows Linux 6.1."""

from __future__ import annotations

import itertools

import pytest

from vballoon import matrix
from vballoon.errors import UsageError
from vballoon.fuzz.format import offered_balloon_features
from vballoon.matrix import Variant
from vballoon.spec import BALLOON_FEATURES, Feature, feature_mask


def test_every_full_variant_name_round_trips() -> None:
    variants = matrix.tier("full")
    names = [v.name for v in variants]
    assert len(set(names)) == len(names), "two variants share a name"
    for variant in variants:
        assert Variant.from_name(variant.name) == variant, f"{variant.name} does not parse back to itself"


def test_full_tier_is_every_valid_combination() -> None:
    # 3 transports x 2^7 switches x 4 backends x 3 boots, minus legacy+packed (1 x 2^6 x 4 x 3).
    expected = 3 * 2**7 * 4 * 3 - 2**6 * 4 * 3
    assert len(matrix.tier("full")) == expected, f"full tier: expected {expected} variants"


def test_standard_tier_covers_every_valid_pair() -> None:
    dims = {name: values for name, values in matrix.DIMENSIONS.items()}
    variants = matrix.tier("standard")
    seen = {(a, getattr(v, a), b, getattr(v, b)) for v in variants for a, b in itertools.combinations(dims, 2)}
    defaults = {name: values[0] for name, values in dims.items()}
    missing = []
    for a, b in itertools.combinations(dims, 2):
        for va, vb in itertools.product(dims[a], dims[b]):
            if matrix.combination_problem({**defaults, a: va, b: vb}) is None and (a, va, b, vb) not in seen:
                missing.append((a, va, b, vb))
    assert not missing, f"standard tier misses pairs: {missing[:5]}"
    assert len(variants) < 30, f"standard tier has {len(variants)} variants; pairwise should need far fewer"


def test_quick_tier_is_small_and_spans_transports() -> None:
    quick = matrix.tier("quick")
    assert len(quick) == 3
    assert {v.transport for v in quick} == {"modern", "transitional", "legacy"}


@pytest.mark.parametrize("name, message", [
    ("pci-modern+bogus", "unknown part '+bogus'"),
    ("mmio", "must start with one of"),
    ("pci-legacy+packed", "packed ring needs VIRTIO_F_VERSION_1"),
])
def test_bad_variant_names_give_one_line_naming_the_option(name: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        Variant.from_name(name)
    text = str(caught.value)
    assert text.startswith(f"--variant {name}") and message in text and "\n" not in text, text


def test_unknown_tier_names_the_option() -> None:
    with pytest.raises(UsageError, match="--matrix huge"):
        matrix.tier("huge")


@pytest.mark.req("BAL-DRV-FEAT-POISON")
def test_linux_clears_page_poison_without_poisoning() -> None:
    accepted = Variant(page_poison=True).accepted_features()
    assert Feature.PAGE_POISON not in accepted, "PAGE_POISON must be cleared when the guest neither poisons nor inits on free"
    assert Feature.PAGE_POISON in Variant(guest_boot="iof").accepted_features()
    assert Feature.PAGE_POISON in Variant(guest_boot="pgpoison").accepted_features()


@pytest.mark.req("BAL-DRV-FEAT-REPORT")
def test_linux_clears_reporting_when_it_poisons_without_page_poison() -> None:
    poisoning = Variant(free_page_reporting=True, page_poison=False, guest_boot="iof")
    assert Feature.REPORTING not in poisoning.accepted_features()
    not_poisoning = Variant(free_page_reporting=True, page_poison=False)
    assert Feature.REPORTING in not_poisoning.accepted_features()


def test_offer_follows_properties_and_transport() -> None:
    offered = Variant(deflate_on_oom=True, transport="legacy", indirect_desc=False).offered_features()
    assert {Feature.STATS_VQ, Feature.DEFLATE_ON_OOM, Feature.PAGE_POISON} <= offered
    assert Feature.VERSION_1 not in offered and Feature.INDIRECT_DESC not in offered
    assert Feature.INDIRECT_DESC not in Variant().accepted_features(), "Linux's balloon always clears INDIRECT_DESC"


def test_legacy_interface_offers_neither_version_1_nor_bits_above_31() -> None:
    packed = Variant(transport="transitional", packed=True)
    assert {Feature.VERSION_1, Feature.RING_PACKED} <= packed.offered_features()
    assert not {Feature.VERSION_1, Feature.RING_PACKED} & packed.offered_features(legacy_interface=True)


def test_matrix_reference_and_fuzzer_agree_on_the_offer_of_every_variant() -> None:
    """One model of QEMU's offer (the reference's DeviceProperties): the matrix's bits, the reference's mask and the
    fuzzer's balloon bits are the same for every variant of the full tier, through each interface it has."""
    negotiable = feature_mask(*BALLOON_FEATURES) & ~feature_mask(Feature.MUST_TELL_HOST)
    for variant in matrix.tier("full"):
        for legacy_interface in {variant.transport != "modern", variant.transport == "legacy"}:
            properties = variant.reference_properties(legacy_interface)
            assert feature_mask(*variant.offered_features(legacy_interface)) == properties.offered_features, \
                f"{variant.name} (legacy interface {legacy_interface}): matrix and reference offers differ"
        assert offered_balloon_features(variant) == feature_mask(*variant.offered_features()) & negotiable, \
            f"{variant.name}: the fuzzer's offer differs from the matrix's"


def test_device_properties_attach_iothread_for_hinting() -> None:
    props = Variant(free_page_hint=True, transport="modern").device_properties()
    assert props["iothread"] == "iothread0" and props["free-page-hint"] == "on"
    assert props["disable-legacy"] == "on" and props["disable-modern"] == "off"
    assert "iothread" not in Variant().device_properties()
