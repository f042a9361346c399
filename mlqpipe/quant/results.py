"""What a kernel hands to a format's writer: numbers only, no file format.

A kernel decides the values; how they are laid out in a model (bit order of packed codes, where scales
go, which messages hold them) is the format's business, so one kernel serves every format."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays do not compare to one bool
class Float32Result:
    values: np.ndarray  # flat float32, in the blob's order


@dataclass(frozen=True, eq=False)
class Float16Result:
    values: np.ndarray  # flat float16, in the blob's order


@dataclass(frozen=True, eq=False)
class LinearResult:
    """w ≈ codes * scale + bias, one scale and bias per channel along `axis` (one of each: per tensor)."""

    codes: np.ndarray  # flat uint8 < 2**nbits, in the blob's order
    scale: np.ndarray  # float32 [channels]
    bias: np.ndarray  # float32 [channels]
    nbits: int
    axis: int | None


@dataclass(frozen=True, eq=False)
class LutResult:
    """w ≈ lut[indices], one table of exactly 2**nbits entries for the whole tensor."""

    lut: np.ndarray  # float32 [2**nbits]
    indices: np.ndarray  # flat uint8 < 2**nbits, in the blob's order
    nbits: int


# ML-program (iOS18 canonical) results: the writer converts them to iOS16/17 attribute forms where it can.
# They nest (iOS18 joint compression, each nesting one chained constexpr op): a PaletteResult's `lut` may be
# an AffineResult (a LUT quantized per tensor); a SparseResult's `nonzero` may be a PaletteResult or an
# AffineResult (the nonzero values palettized or quantized), whose indices / data are then 1-D.


@dataclass(frozen=True, eq=False)
class AffineResult:
    """w ≈ scale · (data − zero_point), scale and zero_point broadcast blockwise (constexpr_blockwise_shift_scale).

    `scale` has the rank of the tensor it describes with `shape[i] / scale.shape[i]` = the block size on
    axis i; `zero_point` has scale's shape and data's dtype, or is None (symmetric signed: no offset).
    As a SparseResult's `nonzero`, `data` holds only the codes of the kept values (1-D, row-major) and
    scale/offset have the mask's rank (constexpr_sparse_blockwise_shift_scale); as a PaletteResult's `lut`
    it is the table's shape and per tensor."""

    data: np.ndarray  # int8 (int8/int4) or uint8 (uint8/uint4): the weight's (or LUT's) shape, or 1-D nonzero codes
    scale: np.ndarray  # the weight's float dtype
    zero_point: np.ndarray | None
    dtype: str  # "int8" | "uint8" | "int4" | "uint4"


@dataclass(frozen=True, eq=False)
class PaletteResult:
    """w ≈ lut[group, indices] (constexpr_lut_to_dense, iOS18 layout), times `per_channel_scale` if set.

    `lut` is [k_1 … k_R, 2**nbits, V] (k_i groups along axis i, V = vector length), a float array or an
    AffineResult of that shape (an int8/uint8 table quantized per tensor); `indices` has the weight's shape
    with `vector_axis` divided by V (vector_axis None when V == 1). As a SparseResult's `nonzero`,
    `indices` holds only the kept values' indices (1-D, row-major; constexpr_lut_to_sparse), the groups
    still laid out on the mask's shape, V == 1 and no per-channel scale."""

    lut: np.ndarray | AffineResult  # float: the weight's float dtype
    indices: np.ndarray  # uint8 < 2**nbits
    nbits: int
    vector_axis: int | None
    per_channel_scale: np.ndarray | None = None  # the weight's rank, broadcastable to it; decoded w = scale · lut[...]


@dataclass(frozen=True, eq=False)
class SparseResult:
    """w = zeros with `nonzero` scattered (row-major) at the True positions of `mask`; `nonzero` is the
    values themselves, or a PaletteResult / AffineResult encoding them (joint compression)."""

    mask: np.ndarray  # bool, the weight's shape
    nonzero: np.ndarray | PaletteResult | AffineResult  # an array: 1-D, the weight's dtype
