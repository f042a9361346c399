import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mlqpipe.formats.mlprogram.packing import (
    WIDTHS,
    codes_to_int4,
    int4_to_codes,
    pack_lsb_first,
    packed_size,
    padding_bits,
    padding_is_zero,
    unpack_lsb_first,
)


def _reference_pack(values, nbits):
    """Bit-by-bit statement of the ML-program layout: value i at bits i*n.. of one little-endian stream."""
    bits = [(int(v) >> i) & 1 for v in values for i in range(nbits)]
    bits += [0] * (-len(bits) % 8)
    return bytes(sum(b << k for k, b in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8))


_cases = st.sampled_from(WIDTHS).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.integers(0, 2**n - 1), max_size=70))
)


@given(_cases)
def test_pack_matches_bitwise_definition_and_round_trips(case):
    nbits, values = case
    q = np.array(values, dtype=np.uint8)
    packed = pack_lsb_first(q, nbits)
    assert packed == _reference_pack(values, nbits)
    assert len(packed) == packed_size(len(values), nbits)
    assert padding_is_zero(packed, nbits, len(values))
    out = unpack_lsb_first(packed, nbits, len(values))
    assert out.dtype == np.uint8 and out.tolist() == values


@settings(max_examples=30)
@given(st.sampled_from(WIDTHS), st.integers(1, 5000), st.integers(0, 2**32 - 1))
def test_round_trip_large(nbits, count, seed):
    q = np.random.default_rng(seed).integers(0, 2**nbits, count).astype(np.uint8)
    assert np.array_equal(unpack_lsb_first(pack_lsb_first(q, nbits), nbits, count), q)


@pytest.mark.parametrize(
    "nbits, values, expected",
    [
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], bytes([0b00001101, 0b00000001])),
        (2, [1, 2, 3, 0, 3], bytes([0b00111001, 0b00000011])),
        (3, [5, 3, 7], bytes([0b11011101, 0b00000001])),  # 101 | 011 | 111: the third value straddles
        (4, [1, 2, 3], bytes([0x21, 0x03])),
        (6, [0x3F, 0x01, 0x2A], bytes([0b01111111, 0b10100000, 0b00000010])),
        (8, [7, 255], bytes([7, 255])),
    ],
)
def test_known_layout(nbits, values, expected):
    assert pack_lsb_first(np.array(values, dtype=np.uint8), nbits) == expected
    assert unpack_lsb_first(expected, nbits, len(values)).tolist() == values


@pytest.fixture(scope="module")
def ct_utils():
    """coremltools' own LSB-first packer (test-only oracle; imported once, it is slow to import)."""
    return pytest.importorskip("coremltools.optimize._utils")


@given(_cases)
def test_equals_coremltools_packing(ct_utils, case):
    nbits, values = case
    q = np.array(values, dtype=np.uint8)
    theirs = ct_utils.pack_elements_into_bits(q, nbits).tobytes() if values else b""
    assert pack_lsb_first(q, nbits) == theirs
    if values:
        back = ct_utils.restore_elements_from_packed_bits(np.frombuffer(theirs, np.uint8), nbits, len(values))
        assert unpack_lsb_first(theirs, nbits, len(values)).tolist() == back.tolist()


@given(st.lists(st.integers(-8, 7), max_size=50))
def test_int4_codes_round_trip_and_equal_coremltools(ct_utils, values):
    v = np.array(values, dtype=np.int8)
    codes = int4_to_codes(v)
    assert codes.dtype == np.uint8 and codes.tolist() == [x & 0xF for x in values]
    back = codes_to_int4(codes)
    assert back.dtype == np.int8 and back.tolist() == values
    if values:
        assert pack_lsb_first(codes, 4) == ct_utils.pack_elements_into_bits(v, 4).tobytes()
        theirs = ct_utils.restore_elements_from_packed_bits(
            np.frombuffer(pack_lsb_first(codes, 4), np.uint8), 4, len(values), are_packed_values_signed=True
        )
        assert theirs.tolist() == values


def test_int4_range():
    with pytest.raises(ValueError, match=r"int4 values must be in -8..7, got -9..0"):
        int4_to_codes(np.array([-9, 0]))


@given(st.sampled_from(WIDTHS[:-1]), st.integers(0, 40), st.data())
def test_padding_is_zero_sees_every_dirty_bit(nbits, count, data):
    packed = bytearray(pack_lsb_first(np.zeros(count, np.uint8), nbits))
    assert padding_bits(count, nbits) == len(packed) * 8 - count * nbits
    spare = len(packed) * 8 - count * nbits
    if spare:
        bit = count * nbits + data.draw(st.integers(0, spare - 1))
        packed[bit // 8] |= 1 << (bit % 8)
        assert not padding_is_zero(bytes(packed), nbits, count)
        assert unpack_lsb_first(bytes(packed), nbits, count).tolist() == [0] * count  # unpack ignores it
    assert not padding_is_zero(bytes(pack_lsb_first(np.zeros(count, np.uint8), nbits)) + b"\x01", nbits, count)


def test_refusals():
    with pytest.raises(ValueError, match=r"values must be in 0..7 to pack them in 3 bits, got 0..8"):
        pack_lsb_first(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match=r"1 bytes hold fewer than 3 values of 3 bits"):
        unpack_lsb_first(b"\x00", 3, 3)
    with pytest.raises(ValueError, match=r"nbits must be one of 1, 2, 3, 4, 6, 8, got 5"):
        pack_lsb_first(np.zeros(3, np.uint8), 5)
