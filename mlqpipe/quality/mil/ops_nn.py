"""MIL's heavy ops: linear, matmul, einsum, conv / conv_transpose (1-D and 2-D), max / avg / l2 pooling
(1-D and 2-D) and the normalisations. The products run as float32 matrix products (BLAS): a convolution is
im2col (a strided window view, copied a bounded chunk of output rows at a time) times the weight matrix of
each group; a transposed convolution is the convolution of the stride-dilated input with the flipped kernel.
"""

from __future__ import annotations

from math import prod

import numpy as np

from mlqpipe.quality.mil.base import Refuse, axes_of, flag, floats, ints, row, scalar, text

SPATIAL = (1, 2, 3)  # convolution / pooling ranks evaluated here
_CHUNK = 1 << 24  # elements of one im2col buffer (64 MB of float32) before the output rows are split

# --- products -----------------------------------------------------------------------------------------------


def _linear(x, weight, bias=None):
    x, w = floats(x), floats(weight)
    if w.ndim != 2 or x.shape[-1:] != w.shape[1:]:
        raise Refuse(f"weight of shape {list(w.shape)} for an input of shape {list(x.shape)}")
    out = x @ w.T
    return out if bias is None else out + floats(bias)


def _matmul(x, y, transpose_x=None, transpose_y=None):
    x, y = np.asarray(x), np.asarray(y)
    if flag(transpose_x) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if flag(transpose_y) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    try:
        return np.matmul(x, y)
    except ValueError as e:
        raise Refuse(f"shapes {list(x.shape)} and {list(y.shape)} ({e})") from None


def _einsum(values, equation):
    eq = text(equation, "equation")
    try:
        return np.einsum(eq, *(floats(v) for v in values), optimize=True)
    except ValueError as e:
        raise Refuse(f"equation {eq!r} ({e})") from None


# --- windows and padding ------------------------------------------------------------------------------------


def _spatial(x, what: str) -> int:
    n = x.ndim - 2
    if n not in SPATIAL:
        raise Refuse(f"{what} over {n} spatial axes (input of shape {list(x.shape)})")
    return n


def _per_axis(v, n: int, default: int, what: str) -> list[int]:
    out = [default] * n if v is None else ints(v, what)
    if len(out) != n:
        raise Refuse(f"{what} {out} for {n} spatial axes")
    return out


def pads_of(pad_type, pad, sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis. 'same' gives ceil(size / stride) outputs, the odd pixel at the
    end ('same_lower': at the beginning); 'custom' reads `pad` = [begin0, end0, begin1, end1, ...]."""
    kind = "valid" if pad_type is None else text(pad_type, "pad_type")
    n = len(sizes)
    if kind == "valid":
        return [(0, 0)] * n
    if kind == "custom":
        p = [0] * (2 * n) if pad is None else ints(pad, "pad")
        if len(p) != 2 * n or any(v < 0 for v in p):
            raise Refuse(f"pad {p} for {n} spatial axes")
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if kind in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            out.append((big, small) if kind == "same_lower" else (small, big))
        return out
    raise Refuse(f"pad_type {kind!r}")


def _padded(x, pads, value=0.0):
    if not any(b or e for b, e in pads):
        return x
    return np.pad(x, [(0, 0), (0, 0), *pads], constant_values=value)


def windows(x, kernel, strides, dilations) -> np.ndarray:
    """x (N, C, *S) padded -> a view (N, C, *O, *K) of every kernel window (no copy)."""
    n = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if any(e > s for e, s in zip(eff, x.shape[2:])):
        raise Refuse(f"a kernel of {kernel} (dilated {eff}) larger than its padded input {list(x.shape[2:])}")
    view = np.lib.stride_tricks.sliding_window_view(x, eff, axis=tuple(range(2, 2 + n)))
    index = (slice(None), slice(None), *(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))
    return view[index]


# --- convolution --------------------------------------------------------------------------------------------


def conv_nd(x, w, groups: int, strides, dilations, pads) -> np.ndarray:
    """Grouped convolution of x (N, C, *S) with w (OC, C/groups, *K): im2col per chunk of output rows and one
    matrix product per group."""
    x, w = floats(x), floats(w)
    n_, c = x.shape[:2]
    oc, cg, *kernel = w.shape
    if c != cg * groups or oc % groups:
        raise Refuse(f"weight of shape {list(w.shape)} with groups {groups} for an input of {c} channels")
    view = windows(_padded(x, pads), kernel, strides, dilations)  # (N, C, *O, *K)
    nsp = len(kernel)
    out_sizes = view.shape[2:2 + nsp]
    k = prod(kernel)
    wm = w.reshape(groups, oc // groups, cg * k)
    rows_per = max(1, _CHUNK // max(1, n_ * c * k * prod(out_sizes[1:])))
    parts = []
    for start in range(0, out_sizes[0], rows_per):
        part = view[:, :, start:start + rows_per]  # (N, C, r, *O', *K)
        osz = part.shape[2:2 + nsp]
        # (N, G, Cg, *O, *K) -> (N, G, *O, Cg, *K) -> (N, G, P, Cg*K)
        g = part.reshape(n_, groups, cg, *part.shape[2:])
        order = (0, 1, *range(3, 3 + nsp), 2, *range(3 + nsp, 3 + 2 * nsp))
        cols = np.ascontiguousarray(g.transpose(order)).reshape(n_, groups, prod(osz), cg * k)
        y = cols @ np.swapaxes(wm, -1, -2)  # (N, G, P, OC/G)
        parts.append(np.swapaxes(y, -1, -2).reshape(n_, oc, *osz))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def _conv(x, weight, bias=None, strides=None, pad_type=None, pad=None, dilations=None, groups=None):
    x = floats(x)
    n = _spatial(x, "conv")
    w = floats(weight)
    if w.ndim != n + 2:
        raise Refuse(f"weight of rank {w.ndim} for {n} spatial axes")
    s, d = _per_axis(strides, n, 1, "strides"), _per_axis(dilations, n, 1, "dilations")
    g = 1 if groups is None else int(scalar(groups, "groups"))
    pads = pads_of(pad_type, pad, x.shape[2:], w.shape[2:], s, d)
    out = conv_nd(x, w, g, s, d, pads)
    return out if bias is None else out + floats(bias).reshape((-1,) + (1,) * n)


def _conv_transpose(x, weight, bias=None, pad=None, output_shape=None, pad_type=None, strides=None, dilations=None, groups=None):
    """Weight (C_in, C_out/groups, *K). The full output ((size-1)·stride + (k-1)·dilation + 1 per axis) is
    the convolution of the input with stride-1 zeros inserted, padded by the dilated kernel, with the
    flipped kernel; 'custom' pad then crops begin/end. 'same' (ambiguous for transposed convolutions) and
    an `output_shape` other than the computed one are refused."""
    x = floats(x)
    n = _spatial(x, "conv_transpose")
    w = floats(weight)
    g = 1 if groups is None else int(scalar(groups, "groups"))
    cin, coutg, *kernel = w.shape
    if w.ndim != n + 2 or cin != x.shape[1] or cin % g:
        raise Refuse(f"weight of shape {list(w.shape)} with groups {g} for an input of shape {list(x.shape)}")
    s, d = _per_axis(strides, n, 1, "strides"), _per_axis(dilations, n, 1, "dilations")
    kind = "valid" if pad_type is None else text(pad_type, "pad_type")
    if kind not in ("valid", "custom"):
        raise Refuse(f"pad_type {kind!r} for a transposed convolution")
    crop = pads_of(kind, pad, x.shape[2:], kernel, s, d)
    sizes = x.shape[2:]
    dilated = np.zeros((*x.shape[:2], *((m - 1) * st + 1 for m, st in zip(sizes, s))), dtype=x.dtype)
    dilated[(slice(None), slice(None), *(slice(None, None, st) for st in s))] = x
    # group i's kernel [Cin/g, Cout/g, *K] -> [Cout/g, Cin/g, *K], flipped in space
    wg = w.reshape(g, cin // g, coutg, *kernel).swapaxes(1, 2).reshape(g * coutg, cin // g, *kernel)
    wg = np.flip(wg, axis=tuple(range(2, 2 + n)))
    full = conv_nd(dilated, wg, g, [1] * n, d, [((k - 1) * dd, (k - 1) * dd) for k, dd in zip(kernel, d)])
    index = [slice(None), slice(None)]
    for i, (b, e) in enumerate(crop):
        size = full.shape[2 + i]
        if b + e >= size:
            raise Refuse(f"pad {b}+{e} crops the whole output axis of size {size}")
        index.append(slice(b, size - e))
    out = full[tuple(index)]
    if output_shape is not None and ints(output_shape, "output_shape")[-n:] != list(out.shape[2:]):
        raise Refuse(f"output_shape {ints(output_shape)} differs from the computed {list(out.shape)}")
    return out if bias is None else out + floats(bias).reshape((-1,) + (1,) * n)


# --- pooling ------------------------------------------------------------------------------------------------


def _pool_geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode):
    """(kernel, strides, declared pads, extra end pads for ceil_mode) of a pooling op."""
    n = _spatial(x, "pooling")
    k = _per_axis(kernel_sizes, n, 1, "kernel_sizes")
    s = _per_axis(strides, n, 1, "strides")
    pads = pads_of(pad_type, pad, x.shape[2:], k, s, [1] * n)
    extra = [0] * n
    if flag(ceil_mode):
        for i, (size, kk, st, (b, e)) in enumerate(zip(x.shape[2:], k, s, pads)):
            span = size + b + e - kk
            out = -(-span // st) + 1
            if (out - 1) * st >= size + b:  # a last window starting in the end padding is dropped (as torch does)
                out -= 1
            extra[i] = max((out - 1) * st + kk - (size + b + e), 0)
    return k, s, pads, extra


def _max_pool(x, kernel_sizes, strides=None, pad_type=None, pad=None, ceil_mode=None):
    x = floats(x)
    k, s, pads, extra = _pool_geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode)
    full = [(b, e + x_) for (b, e), x_ in zip(pads, extra)]
    view = windows(_padded(x, full, -np.inf), k, s, [1] * len(k))
    return view.max(axis=tuple(range(-len(k), 0)))


def _avg_pool(x, kernel_sizes, strides=None, pad_type=None, pad=None, exclude_padding_from_average=None, ceil_mode=None):
    """The divisor counts the window's input elements (exclude_padding_from_average) or its input and
    declared padding elements; ceil_mode's extra end padding is never counted (torch's rule)."""
    x = floats(x)
    k, s, pads, extra = _pool_geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode)
    n = len(k)
    full = [(b, e + x_) for (b, e), x_ in zip(pads, extra)]
    axes = tuple(range(-n, 0))
    total = windows(_padded(x, full), k, s, [1] * n).sum(axis=axes)
    counted = np.ones((1, 1, *x.shape[2:]), dtype=np.float32)
    if flag(exclude_padding_from_average):
        counted = _padded(counted, full)
    else:
        counted = _padded(_padded(counted, pads, 1.0), [(0, x_) for x_ in extra])
    count = windows(counted, k, s, [1] * n).sum(axis=axes)
    return total / count


def _l2_pool(x, kernel_sizes, strides=None, pad_type=None, pad=None, ceil_mode=None):
    x = floats(x)
    k, s, pads, extra = _pool_geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode)
    full = [(b, e + x_) for (b, e), x_ in zip(pads, extra)]
    return np.sqrt(windows(_padded(np.square(x), full), k, s, [1] * len(k)).sum(axis=tuple(range(-len(k), 0))))


# --- normalisation ------------------------------------------------------------------------------------------


def _eps(epsilon, default: float) -> np.float32:
    return np.float32(default if epsilon is None else scalar(epsilon, "epsilon"))


def _along_channels(x, v, what: str):
    v = floats(v)
    if x.ndim < 2 or v.size != x.shape[1]:
        raise Refuse(f"{what} of shape {list(v.shape)} for an input of shape {list(x.shape)}")
    return v.reshape((-1,) + (1,) * (x.ndim - 2))


def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=None):
    x = floats(x)
    scale = 1.0 / np.sqrt(_along_channels(x, variance, "variance") + _eps(epsilon, 1e-5))
    if gamma is not None:
        scale = scale * _along_channels(x, gamma, "gamma")
    out = (x - _along_channels(x, mean, "mean")) * scale
    return out if beta is None else out + _along_channels(x, beta, "beta")


def _instance_norm(x, gamma=None, beta=None, epsilon=None):
    x = floats(x)
    if x.ndim < 3:
        raise Refuse(f"an input of rank {x.ndim}")
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(np.square(x - mean).mean(axis=axes, keepdims=True) + _eps(epsilon, 1e-5))
    if gamma is not None:
        out = out * _along_channels(x, gamma, "gamma")
    return out if beta is None else out + _along_channels(x, beta, "beta")


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=None):
    x = floats(x)
    ax = tuple(sorted(axes_of(axes, x.ndim))) if axes is not None else tuple(range(x.ndim))
    mean = x.mean(axis=ax, keepdims=True)
    out = (x - mean) / np.sqrt(np.square(x - mean).mean(axis=ax, keepdims=True) + _eps(epsilon, 1e-5))
    shape = [x.shape[i] if i in ax else 1 for i in range(x.ndim)]

    def fit(v, what):
        v = floats(v)
        if v.size != prod(shape):
            raise Refuse(f"{what} of shape {list(v.shape)} for normalised axes of shape {[x.shape[i] for i in ax]}")
        return v.reshape(shape)

    if gamma is not None:
        out = out * fit(gamma, "gamma")
    return out if beta is None else out + fit(beta, "beta")


def _l2_norm(x, epsilon=None):
    """x divided by the root of (its sum of squares over the last three axes + epsilon)."""
    x = floats(x)
    if x.ndim < 3:
        raise Refuse(f"l2_norm of an input of rank {x.ndim}")
    return x / np.sqrt(np.square(x).sum(axis=(-3, -2, -1), keepdims=True) + _eps(epsilon, 1e-6))


OPS = {
    "linear": row(_linear), "matmul": row(_matmul), "einsum": row(_einsum, "values"),
    "conv": row(_conv), "conv_transpose": row(_conv_transpose),
    "max_pool": row(_max_pool), "avg_pool": row(_avg_pool), "l2_pool": row(_l2_pool),
    "batch_norm": row(_batch_norm), "instance_norm": row(_instance_norm), "layer_norm": row(_layer_norm),
    "l2_norm": row(_l2_norm),
}  # fmt: skip
