"""A numpy forward pass for classic Core ML neural networks, so quantized models can be tested on Linux.

Tensors follow Core ML's rank-5 layout for neuralNetwork layers, [Seq, Batch, C, H, W]; we carry a batch of
N samples as (N, Seq, C, H, W) and run every layer vectorised over N. Weights are read through the inventory
(dequantized when stored quantized), so the same code evaluates the float and the quantized model.
A layer type or setting this module does not implement raises `Unsupported` naming the layer: the caller
reports the model as "not evaluated" — never a silent pass.
"""

from __future__ import annotations

import numpy as np

from ..coreml.inventory import iter_layers, layer_records
from ..coreml.weights import holds_values


class Unsupported(Exception):
    """The evaluator cannot run this layer (type or setting); the message names it."""


def _weights(model_path, net_path, network, layer, model_spec, channels: int | None = None) -> dict:
    """The layer's blobs by slot path. A quantized blob whose size the layer does not say (PReLU and
    parametricSoftplus take 1 or C values, C the input's channels) is read as C values when its bytes hold
    that many, else as one."""
    out = {}
    for r in layer_records(model_path, net_path, network, layer, model_spec):
        count = None
        if not r.count and r.storage.is_quantized and channels:
            count = channels if holds_values(r.wp, r.storage, channels) else 1
        out[r.slot_path] = r.values(count=count)
    return out


def run_network(nn, model_spec, feeds: dict[str, np.ndarray], model_path: str = "") -> dict[str, np.ndarray]:
    """Run every layer of `nn` in order; returns every blob (inputs included)."""
    blobs = dict(feeds)
    for net_path, network, layer in iter_layers(nn):
        if net_path:
            raise Unsupported(f"layer '{layer.name}' lives in a sub-network ({net_path.rstrip('/')}); branch/loop are not evaluated")
        kind = layer.WhichOneof("layer")
        fn = _LAYERS.get(kind)
        if fn is None:
            raise Unsupported(f"layer '{layer.name}' of type {kind} is not implemented by mlqpipe's evaluator")
        missing = [i for i in layer.input if i not in blobs]
        if missing and kind != "uniDirectionalLSTM":
            raise Unsupported(f"layer '{layer.name}': input blob {missing[0]!r} is not available")
        first = blobs.get(layer.input[0]) if layer.input else None
        w = _weights(model_path, net_path, network, layer, model_spec, first.shape[2] if getattr(first, "ndim", 0) == 5 else None)
        params = getattr(layer, kind)
        if isinstance(params, bytes):
            from .messages import LAYER_PARAMS

            params = LAYER_PARAMS[kind].FromString(params)
        outs = fn(params, [blobs.get(i) for i in layer.input], w, layer)
        for name, value in zip(layer.output, outs if isinstance(outs, (list, tuple)) else [outs]):
            blobs[name] = value.astype(np.float32)
    return blobs


# --- helpers ---------------------------------------------------------------------------------------------


def _pad_amounts(valid) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from a ValidPadding message kept as bytes (paddingAmounts.borderAmounts)."""
    from .messages import ValidPadding

    msg = ValidPadding.FromString(valid)
    b = list(msg.paddingAmounts.borderAmounts)
    if not b:
        return 0, 0, 0, 0
    h = b[0] if len(b) > 0 else None
    wv = b[1] if len(b) > 1 else None
    return (int(h.startEdgeSize), int(h.endEdgeSize), int(wv.startEdgeSize) if wv else 0, int(wv.endEdgeSize) if wv else 0)


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2  # bottom/right heavy, Core ML's default for 'same'


def _patches(x, kh, kw, sh, sw, dh, dw):
    """(N, S, C, H, W) -> (N, S, C, kh, kw, OH, OW) sliding windows (views)."""
    n, s, c, h, w = x.shape
    oh = (h - ((kh - 1) * dh + 1)) // sh + 1
    ow = (w - ((kw - 1) * dw + 1)) // sw + 1
    if oh <= 0 or ow <= 0:
        raise Unsupported("kernel larger than its padded input")
    st = x.strides
    return np.lib.stride_tricks.as_strided(
        x, (n, s, c, kh, kw, oh, ow), (st[0], st[1], st[2], st[3] * dh, st[4] * dw, st[3] * sh, st[4] * sw), writeable=False
    )


def _pad(x, top, bottom, left, right, value=0.0):
    if top == bottom == left == right == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


# --- layers ------------------------------------------------------------------------------------------------


def _convolution(p, ins, w, layer):
    x = ins[0]
    if p.isDeconvolution:
        raise Unsupported(f"layer '{layer.name}': deconvolution is not implemented by mlqpipe's evaluator")
    oc, kc, g = int(p.outputChannels), int(p.kernelChannels), int(p.nGroups) or 1
    kh, kw = (list(p.kernelSize) + [3, 3])[:2] if len(p.kernelSize) else (3, 3)
    sh, sw = (list(p.stride) + [1, 1])[:2] if len(p.stride) else (1, 1)
    dh, dw = (list(p.dilationFactor) + [1, 1])[:2] if len(p.dilationFactor) else (1, 1)
    pad = p.WhichOneof("ConvolutionPaddingType")
    if pad == "same":
        from .messages import SamePadding

        if SamePadding.FromString(p.same).asymmetryMode != 0:
            raise Unsupported(f"layer '{layer.name}': 'same' padding with TOP_LEFT_HEAVY is not implemented by mlqpipe's evaluator")
        t, b = _same_pad(x.shape[3], kh, sh, dh)
        l, r = _same_pad(x.shape[4], kw, sw, dw)
    else:
        t, b, l, r = _pad_amounts(p.valid) if p.HasField("valid") else (0, 0, 0, 0)
    x = _pad(x, t, b, l, r)
    patches = _patches(x, kh, kw, sh, sw, dh, dw)  # N S C kh kw OH OW
    weights = w["weights"].reshape(oc, kc, kh, kw)
    n, s, c = patches.shape[:3]
    outs = []
    for gi in range(g):  # a handful of groups at most; each is one tensordot
        pc = patches[:, :, gi * kc : (gi + 1) * kc]
        wg = weights[gi * (oc // g) : (gi + 1) * (oc // g)]
        outs.append(np.einsum("nsckluv,ockl->nsouv", pc, wg, optimize=True))
    y = np.concatenate(outs, axis=2)
    if p.hasBias:
        y = y + w["bias"].reshape(1, 1, oc, 1, 1)
    return y


def _pooling(p, ins, w, layer):
    x = ins[0]
    kind = ("MAX", "AVERAGE", "L2")[int(p.type)]
    if p.globalPooling:
        if kind == "MAX":
            return x.max(axis=(3, 4), keepdims=True)
        if kind == "AVERAGE":
            return x.mean(axis=(3, 4), keepdims=True)
        return np.sqrt((x**2).sum(axis=(3, 4), keepdims=True))
    kh, kw = (list(p.kernelSize) + [3, 3])[:2] if len(p.kernelSize) else (3, 3)
    sh, sw = (list(p.stride) + [1, 1])[:2] if len(p.stride) else (1, 1)
    pad = p.WhichOneof("PoolingPaddingType")
    if pad == "same":
        t, b = _same_pad(x.shape[3], kh, sh, 1)
        l, r = _same_pad(x.shape[4], kw, sw, 1)
    elif pad == "valid":
        t, b, l, r = _pad_amounts(p.valid)
    else:
        raise Unsupported(f"layer '{layer.name}': pooling padding {pad} is not implemented by mlqpipe's evaluator")
    fill = -np.inf if kind == "MAX" else 0.0
    xp = _pad(x, t, b, l, r, fill)
    win = _patches(xp, kh, kw, sh, sw, 1, 1)
    if kind == "MAX":
        return win.max(axis=(3, 4))
    if kind == "L2":
        return np.sqrt((win**2).sum(axis=(3, 4)))
    total = win.sum(axis=(3, 4))
    if p.avgPoolExcludePadding and (t or b or l or r):
        ones = _patches(_pad(np.ones_like(x[:1, :1, :1]), t, b, l, r), kh, kw, sh, sw, 1, 1).sum(axis=(3, 4))
        return total / ones
    return total / (kh * kw)


def _activation(p, ins, w, layer):
    x = ins[0]
    kind = p.WhichOneof("NonlinearityType")
    from .messages import activation_params

    a = activation_params(p, kind)
    if kind == "ReLU":
        return np.maximum(x, 0)
    if kind == "linear":
        return a.get("alpha", 0.0) * x + a.get("beta", 0.0)
    if kind == "leakyReLU":
        return np.where(x >= 0, x, a.get("alpha", 0.0) * x)
    if kind == "thresholdedReLU":
        return np.where(x > a.get("alpha", 0.0), x, 0.0)
    if kind == "tanh":
        return np.tanh(x)
    if kind == "scaledTanh":
        return a.get("alpha", 0.0) * np.tanh(a.get("beta", 0.0) * x)
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if kind == "sigmoidHard":
        return np.clip(a.get("alpha", 0.0) * x + a.get("beta", 0.0), 0, 1)
    if kind == "ELU":
        return np.where(x >= 0, x, a.get("alpha", 0.0) * (np.exp(x) - 1))
    if kind == "softsign":
        return x / (1 + np.abs(x))
    if kind == "softplus":
        return np.logaddexp(0, x)
    if kind == "PReLU":
        alpha = w["PReLU.alpha"].reshape(1, 1, -1, 1, 1)
        return np.where(x >= 0, x, alpha * x)
    if kind == "parametricSoftplus":
        alpha = w["parametricSoftplus.alpha"].reshape(1, 1, -1, 1, 1)
        beta = w["parametricSoftplus.beta"].reshape(1, 1, -1, 1, 1)
        return alpha * np.logaddexp(0, beta * x)
    raise Unsupported(f"layer '{layer.name}': activation {kind} is not implemented by mlqpipe's evaluator")


def _inner_product(p, ins, w, layer):
    x = ins[0]
    n, s = x.shape[:2]
    flat = x.reshape(n, s, -1)
    if flat.shape[2] != int(p.inputChannels):
        raise Unsupported(f"layer '{layer.name}': input has {flat.shape[2]} values per step, innerProduct expects {p.inputChannels}")
    y = flat @ w["weights"].reshape(int(p.outputChannels), -1).T
    if p.hasBias:
        y = y + w["bias"]
    return y.reshape(n, s, -1, 1, 1)


def _batchnorm(p, ins, w, layer):
    x = ins[0]
    shape = (1, 1, -1, 1, 1)
    if p.computeMeanVar or p.instanceNormalization:
        mean = x.mean(axis=(3, 4), keepdims=True)
        var = x.var(axis=(3, 4), keepdims=True)
    else:
        mean, var = w["mean"].reshape(shape), w["variance"].reshape(shape)
    return (x - mean) / np.sqrt(var + p.epsilon) * w["gamma"].reshape(shape) + w["beta"].reshape(shape)


def _broadcast_param(values, shape_field, x):
    dims = [int(d) for d in shape_field]
    if dims in ([1], []):
        return values.reshape(1)
    if len(dims) == 1:
        return values.reshape(1, 1, dims[0], 1, 1)
    return values.reshape(1, 1, *dims)


def _scale(p, ins, w, layer):
    x = ins[0]
    y = x * _broadcast_param(w["scale"], p.shapeScale, x)
    if p.hasBias:
        y = y + _broadcast_param(w["bias"], p.shapeBias, x)
    return y


def _bias(p, ins, w, layer):
    return ins[0] + _broadcast_param(w["bias"], p.shape, ins[0])


def _softmax(p, ins, w, layer):
    x = ins[0]
    e = np.exp(x - x.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def _flatten(p, ins, w, layer):
    x = ins[0]
    n, s, c, h, wd = x.shape
    if int(getattr(p, "mode", 0)) == 1:  # CHANNEL_LAST
        x = x.transpose(0, 1, 3, 4, 2)
    return x.reshape(n, s, c * h * wd, 1, 1)


def _reshape(p, ins, w, layer):
    x = ins[0]
    n = x.shape[0]
    target = [int(d) for d in p.targetShape]
    if len(target) == 3:
        target = [x.shape[1]] + target
    if int(getattr(p, "mode", 0)) == 1:  # CHANNEL_LAST
        flat = x.transpose(0, 1, 3, 4, 2).reshape(n, -1)
        s, c, h, wd = target
        return flat.reshape(n, s, h, wd, c).transpose(0, 1, 4, 2, 3)
    return x.reshape(n, *target)


def _permute(p, ins, w, layer):
    axes = [int(a) for a in p.axis]  # a permutation of [Seq, C, H, W]
    return ins[0].transpose(0, *[a + 1 for a in axes])


def _concat(p, ins, w, layer):
    return np.concatenate(ins, axis=1 if p.sequenceConcat else 2)


def _add(p, ins, w, layer):
    y = ins[0]
    for other in ins[1:]:
        y = y + other
    return y + p.alpha if len(ins) == 1 else y


def _multiply(p, ins, w, layer):
    y = ins[0]
    for other in ins[1:]:
        y = y * other
    return y * p.alpha if len(ins) == 1 else y


def _embedding(p, ins, w, layer):
    idx = ins[0].reshape(ins[0].shape[0], ins[0].shape[1]).astype(np.int64)
    table = w["weights"].reshape(int(p.outputChannels), int(p.inputDim))
    y = table.T[idx]  # N S out
    if p.hasBias:
        y = y + w["bias"]
    return y[..., None, None]


def _lstm(p, ins, w, layer):
    from .messages import lstm_activations

    x = ins[0]
    n, s = x.shape[:2]
    i_size, o = int(p.inputVectorSize), int(p.outputVectorSize)
    xs = x.reshape(n, s, -1)
    if xs.shape[2] != i_size:
        raise Unsupported(f"layer '{layer.name}': LSTM input has {xs.shape[2]} values per step, expects {i_size}")
    h = ins[1].reshape(n, o) if len(ins) > 1 and ins[1] is not None else np.zeros((n, o), np.float32)
    c = ins[2].reshape(n, o) if len(ins) > 2 and ins[2] is not None else np.zeros((n, o), np.float32)
    f_gate, g_act, h_act = lstm_activations(p.activations, layer)
    pre = "weightParams."
    W = {g: w[f"{pre}{g}WeightMatrix"].reshape(o, i_size) for g in ("inputGate", "forgetGate", "blockInput", "outputGate")}
    R = {g: w[f"{pre}{g}RecursionMatrix"].reshape(o, o) for g in W}
    b = {g: (w[f"{pre}{g}BiasVector"] if p.params.hasBiasVectors else np.zeros(o, np.float32)) for g in W}
    peep = p.params.hasPeepholeVectors
    clip = p.params.cellClipThreshold or 50000.0
    order = range(s - 1, -1, -1) if p.reverseInput else range(s)
    seq = []
    for t in order:  # time steps: a recurrence cannot be vectorised over t
        xt = xs[:, t]
        i_t = xt @ W["inputGate"].T + h @ R["inputGate"].T + b["inputGate"]
        f_t = xt @ W["forgetGate"].T + h @ R["forgetGate"].T + b["forgetGate"]
        if peep:
            i_t = i_t + c * w[f"{pre}inputGatePeepholeVector"]
            f_t = f_t + c * w[f"{pre}forgetGatePeepholeVector"]
        i_t, f_t = f_gate(i_t), f_gate(f_t)
        if p.params.coupledInputAndForgetGate:
            f_t = 1 - i_t
        z_t = g_act(xt @ W["blockInput"].T + h @ R["blockInput"].T + b["blockInput"])
        c = np.clip(f_t * c + i_t * z_t, -clip, clip)
        o_t = xt @ W["outputGate"].T + h @ R["outputGate"].T + b["outputGate"]
        if peep:
            o_t = o_t + c * w[f"{pre}outputGatePeepholeVector"]
        h = f_gate(o_t) * h_act(c)
        seq.append(h)
    y = np.stack(seq, axis=1) if p.params.sequenceOutput else h[:, None]
    return [y[..., None, None], h[:, None, :, None, None], c[:, None, :, None, None]]


_LAYERS = {
    "convolution": _convolution,
    "pooling": _pooling,
    "activation": _activation,
    "innerProduct": _inner_product,
    "batchnorm": _batchnorm,
    "scale": _scale,
    "bias": _bias,
    "softmax": _softmax,
    "flatten": _flatten,
    "reshape": _reshape,
    "permute": _permute,
    "concat": _concat,
    "add": _add,
    "multiply": _multiply,
    "embedding": _embedding,
    "uniDirectionalLSTM": _lstm,
}
