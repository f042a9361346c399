"""Bit packing of the neural-network format's `rawValue`: most significant bit first.

The layout is this format's, not the kernels' (ML programs pack their sub-byte types least significant bit
first), hence the names. Each n-bit value is written most significant bit first, values are concatenated
into one big-endian bit stream, and the stream is padded with zero bits to a whole byte. Eight n-bit values always fill exactly n
bytes, so both directions work on groups of eight values held in one 64-bit integer: no per-element Python.
"""

from __future__ import annotations

import numpy as np

_SHIFTS = {n: np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(n) for n in range(1, 9)}


def packed_size(count: int, nbits: int) -> int:
    """Bytes needed for `count` values of `nbits` bits (what Core ML expects in rawValue)."""
    return (count * nbits + 7) // 8


def pack_msb_first(values: np.ndarray, nbits: int) -> bytes:
    """Pack unsigned integers < 2**nbits into Core ML's big-endian bit stream."""
    _check_nbits(nbits)
    q = np.ascontiguousarray(values, dtype=np.uint8).ravel()
    if nbits == 8:
        return q.tobytes()
    count = q.size
    if 8 % nbits == 0:  # 1, 2, 4 bits: whole values per byte, plain uint8 arithmetic
        per_byte = 8 // nbits
        padded = np.zeros(-(-count // per_byte) * per_byte, dtype=np.uint8)
        padded[:count] = q
        lanes = padded.reshape(-1, per_byte)
        out = lanes[:, 0] << np.uint8(8 - nbits)
        for k in range(1, per_byte):  # at most 8 column operations, not per element
            out |= lanes[:, k] << np.uint8(8 - nbits * (k + 1))
        return out.tobytes()
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:count] = q
    words = np.bitwise_or.reduce(padded.reshape(groups, 8) << _SHIFTS[nbits], axis=1)
    # The 8*nbits meaningful bits are the low ones; big-endian bytes put them last.
    stream = words.astype(">u8").view(np.uint8).reshape(groups, 8)[:, 8 - nbits :]
    return stream.tobytes()[: packed_size(count, nbits)]


def unpack_msb_first(data: bytes, count: int, nbits: int) -> np.ndarray:
    """Inverse of `pack_msb_first`: the first `count` values of the stream as uint8."""
    _check_nbits(nbits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < packed_size(count, nbits):
        raise ValueError(f"{raw.size} bytes hold fewer than {count} values of {nbits} bits")
    if nbits == 8:
        return raw[:count].copy()
    groups = -(-count // 8)
    padded = np.zeros(groups * nbits, dtype=np.uint8)
    take = min(raw.size, padded.size)
    padded[:take] = raw[:take]
    wide = np.zeros((groups, 8), dtype=np.uint8)
    wide[:, 8 - nbits :] = padded.reshape(groups, nbits)
    words = wide.view(">u8").reshape(groups).astype(np.uint64)
    mask = np.uint64((1 << nbits) - 1)
    values = (words[:, None] >> _SHIFTS[nbits]) & mask
    return values.astype(np.uint8).ravel()[:count]


def _check_nbits(nbits: int) -> None:
    if not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be 1..8, got {nbits}")
