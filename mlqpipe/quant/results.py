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
