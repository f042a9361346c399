"""Folding batchnorm, scale and bias layers into the layer before them.

coremltools folds before quantizing below 16 bits; this module makes the same folds, in the same order (so
the bytes match where its fold is right), and differs where its fold is wrong:
- convolution -> batchnorm is computed per output channel (coremltools broadcasts to C x C x K and raises);
- a scale without bias still scales the previous layer's bias; one-value scales and biases are broadcast
  to every channel instead of leaving a one-value bias behind;
- deconvolution weights are scaled in their own layout ([in, out/groups, kH, kW], per group);
- float16 blobs are rewritten as float32 (coremltools leaves float16Value set beside the new floatValue);
- nothing is folded when the intermediate result is also used elsewhere (a model output, a sub-network, a
  second reader), when either layer is updatable or already quantized, or when shapes do not line up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.nn.structure import iter_layers
from mlqpipe.formats.nn.layers import layer_type, nested_networks, weight_slots
from mlqpipe.formats.nn.structure import neural_networks, output_names
from mlqpipe.formats.nn.weights import read_values, storage_of, write_float32


@dataclass(frozen=True)
class Fold:
    network: str
    into: str
    removed: str
    kind: str  # "batchnorm", "scale" or "bias"


ALL_KINDS = ("batchnorm", "scale", "bias")


def fold_model(spec, kinds=ALL_KINDS) -> list[Fold]:
    """Fold every foldable pair in every neural network of `spec` (in place); returns what was folded.

    `kinds` limits which layer types are folded away (batchnorm, scale, bias)."""
    folds: list[Fold] = []
    protected = output_names(spec)
    for model_path, _, nn in neural_networks(spec):
        uses = blob_uses(nn)
        networks = [("", nn)] + [(f"{p}{l.name}.{name}/", n) for p, _, l in iter_layers(nn) for name, n in nested_networks(l)]
        for net_path, network in networks:
            folds += fold_network(network, protected, uses, f"{model_path}{net_path}", tuple(kinds))
    return folds


def blob_uses(nn) -> Counter:
    """How many times each blob name is read anywhere in the network tree."""
    uses: Counter = Counter()
    for _, _, layer in iter_layers(nn):
        uses.update(layer.input)
    return uses


def fold_network(network, protected: set[str], uses: Counter, where: str = "", kinds=ALL_KINDS) -> list[Fold]:
    """coremltools' folding loop: find the first foldable pair, fold it, start again."""
    folds = []
    while True:
        found = _next_fold(network.layers, protected, uses, kinds)
        if found is None:
            return folds
        first, second, kind = found
        layers = network.layers
        into, removed = layers[first], layers[second]
        _FOLDERS[kind](into, removed)
        folds.append(Fold(where, into.name, removed.name, layer_type(removed)))
        del into.output[:]
        into.output.extend(removed.output)
        del layers[second]


def _next_fold(layers, protected, uses, kinds=ALL_KINDS):
    consumers, producers = _graph(layers)
    types = [layer_type(l) for l in layers]
    batchnorms = {i for i, t in enumerate(types) if t == "batchnorm" and not layers[i].batchnorm.instanceNormalization}
    order = (
        ("convolution", ("batchnorm", "scale", "bias")),
        ("innerProduct", ("scale", "bias")),
        ("batchnorm", ("scale",)),
    )
    for producer_kind, targets in order:
        for i, kind in enumerate(types):
            if kind != producer_kind or (kind == "batchnorm" and i not in batchnorms):
                continue
            if len(consumers[i]) != 1:
                continue
            j = consumers[i][0]
            if len(producers[j]) != 1:
                continue
            target = types[j]
            if target == "batchnorm" and j not in batchnorms:
                continue
            if target in targets and target in kinds:  # kinds: what the caller allows to be folded away
                fold_kind = f"{producer_kind}+{target}"
                if _safe(layers[i], layers[j], fold_kind, protected, uses):
                    return i, j, fold_kind
    return None


def _graph(layers):
    outputs = [set(l.output) for l in layers]
    inputs = [set(l.input) for l in layers]
    n = len(layers)
    consumers = [[c for c in range(n) if outputs[p] & inputs[c]] for p in range(n)]
    producers = [[p for p in range(n) if outputs[p] & inputs[c]] for c in range(n)]
    return consumers, producers


def _safe(first, second, kind, protected, uses) -> bool:
    if len(first.output) != 1 or len(second.input) != 1 or second.input[0] != first.output[0]:
        return False
    blob = first.output[0]
    if blob in protected or uses[blob] != 1:
        return False
    if first.isUpdatable or second.isUpdatable:
        return False
    for s in weight_slots(first) + weight_slots(second):
        st = storage_of(s.wp)
        if st.kind not in ("float32", "float16", "empty") or s.wp.isUpdatable:
            return False
    return _SHAPE_OK[kind](first, second)


def _channels(layer) -> int:
    return int(getattr(layer, layer_type(layer)).outputChannels) if layer_type(layer) != "batchnorm" else int(layer.batchnorm.channels)


def _per_channel(shape, channels: int) -> bool:
    dims = [int(d) for d in shape]
    return dims in ([1], [channels], [channels, 1, 1])


def _scale_ok(first, second) -> bool:
    c = _channels(first)
    s = second.scale
    return _per_channel(s.shapeScale, c) and (not s.hasBias or _per_channel(s.shapeBias, c))


_SHAPE_OK = {
    "convolution+batchnorm": lambda a, b: int(b.batchnorm.channels) == _channels(a) and not b.batchnorm.computeMeanVar,
    "convolution+scale": _scale_ok,
    "convolution+bias": lambda a, b: _per_channel(b.bias.shape, _channels(a)),
    "innerProduct+scale": _scale_ok,
    "innerProduct+bias": lambda a, b: _per_channel(b.bias.shape, _channels(a)),
    "batchnorm+scale": _scale_ok,
}


# --- the folds themselves -------------------------------------------------------------------------------


def _values(slot) -> np.ndarray:
    count = int(np.prod(slot.shape))
    if count and storage_of(slot.wp).kind == "empty":  # Core ML rejects such a layer; a fold cannot invent values
        raise ModelError(f"{slot.path}: empty, but the layer's parameters need {count} values: Core ML rejects this "
                         "model, and folding it would invent numbers (fix the input model)")
    return read_values(slot.wp, int(np.prod(slot.shape)), slot.path, shape=slot.shape, axis=slot.axis)


def _slots(layer) -> dict:
    """The layer's blobs by field, their paths prefixed with the layer name (for error messages)."""
    return {s.field: replace(s, path=f"{layer.name}:{s.path}") for s in weight_slots(layer)}


def _scale_weights(layer, per_channel: np.ndarray) -> np.ndarray:
    """Multiply each output channel of a convolution / innerProduct weight blob by a factor (float32 math)."""
    params = getattr(layer, layer_type(layer))
    slot = _slots(layer)["weights"]
    w = _values(slot)
    oc = int(params.outputChannels)
    s = np.broadcast_to(np.asarray(per_channel, dtype=np.float32), (oc,))
    if layer_type(layer) == "convolution" and params.isDeconvolution:
        groups = slot.groups
        kc = slot.shape[0]
        w = w.reshape(groups, kc // groups, oc // groups, -1) * s.reshape(groups, 1, oc // groups, 1)
    elif np.size(per_channel) == 1:
        w = w.reshape(oc, -1) * np.asarray(per_channel, dtype=np.float32).reshape(1, 1)
    else:
        w = w.reshape(oc, -1) * s[:, None]
    return w.astype(np.float32).ravel()


def _set_bias(layer, bias: np.ndarray) -> None:
    params = getattr(layer, layer_type(layer))
    write_float32(params.bias, bias)
    params.hasBias = True


def _float32_rest(layer) -> None:
    """Keep one precision per layer: rewrite any remaining float16 blob of the folded layer as float32."""
    for slot in _slots(layer).values():
        if storage_of(slot.wp).kind == "float16":
            write_float32(slot.wp, _values(slot))


def _layer_bias(layer):
    params = getattr(layer, layer_type(layer))
    return _values(_slots(layer)["bias"]) if params.hasBias else None


def _fold_scale(first, second) -> None:
    sc = second.scale
    oc = _channels(first)
    s = _values(_slots(second)["scale"])
    sb = _values(_slots(second)["bias"]) if sc.hasBias else None
    lb = _layer_bias(first)
    new_w = _scale_weights(first, s)
    write_float32(getattr(first, layer_type(first)).weights, new_w)
    if lb is not None:
        bias = s * lb + sb if sb is not None else s * lb
        _set_bias(first, np.broadcast_to(bias, (oc,)))
    elif sb is not None:
        _set_bias(first, np.broadcast_to(sb, (oc,)))
    _float32_rest(first)


def _fold_bias(first, second) -> None:
    oc = _channels(first)
    bb = _values(_slots(second)["bias"])
    lb = _layer_bias(first)
    _set_bias(first, np.broadcast_to(lb + bb if lb is not None else bb, (oc,)))
    _float32_rest(first)


def _fold_batchnorm(first, second) -> None:
    bn = second.batchnorm
    p = {f: _values(s).astype(np.float64) for f, s in _slots(second).items()}
    oc = _channels(first)
    factor = p["gamma"] / np.sqrt(p["variance"] + np.float64(bn.epsilon))
    lb = _layer_bias(first)
    lb = np.zeros(oc) if lb is None else lb.astype(np.float64)
    w = _values(_slots(first)["weights"]).astype(np.float64)
    conv = first.convolution
    if conv.isDeconvolution:
        g = int(conv.nGroups) or 1
        kc = int(conv.kernelChannels)
        w = w.reshape(g, kc // g, oc // g, -1) * factor.reshape(g, 1, oc // g, 1)
    else:
        w = w.reshape(oc, -1) * factor[:, None]
    write_float32(conv.weights, w.astype(np.float32).ravel())
    _set_bias(first, ((lb - p["mean"]) * factor + p["beta"]).astype(np.float32))
    _float32_rest(first)


def _fold_bn_scale(first, second) -> None:
    sc = second.scale
    bn = first.batchnorm
    s = _values(_slots(second)["scale"])
    c = int(bn.channels)
    slots = _slots(first)
    gamma = _values(slots["gamma"]) * s
    beta = _values(slots["beta"]) * s
    if sc.hasBias:
        beta = beta + _values(_slots(second)["bias"])
    write_float32(bn.gamma, np.broadcast_to(gamma, (c,)))
    write_float32(bn.beta, np.broadcast_to(beta, (c,)))
    _float32_rest(first)


_FOLDERS = {
    "convolution+batchnorm": _fold_batchnorm,
    "convolution+scale": _fold_scale,
    "convolution+bias": _fold_bias,
    "innerProduct+scale": _fold_scale,
    "innerProduct+bias": _fold_bias,
    "batchnorm+scale": _fold_bn_scale,
}
