"""Sub-byte packing of ML-program blobs and immediate values: least significant bit first.

Element i occupies bits i*n ... i*n+n-1 of one little-endian bit stream (bit 0 of byte 0 first), so 3- and
6-bit values straddle bytes, and the stream ends with zero bits up to a whole byte. This is the opposite of
the neural-network format's MSB-first layout (`mlqpipe.formats.nn.packing`), hence the names.

Both directions work on groups of `8 / gcd(8, n)` values that fill a whole number of bytes (one byte for
1/2/4 bits, three bytes for 3/6 bits), one column of the group at a time: no per-element Python, and no
temporary wider than a 32-bit word per group.
"""

from __future__ import annotations

from math import gcd

import numpy as np

WIDTHS = (1, 2, 3, 4, 6, 8)


def packed_size(count: int, nbits: int) -> int:
    """Bytes that hold `count` values of `nbits` bits (a blob's sizeInBytes)."""
    return (count * nbits + 7) // 8


def padding_bits(count: int, nbits: int) -> int:
    """Unused bits at the end of the last byte (a blob's padding_size_in_bits)."""
    return -(count * nbits) % 8


def pack_lsb_first(values: np.ndarray, nbits: int) -> bytes:
    """Pack unsigned integers < 2**nbits LSB first; the padding bits of the last byte are zero."""
    _check_nbits(nbits)
    q = np.ascontiguousarray(values).ravel()
    if q.size and ((q.dtype.kind != "u" and q.min() < 0) or q.max() >= 1 << nbits):  # unsigned: no minimum to check
        top = (1 << nbits) - 1
        raise ValueError(f"values must be in 0..{top} to pack them in {nbits} bits, got {q.min()}..{q.max()}")
    q = q.astype(np.uint8, copy=False)
    if nbits == 8:
        return q.tobytes()
    if nbits == 1:  # masks: numpy packs bits directly (LSB first, zero padding)
        return np.packbits(q, bitorder="little").tobytes()
    if nbits == 4:  # nibbles: the first value in the low half of each byte
        pairs = q if q.size % 2 == 0 else np.concatenate([q, np.zeros(1, np.uint8)])
        return (pairs[0::2] | (pairs[1::2] << 4)).tobytes()
    per_group, group_bytes, word = _layout(nbits)
    groups = -(-q.size // per_group)
    lanes = np.zeros(groups * per_group, dtype=np.uint8)
    lanes[: q.size] = q
    lanes = lanes.reshape(groups, per_group)
    words = np.zeros(groups, dtype=word)
    for k in range(per_group):  # at most 8 column operations, not per element
        words |= lanes[:, k].astype(word) << word(k * nbits)
    little = words.astype(np.dtype(word).newbyteorder("<"), copy=False)
    stream = little.view(np.uint8).reshape(groups, little.itemsize)[:, :group_bytes]
    return stream.tobytes()[: packed_size(q.size, nbits)]


def unpack_lsb_first(data, nbits: int, count: int) -> np.ndarray:
    """The first `count` values of an LSB-first stream as uint8 (a new array). Padding bits are not looked
    at: `padding_is_zero` says whether they are clean."""
    _check_nbits(nbits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < packed_size(count, nbits):
        raise ValueError(f"{raw.size} bytes hold fewer than {count} values of {nbits} bits")
    if nbits == 8:
        return raw[:count].copy()
    if nbits == 1:  # masks: numpy unpacks bits directly
        return np.unpackbits(raw[: packed_size(count, 1)], count=count, bitorder="little")
    if nbits == 4:
        data = raw[: packed_size(count, 4)]
        out = np.empty(data.size * 2, dtype=np.uint8)
        out[0::2], out[1::2] = data & 0x0F, data >> 4
        return out[:count]
    per_group, group_bytes, word = _layout(nbits)
    groups = -(-count // per_group)
    padded = np.zeros(groups * group_bytes, dtype=np.uint8)
    take = min(raw.size, padded.size)
    padded[:take] = raw[:take]
    wide = np.zeros((groups, np.dtype(word).itemsize), dtype=np.uint8)
    wide[:, :group_bytes] = padded.reshape(groups, group_bytes)
    words = wide.view(np.dtype(word).newbyteorder("<")).reshape(groups).astype(word, copy=False)
    mask = word((1 << nbits) - 1)
    out = np.empty((groups, per_group), dtype=np.uint8)
    for k in range(per_group):
        out[:, k] = (words >> word(k * nbits)) & mask
    return out.reshape(-1)[:count]


def padding_is_zero(data, nbits: int, count: int) -> bool:
    """True when every bit after the first `count * nbits` bits of `data` is zero (Core ML's constexpr ops
    and coremltools' loader require clean padding; a dirty tail means a corrupt or foreign writer)."""
    _check_nbits(nbits)
    raw = np.frombuffer(data, dtype=np.uint8)
    used = count * nbits
    whole, rest = divmod(used, 8)
    if rest and whole < raw.size and raw[whole] >> rest:
        return False
    return not raw[whole + (1 if rest else 0) :].any()


def int4_to_codes(values: np.ndarray) -> np.ndarray:
    """int8 values in -8..7 -> their two's-complement 4-bit codes 0..15 (uint8), ready to pack."""
    v = np.asarray(values)
    if v.size and (v.min() < -8 or v.max() > 7):
        raise ValueError(f"int4 values must be in -8..7, got {v.min()}..{v.max()}")
    return (v.astype(np.int8) & np.int8(0x0F)).astype(np.uint8)


def codes_to_int4(codes: np.ndarray) -> np.ndarray:
    """4-bit codes 0..15 -> the int8 values -8..7 they encode (two's complement: codes 8..15 are negative)."""
    c = np.asarray(codes).astype(np.int8)
    return (c ^ np.int8(8)) - np.int8(8)


def _layout(nbits: int) -> tuple[int, int, type]:
    """(values per group, bytes per group, word type): the smallest run of values filling whole bytes."""
    per_group = 8 // gcd(8, nbits)
    group_bytes = per_group * nbits // 8
    return per_group, group_bytes, np.uint8 if group_bytes == 1 else np.uint32


def _check_nbits(nbits: int) -> None:
    if nbits not in WIDTHS:
        raise ValueError(f"nbits must be one of {', '.join(map(str, WIDTHS))}, got {nbits}")
