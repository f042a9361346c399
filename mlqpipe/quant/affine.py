"""Linear (affine) quantization of ML-program weights, bit-exact with coremltools 9.0's
`linear_quantize_weights` (MLPROGRAM.md §7), in the iOS18 blockwise form.

Every block (per tensor: one; per channel: one per output channel; per block: one per output channel and
`block_size` input elements) gets a range: `linear` widens [min, max] to include 0, `linear_symmetric`
uses ±max|w| and drops the lowest signed code (int8 [−127, 127]). The arithmetic runs in the weight's own
dtype, as coremltools' does, so fp16 weights get fp16 scales and the same rounding (half to even).

Degenerate blocks, as coremltools writes them: an all-zero block has scale 0, data 0 and zero point 0
(coremltools computes 0/0 and casts the NaN, which gives 0 on the machines it runs on; we write the 0
explicitly); symmetric unsigned keeps its zero point 127 (or 7). A constant block c ≠ 0 is exact (linear
mode: the range [0, c] puts c on the top code). An fp16 block whose scale underflows to 0 while not all
zero decodes to 0, as coremltools'.

One difference, where coremltools is wrong: in `linear` mode on fp16 weights it computes the zero point
`(qmin·hi − qmax·lo)/(hi − lo)` in fp16, which overflows when |w| exceeds about 65504/qmax and then
clips the zero point to the end of the range (every value shifted). When that product is not finite in
fp16 we compute the zero point in float32. Weights whose range itself overflows fp16, and NaN/Inf, are
refused.

Errors: bad input raises ValueError with a message that does not name the weight (the caller does);
`NotApplicable` (a ValueError) marks settings that do not fit this weight's shape, which coremltools
skips with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlqpipe.quant.results import AffineResult


class NotApplicable(ValueError):
    """The settings do not fit this weight (coremltools skips such a weight with a warning)."""


# dtype -> (bits, signed)
DTYPES = {"int8": (8, True), "uint8": (8, False), "int4": (4, True), "uint4": (4, False)}
MODES = ("linear", "linear_symmetric")
GRANULARITIES = ("per_tensor", "per_channel", "per_block")


@dataclass(frozen=True)
class AffineSettings:
    mode: str = "linear_symmetric"
    dtype: str = "int8"
    granularity: str = "per_channel"
    block_size: int | tuple[int, ...] = 32  # per_block: an int (on input_axis; 0 = whole axis) or one per axis
    axis: int = 0  # the output channel axis
    input_axis: int | None = None  # per_block with an int block_size; None: 1 if axis is 0, else 0


def quant_range(dtype: str, mode: str) -> tuple[int, int]:
    """The code range; symmetric mode drops the lowest signed / highest unsigned code."""
    bits, signed = DTYPES[dtype]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if mode == "linear_symmetric":
        lo, hi = (lo + 1, hi) if signed else (lo, hi - 1)
    return lo, hi


def block_sizes(shape: tuple[int, ...], s: AffineSettings) -> list[int]:
    """coremltools' per-axis block sizes: 0 = the whole axis shares one scale."""
    rank = len(shape)
    if s.granularity == "per_block" and not isinstance(s.block_size, (int, np.integer)):
        sizes = [int(b) for b in s.block_size]
        if len(sizes) != rank:
            raise ValueError(f"block_size {tuple(sizes)} needs one entry per axis of the {rank}-D weight {shape}")
        return sizes
    axis = _axis(s.axis, rank)
    sizes = [0] * rank
    if s.granularity == "per_channel":
        sizes[axis] = 1
    elif s.granularity == "per_block":
        into = _axis((1 if axis == 0 else 0) if s.input_axis is None else s.input_axis, rank)
        sizes[into] = int(s.block_size)
        sizes[axis] = 1
    return sizes


def linear_quantize(values: np.ndarray, s: AffineSettings) -> AffineResult:
    """Quantize one weight; raises ValueError on NaN/Inf, NotApplicable when a block size does not divide."""
    _check(s)
    w = np.asarray(values)
    if w.dtype not in (np.float16, np.float32):
        raise ValueError(f"linear quantization needs float16 or float32 weights, not {w.dtype}")
    sizes = block_sizes(w.shape, s)
    blocked, reduce_axes, scale_shape = _blocked_view(w, sizes)
    if s.mode == "linear_symmetric":  # max |w| = max(|min|, |max|) exactly: one reduction instead of two
        hi = _block_reduce(np.maximum, np.abs(blocked), reduce_axes, sizes)
        lo = -hi
    else:
        lo = _block_reduce(np.minimum, blocked, reduce_axes, sizes)
        hi = _block_reduce(np.maximum, blocked, reduce_axes, sizes)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):  # min/max propagate NaN and see Inf
        raise ValueError("the weight contains NaN or Inf; it cannot be quantized")
    qmin, qmax = quant_range(s.dtype, s.mode)
    if s.mode != "linear_symmetric":
        lo = np.minimum(0.0, lo)
        hi = np.maximum(0.0, hi)
    span = hi - lo
    if not np.all(np.isfinite(span)):
        raise ValueError(f"the weight's value range exceeds {w.dtype}; quantize it from float32 values")
    scale = span / (qmax - qmin)  # in the weight's dtype, as coremltools
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        zero_point = _zero_point(lo, hi, span, qmin, qmax, s)
    np_int = np.int8 if DTYPES[s.dtype][1] else np.uint8
    data = np.empty(blocked.shape, np_int)
    _quantize_into(data, blocked, scale, zero_point, qmin, qmax)
    data = data.reshape(w.shape)
    if zero_point is not None:
        zero_point = np.nan_to_num(zero_point, nan=0.0).reshape(scale_shape).astype(np_int)
    return AffineResult(data, scale.reshape(scale_shape).astype(w.dtype), zero_point, s.dtype)


_ROWS_CHUNK = 1 << 17  # elements per step of _quantize_into: its float buffer stays in cache and is reused


def _quantize_into(data, blocked, scale, zero_point, qmin, qmax) -> None:
    """data = clip(rint(blocked / scale) + zero_point, qmin, qmax), cast to data's integer type, a few rows of
    the blocked view at a time: one small float buffer instead of a weight-sized temporary (whose fresh pages
    cost more than the arithmetic). 0/0 of an all-zero block gives 0, as coremltools' cast does."""
    if blocked.ndim == 0:  # a scalar weight: one row of one element
        data, blocked, scale = data.reshape(1), blocked.reshape(1), scale.reshape(1)
        zero_point = None if zero_point is None else zero_point.reshape(1)
    rows = blocked.shape[0]
    step = max(1, _ROWS_CHUNK // max(1, blocked.size // max(rows, 1)))
    exact = bool(np.all(scale))  # no 0/0: whole numbers in range, clipped straight into the codes
    buf = np.empty((min(step, rows),) + blocked.shape[1:], np.result_type(blocked, scale))
    for start in range(0, rows, step):
        part, out = blocked[start:start + step], data[start:start + step]
        q = buf[:len(part)]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            np.divide(part, _rows(scale, start, step), out=q)
            np.rint(q, out=q)  # round half to even, as np.round
            if zero_point is not None:
                np.add(q, _rows(zero_point, start, step), out=q)
        if exact:
            np.clip(q, qmin, qmax, out=out, casting="unsafe")
        else:
            np.clip(q, qmin, qmax, out=q)
            q[np.isnan(q)] = 0
            out[...] = q


def _rows(a: np.ndarray, start: int, step: int) -> np.ndarray:
    """Rows start..start+step of a keepdims array that is broadcast against the blocked view."""
    return a[start:start + step] if a.ndim and a.shape[0] > 1 else a


def dequantize(r: AffineResult) -> np.ndarray:
    """scale · (data − zero_point), blockwise, in the scale's dtype (what constexpr_blockwise_shift_scale does)."""
    reps = [d // b for d, b in zip(r.data.shape, r.scale.shape)]
    q = r.data.astype(np.float32)
    if r.zero_point is not None:
        q -= np.kron(r.zero_point.astype(np.float32), np.ones(reps, np.float32))
    return (q * np.kron(r.scale.astype(np.float32), np.ones(reps, np.float32))).astype(r.scale.dtype)


def _zero_point(lo, hi, span, qmin, qmax, s: AffineSettings):
    if s.mode == "linear_symmetric":
        return None if DTYPES[s.dtype][1] else np.full(lo.shape, float(qmax // 2))
    zp = (qmin * hi - qmax * lo) / span
    if lo.dtype == np.float16 and not np.all(np.isfinite(zp[span != 0])):
        # fp16 overflow of qmin·hi or qmax·lo (|w| beyond ~65504/qmax): coremltools clips this to one end
        # of the range, shifting every value; float32 gives the zero point the range really has
        lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
        zp = ((qmin * hi32 - qmax * lo32) / (hi32 - lo32)).astype(np.float16)
    return np.clip(np.round(zp), qmin, qmax)


def _block_reduce(ufunc, blocked: np.ndarray, reduce_axes: tuple, sizes: list[int]) -> np.ndarray:
    """`ufunc` over each block, keepdims. Blocks that are short contiguous runs (per_block on the last axis,
    one block per row elsewhere) go through reduceat, which numpy runs about twice as fast as a reduction
    over a short trailing axis; min and max are exact in any order."""
    run = sizes[-1] if sizes else 0
    if 1 < run <= 256 and all(b == 1 for b in sizes[:-1]) and blocked.flags.c_contiguous:
        flat = blocked.reshape(-1)
        out = ufunc.reduceat(flat, np.arange(0, flat.size, run))
        return out.reshape([1 if i in reduce_axes else n for i, n in enumerate(blocked.shape)])
    return ufunc.reduce(blocked, axis=reduce_axes, keepdims=True)


def _blocked_view(w: np.ndarray, sizes: list[int]):
    """Split each blocked axis d into (d / b, b); return the view, the axes to reduce, the scale shape."""
    new_shape, keep, scale_shape = [], [], []
    for axis, (dim, b) in enumerate(zip(w.shape, sizes)):
        if b < 0:
            raise ValueError(f"block size {b} on axis {axis} is negative")
        if b > 0:
            if dim % b:
                raise NotApplicable(f"axis {axis} has {dim} elements, not a multiple of the block size {b}")
            keep.append(len(new_shape))
            new_shape += [dim // b, b]
            scale_shape.append(dim // b)
        else:
            new_shape.append(dim)
            scale_shape.append(1)
    reduce_axes = tuple(i for i in range(len(new_shape)) if i not in keep)
    return w.reshape(new_shape), reduce_axes, scale_shape


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for a {rank}-D weight")
    return axis % rank


def _check(s: AffineSettings) -> None:
    if s.mode not in MODES:
        raise ValueError(f"mode {s.mode!r} is not one of {', '.join(MODES)}")
    if s.dtype not in DTYPES:
        raise ValueError(f"dtype {s.dtype!r} is not one of {', '.join(DTYPES)}")
    if s.granularity not in GRANULARITIES:
        raise ValueError(f"granularity {s.granularity!r} is not one of {', '.join(GRANULARITIES)}")
