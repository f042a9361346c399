"""Palettization (lookup tables) of ML-program weights: coremltools 9.0's `palettize_weights`
(MLPROGRAM.md §7) in the iOS18 `constexpr_lut_to_dense` layout.

Grouping, as coremltools: the channel axis is swapped to axis 0 (also per tensor: it changes the element
order a custom function or k-means sees), split into groups of `group_size` channels, and each group is
flattened row-major (vector palettization: points of `cluster_dim` consecutive channels) and palettized on
its own. With `enable_per_channel_scale` the weight is first divided by max|w| taken along the channel
axis (zeros replaced by 1); that scale is returned as `per_channel_scale`.

Modes:
- uniform, unique, custom: exactly coremltools' arithmetic (uniform in the weight's dtype, LUT built in
  float64; unique: nbits = the smallest of 1, 2, 3, 4, 6, 8 holding every group's distinct values, LUT
  zero-padded).
- kmeans, scalar: fp16 groups of >= 10,000 elements reproduce coremltools' vendored exact kmeans1d bit
  for bit (quant/kmeans.py: the same weighted DP costs and running-mean centroids in float64; ties go to
  the leftmost split, as its SMAWK does; all groups of a weight solved together). Every other group
  uses mlqpipe's 1-D k-means (quant/lut.py: exact up to binning): where coremltools runs scikit-learn's
  KMeans, our MSE is lower (a listed difference).
  LUT entries beyond the clusters found are 0 (coremltools' kmeans1d convention; scikit-learn would
  repeat centres there: same decoded weights).
- kmeans, vector (cluster_dim > 1): Lloyd's algorithm from greedy k-means++ seeds drawn with a fixed seed
  (deterministic; quant/kmeans.py), converged on a random sample, then refined on all points.

Refused with ValueError (the caller names the weight): NaN or ±Inf (coremltools' uniform mode silently
writes NaN into the LUT; its k-means fails the whole model), bad settings, a bad custom function result.
`NotApplicable` (a ValueError) marks settings this weight's shape cannot take (coremltools skips it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlqpipe.quant.affine import NotApplicable
from mlqpipe.quant.kmeans import kmeans1d_fp16, vector_kmeans
from mlqpipe.quant.results import PaletteResult

NBITS = (1, 2, 3, 4, 6, 8)
MODES = ("kmeans", "uniform", "unique", "custom")
KMEANS1D_MIN_SIZE = 10_000  # coremltools uses its exact 1-D k-means for fp16 groups of at least this many values


@dataclass(frozen=True)
class PaletteSettings:
    mode: str = "kmeans"
    nbits: int | None = None  # required for kmeans/uniform; unique: None = inferred (a given value is a minimum)
    granularity: str = "per_tensor"  # or "per_grouped_channel"
    group_size: int = 32  # per_grouped_channel: channels per LUT (0 = all)
    channel_axis: int = 0  # the axis coremltools groups on (the output axis, or the config's channel_axis)
    cluster_dim: int = 1
    enable_per_channel_scale: bool = False
    lut_function: Callable | None = None  # custom: group values -> (lut, indices)


def palettize(values: np.ndarray, s: PaletteSettings) -> PaletteResult:
    """Palettize one weight (see the module doc); raises ValueError / NotApplicable."""
    w = np.asarray(values)
    _check(w, s)
    axis = s.channel_axis % w.ndim
    scale = None
    if s.enable_per_channel_scale:
        scale = np.max(np.abs(w), axis=axis, keepdims=True)
        scale[scale == 0] = 1
        w = w / scale
    channels = w.shape[axis]
    size = channels if s.granularity == "per_tensor" or s.group_size == 0 else int(s.group_size)
    if size <= 0 or channels % size:
        raise NotApplicable(f"the {channels} channels on axis {axis} are not a multiple of group_size {size}")
    v = int(s.cluster_dim)
    if size % v:
        raise NotApplicable(f"the group of {size} channels on axis {axis} is not a multiple of cluster_dim {v}")
    swapped = np.swapaxes(w, 0, axis)
    groups = np.split(swapped, channels // size, axis=0)
    nbits = _unique_nbits(groups, v, s.nbits) if s.mode == "unique" else s.nbits
    if s.mode == "kmeans" and v == 1 and w.dtype == np.float16 and groups[0].size >= KMEANS1D_MIN_SIZE:
        luts, indices = kmeans1d_fp16(np.stack([g.ravel() for g in groups]), nbits)  # all groups in one batch
        luts = luts[..., None]
    else:
        luts, indices = zip(*(_group(g, s, nbits, v) for g in groups))
    if s.mode == "custom":
        nbits = int(math.ceil(math.log2(luts[0].shape[0])))
    lut = np.stack(luts).reshape((len(groups),) + (1,) * (w.ndim - 1) + (1 << nbits, v))
    idx_shape = list(swapped.shape)
    idx_shape[0] //= v
    idx = np.stack(indices).reshape(idx_shape)
    if axis:
        lut, idx = np.swapaxes(lut, 0, axis), np.swapaxes(idx, 0, axis)
    return PaletteResult(
        np.ascontiguousarray(lut), np.ascontiguousarray(idx), nbits, None if v == 1 else axis, scale
    )


def depalettize(r: PaletteResult) -> np.ndarray:
    """Dense weights back (what constexpr_lut_to_dense, then the per-channel scale, computes)."""
    lut, idx, v = r.lut, r.indices, r.lut.shape[-1]
    reps = [d // k for d, k in zip(idx.shape, lut.shape[:-2])]
    table = lut.reshape(-1, lut.shape[-2], v)
    group = np.arange(table.shape[0]).reshape(lut.shape[:-2])
    group = np.kron(group, np.ones(reps, dtype=group.dtype))  # each index's table
    out = table[group, idx.astype(np.intp)]  # idx.shape + (v,)
    if v > 1:
        out = np.moveaxis(out, -1, r.vector_axis + 1)
        shape = list(idx.shape)
        shape[r.vector_axis] *= v
        out = out.reshape(shape)
    else:
        out = out[..., 0]
    return out if r.per_channel_scale is None else out * r.per_channel_scale


# one group -------------------------------------------------------------------------------------------


def _group(g: np.ndarray, s: PaletteSettings, nbits: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """(lut [2**nbits, v] in g's dtype, uint8 indices in the group's row-major point order)."""
    if s.mode == "uniform":
        return _uniform(g, nbits)
    if s.mode == "unique":
        points = _points(g, v)
        distinct, inverse = np.unique(points, axis=0, return_inverse=True)
        lut = np.zeros((1 << nbits, v))
        lut[: len(distinct)] = distinct
        return lut.astype(g.dtype), inverse.ravel().astype(np.uint8)
    if s.mode == "custom":
        return _custom(g, s.lut_function, v)
    if v > 1:
        return vector_kmeans(_points(g, v), nbits)
    from mlqpipe.quant.lut import kmeans_lut  # builds its bin tables on import: only k-means needs them

    table, codes = kmeans_lut(g.ravel(), nbits)
    return table.astype(g.dtype).reshape(-1, 1), codes


def _points(g: np.ndarray, v: int) -> np.ndarray:
    """Points of v consecutive channels (axis 0), in row-major order of [channels / v, rest…]."""
    if v == 1:
        return g.reshape(-1, 1)
    moved = np.swapaxes(g, -1, 0)
    moved = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // v, v))
    return np.swapaxes(moved, -2, 0).reshape(-1, v)


def _uniform(g: np.ndarray, nbits: int):
    flat = g.ravel()
    lo, hi = np.amin(flat), np.amax(flat)
    top = (1 << nbits) - 1
    step = (hi - lo) / top  # a scalar of the weight's dtype
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.round(((flat - lo) / (hi - lo)) * top)
    q[np.isnan(q)] = 0  # a constant group: 0/0, which coremltools' cast turns into 0
    lut = np.arange(1 << nbits, dtype=np.int64) * step + lo  # float64, as coremltools
    return lut.astype(g.dtype).reshape(-1, 1), q.astype(np.uint8)


def _custom(g: np.ndarray, fn: Callable, v: int):
    try:
        result = fn(g.copy())
    except Exception as e:  # user code: say whose call failed and keep the cause
        raise ValueError(f"lut_function raised {type(e).__name__}: {e}") from e
    try:
        lut, idx = result
    except (TypeError, ValueError):
        raise ValueError("lut_function must return (lut, indices)") from None
    lut = np.asarray(lut)
    idx = np.asarray(idx)
    if lut.ndim == 1:
        lut = lut.reshape(-1, 1)
    entries = lut.shape[0]
    if lut.ndim != 2 or lut.shape[1] != v or entries not in [1 << n for n in NBITS]:
        raise ValueError(f"lut_function returned a LUT of shape {lut.shape}; it needs 2, 4, 8, 16, 64 or 256 entries of {v} value(s)")
    if not np.all(np.isfinite(lut)):
        raise ValueError("lut_function returned a LUT with NaN or Inf")
    if idx.size != g.size // v or idx.dtype.kind not in "iub":
        raise ValueError(f"lut_function returned {idx.size} {idx.dtype} indices; it needs {g.size // v} integers")
    if idx.size and (idx.min() < 0 or idx.max() >= entries):
        raise ValueError(f"lut_function returned indices outside 0..{entries - 1}")
    return lut.astype(g.dtype), idx.ravel().astype(np.uint8)


def _unique_nbits(groups, v: int, given: int | None) -> int:
    """coremltools' count (vectors for it are taken along the group's last axis: we count the same way)."""
    nbits = given
    for g in groups:
        pts = g.ravel() if v == 1 else np.swapaxes(g, -1, 0).reshape(-1, v)
        count = len(np.unique(pts)) if v == 1 else len(np.unique(pts, axis=0))
        need = next((n for n in NBITS if count <= 1 << n), None)
        if need is None:
            raise NotApplicable(f"{count} distinct values do not fit an 8-bit LUT")
        nbits = need if nbits is None else max(nbits, need)
    return nbits


# settings ------------------------------------------------------------------------------------------


def _check(w: np.ndarray, s: PaletteSettings) -> None:
    if w.dtype not in (np.float16, np.float32):
        raise ValueError(f"palettization needs float16 or float32 weights, not {w.dtype}")
    if w.ndim < 1 or w.size == 0:
        raise ValueError("palettization needs a non-empty weight")
    if s.mode not in MODES:
        raise ValueError(f"mode {s.mode!r} is not one of {', '.join(MODES)}")
    if s.granularity not in ("per_tensor", "per_grouped_channel"):
        raise ValueError(f"granularity {s.granularity!r} is not per_tensor or per_grouped_channel")
    if s.mode in ("kmeans", "uniform") and s.nbits not in NBITS:
        raise ValueError(f"{s.mode} needs nbits in {NBITS}, not {s.nbits}")
    if s.mode == "unique" and s.nbits is not None and s.nbits not in NBITS:
        raise ValueError(f"nbits {s.nbits} is not in {NBITS}")
    if s.mode == "custom" and not callable(s.lut_function):
        raise ValueError("custom mode needs a callable lut_function(values) -> (lut, indices)")
    if not -w.ndim <= s.channel_axis < w.ndim:
        raise ValueError(f"channel_axis {s.channel_axis} is out of range for a {w.ndim}-D weight")
    if int(s.cluster_dim) < 1:
        raise ValueError(f"cluster_dim {s.cluster_dim} must be at least 1")
    if s.mode == "uniform" and s.cluster_dim > 1:
        raise ValueError("uniform palettization has no vector form (cluster_dim > 1)")
    if not (np.isfinite(np.min(w)) and np.isfinite(np.max(w))):  # min/max propagate NaN; no temporary
        raise ValueError("the weight contains NaN or Inf; it cannot be palettized")
