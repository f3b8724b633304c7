"""Wire constants and codecs in vballoon.spec."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vballoon import spec
from vballoon.errors import DecodeError
from vballoon.spec import BalloonConfig, Feature, StatTag

STATELESS = settings(max_examples=200, deadline=None)


def test_feature_bits_match_the_linux_and_qemu_headers():
    expected = {
        "MUST_TELL_HOST": 0, "STATS_VQ": 1, "DEFLATE_ON_OOM": 2, "FREE_PAGE_HINT": 3,
        "PAGE_POISON": 4, "REPORTING": 5, "INDIRECT_DESC": 28, "EVENT_IDX": 29,
        "VERSION_1": 32, "RING_PACKED": 34,
    }
    got = {name: int(Feature[name]) for name in expected}
    assert got == expected, f"expected {expected}, got {got}"


def test_feature_mask_and_has_feature():
    mask = spec.feature_mask(Feature.STATS_VQ, Feature.VERSION_1)
    assert mask == (1 << 1) | (1 << 32), f"expected bits 1 and 32, got {mask:#x}"
    assert spec.has_feature(mask, Feature.VERSION_1)
    assert not spec.has_feature(mask, Feature.PAGE_POISON)


@pytest.mark.req("BAL-LEG-ST-END", "BAL-LEG-FPH-END")
def test_buffer_endian_is_little_for_modern_and_native_for_legacy():
    modern = spec.feature_mask(Feature.VERSION_1)
    assert spec.buffer_endian(modern, "big") == "little"
    assert spec.buffer_endian(0, "big") == "big"
    assert spec.buffer_endian(0) == "little"


def test_status_bits():
    S = spec.Status
    got = [S.ACKNOWLEDGE, S.DRIVER, S.DRIVER_OK, S.FEATURES_OK, S.DEVICE_NEEDS_RESET, S.FAILED]
    assert got == [1, 2, 4, 8, 0x40, 0x80], f"expected ACK,DRIVER,DRIVER_OK,FEATURES_OK,NEEDS_RESET,FAILED bits, got {got}"


def test_stats_table_matches_tags_units_and_qom_keys():
    assert [int(s.tag) for s in spec.STATS] == list(range(16))
    assert spec.STATS[StatTag.MEMFREE].qom_key == "stat-free-memory"
    assert spec.STATS[StatTag.MAJFLT].unit == "count"
    assert spec.STATS[StatTag.DIRECT_RECLAIM].qom_key == "stat-direct-reclaims"
    assert spec.STATS[StatTag.SWAP_IN].name == "SWAP_IN"
    in_spec = [s.tag for s in spec.STATS if s.in_spec]
    assert in_spec == list(range(10)), f"spec defines tags 0-9, got {in_spec}"
    assert spec.LINUX_S_NR == 16


@pytest.mark.req("BAL-DRV-ST-5")
def test_stats_entry_is_ten_packed_bytes():
    data = spec.encode_stats([(StatTag.MEMFREE, 0x1122334455667788)])
    assert data == struct.pack("<HQ", 4, 0x1122334455667788)
    assert len(data) == spec.STAT_ENTRY_SIZE == 10


def test_decode_stats_ignores_trailing_partial_entry():
    data = spec.encode_stats([(1, 7), (2, 9)]) + b"\x05\x00\x01"
    got = spec.decode_stats(data)
    assert got.entries == ((1, 7), (2, 9)), f"got {got.entries}"
    assert got.trailing_bytes == 3


def test_stats_big_endian_round_trip():
    data = spec.encode_stats([(3, 5)], "big")
    assert data[:2] == b"\x00\x03"
    assert spec.decode_stats(data, "big").entries == ((3, 5),)


def test_encode_stats_rejects_values_that_do_not_fit():
    with pytest.raises(DecodeError):
        spec.encode_stats([(1 << 16, 0)])


def test_unknown_endianness_is_a_decode_error():
    with pytest.raises(DecodeError, match="endianness"):
        spec.decode_pfns(b"\0" * 4, "middle")  # type: ignore[arg-type]


def test_pfns_round_trip_and_trailing_bytes():
    data = spec.encode_pfns([0, 1, 0xFFFFFFFF]) + b"\x01"
    got = spec.decode_pfns(data)
    assert got.pfns == (0, 1, 0xFFFFFFFF) and got.trailing_bytes == 1
    with pytest.raises(DecodeError):
        spec.encode_pfns([1 << 32])
    assert spec.PAGE_SIZE == 4096 and spec.PFN_SHIFT == 12


def test_cmd_id_codec_and_constants():
    assert (spec.CMD_ID_STOP, spec.CMD_ID_DONE, spec.CMD_ID_FIRST) == (0, 1, 0x80000001)
    assert spec.decode_cmd_id(spec.encode_cmd_id(0x80000005)) == 0x80000005
    assert spec.decode_cmd_id(spec.encode_cmd_id(7) + b"junk") == 7
    with pytest.raises(DecodeError, match="3 bytes"):
        spec.decode_cmd_id(b"\x01\x02\x03")
    with pytest.raises(DecodeError):
        spec.encode_cmd_id(-1)


def test_next_cmd_id_wraps_to_min():
    assert spec.next_cmd_id(spec.CMD_ID_MIN) == spec.CMD_ID_FIRST
    assert spec.next_cmd_id(0xFFFFFFFF) == 0x80000000


@pytest.mark.parametrize(
    ("features", "quirk", "size"),
    [
        (spec.feature_mask(Feature.STATS_VQ), False, 8),
        (spec.feature_mask(Feature.FREE_PAGE_HINT), False, 12),
        (spec.feature_mask(Feature.PAGE_POISON), False, 16),
        (spec.feature_mask(Feature.FREE_PAGE_HINT, Feature.PAGE_POISON), False, 16),
        (0, True, 16),
    ],
)
def test_config_size_follows_qemu_rule(features, quirk, size):
    got = spec.config_size(features, qemu_4_0_config_size=quirk)
    assert got == size, f"features {features:#x} quirk {quirk}: expected {size}, got {got}"


@pytest.mark.req("BAL-CFG-LEG-LE")
def test_config_layout_is_little_endian_at_fixed_offsets():
    cfg = BalloonConfig(num_pages=1, actual=2, free_page_hint_cmd_id=3, poison_val=0xAABBCCDD)
    data = cfg.encode()
    assert data == struct.pack("<4I", 1, 2, 3, 0xAABBCCDD)
    assert [int(f) for f in spec.ConfigField] == [0, 4, 8, 12]
    assert cfg.encode(8) == data[:8]
    assert BalloonConfig.decode(data[:12]) == BalloonConfig(1, 2, 3, 0)
    assert BalloonConfig.decode(data) == cfg


def test_config_codec_rejects_bad_sizes_and_values():
    with pytest.raises(DecodeError):
        BalloonConfig().encode(10)
    with pytest.raises(DecodeError):
        BalloonConfig.decode(b"\0" * 9)
    with pytest.raises(DecodeError):
        BalloonConfig(num_pages=1 << 32).encode()


@STATELESS
@given(st.binary(max_size=200), st.sampled_from(["little", "big"]))
def test_decoders_raise_only_decode_error(data, endian):
    for decode in (spec.decode_stats, spec.decode_pfns, spec.decode_cmd_id):
        try:
            decode(data, endian)
        except DecodeError:
            pass
    try:
        BalloonConfig.decode(data)
    except DecodeError:
        pass


@STATELESS
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1)), max_size=20),
       st.binary(max_size=9))
def test_stats_round_trip_with_any_trailing_partial_entry(entries, tail):
    got = spec.decode_stats(spec.encode_stats(entries) + tail)
    assert got.entries == tuple(entries)
    assert got.trailing_bytes == len(tail)
