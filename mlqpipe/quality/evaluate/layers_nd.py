"""ND layers (specification 4 and later, EXACT_ARRAY_MAPPING networks as TF2/Keras and PyTorch converters
write them), for the forward pass.

Blobs are (N, *coreml_shape): a Core ML axis is one numpy axis further right (`ctx.axis`), and every shape a
layer reads or writes is the per-sample one, so broadcasting between blobs of different Core ML rank inserts
unit axes after the sample axis (`_align`). Shapes, counts and indices that come from data (reshapeDynamic's
shape, sliceDynamic's begin, tile's reps) are per sample too; the samples of one batch share one output shape,
so they must agree. Integer-valued results (argMax, getShape, comparisons) are float32 values like every blob.
Where Core ML's documentation leaves the answer open (ties in argMax/topK/argSort, round's halves, mod with
mixed signs, repeated indices in a scatter UPDATE, negative indices where none are documented) the layer raises
`Unsupported` when the data reaches that case instead of guessing.
"""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.evaluate.context import Ctx, core_shape, with_samples

# --- helpers ---------------------------------------------------------------------------------------------------


def _n(ctx: Ctx) -> int:
    """Samples in the batch, for layers without inputs (fillStatic, rangeStatic, loadConstantND)."""
    for value in ctx.scope.values():
        return int(np.shape(value)[0])
    return 1


def _align(*xs: np.ndarray) -> list[np.ndarray]:
    """Blobs of different Core ML rank, unit axes inserted after the sample axis: numpy then broadcasts them
    as Core ML does (trailing axes aligned), and samples stay on axis 0."""
    rank = max(x.ndim for x in xs)
    return [x[(slice(None),) + (None,) * (rank - x.ndim)] for x in xs]


def _ints(ctx: Ctx, x, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.size and not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        raise ctx.unsupported(f"{what} that are not whole numbers")
    return a.astype(np.int64)


def _agreed(ctx: Ctx, x: np.ndarray, what: str) -> np.ndarray:
    """The value of a per-sample blob that sets a shape or an index (one output shape per batch): every sample
    must hold the same; returned without the sample axis."""
    a = np.asarray(x)
    if a.shape[0] > 1 and not np.array_equal(a, np.broadcast_to(a[:1], a.shape)):
        raise ctx.unsupported(f"{what} that differs between samples")
    return a[0]


def _shape_arg(ctx: Ctx, x: np.ndarray, what: str) -> list[int]:
    return [int(v) for v in _ints(ctx, _agreed(ctx, x, what).reshape(-1), what)]


def _scalar_arg(ctx: Ctx, x: np.ndarray, what: str) -> float:
    v = _agreed(ctx, x, what).reshape(-1)
    if v.size != 1:
        raise ctx.unsupported(f"{what} with {v.size} values where a scalar is expected")
    return float(v[0])


def _per_sample_scalar(ctx: Ctx, x: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    if v.shape[1] != 1:
        raise ctx.unsupported(f"{what} with {v.shape[1]} values where a scalar is expected")
    return v[:, 0]


def _indices(ctx: Ctx, x, size, what: str, negative: bool = True) -> np.ndarray:
    """Whole-number indices into an axis of `size` (or per-coordinate sizes), negative ones counted from the
    end where Core ML documents that; anything out of range is refused (Core ML leaves it undefined)."""
    i = _ints(ctx, x, what)
    if negative:
        i = np.where(i < 0, i + size, i)
    if i.size and (np.any(i < 0) or np.any(i >= size)):
        raise ctx.unsupported(f"{what} outside the axis they index" + ("" if negative else " (or negative)"))
    return i


def _normalize_axis(ctx: Ctx, axis: int, rank: int, what: str = "axis") -> int:
    """A Core ML axis into a shape of `rank` (not a blob's), as a 0-based Core ML axis."""
    a = int(axis) + rank if int(axis) < 0 else int(axis)
    if not 0 <= a < rank:
        raise ctx.unsupported(f"{what} {axis} for a rank-{rank} result")
    return a


def _no_rank0(y: np.ndarray) -> np.ndarray:
    """Core ML has no rank-0 tensors: a result without axes is shape (1,)."""
    return y.reshape(y.shape[0], 1) if y.ndim == 1 else y


def _ties(values: np.ndarray, axis: int) -> bool:
    """Whether `values`, sorted along `axis`, hold two equal neighbours."""
    return values.shape[axis] > 1 and bool(np.any(np.diff(values, axis=axis) == 0))


# --- element-wise functions --------------------------------------------------------------------------------------

_ERFC_FIT = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
             -0.82215223, 0.17087277)  # Chebyshev fit of erfc (fractional error < 1.2e-7), Numerical Recipes


def _erf(x) -> np.ndarray:
    """erf to float32 precision, vectorised (numpy has none): its Maclaurin series below 1 (15 terms, error
    < 1e-14), 1 - erfc from a Chebyshev fit above (where erf > 0.84, so the fit's error stays relative)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    s = np.minimum(a, 1.0)
    term, total, s2 = s.copy(), s.copy(), s * s
    for k in range(1, 16):
        term = term * (-s2) / k
        total = total + term / (2 * k + 1)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = np.zeros_like(a)
    for c in reversed(_ERFC_FIT[1:]):
        poly = (poly + c) * t
    large = 1.0 - t * np.exp(-a * a + _ERFC_FIT[0] + poly)
    return np.sign(x) * np.where(a < 1.0, total * (2.0 / np.sqrt(np.pi)), large)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + e^-x), without overflow


GELU = {
    0: lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),  # EXACT
    1: lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),  # TANH_APPROXIMATION
    2: lambda x: x * _sigmoid(1.702 * x),  # SIGMOID_APPROXIMATION
}

UNARY = {
    "ceil": np.ceil, "floor": np.floor, "sign": np.sign, "exp2": np.exp2,
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh, "asinh": np.arcsinh, "acosh": np.arccosh,
    "atanh": np.arctanh, "erf": _erf,
}


def _unary(fn):
    def layer(ctx: Ctx, ins):
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # NaN/Inf outside the domain, as Core ML
            return fn(ins[0])

    return layer


def round_(ctx: Ctx, ins):
    x = ins[0]
    if np.any(np.abs(x - np.floor(x)) == 0.5):
        raise ctx.unsupported("round of a value halfway between two integers (the tie rule is not documented)")
    return np.round(x)


def gelu(ctx: Ctx, ins):
    fn = GELU.get(int(ctx.params.mode))
    if fn is None:
        raise ctx.unsupported(f"gelu mode {ctx.params.mode}")
    return fn(ins[0].astype(np.float64))


def clip(ctx: Ctx, ins):
    return np.minimum(np.maximum(ins[0], ctx.params.minVal), ctx.params.maxVal)


def clamped_relu(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    return np.minimum(p.beta, np.where(x >= 0, x, p.alpha * x))


# --- element-wise with broadcasting ------------------------------------------------------------------------------


BINARY = {
    "addBroadcastable": np.add,
    "subtractBroadcastable": np.subtract,
    "multiplyBroadcastable": np.multiply,
    "divideBroadcastable": np.divide,
    "maxBroadcastable": np.maximum,
    "minBroadcastable": np.minimum,
    "powBroadcastable": np.power,
    "floorDivBroadcastable": lambda a, b: np.floor(a / b),
}


def _binary(fn):
    def layer(ctx: Ctx, ins):
        if len(ins) != 2:
            raise ctx.unsupported(f"{len(ins)} inputs (Core ML requires 2)")
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return fn(*_align(*ins))

    return layer


def mod_broadcastable(ctx: Ctx, ins):
    if len(ins) != 2:
        raise ctx.unsupported(f"{len(ins)} inputs (Core ML requires 2)")
    a, b = _align(*ins)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.fmod(a, b)
    if np.any((r != 0) & ((r < 0) != (b < 0))):  # floored and truncated mod differ only here
        raise ctx.unsupported("mod of operands with different signs (floored or truncated mod is not documented)")
    return r


COMPARE = {
    "equal": np.equal, "notEqual": np.not_equal, "lessThan": np.less, "lessEqual": np.less_equal,
    "greaterThan": np.greater, "greaterEqual": np.greater_equal,
}


def _compare(fn):
    def layer(ctx: Ctx, ins):
        if len(ins) == 1:  # one input: compared with alpha
            return fn(ins[0], np.float32(ctx.params.alpha))
        return fn(*_align(*ins))

    return layer


LOGICAL = {"logicalAnd": np.logical_and, "logicalOr": np.logical_or, "logicalXor": np.logical_xor}


def _logical(fn):
    def layer(ctx: Ctx, ins):
        if len(ins) != 2:
            raise ctx.unsupported(f"{len(ins)} inputs (Core ML requires 2)")
        a, b = _align(*ins)
        return fn(a != 0, b != 0)

    return layer


def logical_not(ctx: Ctx, ins):
    return ins[0] == 0


def where_broadcastable(ctx: Ctx, ins):
    cond, x, y = _align(*ins)
    return np.where(cond != 0, x, y)


def softmax_nd(ctx: Ctx, ins):
    x = ins[0]
    a = ctx.axis(ctx.params.axis, x)
    e = np.exp(x - x.max(axis=a, keepdims=True))
    return e / e.sum(axis=a, keepdims=True)


# --- reductions --------------------------------------------------------------------------------------------------


def _logsumexp(x, axes):
    m = x.max(axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True, dtype=np.float64))


REDUCERS = {  # f(x, axes) with the reduced axes kept; sums accumulate in float64
    "reduceSum": lambda x, ax: np.sum(x, axis=ax, keepdims=True, dtype=np.float64),
    "reduceMean": lambda x, ax: np.mean(x, axis=ax, keepdims=True, dtype=np.float64),
    "reduceProd": lambda x, ax: np.prod(x, axis=ax, keepdims=True, dtype=np.float64),
    "reduceMax": lambda x, ax: np.max(x, axis=ax, keepdims=True),
    "reduceMin": lambda x, ax: np.min(x, axis=ax, keepdims=True),
    "reduceL1": lambda x, ax: np.sum(np.abs(x), axis=ax, keepdims=True, dtype=np.float64),
    "reduceL2": lambda x, ax: np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=ax, keepdims=True)),
    "reduceSumSquare": lambda x, ax: np.sum(np.square(x, dtype=np.float64), axis=ax, keepdims=True),
    "reduceLogSum": lambda x, ax: np.log(np.sum(x, axis=ax, keepdims=True, dtype=np.float64)),
    "reduceLogSumExp": _logsumexp,
}


def reduce_nd(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    if p.reduceAll:
        axes = tuple(range(1, x.ndim))
    elif len(p.axes):
        axes = tuple(sorted({ctx.axis(a, x) for a in p.axes}))
    else:
        raise ctx.unsupported("a reduction with no axes and reduceAll false")
    with np.errstate(divide="ignore", invalid="ignore"):
        y = REDUCERS[ctx.kind](x, axes)
    return y if p.keepDims else _no_rank0(np.squeeze(y, axis=axes))


# --- shapes ------------------------------------------------------------------------------------------------------


def _reshape(ctx: Ctx, x: np.ndarray, target: list[int]) -> np.ndarray:
    if not target or any(d == 0 or d < -1 for d in target) or target.count(-1) > 1:
        raise ctx.unsupported(f"a reshape to {target}")
    try:
        return x.reshape((x.shape[0], *target))
    except ValueError:
        raise ctx.unsupported(f"a reshape of {core_shape(x)} to {target}") from None


def reshape_static(ctx: Ctx, ins):
    return _reshape(ctx, ins[0], [int(d) for d in ctx.params.targetShape])


def reshape_like(ctx: Ctx, ins):
    return _reshape(ctx, ins[0], list(core_shape(ins[1])))


def reshape_dynamic(ctx: Ctx, ins):
    return _reshape(ctx, ins[0], _shape_arg(ctx, ins[1], "a reshape target shape"))


def rank_preserving_reshape(ctx: Ctx, ins):
    x, target = ins[0], [int(d) for d in ctx.params.targetShape]
    if len(target) != x.ndim - 1:
        raise ctx.unsupported(f"targetShape {target} for a rank-{x.ndim - 1} input")
    return _reshape(ctx, x, [x.shape[i + 1] if d == 0 else d for i, d in enumerate(target)])  # 0: keep the axis


def flatten_to_2d(ctx: Ctx, ins):
    x = ins[0]
    rank, a = x.ndim - 1, int(ctx.params.axis)
    a = a + rank if a < 0 else a
    if not 0 <= a <= rank:
        raise ctx.unsupported(f"axis {ctx.params.axis} for a rank-{rank} input")
    core = core_shape(x)
    return x.reshape(x.shape[0], int(np.prod(core[:a])), int(np.prod(core[a:])))


def squeeze(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    core = core_shape(x)
    if p.squeezeAll:
        keep = [d for d in core if d != 1]
    elif len(p.axes):
        axes = {ctx.axis(a, x) - 1 for a in p.axes}
        if any(core[a] != 1 for a in axes):
            raise ctx.unsupported(f"squeezing axes {list(p.axes)} of shape {core} (not all are 1)")
        keep = [d for i, d in enumerate(core) if i not in axes]
    else:
        raise ctx.unsupported("a squeeze with no axes and squeezeAll false")
    return x.reshape(x.shape[0], *(keep or [1]))


def expand_dims(ctx: Ctx, ins):
    x, axes = ins[0], [int(a) for a in ctx.params.axes]
    rank = x.ndim - 1 + len(axes)
    spots = sorted({_normalize_axis(ctx, a, rank) for a in axes})
    if not axes or len(spots) != len(axes):
        raise ctx.unsupported(f"expandDims axes {axes}")
    shape = list(core_shape(x))
    for a in spots:
        shape.insert(a, 1)
    return x.reshape(x.shape[0], *shape)


def transpose(ctx: Ctx, ins):
    x, axes = ins[0], [int(a) for a in ctx.params.axes]
    if sorted(axes) != list(range(x.ndim - 1)):
        raise ctx.unsupported(f"transpose axes {axes} for a rank-{x.ndim - 1} input")
    return x.transpose(0, *[a + 1 for a in axes])


def concat_nd(ctx: Ctx, ins):
    if len({x.ndim for x in ins}) != 1:
        raise ctx.unsupported("inputs of different ranks")
    a = ctx.axis(ctx.params.axis, ins[0])
    try:
        if ctx.params.interleave:  # out[.., i*k + j, ..] = ins[j][.., i, ..]: stack after the axis, then merge
            y = np.stack(np.broadcast_arrays(*ins), axis=a + 1)
            return y.reshape(y.shape[:a] + (-1,) + y.shape[a + 2 :])
        return np.concatenate(ins, axis=a)
    except ValueError:
        raise ctx.unsupported(f"inputs of shapes {[core_shape(x) for x in ins]}") from None


def split_nd(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    a = ctx.axis(p.axis, x)
    size = x.shape[a]
    if len(p.splitSizes):
        sizes = [int(s) for s in p.splitSizes]
    else:
        parts = int(p.numSplits) or len(ctx.layer.output)
        if size % parts:
            raise ctx.unsupported(f"{parts} equal splits of an axis of {size}")
        sizes = [size // parts] * parts
    if sum(sizes) != size or len(sizes) != len(ctx.layer.output):
        raise ctx.unsupported(f"split sizes {sizes} of an axis of {size} into {len(ctx.layer.output)} outputs")
    return np.split(x, np.cumsum(sizes)[:-1], axis=a)


def stack(ctx: Ctx, ins):
    if len({core_shape(x) for x in ins}) != 1:
        raise ctx.unsupported("inputs of different shapes")
    a = _normalize_axis(ctx, ctx.params.axis, ins[0].ndim)  # an axis of the rank + 1 result
    return np.stack(np.broadcast_arrays(*ins), axis=a + 1)


def reverse(ctx: Ctx, ins):
    x, dims = ins[0], list(ctx.params.reverseDim)
    if len(dims) != x.ndim - 1:
        raise ctx.unsupported(f"reverseDim of length {len(dims)} for a rank-{x.ndim - 1} input")
    axes = [i + 1 for i, flip in enumerate(dims) if flip]
    return np.flip(x, axis=axes) if axes else x


def reverse_seq(ctx: Ctx, ins):
    data, lengths = ins
    b, s = ctx.axis(ctx.params.batchAxis, data), ctx.axis(ctx.params.sequenceAxis, data)
    n, batch, steps = data.shape[0], data.shape[b], data.shape[s]
    seq = _ints(ctx, lengths, "sequence lengths").reshape(n, -1)
    if b >= s or seq.shape[1] != batch or np.any(seq < 0) or np.any(seq > steps):
        raise ctx.unsupported(f"reverseSeq with batchAxis {ctx.params.batchAxis}, sequenceAxis "
                              f"{ctx.params.sequenceAxis} and lengths of shape {core_shape(lengths)}")
    j = np.arange(steps)
    length = seq[:, :, None]
    src = np.where(j < length, length - 1 - j, j)  # (n, batch, steps): the first `length` steps reversed
    shape = [1] * data.ndim
    shape[0], shape[b], shape[s] = n, batch, steps
    return np.take_along_axis(data, np.broadcast_to(src.reshape(shape), data.shape), axis=s)


def tile(ctx: Ctx, ins):
    x = ins[0]
    reps = _shape_arg(ctx, ins[1], "tile reps") if len(ins) > 1 else [int(r) for r in ctx.params.reps]
    rank = x.ndim - 1
    if not reps or len(reps) > rank or min(reps) < 1:
        raise ctx.unsupported(f"tile reps {reps} for a rank-{rank} input")
    return np.tile(x, (1,) + (1,) * (rank - len(reps)) + tuple(reps))  # shorter reps: ones prepended


def _slice(ctx: Ctx, x, begin, end, strides, begin_masks, end_masks, squeeze_masks):
    rank = x.ndim - 1
    squeeze_masks = list(squeeze_masks) or [False] * rank
    if any(len(v) != rank for v in (begin, end, strides, begin_masks, end_masks, squeeze_masks)):
        raise ctx.unsupported(f"slice parameters whose lengths differ from the input rank {rank}")
    index: list = [slice(None)]
    for i in range(rank):
        b, e, s = int(begin[i]), int(end[i]), int(strides[i])
        if squeeze_masks[i]:  # only beginIds[i] is taken, and the axis removed
            index.append(int(_indices(ctx, b, x.shape[i + 1], "a squeezed slice index")))
            continue
        if s == 0:
            raise ctx.unsupported("a slice stride of 0")
        if s < 0 and (begin_masks[i] or end_masks[i]):
            raise ctx.unsupported("a masked slice with a negative stride")
        index.append(slice(None if begin_masks[i] else b, None if end_masks[i] else e, s))
    y = x[tuple(index)]
    if 0 in y.shape[1:]:
        raise ctx.unsupported("a slice with no values")
    return _no_rank0(y)


def slice_static(ctx: Ctx, ins):
    p = ctx.params
    return _slice(ctx, ins[0], p.beginIds, p.endIds, p.strides, p.beginMasks, p.endMasks, p.squeezeMasks)


def slice_dynamic(ctx: Ctx, ins):
    """Inputs 2-7 (begin, end, strides, beginMasks, endMasks, squeezeMasks) override the parameters."""
    p = ctx.params
    given = [_shape_arg(ctx, v, "a slice parameter") for v in ins[1:]]
    static = [None, list(p.endIds), list(p.strides), list(p.beginMasks), list(p.endMasks), list(p.squeezeMasks)]
    values = given + static[len(given) :]
    begin, end, strides, bm, em, sm = values
    return _slice(ctx, ins[0], begin, end, strides, [bool(v) for v in bm], [bool(v) for v in em], [bool(v) for v in sm])


def slice_by_size(ctx: Ctx, ins):
    x, size = ins[0], int(ctx.params.size)
    a = ctx.axis(ctx.params.axis, x)
    begin = int(_indices(ctx, _scalar_arg(ctx, ins[1], "the slice begin"), x.shape[a], "the slice begin", negative=False))
    if size < 1 or begin + size > x.shape[a]:
        raise ctx.unsupported(f"a slice of {size} from {begin} of an axis of {x.shape[a]}")
    return np.take(x, np.arange(begin, begin + size), axis=a)


def sliding_windows(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    a = ctx.axis(p.axis, x)
    width, step, length = int(p.windowSize), int(p.step), x.shape[a]
    if width < 1 or step < 1 or width > length:
        raise ctx.unsupported(f"windows of {width} every {step} over an axis of {length}")
    starts = np.arange((length - width) // step + 1) * step
    return np.take(x, starts[:, None] + np.arange(width), axis=a)  # (..., windows, width, ...)


def constant_pad(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    rank = x.ndim - 1
    amounts = _shape_arg(ctx, ins[1], "pad amounts") if len(ins) > 1 else [int(v) for v in p.padAmounts]
    if len(amounts) != 2 * rank or min(amounts) < 0:
        raise ctx.unsupported(f"pad amounts {amounts} for a rank-{rank} input")
    widths = [(0, 0)]
    for i in range(rank):
        before, after = amounts[2 * i], amounts[2 * i + 1]
        if p.padToGivenOutputSizeMode:  # the non-zero one is the output size, padded on that side
            if before and after:
                raise ctx.unsupported("padToGivenOutputSizeMode with both pad amounts of an axis set")
            size = x.shape[i + 1]
            before, after = max(before - size, 0) if before else 0, max(after - size, 0) if after else 0
        widths.append((before, after))
    return np.pad(x, widths, constant_values=np.float32(p.value))


def _broadcast(ctx: Ctx, x: np.ndarray, target: list[int]) -> np.ndarray:
    if len(target) < x.ndim - 1:
        raise ctx.unsupported(f"broadcasting a shape {core_shape(x)} to the lower rank {target}")
    x = x[(slice(None),) + (None,) * (len(target) - (x.ndim - 1))]
    try:
        return np.broadcast_to(x, (x.shape[0], *target))
    except ValueError:
        raise ctx.unsupported(f"broadcasting {core_shape(x)} to {target}") from None


def broadcast_to_static(ctx: Ctx, ins):
    return _broadcast(ctx, ins[0], [int(d) for d in ctx.params.targetShape])


def broadcast_to_like(ctx: Ctx, ins):
    return _broadcast(ctx, ins[0], list(core_shape(ins[1])))


def broadcast_to_dynamic(ctx: Ctx, ins):
    return _broadcast(ctx, ins[0], _shape_arg(ctx, ins[1], "a broadcast target shape"))


def get_shape(ctx: Ctx, ins):
    x = ins[0]
    return np.broadcast_to(np.asarray(core_shape(x), np.float32), (x.shape[0], x.ndim - 1))


# --- tensors from parameters --------------------------------------------------------------------------------------


def load_constant_nd(ctx: Ctx, ins):
    shape = [int(d) for d in ctx.params.shape]
    data = ctx.weight("data")
    if data.size != int(np.prod(shape)):
        raise ctx.unsupported(f"{data.size} constant values for shape {shape}")
    return with_samples(data.reshape(shape), _n(ctx))


def fill_like(ctx: Ctx, ins):
    return np.broadcast_to(np.float32(ctx.params.value), ins[0].shape)


def fill_static(ctx: Ctx, ins):
    shape = [int(d) for d in ctx.params.targetShape]
    return with_samples(np.full(shape, ctx.params.value, np.float32), _n(ctx))


def fill_dynamic(ctx: Ctx, ins):
    shape = _shape_arg(ctx, ins[0], "a fill shape")
    if not shape or min(shape) < 1:
        raise ctx.unsupported(f"a fill of shape {shape}")
    return np.broadcast_to(np.float32(ctx.params.value), (ins[0].shape[0], *shape))


def _arange(ctx: Ctx, start, end, step) -> np.ndarray:
    """Per-sample numpy.arange (start, end, step: (N,) arrays); every sample must give the same length."""
    if np.any(step == 0):
        raise ctx.unsupported("a range with step 0")
    counts = np.maximum(np.ceil((end - start) / step), 0).astype(np.int64)
    if np.any(counts != counts[0]) or counts[0] < 1:
        raise ctx.unsupported("a range whose length differs between samples or is 0")
    return start[:, None] + np.arange(counts[0])[None, :] * step[:, None]


def range_static(ctx: Ctx, ins):
    p = ctx.params
    one = _arange(ctx, *(np.array([v], np.float64) for v in (p.startValue, p.endValue, p.stepSizeValue)))
    return with_samples(one[0], _n(ctx))


def range_dynamic(ctx: Ctx, ins):
    """Inputs in order: end, then start and step when present (else the parameters)."""
    p = ctx.params
    n = ins[0].shape[0]
    end = _per_sample_scalar(ctx, ins[0], "the range end")
    start = _per_sample_scalar(ctx, ins[1], "the range start") if len(ins) > 1 else np.full(n, p.startValue, np.float64)
    step = _per_sample_scalar(ctx, ins[2], "the range step") if len(ins) > 2 else np.full(n, p.stepSizeValue, np.float64)
    return _arange(ctx, start, end, step)


def one_hot(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    size = int(_scalar_arg(ctx, ins[1], "the one-hot size")) if len(ins) > 1 else int(p.oneHotVectorSize)
    if size < 1:
        raise ctx.unsupported(f"a one-hot size of {size}")
    a = _normalize_axis(ctx, p.axis, x.ndim)  # an axis of the rank + 1 output
    hot = _ints(ctx, x, "one-hot indices")[..., None] == np.arange(size)  # out of range: all off
    return np.moveaxis(np.where(hot, np.float32(p.onValue), np.float32(p.offValue)), -1, a + 1)


# --- matrices, embeddings, normalisation ---------------------------------------------------------------------------


def batched_matmul(ctx: Ctx, ins):
    p, a = ctx.params, ins[0]
    if p.int8DynamicQuantize:
        raise ctx.unsupported("int8DynamicQuantize (the run-time input quantization is not documented)")
    if len(ins) == 1:  # a @ W (+ b), W [X1, X2] stored column-major, i.e. as [X2, X1]; transposes are ignored
        x1, x2 = int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
        if a.shape[-1] != x1:
            raise ctx.unsupported(f"an input whose last axis is {a.shape[-1]} for weightMatrixFirstDimension {x1}")
        y = a @ ctx.weight("weights").reshape(x2, x1).T
        return y + ctx.weight("bias").reshape(x2) if p.hasBias else y
    b = ins[1]
    if (p.transposeA and a.ndim == 2) or (p.transposeB and b.ndim == 2):
        raise ctx.unsupported("transposing a rank-1 operand")
    a = a[:, None, :] if a.ndim == 2 else a  # rank 1: (D) -> (1, D), and the 1 stays in the output
    b = b[:, :, None] if b.ndim == 2 else b  # rank 1: (D) -> (D, 1)
    a = np.swapaxes(a, -1, -2) if p.transposeA else a
    b = np.swapaxes(b, -1, -2) if p.transposeB else b
    try:
        return np.matmul(*_align(a, b))
    except ValueError:
        raise ctx.unsupported(f"operands of shapes {core_shape(a)} and {core_shape(b)}") from None


def embedding_nd(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    vocab, size = int(p.vocabSize), int(p.embeddingSize)
    if x.ndim < 3 or x.shape[-1] != 1:
        raise ctx.unsupported(f"an input of shape {core_shape(x)} (rank >= 2 with a last axis of 1 is required)")
    ids = _indices(ctx, x[..., 0], vocab, "embedding indices", negative=False)
    y = ctx.weight("weights").reshape(size, vocab).T[ids]
    return y + ctx.weight("bias").reshape(size) if p.hasBias else y


def layer_normalization(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    shape = [int(d) for d in p.normalizedShape]
    k = len(shape)
    if not k or k > x.ndim - 1 or list(x.shape[-k:]) != shape:
        raise ctx.unsupported(f"normalizedShape {shape} for an input of shape {core_shape(x)}")
    axes = tuple(range(x.ndim - k, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + p.eps)
    return y * ctx.weight("gamma").reshape(shape) + ctx.weight("beta").reshape(shape)


def matrix_band_part(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    if x.ndim < 3:
        raise ctx.unsupported("an input of rank < 2")
    m = np.arange(x.shape[-2])[:, None]
    n = np.arange(x.shape[-1])[None, :]
    low, up = int(p.numLower), int(p.numUpper)
    band = ((low < 0) | (m - n <= low)) & ((up < 0) | (n - m <= up))
    return np.where(band, x, np.float32(0))


def _triangle(keep):
    def layer(ctx: Ctx, ins):
        x = ins[0]
        if x.ndim < 3:
            raise ctx.unsupported("an input of rank < 2")
        return keep(x, int(ctx.params.k))  # numpy's tril/triu work on the last two axes

    return layer


# --- indexing ---------------------------------------------------------------------------------------------------

SCATTER_MODES = {1: np.add, 2: np.subtract, 3: np.multiply, 4: np.divide, 5: np.maximum, 6: np.minimum}  # 0: UPDATE


def _samples_index(n: int, k: int) -> np.ndarray:
    """arange(n) shaped to broadcast against per-sample index arrays of k axes."""
    return np.arange(n).reshape((n,) + (1,) * k)


def _scatter_into(ctx: Ctx, target: np.ndarray, index: tuple, updates: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """target[index] <- updates by the layer's mode; `keys` (N, M) name the element each update hits, to refuse
    UPDATE with repeated indices (Core ML does not say which update wins)."""
    mode = int(ctx.params.mode)
    if mode == 0:
        if _ties(np.sort(keys, axis=1), 1):
            raise ctx.unsupported("a scatter UPDATE with repeated indices")
        target[index] = updates
    elif mode in SCATTER_MODES:
        with np.errstate(divide="ignore", invalid="ignore"):
            SCATTER_MODES[mode].at(target, index, updates)
    else:
        raise ctx.unsupported(f"scatter mode {mode}")
    return target


def gather(ctx: Ctx, ins):
    """out[.., i, ..] = data[.., indices[i], ..] with the indices' axes in place of `axis` (numpy.take)."""
    data, idx = ins
    a = ctx.axis(ctx.params.axis, data)
    i = _indices(ctx, idx, data.shape[a], "gather indices")
    k, lead = i.ndim - 1, a - 1
    y = np.moveaxis(data, a, 1)[_samples_index(data.shape[0], k), i]  # N, I.., data axes before a, after a
    return y.transpose([0, *range(k + 1, k + 1 + lead), *range(1, k + 1), *range(k + 1 + lead, y.ndim)])


def gather_along_axis(ctx: Ctx, ins):
    data, idx = ins
    a = ctx.axis(ctx.params.axis, data)
    if idx.ndim != data.ndim or any(idx.shape[d] != data.shape[d] for d in range(1, data.ndim) if d != a):
        raise ctx.unsupported(f"indices of shape {core_shape(idx)} for data of shape {core_shape(data)}")
    i = _indices(ctx, idx, data.shape[a], "gather indices")
    return np.take_along_axis(data, np.broadcast_to(i, (data.shape[0],) + i.shape[1:]), axis=a)


def _nd_index(ctx: Ctx, data: np.ndarray, idx: np.ndarray, what: str) -> tuple[tuple, np.ndarray]:
    """The numpy index of gatherND/scatterND multi-indices (the last axis of `idx` indexes the leading axes of
    `data`), and the flat position of each point (for repeated-index checks)."""
    depth = idx.shape[-1]
    if not 0 < depth <= data.ndim - 1:
        raise ctx.unsupported(f"{depth}-element indices into a rank-{data.ndim - 1} tensor")
    dims = data.shape[1 : 1 + depth]
    i = _indices(ctx, idx, np.asarray(dims), what, negative=False)  # negative indices are not documented
    index = (_samples_index(data.shape[0], i.ndim - 2),) + tuple(i[..., j] for j in range(depth))
    flat = np.ravel_multi_index(tuple(i[..., j] for j in range(depth)), dims)
    return index, flat.reshape(i.shape[0], -1)


def gather_nd(ctx: Ctx, ins):
    data, idx = ins
    index, _ = _nd_index(ctx, data, idx, "gatherND indices")
    return data[index]


def scatter(ctx: Ctx, ins):
    """out = container; out[.., indices[i], ..] (op)= updates[.., i, ..] along `axis`."""
    container, idx, updates = ins
    a = ctx.axis(ctx.params.axis, container)
    i = _indices(ctx, idx, container.shape[a], "scatter indices")
    k, lead, n = i.ndim - 1, a - 1, container.shape[0]
    target = np.array(np.moveaxis(container, a, 1), dtype=np.float32)  # N, Da, axes before a, axes after a
    want = container.shape[1:a] + i.shape[1:] + container.shape[a + 1 :]
    if updates.ndim != len(want) + 1 or updates.shape[1:] != want:
        raise ctx.unsupported(f"updates of shape {core_shape(updates)} (expected {want})")
    order = [0, *range(lead + 1, lead + 1 + k), *range(1, lead + 1), *range(lead + 1 + k, updates.ndim)]
    moved = updates.transpose(order)  # N, I.., axes before a, axes after a: the shape of target[n, i]
    _scatter_into(ctx, target, (_samples_index(n, k), i), moved, i.reshape(n, -1))
    return np.moveaxis(target, 1, a)


def scatter_nd(ctx: Ctx, ins):
    container, idx, updates = ins
    index, flat = _nd_index(ctx, container, idx, "scatterND indices")
    want = idx.shape[1:-1] + container.shape[1 + idx.shape[-1] :]
    if updates.shape[1:] != want:
        raise ctx.unsupported(f"updates of shape {core_shape(updates)} (expected {want})")
    return _scatter_into(ctx, np.array(container, dtype=np.float32), index, updates, flat)


def scatter_along_axis(ctx: Ctx, ins):
    container, idx, updates = ins
    a = ctx.axis(ctx.params.axis, container)
    others = [d for d in range(1, container.ndim) if d != a]
    if idx.ndim != container.ndim or updates.shape[1:] != idx.shape[1:] or any(idx.shape[d] != container.shape[d] for d in others):
        raise ctx.unsupported(f"indices {core_shape(idx)} and updates {core_shape(updates)} for a container {core_shape(container)}")
    i = _indices(ctx, idx, container.shape[a], "scatter indices")
    grid = list(np.ogrid[tuple(slice(s) for s in i.shape)])
    grid[a] = i
    target = np.array(container, dtype=np.float32)
    keys = np.moveaxis(i, a, -1).reshape(-1, i.shape[a])  # repeated indices matter along the axis only
    return _scatter_into(ctx, target, tuple(grid), np.broadcast_to(updates, i.shape), keys)


def where_nonzero(ctx: Ctx, ins):
    x = ins[0]
    found = np.argwhere(x != 0)  # rows (sample, i0, ..) in row-major order, sample first
    counts = np.bincount(found[:, 0], minlength=x.shape[0])
    if np.any(counts != counts[0]) or counts[0] == 0:
        raise ctx.unsupported("whereNonZero whose count of non-zero values differs between samples or is 0")
    return found[:, 1:].reshape(x.shape[0], int(counts[0]), x.ndim - 1)


# --- order statistics and scans ------------------------------------------------------------------------------------


def _arg_extreme(pick, extreme):
    def layer(ctx: Ctx, ins):
        x, p = ins[0], ctx.params
        a = ctx.axis(p.axis, x)
        if np.sum(x == extreme(x, axis=a, keepdims=True), axis=a).max(initial=0) > 1:
            raise ctx.unsupported("an extreme value that occurs more than once (which index is not documented)")
        y = pick(x, axis=a, keepdims=True)
        return _no_rank0(np.squeeze(y, axis=a)) if p.removeDim and x.ndim > 2 else y

    return layer


def top_k(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    a = ctx.axis(p.axis, x)
    k = int(_scalar_arg(ctx, ins[1], "K")) if len(ins) > 1 else int(p.K)
    if not 0 < k <= x.shape[a]:
        raise ctx.unsupported(f"K = {k} along an axis of {x.shape[a]}")
    order = np.argsort(x if p.useBottomK else -x, axis=a, kind="stable")
    first = np.take(order, np.arange(min(k + 1, x.shape[a])), axis=a)
    if _ties(np.take_along_axis(x, first, axis=a), a):  # equal values at or next to the cut: order undocumented
        raise ctx.unsupported("topK over tied values")
    idx = np.take(first, np.arange(k), axis=a)
    return [np.take_along_axis(x, idx, axis=a), idx]


def arg_sort(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    a = ctx.axis(p.axis, x)
    order = np.argsort(-x if p.descending else x, axis=a, kind="stable")
    if _ties(np.take_along_axis(x, order, axis=a), a):
        raise ctx.unsupported("argSort over tied values")
    return order


def cum_sum(ctx: Ctx, ins):
    x, p = ins[0], ctx.params
    axis = int(_scalar_arg(ctx, ins[1], "the cumSum axis")) if len(ins) > 1 else int(p.axis)
    a = ctx.axis(axis, x)
    y = np.flip(x, axis=a) if p.reverse else x
    total = np.cumsum(y, axis=a, dtype=np.float64)
    if p.excludeFinalSum:  # each position holds the sum before it
        total = total - y
    return np.flip(total, axis=a) if p.reverse else total


# --- the table --------------------------------------------------------------------------------------------------


def _nd_only(fn):
    """ND layer types are invalid in rank-5 networks (NeuralNetwork.proto), where their axes would mean
    something else."""

    def layer(ctx: Ctx, ins):
        if not ctx.nd:
            raise ctx.unsupported("an ND layer in a rank-5 (arrayInputShapeMapping RANK5) network")
        return fn(ctx, ins)

    layer.__name__ = getattr(fn, "__name__", "layer")
    return layer


_TABLE = {
    **{kind: _unary(fn) for kind, fn in UNARY.items()},
    **{kind: _binary(fn) for kind, fn in BINARY.items()},
    **{kind: _compare(fn) for kind, fn in COMPARE.items()},
    **{kind: _logical(fn) for kind, fn in LOGICAL.items()},
    **{kind: reduce_nd for kind in REDUCERS},
    "round": round_,
    "gelu": gelu,
    "clip": clip,
    "clampedReLU": clamped_relu,
    "modBroadcastable": mod_broadcastable,
    "logicalNot": logical_not,
    "whereBroadcastable": where_broadcastable,
    "softmaxND": softmax_nd,
    "reshapeStatic": reshape_static,
    "reshapeLike": reshape_like,
    "reshapeDynamic": reshape_dynamic,
    "rankPreservingReshape": rank_preserving_reshape,
    "flattenTo2D": flatten_to_2d,
    "squeeze": squeeze,
    "expandDims": expand_dims,
    "transpose": transpose,
    "concatND": concat_nd,
    "splitND": split_nd,
    "stack": stack,
    "reverse": reverse,
    "reverseSeq": reverse_seq,
    "tile": tile,
    "sliceStatic": slice_static,
    "sliceDynamic": slice_dynamic,
    "sliceBySize": slice_by_size,
    "slidingWindows": sliding_windows,
    "constantPad": constant_pad,
    "broadcastToStatic": broadcast_to_static,
    "broadcastToLike": broadcast_to_like,
    "broadcastToDynamic": broadcast_to_dynamic,
    "getShape": get_shape,
    "loadConstantND": load_constant_nd,
    "fillLike": fill_like,
    "fillStatic": fill_static,
    "fillDynamic": fill_dynamic,
    "rangeStatic": range_static,
    "rangeDynamic": range_dynamic,
    "oneHot": one_hot,
    "batchedMatmul": batched_matmul,
    "embeddingND": embedding_nd,
    "layerNormalization": layer_normalization,
    "matrixBandPart": matrix_band_part,
    "lowerTriangular": _triangle(np.tril),
    "upperTriangular": _triangle(np.triu),
    "gather": gather,
    "gatherAlongAxis": gather_along_axis,
    "gatherND": gather_nd,
    "scatter": scatter,
    "scatterND": scatter_nd,
    "scatterAlongAxis": scatter_along_axis,
    "whereNonZero": where_nonzero,
    "argMax": _arg_extreme(np.argmax, np.max),
    "argMin": _arg_extreme(np.argmin, np.min),
    "topK": top_k,
    "argSort": arg_sort,
    "cumSum": cum_sum,
}

LAYERS = {kind: _nd_only(fn) for kind, fn in _TABLE.items()}
