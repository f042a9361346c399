import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mlqpipe.formats.nn.packing import pack_msb_first, packed_size, unpack_msb_first


def _reference_pack(values, nbits):
    """Bit-by-bit statement of Core ML's layout: MSB first, one big-endian stream, zero padded."""
    bits = [(int(v) >> i) & 1 for v in values for i in reversed(range(nbits))]
    bits += [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, 2**n - 1), max_size=70))))
def test_pack_matches_bitwise_definition_and_round_trips(case):
    nbits, values = case
    q = np.array(values, dtype=np.uint8)
    packed = pack_msb_first(q, nbits)
    assert packed == _reference_pack(values, nbits)
    assert len(packed) == packed_size(len(values), nbits)
    assert unpack_msb_first(packed, len(values), nbits).tolist() == values


@settings(max_examples=30)
@given(st.integers(1, 8), st.integers(1, 5000), st.integers(0, 2**32 - 1))
def test_round_trip_large(nbits, count, seed):
    q = np.random.default_rng(seed).integers(0, 2**nbits, count).astype(np.uint8)
    assert np.array_equal(unpack_msb_first(pack_msb_first(q, nbits), count, nbits), q)


def test_known_layout():
    assert pack_msb_first(np.array([1, 2, 3]), 4) == bytes([0x12, 0x30])
    assert pack_msb_first(np.array([1, 0, 1]), 1) == bytes([0b10100000])
    assert pack_msb_first(np.array([5, 3]), 3) == bytes([0b10101100])


def test_unpack_refuses_short_data():
    with pytest.raises(ValueError, match="fewer than 9 values"):
        unpack_msb_first(b"\x00", 9, 1)


@pytest.mark.parametrize("nbits", [0, 9])
def test_nbits_range(nbits):
    with pytest.raises(ValueError, match="nbits must be 1..8"):
        pack_msb_first(np.zeros(3, np.uint8), nbits)
