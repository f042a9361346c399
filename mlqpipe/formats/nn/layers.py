"""Where the weights live in each layer type, and what shape the layer's parameters give them.

One table for the whole package: the inventory, the compatibility API, folding and the validity check all
read weights through `weight_slots`, so a layer type is described once.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Callable, Iterator

# Layer types whose weights coremltools' quantize_weights touches (QuantizedLayerSelector's list without
# the container types and its unused "depthwiseConv" name).
COREMLTOOLS_WEIGHT_TYPES = frozenset(
    "convolution innerProduct embedding embeddingND batchnorm scale bias loadConstant loadConstantND "
    "simpleRecurrent gru uniDirectionalLSTM biDirectionalLSTM batchedMatmul".split()
)
# QuantizedLayerSelector's quantizable_layer_types in coremltools (container types and its unused
# "depthwiseConv" name included): the names its selectors accept.
COREMLTOOLS_SELECTOR_TYPES = COREMLTOOLS_WEIGHT_TYPES | {"depthwiseConv", "loop", "branch"}
NESTED_NETWORKS = {"branch": ("ifBranch", "elseBranch"), "loop": ("conditionNetwork", "bodyNetwork")}


@dataclass(frozen=True)
class Slot:
    """One WeightParams of a layer.

    field: the WeightParams field name ("weights", "bias", "gamma", "inputGateWeightMatrix", ...).
    path: where it sits inside the layer's parameters ("weightParams[1].inputGateBiasVector").
    shape: logical shape from the layer's parameters; None when the layer does not say (custom layers).
    axis: output-channel axis for per-channel scales; None for per-tensor (1-D blobs).
    expected: whether the layer's flags say this blob must hold data (hasBias and friends).
    coremltools: whether coremltools' quantize_weights quantizes this blob.
    """

    field: str
    path: str
    wp: Any
    shape: tuple[int, ...] | None
    axis: int | None
    expected: bool = True
    coremltools: bool = True
    in_channels: int | None = None
    out_channels: int | None = None
    groups: int = 1

    @property
    def is_bias(self) -> bool:
        return self.field in ("bias", "biasVector") or self.field.endswith("BiasVector")


def layer_type(layer) -> str | None:
    return layer.WhichOneof("layer")


def weight_slots(layer) -> list[Slot]:
    """Every WeightParams of `layer` with its logical shape, in the layer's field order."""
    kind = layer_type(layer)
    describe = _DESCRIBERS.get(kind)
    return describe(getattr(layer, kind)) if describe else []


def nested_networks(layer) -> Iterator[tuple[str, Any]]:
    kind = layer_type(layer)
    for name in NESTED_NETWORKS.get(kind, ()):
        params = getattr(layer, kind)
        if params.HasField(name):
            yield name, getattr(params, name)


def _u(v: int) -> int:
    return int(v)


def _convolution(p) -> list[Slot]:
    oc, kc = _u(p.outputChannels), _u(p.kernelChannels)
    kh, kw = (list(p.kernelSize) + [3, 3])[:2] if len(p.kernelSize) else (3, 3)
    groups = _u(p.nGroups) or 1
    if p.isDeconvolution:
        shape, axis, inputs = (kc, oc // groups, kh, kw), 1, kc
    else:
        shape, axis, inputs = (oc, kc, kh, kw), 0, kc * groups
    io = dict(in_channels=inputs, out_channels=oc, groups=groups)
    return [
        Slot("weights", "weights", p.weights, shape, axis, **io),
        Slot("bias", "bias", p.bias, (oc,), None, expected=p.hasBias, **io),
    ]


def _matrix(in_attr: str, out_attr: str) -> Callable[[Any], list[Slot]]:
    """Layers holding one [out, in] matrix and an optional [out] bias."""

    def describe(p) -> list[Slot]:
        i, o = _u(getattr(p, in_attr)), _u(getattr(p, out_attr))
        io = dict(in_channels=i, out_channels=o)
        return [
            Slot("weights", "weights", p.weights, (o, i), 0, **io),
            Slot("bias", "bias", p.bias, (o,), None, expected=p.hasBias, **io),
        ]

    return describe


def _vectors(*fields: str, size: Callable[[Any], int]) -> Callable[[Any], list[Slot]]:
    def describe(p) -> list[Slot]:
        return [Slot(f, f, getattr(p, f), (size(p),), None) for f in fields]

    return describe


def _scale(p) -> list[Slot]:
    return [
        Slot("scale", "scale", p.scale, (prod(p.shapeScale),), None),
        Slot("bias", "bias", p.bias, (prod(p.shapeBias),), None, expected=p.hasBias),
    ]


def _recurrent_set(p, prefix: str, gates: list[str], i: int, o: int, has_bias: bool, peep: bool, where=None):
    slots = []
    owner = where if where is not None else p
    io = dict(in_channels=i, out_channels=o)
    for g in gates:
        slots.append(Slot(f"{g}WeightMatrix", f"{prefix}{g}WeightMatrix", getattr(owner, f"{g}WeightMatrix"), (o, i), 0, **io))
    for g in gates:
        slots.append(Slot(f"{g}RecursionMatrix", f"{prefix}{g}RecursionMatrix", getattr(owner, f"{g}RecursionMatrix"), (o, o), 0, **io))
    for g in gates:
        slots.append(Slot(f"{g}BiasVector", f"{prefix}{g}BiasVector", getattr(owner, f"{g}BiasVector"), (o,), None, expected=has_bias, **io))
    return slots


_LSTM_GATES = ["inputGate", "forgetGate", "blockInput", "outputGate"]
_PEEPHOLES = ["inputGatePeepholeVector", "forgetGatePeepholeVector", "outputGatePeepholeVector"]


def _lstm_weights(wp, prefix: str, i: int, o: int, params) -> list[Slot]:
    slots = _recurrent_set(None, prefix, _LSTM_GATES, i, o, params.hasBiasVectors, False, where=wp)
    for f in _PEEPHOLES:
        slots.append(
            Slot(f, prefix + f, getattr(wp, f), (o,), None, expected=params.hasPeepholeVectors, in_channels=i, out_channels=o)
        )
    return slots


def _uni_lstm(p) -> list[Slot]:
    return _lstm_weights(p.weightParams, "weightParams.", _u(p.inputVectorSize), _u(p.outputVectorSize), p.params)


def _bi_lstm(p) -> list[Slot]:
    slots = []
    for n, wp in enumerate(p.weightParams):
        slots += _lstm_weights(wp, f"weightParams[{n}].", _u(p.inputVectorSize), _u(p.outputVectorSize), p.params)
    return slots


def _gru(p) -> list[Slot]:
    gates = ["updateGate", "resetGate", "outputGate"]
    return _recurrent_set(p, "", gates, _u(p.inputVectorSize), _u(p.outputVectorSize), p.hasBiasVectors, False)


def _simple_recurrent(p) -> list[Slot]:
    i, o = _u(p.inputVectorSize), _u(p.outputVectorSize)
    io = dict(in_channels=i, out_channels=o)
    return [
        Slot("weightMatrix", "weightMatrix", p.weightMatrix, (o, i), 0, **io),
        Slot("recursionMatrix", "recursionMatrix", p.recursionMatrix, (o, o), 0, **io),
        Slot("biasVector", "biasVector", p.biasVector, (o,), None, expected=p.hasBiasVector, **io),
    ]


def _activation(p) -> list[Slot]:
    kind = p.WhichOneof("NonlinearityType")
    if kind == "PReLU":
        return [Slot("alpha", "PReLU.alpha", p.PReLU.alpha, None, None, coremltools=False)]
    if kind == "parametricSoftplus":
        ps = p.parametricSoftplus
        return [
            Slot("alpha", "parametricSoftplus.alpha", ps.alpha, None, None, coremltools=False),
            Slot("beta", "parametricSoftplus.beta", ps.beta, None, None, coremltools=False),
        ]
    return []


def _layer_norm(p) -> list[Slot]:
    n = prod(int(v) for v in p.normalizedShape)
    return [Slot(f, f, getattr(p, f), (n,), None, coremltools=False) for f in ("gamma", "beta")]


def _convolution3d(p) -> list[Slot]:
    oc, ic, groups = int(p.outputChannels), int(p.inputChannels), int(p.nGroups) or 1
    k = (int(p.kernelDepth), int(p.kernelHeight), int(p.kernelWidth))
    if p.isDeconvolution:
        shape, axis = (ic, oc // groups) + k, None
    else:
        shape, axis = (oc, ic // groups) + k, 0
    io = dict(in_channels=ic, out_channels=oc, groups=groups, coremltools=False)
    return [
        Slot("weights", "weights", p.weights, shape, axis, **io),
        Slot("bias", "bias", p.bias, (oc,), None, expected=p.hasBias, **io),
    ]


def _custom(p) -> list[Slot]:
    return [Slot("weights", f"weights[{n}]", wp, None, None, coremltools=False) for n, wp in enumerate(p.weights)]


_DESCRIBERS: dict[str, Callable[[Any], list[Slot]]] = {
    "convolution": _convolution,
    "innerProduct": _matrix("inputChannels", "outputChannels"),
    "batchedMatmul": _matrix("weightMatrixFirstDimension", "weightMatrixSecondDimension"),
    "embedding": _matrix("inputDim", "outputChannels"),
    "embeddingND": _matrix("vocabSize", "embeddingSize"),
    "batchnorm": _vectors("gamma", "beta", "mean", "variance", size=lambda p: _u(p.channels)),
    "scale": _scale,
    "bias": _vectors("bias", size=lambda p: prod(p.shape)),
    "loadConstant": _vectors("data", size=lambda p: prod(p.shape)),
    "loadConstantND": _vectors("data", size=lambda p: prod(p.shape)),
    "simpleRecurrent": _simple_recurrent,
    "gru": _gru,
    "uniDirectionalLSTM": _uni_lstm,
    "biDirectionalLSTM": _bi_lstm,
    "activation": _activation,
    "layerNormalization": _layer_norm,
    "convolution3d": _convolution3d,
    "custom": _custom,
}
