"""Linear (affine) quantization, per output channel, and the linear lookup table.

The arithmetic mirrors coremltools 9.0 step by step in float32 (with protobuf >= 7 it reads weights as
float32), so the same settings give the same bytes. `min_scale` is coremltools' fixed 1e-6 threshold below
which a channel's scale counts as zero (the channel collapses to one value); mlqpipe's own stages pass the
smallest normal float32 instead, so tiny-range channels keep their precision.
"""

from __future__ import annotations

import numpy as np

COREMLTOOLS_MIN_SCALE = 1e-6
EXACT_MIN_SCALE = float(np.finfo(np.float32).tiny)


def quantize_linear(
    rows: np.ndarray, nbits: int, symmetric: bool = False, min_scale: float = COREMLTOOLS_MIN_SCALE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a float32 [channels, values] array row by row.

    Returns (q uint8 [C, L], scale float32 [C], bias float32 [C]) with w ≈ q * scale + bias.
    """
    w = np.asarray(rows, dtype=np.float32)
    lo = w.min(axis=1)
    hi = w.max(axis=1)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):  # min/max propagate NaN and see Inf
        raise ValueError("weights contain NaN or Inf")
    if symmetric:
        if nbits < 2:
            raise ValueError("linear_symmetric needs nbits >= 2 (1-bit symmetric has no zero level)")
        r = np.maximum(np.abs(lo), np.abs(hi))
        scale = r / ((1 << nbits) / 2.0 - 1)
        bias = -(1 << nbits) / 2.0 * scale
        num = w - bias[:, None]
        denom = np.broadcast_to(scale[:, None], num.shape)
        q = np.divide(num, denom, out=np.zeros_like(num), where=np.abs(denom) > min_scale)
    else:
        scale = (hi - lo) / np.float32((1 << nbits) - 1)
        inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=np.abs(scale) > min_scale)
        bias = lo
        q = np.subtract(w, lo[:, None])  # one temporary, then in place: large layers stay cheap
        np.multiply(q, inv[:, None], out=q)
    # no clipping needed: (w - lo) / scale spans [0, 2**nbits - 1] up to float32 rounding, which rint absorbs
    q = np.rint(q, out=q)
    return q.astype(np.uint8), scale.astype(np.float32), bias.astype(np.float32)


def dequantize_linear(q: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[C, L] uint8 codes back to float32 with per-row (or single) scale and bias."""
    scale = np.asarray(scale, dtype=np.float32).reshape(-1, 1)
    bias = np.asarray(bias, dtype=np.float32).reshape(-1, 1) if np.size(bias) else np.zeros_like(scale)
    return (q.astype(np.float32) * scale + bias).astype(np.float32)


def linear_lut(values: np.ndarray, nbits: int, min_scale: float = COREMLTOOLS_MIN_SCALE):
    """Per-tensor linear quantization expressed as a 2**nbits lookup table (coremltools' linear_lut).

    coremltools builds the table in float64 (int64 indices times a float32 scalar), then stores float32.
    """
    q, scale, bias = quantize_linear(np.asarray(values).reshape(1, -1), nbits, min_scale=min_scale)
    table = np.arange(1 << nbits, dtype=np.int64) * scale[0] + bias[0]
    return table.astype(np.float32), q.ravel()
