"""One kernel per quantization mode: float values in, a neutral result (quant/results.py) out.

Every kernel has the same signature, so the mode registry (engine/modes.py) can name it in its table. The
arithmetic lives in linear.py and lut.py; here it is only shaped for a weight blob."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.quant.linear import EXACT_MIN_SCALE, linear_lut as _linear_lut, quantize_linear
from mlqpipe.quant.results import Float16Result, Float32Result, LinearResult, LutResult


@dataclass(frozen=True)
class KernelSettings:
    nbits: int = 8
    axis: int | None = None  # per-channel axis of linear modes (None: per tensor)
    min_scale: float = EXACT_MIN_SCALE
    lut_function: Callable | None = None
    where: str = ""  # names the weight in errors


def float32(values: np.ndarray, s: KernelSettings) -> Float32Result:
    return Float32Result(np.asarray(values, dtype=np.float32).ravel())


FLOAT16_OVERFLOW = 65520.0  # float32 values at or beyond this round to infinity in float16


def float16(values: np.ndarray, s: KernelSettings) -> Float16Result:
    values = np.asarray(values, dtype=np.float32)
    worst = float(np.max(np.abs(values))) if values.size else 0.0  # a float32 reduction: cheap
    if worst >= FLOAT16_OVERFLOW:
        raise ModelError(
            f"{s.where}: values up to {worst:g} do not fit float16 (max 65504); keep this weight in float32 "
            "(exclude it from the fp16 stage) or use an n-bit mode"
        )
    return Float16Result(values.astype(np.float16).ravel())


def linear(values: np.ndarray, s: KernelSettings, symmetric: bool = False) -> LinearResult:
    """Per-channel affine codes; raises ValueError on NaN or Inf (the caller names the weight)."""
    rows, restore = channel_rows(values, s.axis)
    codes, scale, bias = quantize_linear(rows, s.nbits, symmetric, s.min_scale)
    return LinearResult(restore(codes), scale, bias, s.nbits, s.axis)


def linear_symmetric(values: np.ndarray, s: KernelSettings) -> LinearResult:
    return linear(values, s, symmetric=True)


def linear_lut(values: np.ndarray, s: KernelSettings) -> LutResult:
    table, codes = _linear_lut(values, s.nbits, s.min_scale)
    return LutResult(table, codes, s.nbits)


def kmeans_lut(values: np.ndarray, s: KernelSettings) -> LutResult:
    from mlqpipe.quant.lut import kmeans_lut as _kmeans_lut  # builds a 65,536-entry table on import: plans never need it

    table, codes = _kmeans_lut(values, s.nbits)
    return LutResult(table, codes, s.nbits)


def custom_lut(values: np.ndarray, s: KernelSettings) -> LutResult:
    """The user's `lut_function(nbits, weights) -> (lut, quantized_indices)`, checked."""
    from mlqpipe.quant.lut import check_custom_lut

    if s.lut_function is None or not callable(s.lut_function):
        raise ModelError("custom_lut needs a callable lut_function(nbits, weights) -> (lut, quantized_indices)")
    try:
        result = s.lut_function(s.nbits, values.copy())
    except Exception as e:  # user code: say whose call failed and keep the cause
        raise ModelError(f"{s.where}: custom LUT function raised {type(e).__name__}: {e}") from e
    try:
        table, codes = check_custom_lut(result, s.nbits, values.size, s.where)
    except ValueError as e:
        raise ModelError(str(e)) from None
    return LutResult(table, codes, s.nbits)


def channel_rows(w: np.ndarray, axis: int | None):
    """View weights as [channels, values] rows for per-channel scales, plus the inverse for the codes."""
    if axis is None or w.ndim < 2:
        return w.reshape(1, -1), lambda q: q.ravel()
    moved = np.moveaxis(w, axis, 0)
    shape = moved.shape
    return moved.reshape(shape[0], -1), lambda q: np.moveaxis(q.reshape(shape), 0, axis).ravel()
