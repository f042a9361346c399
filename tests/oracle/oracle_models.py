"""Test models built with coremltools' protobuf classes, and helpers to run both quantizers on them.

Imported by the oracle test modules after `pytest.importorskip("coremltools")`, so this module may import
coremltools at the top. Every model is deterministic: weights come from numpy's default_rng with fixed
seeds, and every builder returns a fresh `Model_pb2.Model`.

Two families of builders: the zoo's (`new_model`, `conv`, `inner`, ...: declared inputs and outputs,
per-channel ranges) and the plain ones (`plain_model`, `plain_conv`, `plain_inner`, `rnd`: no declared
features, plain normal weights, bias seed = weight seed + 1) that test_oracle_zoo.py builds on.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math

import numpy as np
from coremltools.proto import FeatureTypes_pb2, Model_pb2

import coremltools as ct
import mlqpipe
from coremltools.models.neural_network import quantization_utils as ctq

# ---------------------------------------------------------------------------------------------------------
# running both quantizers


def ct_quantize(spec_bytes: bytes, nbits, mode="linear", **kwargs) -> Model_pb2.Model:
    """coremltools 9.0's quantize_weights on a fresh MLModel made from `spec_bytes`, stdout silenced."""
    model = ct.models.MLModel(Model_pb2.Model.FromString(spec_bytes))
    with contextlib.redirect_stdout(io.StringIO()):
        out = ctq.quantize_weights(model, nbits, mode, **kwargs)
    return out.get_spec() if hasattr(out, "get_spec") else out


def ours_quantize(model, nbits, mode="linear", **kwargs) -> Model_pb2.Model:
    """mlqpipe's quantize_weights; checks the input (bytes or a coremltools spec) is left unchanged."""
    before = _snapshot(model)
    out = mlqpipe.quantize_weights(model, nbits, mode, **kwargs)
    assert _snapshot(model) == before, "mlqpipe.quantize_weights modified its input"
    data = out.SerializeToString()
    assert isinstance(data, bytes)
    return Model_pb2.Model.FromString(data)


def _snapshot(model):
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString(deterministic=True)
    if hasattr(model, "get_spec"):
        return model.get_spec().SerializeToString(deterministic=True)
    return None


def canon(spec) -> bytes:
    return spec.SerializeToString(deterministic=True)


def assert_same(ours, theirs, what: str = "") -> None:
    """Byte equality of two specs (deterministic serialization), with the first difference on failure."""
    if canon(ours) != canon(theirs):
        raise AssertionError(f"{what}: mlqpipe differs from coremltools: {first_difference(ours, theirs)}")


def first_difference(a, b, path: str = "model") -> str:
    """A readable description of the first field where two protobuf messages differ ("" when equal)."""
    fields = sorted({f for f, _ in a.ListFields()} | {f for f, _ in b.ListFields()}, key=lambda f: f.number)
    for f in fields:
        va, vb = getattr(a, f.name), getattr(b, f.name)
        here = f"{path}.{f.name}"
        if _repeated(f):
            if f.message_type is not None and not (f.message_type.GetOptions().map_entry):
                if len(va) != len(vb):
                    return f"{here}: {len(va)} entries (ours) vs {len(vb)} (coremltools)"
                for i, (x, y) in enumerate(zip(va, vb)):
                    d = first_difference(x, y, f"{here}[{_label(x, i)}]")
                    if d:
                        return d
                continue
            la, lb = list(va) if not hasattr(va, "items") else sorted(va.items()), list(vb) if not hasattr(vb, "items") else sorted(vb.items())
            if la != lb:
                if len(la) != len(lb):
                    return f"{here}: {len(la)} values (ours) vs {len(lb)} (coremltools); ours[:6]={la[:6]} theirs[:6]={lb[:6]}"
                i = next(i for i, (x, y) in enumerate(zip(la, lb)) if x != y)
                return f"{here}[{i}]: {la[i]!r} (ours) vs {lb[i]!r} (coremltools); {sum(x != y for x, y in zip(la, lb))} of {len(la)} differ"
            continue
        if f.message_type is not None:
            if a.HasField(f.name) != b.HasField(f.name):
                return f"{here}: set in {'ours' if a.HasField(f.name) else 'coremltools'} only"
            d = first_difference(va, vb, here)
            if d:
                return d
            continue
        if va != vb:
            if isinstance(va, bytes):
                n = min(len(va), len(vb))
                i = next((i for i in range(n) if va[i] != vb[i]), n)
                return f"{here}: {len(va)} bytes (ours) vs {len(vb)}; first difference at byte {i}: {va[i:i + 8].hex()} vs {vb[i:i + 8].hex()}"
            return f"{here}: {va!r} (ours) vs {vb!r} (coremltools)"
    return ""


def _label(msg, i):
    name = getattr(msg, "name", None) if hasattr(msg, "DESCRIPTOR") and "name" in msg.DESCRIPTOR.fields_by_name else None
    return f"{i}:{name}" if name else str(i)


def canonical(data: bytes) -> bytes:
    """Deterministic serialization of serialized model bytes."""
    return Model_pb2.Model.FromString(data).SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------------------
# weights


def rand(shape, seed: int, scale: float = 0.1, channel_axis: int | None = 0) -> np.ndarray:
    """Normal float32 values; when rank >= 2, each channel along `channel_axis` gets its own range."""
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * scale
    if len(shape) >= 2 and channel_axis is not None:
        n = shape[channel_axis]
        factor = np.linspace(0.25, 2.0, n) * rng.choice([-1.0, 1.0], n) + rng.uniform(-0.05, 0.05, n)
        view = [1] * len(shape)
        view[channel_axis] = n
        w = w * np.abs(factor).reshape(view) + (factor * 0.05).reshape(view)
    return w.astype(np.float32)


def positive(shape, seed: int, low=0.5, high=1.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def set_wp(wp, values, fp16: bool = False) -> None:
    values = np.asarray(values, dtype=np.float32).ravel()
    if fp16:
        wp.float16Value = values.astype("<f2").tobytes()
    else:
        wp.floatValue.extend(values.tolist())


def wp_values(wp) -> np.ndarray:
    """Float values of an unquantized WeightParams (float32 or float16)."""
    if len(wp.floatValue):
        return np.asarray(wp.floatValue, dtype=np.float32)
    return np.frombuffer(wp.float16Value, dtype="<f2").astype(np.float32)


def storage_fields(wp) -> list[str]:
    return [f for f in ("floatValue", "float16Value", "rawValue", "int8RawValue") if len(getattr(wp, f))]


# ---------------------------------------------------------------------------------------------------------
# models and layers


def new_model(kind: str = "neuralNetwork", version: int = 1, inputs=("x",), outputs=("y",)) -> Model_pb2.Model:
    m = Model_pb2.Model(specificationVersion=version)
    for name in inputs:
        _array_feature(m.description.input.add(), name)
    if kind == "neuralNetworkClassifier":
        m.neuralNetworkClassifier.int64ClassLabels.vector.extend([0, 1, 2, 3])
        m.neuralNetworkClassifier.labelProbabilityLayerName = outputs[0]
        m.description.predictedFeatureName = "label"
        m.description.predictedProbabilitiesName = "probs"
        out = m.description.output.add(name="probs")
        out.type.dictionaryType.int64KeyType.SetInParent()
        m.description.output.add(name="label").type.int64Type.SetInParent()
    else:
        for name in outputs:
            _array_feature(m.description.output.add(), name)
        getattr(m, kind).SetInParent()
    return m


def _array_feature(feature, name: str) -> None:
    feature.name = name
    feature.type.multiArrayType.shape.extend([8])
    feature.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def network(m):
    return getattr(m, m.WhichOneof("Type"))


def conv(net, name, inp, out, oc, kc, k=3, groups=1, bias=True, deconv=False, seed=0, fp16=False, weights=None):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    c = layer.convolution
    c.outputChannels, c.kernelChannels, c.nGroups = oc, kc, groups
    c.kernelSize.extend([k, k])
    c.stride.extend([1, 1])
    c.valid.SetInParent()
    c.isDeconvolution = deconv
    shape = (kc, oc // groups, k, k) if deconv else (oc, kc, k, k)
    w = rand(shape, seed, channel_axis=1 if deconv else 0) if weights is None else weights
    set_wp(c.weights, w, fp16)
    if bias:
        c.hasBias = True
        set_wp(c.bias, rand(oc, seed + 1000), fp16)
    return layer


def inner(net, name, inp, out, ic, oc, bias=True, seed=0, fp16=False, weights=None, bias_values=None):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    p = layer.innerProduct
    p.inputChannels, p.outputChannels = ic, oc
    set_wp(p.weights, rand((oc, ic), seed) if weights is None else weights, fp16)
    if bias:
        p.hasBias = True
        set_wp(p.bias, rand(oc, seed + 1000) if bias_values is None else bias_values, fp16)
    return layer


def batchnorm(net, name, inp, out, c, seed=0, eps=1e-3, fp16=False):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    bn = layer.batchnorm
    bn.channels, bn.epsilon = c, eps
    set_wp(bn.gamma, positive(c, seed), fp16)
    set_wp(bn.beta, rand(c, seed + 1), fp16)
    set_wp(bn.mean, rand(c, seed + 2), fp16)
    set_wp(bn.variance, positive(c, seed + 3, 0.2, 2.0), fp16)
    return layer


def scale(net, name, inp, out, shape, bias=True, seed=0, bias_shape=None, fp16=False):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    s = layer.scale
    s.shapeScale.extend(shape)
    set_wp(s.scale, positive(math.prod(shape), seed), fp16)
    if bias:
        s.hasBias = True
        bias_shape = shape if bias_shape is None else bias_shape
        s.shapeBias.extend(bias_shape)
        set_wp(s.bias, rand(math.prod(bias_shape), seed + 1), fp16)
    return layer


def bias_layer(net, name, inp, out, shape, seed=0, fp16=False):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    layer.bias.shape.extend(shape)
    set_wp(layer.bias.bias, rand(math.prod(shape), seed), fp16)
    return layer


def relu(net, name, inp, out):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    layer.activation.ReLU.SetInParent()
    return layer


def add(net, name, inputs, out):
    layer = net.layers.add(name=name, input=list(inputs), output=[out])
    layer.add.SetInParent()
    return layer


def embedding(net, name, inp, out, vocab, size, bias=True, seed=0):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    e = layer.embedding
    e.inputDim, e.outputChannels = vocab, size
    set_wp(e.weights, rand((size, vocab), seed))
    if bias:
        e.hasBias = True
        set_wp(e.bias, rand(size, seed + 1))
    return layer


def embedding_nd(net, name, inp, out, vocab, size, bias=True, seed=0):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    e = layer.embeddingND
    e.vocabSize, e.embeddingSize = vocab, size
    set_wp(e.weights, rand((size, vocab), seed))
    if bias:
        e.hasBias = True
        set_wp(e.bias, rand(size, seed + 1))
    return layer


def batched_matmul(net, name, inp, out, first, second, bias=True, seed=0):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    b = layer.batchedMatmul
    b.weightMatrixFirstDimension, b.weightMatrixSecondDimension = first, second
    set_wp(b.weights, rand((second, first), seed))
    if bias:
        b.hasBias = True
        set_wp(b.bias, rand(second, seed + 1))
    return layer


def load_constant(net, name, out, shape, seed=0, nd=False, values=None, fp16=False):
    layer = net.layers.add(name=name, output=[out])
    p = layer.loadConstantND if nd else layer.loadConstant
    p.shape.extend(shape)
    set_wp(p.data, rand(math.prod(shape), seed) if values is None else values, fp16)
    return layer


def _lstm_weights(wp, i, o, seed, peep):
    gates = ("inputGate", "forgetGate", "blockInput", "outputGate")
    for n, g in enumerate(gates):
        set_wp(getattr(wp, f"{g}WeightMatrix"), rand((o, i), seed + n))
        set_wp(getattr(wp, f"{g}RecursionMatrix"), rand((o, o), seed + 10 + n))
        set_wp(getattr(wp, f"{g}BiasVector"), rand(o, seed + 20 + n))
    if peep:
        for n, g in enumerate(("inputGate", "forgetGate", "outputGate")):
            set_wp(getattr(wp, f"{g}PeepholeVector"), rand(o, seed + 30 + n))


def _activations(rep, names):
    for n in names:
        getattr(rep.add(), n).SetInParent()


def lstm(net, name, inp, out, i, o, seed=0, peep=True):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    p = layer.uniDirectionalLSTM
    p.inputVectorSize, p.outputVectorSize = i, o
    _activations(p.activations, ("sigmoid", "tanh", "tanh"))
    p.params.hasBiasVectors = True
    p.params.hasPeepholeVectors = peep
    p.params.sequenceOutput = True
    _lstm_weights(p.weightParams, i, o, seed, peep)
    return layer


def bilstm(net, name, inp, out, i, o, seed=0, peep=True):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    p = layer.biDirectionalLSTM
    p.inputVectorSize, p.outputVectorSize = i, o
    _activations(p.activationsForwardLSTM, ("sigmoid", "tanh", "tanh"))
    _activations(p.activationsBackwardLSTM, ("sigmoid", "tanh", "tanh"))
    p.params.hasBiasVectors = True
    p.params.hasPeepholeVectors = peep
    _lstm_weights(p.weightParams.add(), i, o, seed, peep)
    _lstm_weights(p.weightParams.add(), i, o, seed + 100, peep)
    return layer


def gru(net, name, inp, out, i, o, seed=0):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    p = layer.gru
    p.inputVectorSize, p.outputVectorSize = i, o
    _activations(p.activations, ("sigmoid", "tanh"))
    p.hasBiasVectors = True
    for n, g in enumerate(("updateGate", "resetGate", "outputGate")):
        set_wp(getattr(p, f"{g}WeightMatrix"), rand((o, i), seed + n))
        set_wp(getattr(p, f"{g}RecursionMatrix"), rand((o, o), seed + 10 + n))
        set_wp(getattr(p, f"{g}BiasVector"), rand(o, seed + 20 + n))
    return layer


def simple_rnn(net, name, inp, out, i, o, seed=0):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    p = layer.simpleRecurrent
    p.inputVectorSize, p.outputVectorSize = i, o
    p.activation.tanh.SetInParent()
    p.hasBiasVector = True
    set_wp(p.weightMatrix, rand((o, i), seed))
    set_wp(p.recursionMatrix, rand((o, o), seed + 1))
    set_wp(p.biasVector, rand(o, seed + 2))
    return layer


# --- plain builders: bare models without declared features ---------------------------------------------


def rnd(*shape, seed=0, scale=0.1) -> np.ndarray:
    """Plain normal float32 values (no per-channel ranges)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def plain_model(kind: str = "neuralNetwork") -> Model_pb2.Model:
    """specificationVersion 1, an empty network of `kind`, no description."""
    m = Model_pb2.Model(specificationVersion=1)
    getattr(m, kind).SetInParent()
    return m


def plain_conv(net, name, inp, out, oc, kc, k=3, groups=1, bias=True, deconv=False, seed=0, fp16=False):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    c = layer.convolution
    c.outputChannels, c.kernelChannels, c.nGroups = oc, kc, groups
    c.kernelSize.extend([k, k])
    c.valid.SetInParent()
    c.isDeconvolution = deconv
    shape = (kc, oc // groups, k, k) if deconv else (oc, kc, k, k)
    set_wp(c.weights, rnd(*shape, seed=seed), fp16)
    if bias:
        c.hasBias = True
        set_wp(c.bias, rnd(oc, seed=seed + 1), fp16)
    return layer


def plain_inner(net, name, inp, out, ic, oc, bias=True, seed=0, fp16=False):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    p = layer.innerProduct
    p.inputChannels, p.outputChannels = ic, oc
    set_wp(p.weights, rnd(oc, ic, seed=seed), fp16)
    if bias:
        p.hasBias = True
        set_wp(p.bias, rnd(oc, seed=seed + 1), fp16)
    return layer


# --- the zoo --------------------------------------------------------------------------------------------


def m_conv_family():
    """Normal, grouped and depthwise convolution, deconvolution, innerProduct with and without bias."""
    m = new_model()
    net = network(m)
    conv(net, "conv_big", "x", "c1", oc=32, kc=16, seed=1)  # 4608 weights: passes the default advanced limits
    relu(net, "relu1", "c1", "r1")
    conv(net, "grouped", "r1", "c2", oc=16, kc=8, groups=4, seed=2)
    conv(net, "depthwise", "c2", "c3", oc=16, kc=1, groups=16, seed=3)
    conv(net, "conv_nobias", "c3", "c4", oc=8, kc=16, bias=False, seed=4)
    conv(net, "deconv", "c4", "c5", oc=8, kc=8, deconv=True, seed=5)
    conv(net, "deconv_1x1", "c5", "c6", oc=4, kc=8, k=1, deconv=True, bias=False, seed=6)
    inner(net, "dense", "c6", "d1", ic=64, oc=32, seed=7)
    inner(net, "dense_nobias", "d1", "y", ic=32, oc=10, bias=False, seed=8)
    return m


def m_grouped_deconv():
    """Deconvolutions with nGroups > 1 (weights [kernelChannels, outputChannels / nGroups, kH, kW])."""
    m = new_model()
    net = network(m)
    conv(net, "gdeconv", "x", "a", oc=12, kc=8, groups=2, deconv=True, seed=11)
    conv(net, "gdeconv4", "a", "y", oc=8, kc=12, groups=4, k=2, deconv=True, bias=False, seed=12)
    return m


def m_dense():
    """Three innerProducts named like the docs' example (dense_1, dense_2, dense_3)."""
    m = new_model()
    net = network(m)
    inner(net, "dense_1", "x", "a", ic=48, oc=32, seed=21)
    relu(net, "relu_1", "a", "b")
    inner(net, "dense_2", "b", "c", ic=32, oc=16, seed=22)
    relu(net, "relu_2", "c", "d")
    inner(net, "dense_3", "d", "y", ic=16, oc=4, bias=False, seed=23)
    return m


def m_folds():
    """Every fold coremltools does right: conv/innerProduct -> scale / bias, batchnorm -> scale, chains."""
    m = new_model(outputs=tuple(f"y{i}" for i in range(1, 14)))
    net = network(m)
    conv(net, "conv_a", "x", "a1", oc=8, kc=4, seed=31)
    scale(net, "scale_a", "a1", "y1", [8], bias=True, seed=32)
    conv(net, "conv_b", "x", "b1", oc=8, kc=4, bias=False, seed=33)
    scale(net, "scale_b", "b1", "y2", [8, 1, 1], bias=False, seed=34)
    conv(net, "conv_c", "x", "c1", oc=6, kc=4, seed=35)
    bias_layer(net, "bias_c", "c1", "y3", [6, 1, 1], seed=36)
    conv(net, "conv_d", "x", "d1", oc=6, kc=4, seed=37)
    scale(net, "scale_d", "d1", "d2", [6], bias=True, seed=38)
    bias_layer(net, "bias_d", "d2", "y4", [6], seed=39)
    inner(net, "ip_e", "x", "e1", ic=16, oc=12, seed=40)
    scale(net, "scale_e", "e1", "y5", [12], bias=True, seed=41)
    inner(net, "ip_f", "x", "f1", ic=16, oc=12, bias=False, seed=42)
    bias_layer(net, "bias_f", "f1", "y6", [12], seed=43)
    batchnorm(net, "bn_g", "x", "g1", c=8, seed=44)
    scale(net, "scale_g", "g1", "y7", [8], bias=True, seed=45)
    batchnorm(net, "bn_h", "x", "h1", c=8, seed=46)
    scale(net, "scale_h", "h1", "y8", [8], bias=False, seed=47)
    conv(net, "deconv_i", "x", "i1", oc=6, kc=4, deconv=True, seed=48)
    bias_layer(net, "bias_i", "i1", "y9", [6], seed=49)
    # one-value scales and biases, where the layer already has a bias (coremltools broadcasts them right)
    conv(net, "conv_j", "x", "j1", oc=6, kc=4, seed=130)
    bias_layer(net, "bias_j", "j1", "y10", [1], seed=131)
    inner(net, "ip_k", "x", "k1", ic=16, oc=12, seed=132)
    scale(net, "scale_k", "k1", "y11", [1], bias=True, seed=133)
    batchnorm(net, "bn_l", "x", "l1", c=8, seed=134)
    scale(net, "scale_l", "l1", "y12", [1], bias=True, seed=135)
    conv(net, "conv_m", "x", "m1", oc=6, kc=4, seed=136)
    scale(net, "scale_m", "m1", "y13", [6], bias=True, bias_shape=[1], seed=137)
    return m


def m_no_fold():
    """Pairs that must not be folded: two readers, instance normalisation."""
    m = new_model(outputs=("y", "z", "w"))
    net = network(m)
    conv(net, "conv", "x", "a", oc=8, kc=4, seed=51)
    scale(net, "scale", "a", "b", [8], seed=52)
    relu(net, "also_reads_a", "a", "c")
    add(net, "sum", ["b", "c"], "y")
    inner(net, "ip", "x", "p", ic=16, oc=8, seed=53)
    bias_layer(net, "bias1", "p", "q", [8], seed=54)
    bias_layer(net, "bias2", "p", "z", [8], seed=55)
    relu(net, "relu_q", "q", "qq")
    bn = batchnorm(net, "instnorm", "qq", "r", c=8, seed=56)
    bn.batchnorm.instanceNormalization = True
    scale(net, "scale_r", "r", "w", [8], seed=57)
    return m


def m_conv_batchnorm():
    """conv -> batchnorm (coremltools raises below 16 bits) and conv -> batchnorm -> scale."""
    m = new_model(outputs=("y", "z"))
    net = network(m)
    conv(net, "conv_bn", "x", "a", oc=8, kc=4, seed=61)
    batchnorm(net, "bn", "a", "y", c=8, seed=62)
    conv(net, "conv_nb", "x", "b", oc=6, kc=3, bias=False, seed=63)
    batchnorm(net, "bn2", "b", "b2", c=6, seed=64)
    scale(net, "sc2", "b2", "z", [6], bias=True, seed=65)
    return m


def m_embeddings_misc():
    m = new_model("neuralNetworkClassifier", outputs=("probs",))
    net = network(m)
    embedding(net, "embed", "x", "e", vocab=50, size=8, seed=71)
    embedding_nd(net, "embed_nd", "e", "n", vocab=20, size=6, seed=72)
    embedding_nd(net, "embed_nd_nobias", "n", "n2", vocab=10, size=4, bias=False, seed=73)
    batched_matmul(net, "bmm", "n2", "b", first=6, second=12, seed=74)
    batched_matmul(net, "bmm_nobias", "b", "b2", first=12, second=5, bias=False, seed=75)
    load_constant(net, "const", "k", [3, 2, 2], seed=76)
    load_constant(net, "const_nd", "k2", [4, 5], seed=77, nd=True)
    batchnorm(net, "bn_alone", "k", "z", c=3, seed=78)
    add(net, "join", ["b2", "z", "k2"], "s")
    layer = net.layers.add(name="softmax", input=["s"], output=["probs"])
    layer.softmax.SetInParent()
    return m


def m_recurrent():
    m = new_model("neuralNetworkRegressor")
    net = network(m)
    lstm(net, "lstm", "x", "h1", i=5, o=7, seed=81)
    bilstm(net, "bilstm", "h1", "h2", i=7, o=4, seed=82)
    lstm(net, "lstm_nopeep", "h2", "h3", i=8, o=3, seed=83, peep=False)
    gru(net, "gru", "h3", "h4", i=3, o=6, seed=84)
    simple_rnn(net, "rnn", "h4", "y", i=6, o=5, seed=85)
    return m


def m_nested():
    """branch and loop layers with nested networks (a branch inside the loop body), folds inside too."""
    m = new_model(inputs=("x", "cond"))
    net = network(m)
    inner(net, "ip_top", "x", "t", ic=16, oc=16, seed=91)
    br = net.layers.add(name="branch", input=["cond"], output=[]).branch
    inner(br.ifBranch, "if_ip", "t", "if_a", ic=16, oc=8, seed=92)
    bias_layer(br.ifBranch, "if_bias", "if_a", "out_b", [8], seed=93)
    conv(br.elseBranch, "else_conv", "t", "else_a", oc=8, kc=2, seed=94)
    scale(br.elseBranch, "else_scale", "else_a", "out_b", [8], bias=True, seed=95)
    loop = net.layers.add(name="loop", input=["out_b"], output=[]).loop
    loop.maxLoopIterations = 3
    loop.conditionVar = "go"
    load_constant(loop.conditionNetwork, "cond_const", "go", [1, 1, 1], seed=96)
    inner(loop.bodyNetwork, "body_ip", "out_b", "body_a", ic=8, oc=8, seed=97)
    embedding(loop.bodyNetwork, "body_embed", "body_a", "body_e", vocab=12, size=8, seed=98)
    inner_br = loop.bodyNetwork.layers.add(name="inner_branch", input=["body_e"], output=[]).branch
    inner(inner_br.ifBranch, "deep_ip", "body_e", "out_b", ic=8, oc=8, bias=False, seed=99)
    relu(net, "final", "out_b", "y")
    return m


def m_channels():
    """Channels that are constant, of tiny range (< 1e-4) or full of rounding ties, and 1-D blobs like them."""
    rows = []
    n = 512
    ties = np.concatenate(
        [[0.0, 255.0], np.arange(255) + 0.5, np.arange(15) * 17 + 8.5, np.arange(3) * 85 + 42.5, [127.5]]
    )
    rows.append(np.resize(ties, n))  # unsigned ties at 8, 4, 2 and 1 bits
    sym = np.concatenate([[-127.0, 127.0], np.arange(-127, 127) + 0.5])
    rows.append(np.resize(sym, n))  # symmetric 8-bit ties (max |w| 127: scale exactly 1)
    rows.append(np.full(n, 0.3))  # constant
    rows.append(np.zeros(n))  # all zero
    rng = np.random.default_rng(101)
    rows.append(0.5 + 5e-5 * rng.random(n))  # tiny range: below coremltools' 1e-6 scale at 8 bits
    rows.append(-0.25 + 3e-4 * rng.random(n))  # small range just above it at 8 bits
    rows.append(np.resize([-1.0, 0.0, 1.0], n))  # three values only
    rows.append(rng.standard_normal(n) * 0.1)
    w = np.stack(rows).astype(np.float32)
    m = new_model(outputs=("y", "k", "k2"))
    net = network(m)
    inner(net, "ties", "x", "a", ic=n, oc=w.shape[0], weights=w, bias_values=np.full(w.shape[0], 0.125))
    inner(net, "ties_T", "a", "y", ic=w.shape[0], oc=n, bias=False, weights=np.ascontiguousarray(w.T))
    load_constant(net, "const_tiny", "k", [1, 4, 4], values=0.75 + 2e-5 * rng.random(16))
    load_constant(net, "const_ties", "k2", [4, 8], nd=True, values=np.resize(ties, 32))
    return m


def m_mixed_fp16():
    """float16 and float32 weights in one model (as Create ML exports have)."""
    m = new_model()
    net = network(m)
    conv(net, "conv16", "x", "a", oc=8, kc=4, seed=111, fp16=True)
    conv(net, "conv32", "a", "b", oc=8, kc=8, seed=112)
    inner(net, "ip16", "b", "c", ic=72, oc=16, seed=113, fp16=True)
    inner(net, "ip32", "c", "c2", ic=16, oc=12, seed=114)
    mixed = inner(net, "ip_mixed", "c2", "d", ic=12, oc=8, seed=117, fp16=True).innerProduct
    mixed.bias.ClearField("float16Value")  # float16 weights, float32 bias
    set_wp(mixed.bias, rand(8, 118))
    batchnorm(net, "bn16", "d", "e", c=8, seed=115, fp16=True)
    relu(net, "relu", "e", "f")
    load_constant(net, "const16", "k", [2, 2, 2], seed=116, fp16=True)
    add(net, "join", ["f", "k"], "y")
    return m


ZOO = {
    "conv_family": m_conv_family,
    "grouped_deconv": m_grouped_deconv,
    "dense": m_dense,
    "folds": m_folds,
    "no_fold": m_no_fold,
    "conv_batchnorm": m_conv_batchnorm,
    "embeddings_misc": m_embeddings_misc,
    "recurrent": m_recurrent,
    "nested": m_nested,
    "channels": m_channels,
    "mixed_fp16": m_mixed_fp16,
}


@functools.lru_cache(maxsize=None)
def zoo_bytes(name: str) -> bytes:
    return ZOO[name]().SerializeToString()


def widened(spec_bytes: bytes) -> bytes:
    """The same model with every float16 blob stored as the float32 numbers it represents."""
    m = Model_pb2.Model.FromString(spec_bytes)
    for wp in all_weight_params(m):
        if len(wp.float16Value):
            values = np.frombuffer(wp.float16Value, dtype="<f2").astype(np.float32)
            wp.ClearField("float16Value")
            wp.floatValue.extend(values.tolist())
    return m.SerializeToString()


def all_weight_params(msg):
    """Every WeightParams message anywhere inside `msg` (depth first, field order)."""
    for f, value in msg.ListFields():
        if f.message_type is None:
            continue
        items = value if _repeated(f) else [value]
        for item in items:
            if f.message_type.full_name == "CoreML.Specification.WeightParams":
                yield item
            elif not f.message_type.GetOptions().map_entry:
                yield from all_weight_params(item)


def layers_by_name(spec) -> dict:
    """name -> layer for every layer of every network (nested and pipeline networks included)."""
    out = {}

    def walk(msg):
        for f, value in msg.ListFields():
            if f.message_type is None or f.message_type.GetOptions().map_entry:
                continue
            items = value if _repeated(f) else [value]
            for item in items:
                if f.message_type.full_name == "CoreML.Specification.NeuralNetworkLayer":
                    out[item.name] = item
                walk(item)

    walk(spec)
    return out


def lut_size_ok(spec) -> list[str]:
    """Blobs whose lookup table does not have exactly 2**nbits entries."""
    bad = []
    for wp in all_weight_params(spec):
        q = wp.quantization
        if q.WhichOneof("QuantizationType") == "lookupTableQuantization":
            if len(q.lookupTableQuantization.floatValue) != 1 << q.numberOfBits:
                bad.append(f"{len(q.lookupTableQuantization.floatValue)} entries at {q.numberOfBits} bits")
    return bad


def _repeated(field) -> bool:
    is_repeated = getattr(field, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else field.label == field.LABEL_REPEATED
