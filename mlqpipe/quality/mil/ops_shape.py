"""MIL ops that move, select or make values without arithmetic: reshape, transpose, concat, split, slicing,
squeeze / expand_dims, tile, pad, cast, select, fill, range_1d, shape, and the gathers. Shapes, axes and
indices are the op's own inputs (usually consts); an index outside its axis is refused (Core ML leaves it
undefined), negative ones count from the end as MIL documents.
"""

from __future__ import annotations

from math import prod

import numpy as np

from mlqpipe.quality.mil.base import Refuse, axes_of, axis_of, flag, ints, row, scalar, text

# MIL dtype names (cast's `dtype` input) -> numpy
DTYPE_NAMES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "bool": np.bool_,
}  # fmt: skip


def _reshape(x, shape):
    x = np.asarray(x)
    dims = ints(shape, "shape")
    if 0 in dims:
        raise Refuse("a 0 in shape (its meaning differs between opsets)")
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise Refuse(f"shape {dims}")
    known = prod(d for d in dims if d != -1)
    if (-1 in dims and (known == 0 or x.size % known)) or (-1 not in dims and known != x.size):
        raise Refuse(f"shape {dims} does not hold the {x.size} values of an input of shape {list(x.shape)}")
    return x.reshape(dims)


def _transpose(x, perm):
    x = np.asarray(x)
    p = axes_of(perm, x.ndim, "perm")
    if len(p) != x.ndim:
        raise Refuse(f"perm {list(p)} for an input of rank {x.ndim}")
    return np.transpose(x, p)


def _concat(values, axis, interleave=None):
    """Scalars count as one-element vectors: converters write a dynamic shape as a concat of rank-0 sizes
    (coremltools types such a concat as a vector of their number)."""
    arrays = [np.asarray(v) for v in values]
    if all(a.ndim == 0 for a in arrays):
        arrays = [a.reshape(1) for a in arrays]
    a = axis_of(axis, arrays[0].ndim)
    try:
        if flag(interleave):  # slices taken in turn from each input: stack after the axis, then merge
            stacked = np.stack(arrays, axis=a + 1)
            shape = list(arrays[0].shape)
            shape[a] *= len(arrays)
            return stacked.reshape(shape)
        return np.concatenate(arrays, axis=a)
    except ValueError as e:
        raise Refuse(f"inputs that do not fit together ({e})") from None


def _split(x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    a = axis_of(axis, x.ndim)
    n = x.shape[a]
    if split_sizes is not None:
        sizes = ints(split_sizes, "split_sizes")
    elif num_splits is not None:
        k = int(scalar(num_splits, "num_splits"))
        if k <= 0 or n % k:
            raise Refuse(f"num_splits {k} does not divide the axis of size {n}")
        sizes = [n // k] * k
    else:
        raise Refuse("neither num_splits nor split_sizes")
    if sum(sizes) != n or any(s < 0 for s in sizes):
        raise Refuse(f"split_sizes {sizes} do not add up to the axis of size {n}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=a))


def _per_axis(v, rank: int, default, what: str) -> list:
    if v is None:
        return [default] * rank
    out = ints(v, what) if not isinstance(default, bool) else [bool(b) for b in np.asarray(v).reshape(-1)]
    if len(out) != rank:
        raise Refuse(f"{what} has {len(out)} entries for an input of rank {rank}")
    return out


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    r = x.ndim
    b, e = _per_axis(begin, r, 0, "begin"), _per_axis(end, r, 0, "end")
    s = _per_axis(stride, r, 1, "stride")
    bm, em = _per_axis(begin_mask, r, False, "begin_mask"), _per_axis(end_mask, r, False, "end_mask")
    sm = _per_axis(squeeze_mask, r, False, "squeeze_mask")
    if 0 in s:
        raise Refuse("a stride of 0")
    index = []
    for i in range(r):
        if sm[i]:
            j = b[i] + x.shape[i] if b[i] < 0 else b[i]
            if not 0 <= j < x.shape[i]:
                raise Refuse(f"squeezed index {b[i]} outside axis {i} of size {x.shape[i]}")
            index.append(j)
        else:
            index.append(slice(None if bm[i] else b[i], None if em[i] else e[i], s[i]))
    return x[tuple(index)]


def _slice_by_size(x, begin, size):
    x = np.asarray(x)
    b, n = _per_axis(begin, x.ndim, 0, "begin"), _per_axis(size, x.ndim, 0, "size")
    index = []
    for i, (start, count) in enumerate(zip(b, n)):
        start = start + x.shape[i] if start < 0 else start
        stop = x.shape[i] if count == -1 else start + count
        if not 0 <= start <= stop <= x.shape[i]:
            raise Refuse(f"begin {b[i]} and size {n[i]} outside axis {i} of size {x.shape[i]}")
        index.append(slice(start, stop))
    return x[tuple(index)]


def _squeeze(x, axes=None):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    ax = axes_of(axes, x.ndim)
    if any(x.shape[a] != 1 for a in ax):
        raise Refuse(f"squeezing axes {list(ax)} of shape {list(x.shape)}")
    return np.squeeze(x, axis=ax)


def _expand_dims(x, axes):
    x = np.asarray(x)
    ax = ints(axes, "axes")
    out_rank = x.ndim + len(ax)
    return np.expand_dims(x, tuple(axis_of(a, out_rank) for a in ax))


def _tile(x, reps):
    x = np.asarray(x)
    r = ints(reps, "reps")
    if len(r) != x.ndim or any(v < 0 for v in r):
        raise Refuse(f"reps {r} for an input of rank {x.ndim}")
    return np.tile(x, r)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def _pad(x, pad, mode=None, constant_val=None):
    x = np.asarray(x)
    p = ints(pad, "pad")
    mode = "constant" if mode is None else text(mode, "mode")
    if len(p) % 2 or len(p) // 2 > x.ndim or any(v < 0 for v in p):
        raise Refuse(f"pad {p} for an input of rank {x.ndim}")
    if mode not in _PAD_MODES:
        raise Refuse(f"pad mode {mode!r}")
    k = len(p) // 2
    widths = [(0, 0)] * (x.ndim - k) + [(p[2 * i], p[2 * i + 1]) for i in range(k)]
    if mode == "constant":
        return np.pad(x, widths, constant_values=0.0 if constant_val is None else scalar(constant_val))
    if mode == "reflect" and any(max(w) >= x.shape[i] for i, w in enumerate(widths) if max(w)):
        raise Refuse("reflect padding as wide as the axis")
    return np.pad(x, widths, mode=_PAD_MODES[mode])


def _cast(x, dtype):
    name = text(dtype, "dtype")
    if name not in DTYPE_NAMES:
        raise Refuse(f"cast to {name!r}")
    x = np.asarray(x)
    target = np.dtype(DTYPE_NAMES[name])
    if target.kind in "iu" and x.dtype.kind == "f" and x.size and not np.all(np.isfinite(x)):
        raise Refuse("casting inf or NaN to an integer")
    return x.astype(target)  # float -> int truncates toward zero


def _range_1d(end, start, step):
    s, e, d = (np.asarray(v).reshape(()) for v in (start, end, step))
    if d == 0:
        raise Refuse("a step of 0")
    return np.arange(s, e, d, dtype=np.result_type(s, e, d))


def _indices(indices, size, what: str = "indices") -> np.ndarray:
    i = np.asarray(indices)
    if i.dtype.kind not in "iu":
        raise Refuse(f"{what} of dtype {i.dtype}")
    i = np.where(i < 0, i + size, i).astype(np.intp)
    if i.size and (i.min() < 0 or i.max() >= size):
        raise Refuse(f"{what} outside an axis of size {size}")
    return i


def _no_batch_dims(batch_dims):
    if batch_dims is not None and int(scalar(batch_dims, "batch_dims")) != 0:
        raise Refuse("batch_dims other than 0")


def _gather(x, indices, axis=None, batch_dims=None, validate_indices=None):
    _no_batch_dims(batch_dims)
    x = np.asarray(x)
    a = axis_of(0 if axis is None else axis, x.ndim)
    return np.take(x, _indices(indices, x.shape[a]), axis=a)


def _gather_along_axis(x, indices, axis=None, validate_indices=None):
    x = np.asarray(x)
    a = axis_of(0 if axis is None else axis, x.ndim)
    i = _indices(indices, x.shape[a])
    if i.ndim != x.ndim:
        raise Refuse(f"indices of rank {i.ndim} for an input of rank {x.ndim}")
    return np.take_along_axis(x, i, axis=a)


def _gather_nd(x, indices, batch_dims=None, validate_indices=None):
    _no_batch_dims(batch_dims)
    x = np.asarray(x)
    i = np.asarray(indices)
    k = i.shape[-1] if i.ndim else 0
    if i.ndim == 0 or k > x.ndim:
        raise Refuse(f"indices of shape {list(i.shape)} for an input of rank {x.ndim}")
    return x[tuple(_indices(i[..., j], x.shape[j]) for j in range(k))]


def _crop(x, crop_height, crop_width):
    """The last two axes cut by [begin, end] rows and columns."""
    x = np.asarray(x)
    (t, b), (l, r) = ints(crop_height, "crop_height"), ints(crop_width, "crop_width")
    h, w = x.shape[-2:]
    if min(t, b, l, r) < 0 or t + b >= h or l + r >= w:
        raise Refuse(f"crop {[t, b]}, {[l, r]} of a {h}x{w} input")
    return x[..., t:h - b, l:w - r]


def _rank4(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise Refuse(f"{what} of an input of rank {x.ndim}")
    return x


def _block(v, what: str) -> int:
    b = int(scalar(v, what))
    if b < 1:
        raise Refuse(f"{what} {b}")
    return b


def _pixel_shuffle(x, upscale_factor):
    """[n, C·f², H, W] -> [n, C, H·f, W·f]: channel c·f² + i·f + j goes to pixel (h·f + i, w·f + j)."""
    x, f = _rank4(x, "pixel_shuffle"), _block(upscale_factor, "upscale_factor")
    n, c, h, w = x.shape
    if c % (f * f):
        raise Refuse(f"{c} channels for an upscale factor of {f}")
    return x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (f * f), h * f, w * f)


def _pixel_unshuffle(x, downscale_factor):
    """The inverse of pixel_shuffle: [n, C, H·f, W·f] -> [n, C·f², H, W], pixel (h·f + i, w·f + j) of channel
    c going to channel c·f² + i·f + j (iOS16)."""
    x, f = _rank4(x, "pixel_unshuffle"), _block(downscale_factor, "downscale_factor")
    n, c, h, w = x.shape
    if h % f or w % f:
        raise Refuse(f"a {h}x{w} input for a downscale factor of {f}")
    return x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * f * f, h // f, w // f)


def _depth_to_space(x, block_size):
    """[n, C·b², H, W] -> [n, C, H·b, W·b], depth-column-row order: channel (i·b + j)·C + c goes to pixel
    (h·b + i, w·b + j)."""
    x, b = _rank4(x, "depth_to_space"), _block(block_size, "block_size")
    n, c, h, w = x.shape
    if c % (b * b):
        raise Refuse(f"{c} channels for a block size of {b}")
    return x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(x, block_size):
    """The inverse of depth_to_space."""
    x, b = _rank4(x, "space_to_depth"), _block(block_size, "block_size")
    n, c, h, w = x.shape
    if h % b or w % b:
        raise Refuse(f"a {h}x{w} input for a block size of {b}")
    return x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


def _one_hot(indices, one_hot_vector_size, axis=None, on_value=None, off_value=None):
    i = np.asarray(indices)
    size = int(scalar(one_hot_vector_size, "one_hot_vector_size"))
    a = axis_of(-1 if axis is None else axis, i.ndim + 1)
    hot = np.expand_dims(i, a) == np.arange(size).reshape([-1 if k == a else 1 for k in range(i.ndim + 1)])
    on = np.asarray(1.0 if on_value is None else on_value).reshape(())
    off = np.asarray(0.0 if off_value is None else off_value).reshape(())
    return np.where(hot, on, off)


def _band_part(x, lower=None, upper=None):
    """Keeps the band of the last two axes: `lower` diagonals below and `upper` above (negative: all)."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise Refuse(f"band_part of an input of rank {x.ndim}")
    lo, up = (int(scalar(v)) if v is not None else -1 for v in (lower, upper))
    r = np.arange(x.shape[-2])[:, None]
    c = np.arange(x.shape[-1])[None, :]
    keep = ((lo < 0) | (r - c <= lo)) & ((up < 0) | (c - r <= up))
    return np.where(keep, x, np.zeros((), x.dtype))


def _order(x, axis, ascending, what: str):
    """Indices sorting x along axis; ties (whose order Core ML does not document) are refused."""
    x = np.asarray(x)
    a = axis_of(-1 if axis is None else axis, x.ndim)
    up = flag(ascending)
    order = np.argsort(x if up else -x, axis=a, kind="stable")
    ranked = np.take_along_axis(x, order, axis=a)
    if x.shape[a] > 1 and np.any(np.diff(ranked, axis=a) == 0):
        raise Refuse(f"{what} of equal values (their order is not documented)")
    return order, ranked, a


def _topk(x, k=None, axis=None, ascending=None, sort=None, return_indices=None, output_indices_dtype=None):
    if sort is not None and not flag(sort):
        raise Refuse("topk with sort=False")
    if return_indices is not None and not flag(return_indices):
        raise Refuse("topk with return_indices=False")
    order, ranked, a = _order(x, axis, ascending, "topk")
    n = 1 if k is None else int(scalar(k, "k"))
    if not 0 < n <= np.shape(x)[a]:
        raise Refuse(f"k {n} for an axis of size {np.shape(x)[a]}")
    take = [slice(None)] * np.ndim(x)
    take[a] = slice(0, n)
    return ranked[tuple(take)], order[tuple(take)].astype(np.int32)


def _argsort(x, axis=None, ascending=None):
    return _order(x, axis, ascending, "argsort")[0].astype(np.int32)


def _stack(values, axis):
    arrays = [np.asarray(v) for v in values]
    return np.stack(arrays, axis=axis_of(axis, arrays[0].ndim + 1))


def _flatten2d(x, axis=None):
    x = np.asarray(x)
    a = 1 if axis is None else int(scalar(axis, "axis"))
    a = a + x.ndim if a < 0 else a
    if not 0 <= a <= x.ndim:
        raise Refuse(f"axis {a} for an input of rank {x.ndim}")
    return x.reshape(prod(x.shape[:a]), prod(x.shape[a:]))


def _cumsum(x, axis=None, exclusive=None, reverse=None):
    x = np.asarray(x)
    a = axis_of(0 if axis is None else axis, x.ndim)
    v = np.flip(x, a) if flag(reverse) else x
    out = np.cumsum(v, axis=a)
    if flag(exclusive):
        out = out - v
    return np.flip(out, a) if flag(reverse) else out


OPS = {
    "identity": row(lambda x: np.asarray(x)),
    "reshape": row(_reshape), "transpose": row(_transpose), "concat": row(_concat, "values"),
    "stack": row(_stack, "values"), "split": row(_split), "slice_by_index": row(_slice_by_index),
    "slice_by_size": row(_slice_by_size), "squeeze": row(_squeeze), "expand_dims": row(_expand_dims),
    "flatten2d": row(_flatten2d), "reverse": row(lambda x, axes=None: np.flip(x, None if axes is None else axes_of(axes, np.ndim(x)))),
    "tile": row(_tile), "pad": row(_pad), "cast": row(_cast),
    "select": row(lambda cond, a, b: np.where(np.asarray(cond).astype(bool), a, b)),
    "fill": row(lambda shape, value=None: np.full(ints(shape, "shape"), 0.0 if value is None else np.asarray(value).reshape(()))),
    "fill_like": row(lambda ref_tensor, value=None: np.full(np.shape(ref_tensor), 0.0 if value is None else np.asarray(value).reshape(()))),
    "range_1d": row(_range_1d), "shape": row(lambda x: np.array(np.shape(x), dtype=np.int32)),
    "gather": row(_gather), "gather_along_axis": row(_gather_along_axis), "gather_nd": row(_gather_nd),
    "cumsum": row(_cumsum), "crop": row(_crop), "pixel_shuffle": row(_pixel_shuffle), "pixel_unshuffle": row(_pixel_unshuffle),
    "depth_to_space": row(_depth_to_space), "space_to_depth": row(_space_to_depth), "one_hot": row(_one_hot),
    "band_part": row(_band_part), "topk": row(_topk), "argsort": row(_argsort),
}  # fmt: skip
