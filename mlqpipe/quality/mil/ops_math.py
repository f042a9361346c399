"""Elementwise MIL ops (arithmetic, comparisons, logic, unary math, activations), softmax and the reduce_*
family. Each is a pure numpy function of the op's named inputs; numpy's broadcasting is MIL's (trailing axes
aligned). Inputs arrive float32 (float16 values are widened by the interpreter), outputs are cast to the
op's declared dtype afterwards, so these functions only compute.
"""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.mil.base import Refuse, axes_of, axis_of, flag, floats, row, scalar, text

# --- binary --------------------------------------------------------------------------------------------------


def _real_div(x, y):
    if np.asarray(x).dtype.kind in "iub" and np.asarray(y).dtype.kind in "iub":
        raise Refuse("real_div of two integer tensors (its rounding is not documented)")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(floats(x), floats(y))


def _floor_div(x, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.floor_divide(x, y)


def _mod(x, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.mod(x, y)


def _pow(x, y):
    x, y = np.asarray(x), np.asarray(y)
    with np.errstate(all="ignore"):
        return np.power(floats(x), floats(y)) if "f" in (x.dtype.kind, y.dtype.kind) else np.power(x, y)


def _binary(fn):
    return row(lambda x, y: fn(x, y))


BINARY = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply), "real_div": row(_real_div),
    "floor_div": row(_floor_div), "mod": row(_mod), "pow": row(_pow),
    "maximum": _binary(np.maximum), "minimum": _binary(np.minimum),
    "equal": _binary(np.equal), "not_equal": _binary(np.not_equal), "less": _binary(np.less),
    "less_equal": _binary(np.less_equal), "greater": _binary(np.greater), "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or), "logical_xor": _binary(np.logical_xor),
}  # fmt: skip

# --- unary -------------------------------------------------------------------------------------------------


def erf(x) -> np.ndarray:
    """erf in float64 (numpy has none): a Taylor series near 0 (relative error < 1e-6), elsewhere
    Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7 where |erf| > 0.5): float32-accurate, vectorised."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    far = np.sign(x) * (1.0 - poly * np.exp(-a * a))
    x2 = x * x
    near = (2.0 / np.sqrt(np.pi)) * x * (1 - x2 / 3 * (1 - 3 * x2 / 10 * (1 - 5 * x2 / 21 * (1 - 7 * x2 / 36 * (1 - 9 * x2 / 55)))))
    return np.where(a < 0.5, near, far)


def _with_eps(fn, default: float):
    def op(x, epsilon=None):
        eps = default if epsilon is None else float(scalar(epsilon, "epsilon"))
        with np.errstate(all="ignore"):
            return fn(floats(x) + np.float32(eps))

    return row(op)


def _unary(fn, *, as_float: bool = True):
    def op(x):
        with np.errstate(all="ignore"):
            return fn(floats(x) if as_float else np.asarray(x))

    return row(op)


def _clip(x, alpha, beta):
    return np.minimum(np.maximum(floats(x), floats(alpha)), floats(beta))


UNARY = {
    "abs": _unary(np.abs, as_float=False), "sign": _unary(np.sign, as_float=False), "square": _unary(np.square, as_float=False),
    "acos": _unary(np.arccos), "asin": _unary(np.arcsin), "atan": _unary(np.arctan),
    "atanh": _unary(np.arctanh), "cos": _unary(np.cos), "cosh": _unary(np.cosh),
    "sin": _unary(np.sin), "sinh": _unary(np.sinh), "tan": _unary(np.tan), "tanh": _unary(np.tanh),
    "exp": _unary(np.exp), "exp2": _unary(np.exp2), "sqrt": _unary(np.sqrt), "erf": _unary(erf),
    "ceil": _unary(np.ceil), "floor": _unary(np.floor), "round": _unary(np.round),  # half to even, as numpy and torch
    "logical_not": _unary(np.logical_not, as_float=False),
    "log": _with_eps(np.log, 1e-45), "rsqrt": _with_eps(lambda v: 1.0 / np.sqrt(v), 1e-12),
    "inverse": _with_eps(lambda v: 1.0 / v, 1e-4),
    "clip": row(_clip), "threshold": row(lambda x, alpha: np.maximum(floats(x), floats(alpha))),
}  # fmt: skip

# --- activations -------------------------------------------------------------------------------------------


def sigmoid(x):
    x = floats(x)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype, copy=False)


def _gelu(x, mode=None):
    x = floats(x)
    mode = "EXACT" if mode is None else text(mode, "mode")
    if mode == "EXACT":
        return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(x.dtype)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * (x * x * x))))
    if mode == "SIGMOID_APPROXIMATION":
        return x * sigmoid(np.float32(1.702) * x)
    raise Refuse(f"gelu mode {mode!r}")


def _channel(x, p, what: str):
    """A per-channel parameter [C] (or a scalar) shaped to broadcast along axis 1 of x [B, C, ...]."""
    p = floats(p)
    if p.size == 1:
        return p.reshape(())
    if x.ndim < 2 or p.ndim != 1 or p.size != x.shape[1]:
        raise Refuse(f"{what} of shape {list(p.shape)} does not match the channels of an input of shape {list(x.shape)}")
    return p.reshape((-1,) + (1,) * (x.ndim - 2))


def _prelu(x, alpha):
    x = floats(x)
    return np.where(x >= 0, x, x * _channel(x, alpha, "alpha"))


def _softplus_parametric(x, alpha, beta):
    x = floats(x)
    return _channel(x, alpha, "alpha") * np.logaddexp(0, x * _channel(x, beta, "beta"))


def _alpha(v, default: float, what: str = "alpha") -> np.float32:
    return np.float32(default if v is None else scalar(v, what))


def _elu(x, alpha=None):
    x = floats(x)
    with np.errstate(over="ignore"):
        return np.where(x > 0, x, _alpha(alpha, 1.0) * np.expm1(np.minimum(x, 0)))


def _clamped_relu(x, alpha, beta):
    x = floats(x)
    b = np.float32(scalar(beta, "beta"))
    return np.minimum(np.maximum(x, 0), b) + np.minimum(np.minimum(x, 0) * np.float32(scalar(alpha, "alpha")), b)


ACTIVATIONS = {
    "relu": row(lambda x: np.maximum(floats(x), 0)),
    "relu6": row(lambda x: np.clip(floats(x), 0, 6)),
    "leaky_relu": row(lambda x, alpha=None: np.where(floats(x) >= 0, floats(x), floats(x) * _alpha(alpha, 0.01))),
    "elu": row(_elu),
    "thresholded_relu": row(lambda x, alpha=None: np.where(floats(x) > _alpha(alpha, 1.0), floats(x), 0)),
    "prelu": row(_prelu),
    "clamped_relu": row(_clamped_relu),
    "sigmoid": row(sigmoid),
    "sigmoid_hard": row(lambda x, alpha=None, beta=None: np.clip(_alpha(alpha, 0.2) * floats(x) + _alpha(beta, 0.5, "beta"), 0, 1)),
    "silu": row(lambda x: floats(x) * sigmoid(x)),
    "gelu": row(_gelu),
    "softplus": row(lambda x: np.logaddexp(np.float32(0), floats(x))),
    "softplus_parametric": row(_softplus_parametric),
    "softsign": row(lambda x: floats(x) / (1 + np.abs(floats(x)))),
    "scaled_tanh": row(lambda x, alpha=None, beta=None: _alpha(alpha, 1.0) * np.tanh(floats(x) * _alpha(beta, 1.0, "beta"))),
    "linear_activation": row(lambda x, alpha, beta=None: _alpha(alpha, 1.0) * floats(x) + _alpha(beta, 0.0, "beta")),
}  # fmt: skip

# --- softmax and reductions --------------------------------------------------------------------------------


def _softmax(x, axis=None):
    x = floats(x)
    a = axis_of(-1 if axis is None else axis, x.ndim)
    e = np.exp(x - np.max(x, axis=a, keepdims=True))
    return e / np.sum(e, axis=a, keepdims=True)


def _reduce(fn):
    def op(x, axes=None, keep_dims=None):
        x = np.asarray(x)
        ax = None if axes is None else axes_of(axes, x.ndim)
        if ax == ():
            ax = None  # an empty axes list reduces everything, as a missing one does
        with np.errstate(all="ignore"):
            return fn(x, ax, flag(keep_dims))

    return row(op)


def _log_sum_exp(x, ax, keep):
    x = floats(x)
    m = np.max(x, axis=ax, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    out = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
    return out if keep else np.squeeze(out, axis=ax) if ax is not None else out.reshape(())


def _arg(fn):
    def op(x, axis=None, keep_dims=None, output_dtype=None):  # iOS17's output_dtype is the declared dtype
        x = np.asarray(x)
        a = axis_of(-1 if axis is None else axis, x.ndim)
        out = fn(x, axis=a)
        return np.expand_dims(out, a) if flag(keep_dims) else out

    return row(op)


REDUCTIONS = {
    "reduce_sum": _reduce(lambda x, a, k: np.sum(x, axis=a, keepdims=k)),
    "reduce_mean": _reduce(lambda x, a, k: np.mean(floats(x), axis=a, keepdims=k)),
    "reduce_max": _reduce(lambda x, a, k: np.max(x, axis=a, keepdims=k)),
    "reduce_min": _reduce(lambda x, a, k: np.min(x, axis=a, keepdims=k)),
    "reduce_prod": _reduce(lambda x, a, k: np.prod(x, axis=a, keepdims=k)),
    "reduce_l1_norm": _reduce(lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k)),
    "reduce_l2_norm": _reduce(lambda x, a, k: np.sqrt(np.sum(np.square(floats(x)), axis=a, keepdims=k))),
    "reduce_sum_square": _reduce(lambda x, a, k: np.sum(np.square(x), axis=a, keepdims=k)),
    "reduce_log_sum": _reduce(lambda x, a, k: np.log(np.sum(floats(x), axis=a, keepdims=k))),
    "reduce_log_sum_exp": _reduce(_log_sum_exp),
    "reduce_argmax": _arg(np.argmax),  # ties: the first index, as numpy and torch
    "reduce_argmin": _arg(np.argmin),
}  # fmt: skip

OPS = {**BINARY, **UNARY, **ACTIVATIONS, **REDUCTIONS, "softmax": row(_softmax)}
