"""MIL's resizing of the last two axes: upsample_nearest_neighbor, upsample_bilinear (iOS15, and iOS16's
half_pixel_centers), resize_bilinear (its five sampling modes) and resize_nearest_neighbor.

Bilinear resizing is separable: each axis maps output index i to a source position (the op's documented
grid formula, clamped to [0, Xin - 1]) and blends its two neighbouring rows, first along H, then along W.
Nearest neighbour takes source index floor(i · Xin / Xout), computed exactly in integers, the output
size deciding the grid as for upsample_bilinear (coremltools writes torch's 6 -> 9 resize as a scale of
1.5000167, whose floor(i / scale) would miss torch's pixels; from the sizes it matches them).
resize_nearest_neighbor to a size that is not a whole multiple of the input is refused (its definition
gives no sampling rule; for whole multiples every reading agrees).
"""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.mil.base import Refuse, flag, floats, row, scalar, text


def _image(x, what: str):
    x = floats(x)
    if x.ndim < 3:
        raise Refuse(f"{what} of an input of rank {x.ndim} (at least 3 expected)")
    if 0 in x.shape[-2:]:
        raise Refuse(f"{what} of an empty {x.shape[-2]}x{x.shape[-1]} image")
    return x


def _number(v, what: str):
    n = scalar(v, what)
    if isinstance(n, str):
        raise Refuse(f"{what} {n!r} is not a number")
    return n


def _scaled(size: int, scale) -> int:
    """floor(size · scale) in float32, as the op declares its output size."""
    s = np.float32(1 if scale is None else _number(scale, "scale factor"))
    if not s > 0:
        raise Refuse(f"a scale factor of {s}")
    out = int(np.floor(np.float32(size) * s))
    if out < 1:
        raise Refuse(f"a scale factor of {s} for an axis of size {size}")
    return out


def _target(v, what: str, default: int | None = None) -> int:
    n = default if v is None else int(_number(v, what))
    if n is None or n < 1:
        raise Refuse(f"{what} {n}")
    return n


# --- sampling grids -----------------------------------------------------------------------------------------


def grid(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Source positions of the n_out output samples of an axis of n_in (resize_bilinear's sampling modes;
    upsample_bilinear's align_corners is STRICT_ALIGN_CORNERS, half-pixel centers UNALIGN_CORNERS, and
    neither DEFAULT: i · Xin / Xout, TensorFlow's align_corners=False, half_pixel_centers=False)."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            g = np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            g = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        g = i * (n_in / n_out)  # the documented (Xin - Xin/Xout) / (Xout - 1) spacing, simplified
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        g = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        spacing = n_in / n_out
        g = i * spacing + 0.5 * spacing - 0.5
    else:
        raise Refuse(f"sampling_mode {mode!r}")
    return np.clip(g, 0, n_in - 1)


def _blend(x, axis: int, positions: np.ndarray):
    """Linear interpolation of x along `axis` at fractional `positions` (in [0, n-1])."""
    lo = np.floor(positions).astype(np.int64)
    hi = np.minimum(lo + 1, x.shape[axis] - 1)
    frac = (positions - lo).astype(x.dtype)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def _bilinear(x, out_h: int, out_w: int, mode: str):
    h, w = x.shape[-2:]
    y = _blend(x, x.ndim - 2, grid(h, out_h, mode))
    return _blend(y, x.ndim - 1, grid(w, out_w, mode))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(np.arange(n_out, dtype=np.int64) * n_in // n_out, n_in - 1)


# --- ops ----------------------------------------------------------------------------------------------------


def _upsample_nearest_neighbor(x, scale_factor_height=None, scale_factor_width=None):
    x = _image(x, "upsample_nearest_neighbor")
    h, w = x.shape[-2:]
    oh, ow = _scaled(h, scale_factor_height), _scaled(w, scale_factor_width)
    y = np.take(x, _nearest_index(h, oh), axis=-2)
    return np.take(y, _nearest_index(w, ow), axis=-1)


def _resize_nearest_neighbor(x, target_size_height, target_size_width):
    x = _image(x, "resize_nearest_neighbor")
    h, w = x.shape[-2:]
    oh, ow = _target(target_size_height, "target_size_height"), _target(target_size_width, "target_size_width")
    if oh % h or ow % w:
        raise Refuse(f"resizing {h}x{w} to {oh}x{ow}, not a whole multiple (the op defines no sampling rule)")
    return np.repeat(np.repeat(x, oh // h, axis=-2), ow // w, axis=-1)


def _upsample_bilinear(x, scale_factor_height=None, scale_factor_width=None, align_corners=None, half_pixel_centers=None):
    """The output size is floor(size · scale); the grid is recomputed from the output size (as the op says)."""
    x = _image(x, "upsample_bilinear")
    corners = flag(align_corners, True)
    half = flag(half_pixel_centers, not corners)
    if corners and half:
        raise Refuse("align_corners together with half_pixel_centers")
    mode = "STRICT_ALIGN_CORNERS" if corners else "UNALIGN_CORNERS" if half else "DEFAULT"
    h, w = x.shape[-2:]
    return _bilinear(x, _scaled(h, scale_factor_height), _scaled(w, scale_factor_width), mode)


def _resize_bilinear(x, target_size_height=None, target_size_width=None, sampling_mode=None):
    x = _image(x, "resize_bilinear")
    mode = "DEFAULT" if sampling_mode is None else text(sampling_mode, "sampling_mode")
    oh, ow = _target(target_size_height, "target_size_height", 1), _target(target_size_width, "target_size_width", 1)
    return _bilinear(x, oh, ow, mode)


OPS = {
    "upsample_nearest_neighbor": row(_upsample_nearest_neighbor), "resize_nearest_neighbor": row(_resize_nearest_neighbor),
    "upsample_bilinear": row(_upsample_bilinear), "resize_bilinear": row(_resize_bilinear),
}  # fmt: skip
