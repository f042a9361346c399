"""Classic neural-network layers (the rank-5 [Seq, Batch, C, H, W] family), for the forward pass.

Each works on the last three axes as C, H, W and treats every axis before them as batch, which is Core ML's
meaning in classic networks (blob (N, S, C, H, W)) and in ND networks (blob (N, ..., C, H, W)) alike.
Convolution and innerProduct run as float32 matrix products (BLAS); nothing here loops over values.
"""

from __future__ import annotations

import numpy as np

from .context import Ctx


# --- helpers ---------------------------------------------------------------------------------------------


def _pair(values, default: int) -> tuple[int, int]:
    v = [int(x) for x in values]
    return (v + [default, default])[:2] if v else (default, default)


def _pad_amounts(valid) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a ValidPadding message kept as bytes (paddingAmounts.borderAmounts)."""
    from .messages import ValidPadding

    b = list(ValidPadding.FromString(valid).paddingAmounts.borderAmounts)
    h = b[0] if b else None
    w = b[1] if len(b) > 1 else None
    return (int(h.startEdgeSize) if h else 0, int(h.endEdgeSize) if h else 0,
            int(w.startEdgeSize) if w else 0, int(w.endEdgeSize) if w else 0)


def same_pad(size: int, k: int, s: int, d: int, top_left_heavy: bool = False) -> tuple[int, int]:
    """Core ML's 'same' padding: output ceil(size / stride); the odd pixel goes bottom/right by default."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if top_left_heavy else (small, big)


def as_images(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(..., C, H, W) -> (B, C, H, W) and the leading shape to restore."""
    lead = x.shape[:-3]
    return x.reshape((-1,) + x.shape[-3:]), lead


def pad_hw(x, top, bottom, left, right, value=0.0):
    if top == bottom == left == right == 0:
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return np.pad(x, widths, constant_values=value)


def windows(x, kh, kw, sh, sw, dh=1, dw=1):
    """(B, C, H, W) -> (B, C, kh, kw, OH, OW) sliding windows (a view, no copy)."""
    b, c, h, w = x.shape
    oh = (h - ((kh - 1) * dh + 1)) // sh + 1
    ow = (w - ((kw - 1) * dw + 1)) // sw + 1
    if oh <= 0 or ow <= 0:
        from .context import Unsupported

        raise Unsupported("kernel larger than its padded input")
    st = x.strides
    return np.lib.stride_tricks.as_strided(
        x, (b, c, kh, kw, oh, ow), (st[0], st[1], st[2] * dh, st[3] * dw, st[2] * sh, st[3] * sw), writeable=False)


def conv2d(x: np.ndarray, weights: np.ndarray, groups: int, stride, dilation) -> np.ndarray:
    """Grouped 2-D convolution of padded images x (B, C, H, W) with weights (OC, C/groups, kh, kw), as one
    batched float32 matrix product per kernel offset: no im2col copy larger than the output."""
    b, c, h, w = x.shape
    oc, kc, kh, kw = weights.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh = (h - ((kh - 1) * dh + 1)) // sh + 1
    ow = (w - ((kw - 1) * dw + 1)) // sw + 1
    if oh <= 0 or ow <= 0:
        from .context import Unsupported

        raise Unsupported("kernel larger than its padded input")
    xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)  # B H W C: channels contiguous
    ocg = oc // groups
    wg = weights.reshape(groups, ocg, kc, kh, kw).astype(np.float32)
    out = np.zeros((groups, b * oh * ow, ocg), np.float32)
    for i in range(kh):
        for j in range(kw):
            win = xt[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw, :]
            cols = win.reshape(b * oh * ow, groups, kc).transpose(1, 0, 2)  # g, pixels, kc
            out += np.matmul(cols, wg[:, :, :, i, j].transpose(0, 2, 1))  # g, pixels, ocg
    return out.transpose(1, 0, 2).reshape(b, oh, ow, oc).transpose(0, 3, 1, 2)


def _channel_param(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A per-channel (or single) parameter shaped to broadcast over (..., C, H, W)."""
    return values.reshape(-1, 1, 1) if values.size > 1 else values.reshape(())


# --- layers ----------------------------------------------------------------------------------------------


def convolution(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    if p.isDeconvolution:
        raise ctx.unsupported("deconvolution")
    oc, kc, g = int(p.outputChannels), int(p.kernelChannels), int(p.nGroups) or 1
    kh, kw = _pair(p.kernelSize, 3)
    sh, sw = _pair(p.stride, 1)
    dh, dw = _pair(p.dilationFactor, 1)
    imgs, lead = as_images(x)
    if p.WhichOneof("ConvolutionPaddingType") == "same":
        from .messages import SamePadding

        heavy = SamePadding.FromString(p.same).asymmetryMode == 1
        t, b = same_pad(imgs.shape[2], kh, sh, dh, heavy)
        left, r = same_pad(imgs.shape[3], kw, sw, dw, heavy)
    else:
        t, b, left, r = _pad_amounts(p.valid) if p.HasField("valid") else (0, 0, 0, 0)
    if imgs.shape[1] != kc * g:
        raise ctx.unsupported(f"an input with {imgs.shape[1]} channels for kernelChannels {kc} x nGroups {g}")
    y = conv2d(pad_hw(imgs, t, b, left, r), ctx.weight("weights").reshape(oc, kc, kh, kw), g, (sh, sw), (dh, dw))
    if p.hasBias:
        y = y + ctx.weight("bias").reshape(1, oc, 1, 1)
    return y.reshape(lead + y.shape[1:])


def pooling(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    kind = ("MAX", "AVERAGE", "L2")[int(p.type)]
    imgs, lead = as_images(x)
    if p.globalPooling:
        reduce = {"MAX": lambda a: a.max(axis=(2, 3), keepdims=True), "AVERAGE": lambda a: a.mean(axis=(2, 3), keepdims=True),
                  "L2": lambda a: np.sqrt((a**2).sum(axis=(2, 3), keepdims=True))}[kind]
        y = reduce(imgs)
        return y.reshape(lead + y.shape[1:])
    kh, kw = _pair(p.kernelSize, 3)
    sh, sw = _pair(p.stride, 1)
    pad = p.WhichOneof("PoolingPaddingType")
    if pad == "same":
        t, b = same_pad(imgs.shape[2], kh, sh, 1)
        left, r = same_pad(imgs.shape[3], kw, sw, 1)
    elif pad == "valid":
        t, b, left, r = _pad_amounts(p.valid)
    else:
        raise ctx.unsupported(f"pooling padding {pad}")
    fill = -np.inf if kind == "MAX" else 0.0
    win = windows(pad_hw(imgs, t, b, left, r, fill), kh, kw, sh, sw)
    if kind == "MAX":
        y = win.max(axis=(2, 3))
    elif kind == "L2":
        y = np.sqrt((win**2).sum(axis=(2, 3)))
    else:
        total = win.sum(axis=(2, 3))
        if p.avgPoolExcludePadding and (t or b or left or r):
            ones = windows(pad_hw(np.ones((1, 1) + imgs.shape[2:], np.float32), t, b, left, r), kh, kw, sh, sw).sum(axis=(2, 3))
            y = total / ones
        else:
            y = total / (kh * kw)
    return y.reshape(lead + y.shape[1:])


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# activation kind -> f(x, alpha, beta, weights); alpha/beta from the sub-message, weights for PReLU & co.
ACTIVATIONS = {
    "linear": lambda x, a, b, w: a * x + b,
    "ReLU": lambda x, a, b, w: np.maximum(x, 0),
    "leakyReLU": lambda x, a, b, w: np.where(x >= 0, x, a * x),
    "thresholdedReLU": lambda x, a, b, w: np.where(x >= a, x, 0.0),
    "tanh": lambda x, a, b, w: np.tanh(x),
    "scaledTanh": lambda x, a, b, w: a * np.tanh(b * x),
    "sigmoid": lambda x, a, b, w: _sigmoid(x),
    "sigmoidHard": lambda x, a, b, w: np.clip(a * x + b, 0, 1),
    "ELU": lambda x, a, b, w: np.where(x >= 0, x, a * (np.exp(np.minimum(x, 0)) - 1)),
    "softsign": lambda x, a, b, w: x / (1 + np.abs(x)),
    "softplus": lambda x, a, b, w: np.logaddexp(0, x),
    "PReLU": lambda x, a, b, w: np.where(x >= 0, x, _channel_param(w["PReLU.alpha"], x) * x),
    "parametricSoftplus": lambda x, a, b, w: _channel_param(w["parametricSoftplus.alpha"], x)
    * np.logaddexp(0, _channel_param(w["parametricSoftplus.beta"], x) * x),
}


def activation(ctx: Ctx, ins):
    from .messages import activation_params

    kind = ctx.params.WhichOneof("NonlinearityType")
    fn = ACTIVATIONS.get(kind)
    if fn is None:
        raise ctx.unsupported(f"activation {kind}")
    a = activation_params(ctx.params, kind)
    return fn(ins[0], a.get("alpha", 0.0), a.get("beta", 0.0), ctx.weights)


def inner_product(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    ic, oc = int(p.inputChannels), int(p.outputChannels)
    w = ctx.weight("weights").reshape(oc, ic)
    if x.ndim - 1 >= 3:  # [..., C, H, W] with C*H*W input values per position
        lead = x.shape[:-3]
        flat = x.reshape(lead + (-1,))
        tail = (1, 1)
    else:  # ND rank 1 or 2: on the last axis
        lead, flat, tail = x.shape[:-1], x, ()
    if flat.shape[-1] != ic:
        raise ctx.unsupported(f"an input of {flat.shape[-1]} values per position for inputChannels {ic}")
    y = flat @ w.T
    if p.hasBias:
        y = y + ctx.weight("bias")
    return y.reshape(lead + (oc,) + tail)


def batchnorm(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    if p.computeMeanVar or p.instanceNormalization:
        mean = x.mean(axis=(-2, -1), keepdims=True)
        var = x.var(axis=(-2, -1), keepdims=True)
    else:
        mean, var = _channel_param(ctx.weight("mean"), x), _channel_param(ctx.weight("variance"), x)
    return (x - mean) / np.sqrt(var + p.epsilon) * _channel_param(ctx.weight("gamma"), x) + _channel_param(ctx.weight("beta"), x)


def _shaped(values: np.ndarray, dims) -> np.ndarray:
    """A scale/bias parameter of shape [1], [C] or [C, H, W], aligned with the last three axes."""
    dims = [int(d) for d in dims]
    if dims in ([1], []):
        return values.reshape(())
    if len(dims) == 1:
        return values.reshape(dims[0], 1, 1)
    return values.reshape(dims)


def scale(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    y = x * _shaped(ctx.weight("scale"), p.shapeScale)
    if p.hasBias:
        y = y + _shaped(ctx.weight("bias"), p.shapeBias)
    return y


def bias(ctx: Ctx, ins):
    return ins[0] + _shaped(ctx.weight("bias"), ctx.params.shape)


def softmax(ctx: Ctx, ins):
    x = ins[0]
    e = np.exp(x - x.max(axis=-3, keepdims=True))
    return e / e.sum(axis=-3, keepdims=True)


def flatten(ctx: Ctx, ins):
    x = ins[0]
    lead = x.shape[:-3]
    if int(ctx.params.mode) == 1:  # CHANNEL_LAST
        x = np.moveaxis(x, -3, -1)
    return x.reshape(lead + (-1, 1, 1))


def reshape(ctx: Ctx, ins):
    x = ins[0]
    if ctx.nd or x.ndim != 5:
        raise ctx.unsupported("reshape outside a rank-5 network (use reshapeStatic)")
    n = x.shape[0]
    target = [int(d) for d in ctx.params.targetShape]
    if len(target) == 3:
        target = [x.shape[1]] + target
    if int(ctx.params.mode) == 1:  # CHANNEL_LAST
        flat = x.transpose(0, 1, 3, 4, 2).reshape(n, -1)
        s, c, h, w = target
        return flat.reshape(n, s, h, w, c).transpose(0, 1, 4, 2, 3)
    return x.reshape(n, *target)


def permute(ctx: Ctx, ins):
    x = ins[0]
    if x.ndim != 5:
        raise ctx.unsupported("permute of a tensor that is not rank 5 (use transpose)")
    axes = [int(a) for a in ctx.params.axis]  # a permutation of [Seq, C, H, W]
    return x.transpose(0, *[a + 1 for a in axes])


def concat(ctx: Ctx, ins):
    return np.concatenate(ins, axis=-5 if ctx.params.sequenceConcat else -3)


def add(ctx: Ctx, ins):
    y = ins[0]
    for other in ins[1:]:
        y = y + other
    return y + ctx.params.alpha if len(ins) == 1 else y


def multiply(ctx: Ctx, ins):
    y = ins[0]
    for other in ins[1:]:
        y = y * other
    return y * ctx.params.alpha if len(ins) == 1 else y


def embedding(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    idx = x.reshape(x.shape[:-3]).astype(np.int64)  # (..., 1, 1, 1) ids
    table = ctx.weight("weights").reshape(int(p.outputChannels), int(p.inputDim))
    if idx.size and (idx.min() < 0 or idx.max() >= table.shape[1]):
        raise ctx.unsupported("an index outside the embedding's inputDim")
    y = table.T[idx]
    if p.hasBias:
        y = y + ctx.weight("bias")
    return y[..., None, None]


LAYERS = {
    "convolution": convolution,
    "pooling": pooling,
    "activation": activation,
    "innerProduct": inner_product,
    "batchnorm": batchnorm,
    "scale": scale,
    "bias": bias,
    "softmax": softmax,
    "flatten": flatten,
    "reshape": reshape,
    "permute": permute,
    "concat": concat,
    "add": add,
    "multiply": multiply,
    "embedding": embedding,
}
