"""Byte equality with coremltools 9.0 where it is right; documented differences where it is not.

On the plain models (no declared features, as coremltools' own tests build them; oracle_models.plain_*),
and with Core ML's rules checked on both outputs (no finding that the input did not have already).
Merged from tests/oracle_ct/test_oracle.py; the tests that test_oracle_differences.py,
test_oracle_dequantize.py, test_oracle_pipelines.py and test_oracle_modes.py already make were dropped.
"""

import numpy as np
import pytest

pytest.importorskip("coremltools")

import mlqpipe  # noqa: E402
from mlqpipe.formats.nn.check import check_spec, introduced_findings  # noqa: E402
from coremltools.proto import Model_pb2  # noqa: E402
from tests.oracle import oracle_models as O  # noqa: E402
from coremltools.models.neural_network import quantization_utils as qu  # noqa: E402


def _zoo():
    """name -> serialized spec: one model per layer family coremltools quantizes."""
    models = {}

    m = O.plain_model()
    O.plain_conv(O.network(m), "conv", "x", "c", oc=16, kc=8, seed=1)
    O.plain_conv(O.network(m), "grouped", "c", "g", oc=16, kc=4, groups=4, seed=2)
    O.plain_conv(O.network(m), "depthwise", "g", "d", oc=16, kc=1, groups=16, seed=3)
    O.plain_conv(O.network(m), "deconv", "d", "e", oc=8, kc=16, deconv=True, seed=4)
    O.plain_inner(O.network(m), "dense", "e", "f", ic=64, oc=32, seed=5)
    O.plain_inner(O.network(m), "dense_nobias", "f", "y", ic=32, oc=10, bias=False, seed=6)
    models["conv_family"] = m

    m = O.plain_model("neuralNetworkClassifier")
    net = O.network(m)
    e = net.layers.add(name="embed", input=["x"], output=["e"]).embedding
    e.inputDim, e.outputChannels, e.hasBias = 50, 8, True
    e.weights.floatValue.extend(O.rnd(8, 50, seed=7).ravel().tolist())
    e.bias.floatValue.extend(O.rnd(8, seed=8).tolist())
    nd = net.layers.add(name="embednd", input=["e"], output=["n"]).embeddingND
    nd.vocabSize, nd.embeddingSize = 20, 6
    nd.weights.floatValue.extend(O.rnd(6, 20, seed=9).ravel().tolist())
    bm = net.layers.add(name="bmm", input=["n"], output=["b"]).batchedMatmul
    bm.weightMatrixFirstDimension, bm.weightMatrixSecondDimension, bm.hasBias = 6, 12, True
    bm.weights.floatValue.extend(O.rnd(12, 6, seed=10).ravel().tolist())
    bm.bias.floatValue.extend(O.rnd(12, seed=11).tolist())
    lc = net.layers.add(name="const", output=["k"]).loadConstant
    lc.shape.extend([3, 2, 2])
    lc.data.floatValue.extend(O.rnd(12, seed=12).tolist())
    lcnd = net.layers.add(name="constnd", output=["k2"]).loadConstantND
    lcnd.shape.extend([4, 5])
    lcnd.data.floatValue.extend(O.rnd(20, seed=13).tolist())
    bn = net.layers.add(name="bn_alone", input=["k"], output=["z"]).batchnorm
    bn.channels = 3
    for i, f in enumerate(("gamma", "beta", "mean", "variance")):
        getattr(bn, f).floatValue.extend((np.abs(O.rnd(3, seed=20 + i)) + 0.5).tolist())
    models["embeddings_misc"] = m

    m = O.plain_model("neuralNetworkRegressor")
    net = O.network(m)
    lstm = net.layers.add(name="lstm", input=["x"], output=["h"]).uniDirectionalLSTM
    lstm.inputVectorSize, lstm.outputVectorSize = 5, 7
    lstm.params.hasBiasVectors = True
    lstm.params.hasPeepholeVectors = True
    wp = lstm.weightParams
    for i, f in enumerate(["inputGate", "forgetGate", "blockInput", "outputGate"]):
        getattr(wp, f + "WeightMatrix").floatValue.extend(O.rnd(7, 5, seed=30 + i).ravel().tolist())
        getattr(wp, f + "RecursionMatrix").floatValue.extend(O.rnd(7, 7, seed=40 + i).ravel().tolist())
        getattr(wp, f + "BiasVector").floatValue.extend(O.rnd(7, seed=50 + i).tolist())
    for i, f in enumerate(["inputGatePeepholeVector", "forgetGatePeepholeVector", "outputGatePeepholeVector"]):
        getattr(wp, f).floatValue.extend(O.rnd(7, seed=60 + i).tolist())
    gru = net.layers.add(name="gru", input=["h"], output=["g"]).gru
    gru.inputVectorSize, gru.outputVectorSize, gru.hasBiasVectors = 7, 4, True
    for i, f in enumerate(["updateGate", "resetGate", "outputGate"]):
        getattr(gru, f + "WeightMatrix").floatValue.extend(O.rnd(4, 7, seed=70 + i).ravel().tolist())
        getattr(gru, f + "RecursionMatrix").floatValue.extend(O.rnd(4, 4, seed=80 + i).ravel().tolist())
        getattr(gru, f + "BiasVector").floatValue.extend(O.rnd(4, seed=90 + i).tolist())
    models["recurrent"] = m

    m = O.plain_model()
    net = O.network(m)
    O.plain_inner(net, "ip", "x", "a", ic=16, oc=8, seed=100)
    sc = net.layers.add(name="scale", input=["a"], output=["b"]).scale
    sc.shapeScale.append(8)
    sc.scale.floatValue.extend((O.rnd(8, seed=101) + 1).tolist())
    sc.hasBias = True
    sc.shapeBias.append(8)
    sc.bias.floatValue.extend(O.rnd(8, seed=102).tolist())
    O.plain_conv(net, "conv", "b", "c", oc=8, kc=8, k=1, seed=103)
    bias = net.layers.add(name="bias", input=["c"], output=["y"]).bias
    bias.shape.append(8)
    bias.bias.floatValue.extend(O.rnd(8, seed=104).tolist())
    models["folding"] = m

    m = O.plain_model()
    w = O.rnd(8, 40, seed=110)
    w[0] = 0.5  # constant channel
    w[1] = 0.1 + np.linspace(0, 5e-5, 40)  # tiny range
    w[2] = np.repeat([-0.2, 0.3], 20)  # ties
    layer = O.network(m).layers.add(name="edge", input=["x"], output=["y"]).innerProduct
    layer.inputChannels, layer.outputChannels = 40, 8
    layer.weights.floatValue.extend(w.ravel().tolist())
    models["edge_channels"] = m
    return {k: v.SerializeToString() for k, v in models.items()}


ZOO = _zoo()
SETTINGS = [(n, "linear") for n in range(1, 9)] + [(8, "linear_symmetric"), (16, "linear"), (2, "linear_lut"), (4, "linear_lut"), (8, "linear_lut")]


def _compare(data, nbits, mode, **kw):
    theirs = O.ct_quantize(data, nbits, mode, **kw)
    ours = mlqpipe.quantize_weights(data, nbits, mode, **kw)
    before = mlqpipe.load_model(data).spec  # generated: may lack declared inputs, which Core ML needs
    assert introduced_findings(before, ours.spec) == []
    assert introduced_findings(before, mlqpipe.load_model(theirs).spec) == []  # coremltools' output is valid here too
    return theirs, ours


@pytest.mark.parametrize("name", [n for n in ZOO if n != "conv_family"])
@pytest.mark.parametrize("nbits, mode", SETTINGS)
def test_same_bytes_as_coremltools(name, nbits, mode):
    data = ZOO[name]
    theirs, ours = _compare(data, nbits, mode)
    assert O.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)
    assert ZOO[name] == data


@pytest.mark.parametrize("nbits, mode", SETTINGS)
def test_conv_family_same_bytes_except_grouped_deconv_scales(nbits, mode):
    """Grouped deconvolution is the only difference; here deconv has groups=1, so all bytes match."""
    theirs, ours = _compare(ZOO["conv_family"], nbits, mode)
    assert O.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


def _lut_fn(nbits, w):
    return qu._get_linear_lookup_table_and_weight(nbits, w)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_custom_lut_same_bytes(name):
    theirs, ours = _compare(ZOO[name], 3, "custom_lut", lut_function=_lut_fn)
    assert O.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


SELECTORS = {
    "skip_bias": lambda mod: mod.AdvancedQuantizedLayerSelector(skip_layer_types=["bias"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=1),
    "skip_depthwise": lambda mod: mod.AdvancedQuantizedLayerSelector(skip_layer_types=["depthwiseConv"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=10),
    "min_sizes": lambda mod: mod.AdvancedQuantizedLayerSelector(minimum_conv_kernel_channels=8, minimum_conv_weight_count=2000),
    "skip_types": lambda mod: mod.AdvancedQuantizedLayerSelector(skip_layer_types=["innerProduct", "batchnorm"]),
    "matmul": lambda mod: mod.MatrixMultiplyLayerSelector(minimum_weight_count=100, minimum_output_channels=9),
}


@pytest.mark.parametrize("selector", sorted(SELECTORS))
@pytest.mark.parametrize("name", ["conv_family", "embeddings_misc"])
def test_selectors_ours_and_theirs_same_bytes(selector, name):
    ct_sel = SELECTORS[selector](qu)
    theirs = O.ct_quantize(ZOO[name], 8, "linear", selector=ct_sel)
    for sel in (SELECTORS[selector](mlqpipe), ct_sel):  # our class, and coremltools' own object
        ours = mlqpipe.quantize_weights(ZOO[name], 8, "linear", selector=sel)
        assert O.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


def test_documented_custom_selector_example_is_reproduced():
    """coremltools' docs example quantizes dense_2 only (the opposite of its comment); we reproduce it."""

    class MyLayerSelector(qu.QuantizedLayerSelector):
        def do_quantize(self, layer, **kwargs):
            ret = super().do_quantize(layer)
            if not ret or layer.name == "dense_nobias":
                return True
            return False

    theirs = O.ct_quantize(ZOO["conv_family"], 8, "linear", selector=MyLayerSelector())
    ours = mlqpipe.quantize_weights(ZOO["conv_family"], 8, "linear", selector=MyLayerSelector())
    assert O.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)
    stored = {r.layer: str(r.storage) for r in mlqpipe.inventory(ours.spec)}
    assert stored["dense_nobias"] == "linear8" and stored["conv"] == "float32"


def test_dequantization_same_bytes():
    q = O.ct_quantize(ZOO["conv_family"], 4, "linear").SerializeToString()
    theirs, ours = _compare(q, None, "dequantization")
    assert O.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


# ---- where coremltools 9.0 is wrong ----------------------------------------------------------------------


def test_kmeans_works_where_coremltools_raises():
    with pytest.raises(TypeError):
        O.ct_quantize(ZOO["conv_family"], 4, "kmeans_lut")
    ours = mlqpipe.quantize_weights(ZOO["conv_family"], 4, "kmeans_lut")
    lin = mlqpipe.quantize_weights(ZOO["conv_family"], 4, "linear_lut")
    ref = {r.id: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(ZOO["conv_family"]).spec)}
    for a, b in zip(mlqpipe.inventory(ours.spec), mlqpipe.inventory(lin.spec)):
        assert len(a.wp.quantization.lookupTableQuantization.floatValue) == 16
        assert np.mean((a.values() - ref[a.id]) ** 2) <= np.mean((b.values() - ref[b.id]) ** 2) + 1e-12


def test_grouped_deconvolution_gets_valid_scale_count():
    m = O.plain_model()
    O.plain_conv(O.network(m), "gdeconv", "x", "y", oc=8, kc=4, groups=2, deconv=True, seed=400)
    data = m.SerializeToString()
    theirs = O.ct_quantize(data, 8, "linear").neuralNetwork.layers[0].convolution.weights
    ours = mlqpipe.quantize_weights(data, 8, "linear")
    w = ours.spec.neuralNetwork.layers[0].convolution.weights
    assert w.rawValue == theirs.rawValue
    assert len(theirs.quantization.linearQuantization.scale) == 4  # outputChannels / groups: invalid
    assert np.array_equal(np.array(w.quantization.linearQuantization.scale), np.tile(np.array(theirs.quantization.linearQuantization.scale, np.float32), 2))
    before = mlqpipe.load_model(data).spec
    assert introduced_findings(before, ours.spec) == []
    assert {f.rule for f in introduced_findings(before, mlqpipe.load_model(O.ct_quantize(data, 8, "linear")).spec)} == {"scale-count"}


def test_updatable_layer_left_alone_with_warning():
    m = O.plain_model()
    O.plain_inner(O.network(m), "frozen", "x", "a", ic=8, oc=4, seed=600)
    O.plain_inner(O.network(m), "trainable", "a", "y", ic=4, oc=2, seed=601).isUpdatable = True
    with pytest.warns(UserWarning, match="trainable.*updatable"):
        ours = mlqpipe.quantize_weights(m.SerializeToString(), 8, "linear")
    stored = {r.layer: str(r.storage) for r in mlqpipe.inventory(ours.spec)}
    assert stored == {"frozen": "linear8", "trainable": "float32"}
    assert introduced_findings(mlqpipe.load_model(m).spec, ours.spec) == []


def test_mixed_float16_and_float32_layers():
    """Create ML style: some layers float16, others float32. The float32 layer's bytes match coremltools;
    the float16 layer, which coremltools skips, is quantized too."""
    m = O.plain_model()
    O.plain_inner(O.network(m), "half", "x", "a", ic=12, oc=6, seed=700, fp16=True)
    O.plain_inner(O.network(m), "full", "a", "y", ic=6, oc=4, seed=701)
    data = m.SerializeToString()
    theirs = O.ct_quantize(data, 4, "linear")
    ours = Model_pb2.Model.FromString(mlqpipe.quantize_weights(data, 4, "linear").SerializeToString())
    assert ours.neuralNetwork.layers[1].SerializeToString(deterministic=True) == theirs.neuralNetwork.layers[1].SerializeToString(deterministic=True)
    assert len(theirs.neuralNetwork.layers[0].innerProduct.weights.float16Value)  # skipped by coremltools
    assert ours.neuralNetwork.layers[0].innerProduct.weights.quantization.numberOfBits == 4


def test_fold_into_float16_layer_writes_one_storage_field():
    """coremltools' scale fold leaves float16Value beside the new floatValue (two storage fields, an
    invalid model that our check catches); ours writes float32 only."""
    m = O.plain_model()
    net = O.network(m)
    O.plain_conv(net, "conv", "x", "c", oc=4, kc=2, k=1, seed=800, fp16=True)
    sc = net.layers.add(name="s", input=["c"], output=["y"]).scale
    sc.shapeScale.append(4)
    sc.scale.float16Value = np.array([1.5, 2.0, 0.5, -1.0], "<f2").tobytes()
    sc.hasBias = True
    sc.shapeBias.append(4)
    sc.bias.float16Value = np.array([0.1, 0.2, 0.3, 0.4], "<f2").tobytes()
    data = m.SerializeToString()
    theirs = O.ct_quantize(data, 8, "linear")
    findings = check_spec(mlqpipe.load_model(theirs).spec)
    assert "one-storage-field" in {f.rule for f in findings}
    ours = mlqpipe.quantize_weights(data, 8, "linear")
    assert introduced_findings(mlqpipe.load_model(data).spec, ours.spec) == []
    assert [l.name for l in ours.spec.neuralNetwork.layers] == ["conv"]
