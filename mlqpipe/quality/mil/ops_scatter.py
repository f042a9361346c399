"""MIL's scatters (iOS15 / iOS17 definitions): scatter (whole slices along an axis), scatter_along_axis
(elementwise, torch's scatter) and scatter_nd (index tuples), each with a mode combining the data with
the update: update, add, sub, mul, div, max, min.

Repeated indices accumulate through numpy's unbuffered `ufunc.at` (add sums all their updates, as torch's
scatter_add does; sub, mul, div, max and min likewise fold every update in); with mode `update` the winner
of a repeated index is not defined, so that is refused. Negative indices are refused too: iOS15 counts
them from the end, iOS17 calls them out of bounds, and the op does not say which opset it is. Indices
outside their axis are refused (the result is undefined).
"""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.mil.base import Refuse, axis_of, row, text

MODES = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "max": np.maximum, "min": np.minimum}


def _indices(indices, bounds, what: str = "indices") -> np.ndarray:
    """Integer indices checked against `bounds` (the sizes their last axis / the whole array indexes)."""
    i = np.asarray(indices)
    if i.dtype.kind not in "iu":
        raise Refuse(f"{what} of dtype {i.dtype}")
    if i.size and i.min() < 0:
        raise Refuse(f"negative {what} (their meaning differs between opsets)")
    if i.size and np.any(i >= np.asarray(bounds)):
        raise Refuse(f"{what} outside axes of sizes {np.asarray(bounds).reshape(-1).tolist()}")
    return i.astype(np.int64)


def _apply(data, where: tuple, updates, mode, shape) -> np.ndarray:
    """data with `updates` combined in at the index tuple `where` (each array of the tuple indexes one axis)."""
    data = np.asarray(data)
    m = "add" if mode is None else text(mode, "mode")
    if m != "update" and m not in MODES:
        raise Refuse(f"mode {m!r}")
    u = np.asarray(updates)
    if u.shape != tuple(shape):
        raise Refuse(f"updates of shape {list(u.shape)}, expected {list(shape)}")
    if m == "div" and data.dtype.kind in "iu":
        raise Refuse("mode 'div' on integers")
    out = data.copy()
    if m == "update":
        flat = np.ravel_multi_index(tuple(np.broadcast_arrays(*where)), data.shape[:len(where)])
        if np.unique(flat).size != flat.size:
            raise Refuse("mode 'update' with repeated indices (which update wins is not defined)")
        out[where] = u
    else:
        MODES[m].at(out, where, u.astype(out.dtype, copy=False))
    return out


def _tensor(data) -> np.ndarray:
    d = np.asarray(data)
    if d.ndim == 0:
        raise Refuse("scattering into a scalar")
    return d


def _scatter(data, indices, updates, axis=None, mode=None, validate_indices=None):
    data = _tensor(data)
    a = axis_of(0 if axis is None else axis, data.ndim)
    i = _indices(indices, data.shape[a])
    if i.ndim != 1:
        raise Refuse(f"indices of shape {list(i.shape)} (1-D expected)")
    moved = np.moveaxis(data, a, 0)
    u = np.asarray(updates)
    shape = list(data.shape)
    shape[a] = i.size
    if u.shape != tuple(shape):
        raise Refuse(f"updates of shape {list(u.shape)}, expected {shape}")
    out = _apply(moved, (i,), np.moveaxis(u, a, 0), mode, (i.size, *moved.shape[1:]))
    return np.moveaxis(out, 0, a)


def _scatter_along_axis(data, indices, updates, axis=None, mode=None, validate_indices=None):
    data = _tensor(data)
    a = axis_of(0 if axis is None else axis, data.ndim)
    i = _indices(indices, data.shape[a])
    if i.ndim != data.ndim or any(s != d for k, (s, d) in enumerate(zip(i.shape, data.shape)) if k != a):
        raise Refuse(f"indices of shape {list(i.shape)} for data of shape {list(data.shape)}")
    where = tuple(i if k == a else np.arange(n).reshape([-1 if j == k else 1 for j in range(i.ndim)])
                  for k, n in enumerate(i.shape))
    return _apply(data, where, updates, mode, i.shape)


def _scatter_nd(data, indices, updates, mode=None, validate_indices=None):
    data = _tensor(data)
    raw = np.asarray(indices)
    if raw.ndim < 1 or not 1 <= raw.shape[-1] <= data.ndim:
        raise Refuse(f"indices of shape {list(raw.shape)} for data of rank {data.ndim}")
    k = raw.shape[-1]
    i = _indices(raw, data.shape[:k])
    where = tuple(i[..., j] for j in range(k))
    return _apply(data, where, updates, mode, (*i.shape[:-1], *data.shape[k:]))


OPS = {"scatter": row(_scatter), "scatter_along_axis": row(_scatter_along_axis), "scatter_nd": row(_scatter_nd)}
