"""Byte equality with coremltools 9.0 where it is right; documented differences where it is not."""

import numpy as np
import pytest

pytest.importorskip("coremltools")

import mlqpipe  # noqa: E402
from mlqpipe.formats.nn.check import check_spec, introduced_findings  # noqa: E402
from tests.oracle_ct import ctmodels as M  # noqa: E402

M.setup()
from coremltools.models.neural_network import quantization_utils as qu  # noqa: E402


def _zoo():
    """name -> serialized spec: one model per layer family coremltools quantizes."""
    models = {}

    m = M.base()
    M.conv(M.nn(m), "conv", "x", "c", oc=16, kc=8, seed=1)
    M.conv(M.nn(m), "grouped", "c", "g", oc=16, kc=4, groups=4, seed=2)
    M.conv(M.nn(m), "depthwise", "g", "d", oc=16, kc=1, groups=16, seed=3)
    M.conv(M.nn(m), "deconv", "d", "e", oc=8, kc=16, deconv=True, seed=4)
    M.inner(M.nn(m), "dense", "e", "f", ic=64, oc=32, seed=5)
    M.inner(M.nn(m), "dense_nobias", "f", "y", ic=32, oc=10, bias=False, seed=6)
    models["conv_family"] = m

    m = M.base("neuralNetworkClassifier")
    net = M.nn(m)
    e = net.layers.add(name="embed", input=["x"], output=["e"]).embedding
    e.inputDim, e.outputChannels, e.hasBias = 50, 8, True
    e.weights.floatValue.extend(M.rnd(8, 50, seed=7).ravel().tolist())
    e.bias.floatValue.extend(M.rnd(8, seed=8).tolist())
    nd = net.layers.add(name="embednd", input=["e"], output=["n"]).embeddingND
    nd.vocabSize, nd.embeddingSize = 20, 6
    nd.weights.floatValue.extend(M.rnd(6, 20, seed=9).ravel().tolist())
    bm = net.layers.add(name="bmm", input=["n"], output=["b"]).batchedMatmul
    bm.weightMatrixFirstDimension, bm.weightMatrixSecondDimension, bm.hasBias = 6, 12, True
    bm.weights.floatValue.extend(M.rnd(12, 6, seed=10).ravel().tolist())
    bm.bias.floatValue.extend(M.rnd(12, seed=11).tolist())
    lc = net.layers.add(name="const", output=["k"]).loadConstant
    lc.shape.extend([3, 2, 2])
    lc.data.floatValue.extend(M.rnd(12, seed=12).tolist())
    lcnd = net.layers.add(name="constnd", output=["k2"]).loadConstantND
    lcnd.shape.extend([4, 5])
    lcnd.data.floatValue.extend(M.rnd(20, seed=13).tolist())
    bn = net.layers.add(name="bn_alone", input=["k"], output=["z"]).batchnorm
    bn.channels = 3
    for i, f in enumerate(("gamma", "beta", "mean", "variance")):
        getattr(bn, f).floatValue.extend((np.abs(M.rnd(3, seed=20 + i)) + 0.5).tolist())
    models["embeddings_misc"] = m

    m = M.base("neuralNetworkRegressor")
    net = M.nn(m)
    lstm = net.layers.add(name="lstm", input=["x"], output=["h"]).uniDirectionalLSTM
    lstm.inputVectorSize, lstm.outputVectorSize = 5, 7
    lstm.params.hasBiasVectors = True
    lstm.params.hasPeepholeVectors = True
    wp = lstm.weightParams
    for i, f in enumerate(["inputGate", "forgetGate", "blockInput", "outputGate"]):
        getattr(wp, f + "WeightMatrix").floatValue.extend(M.rnd(7, 5, seed=30 + i).ravel().tolist())
        getattr(wp, f + "RecursionMatrix").floatValue.extend(M.rnd(7, 7, seed=40 + i).ravel().tolist())
        getattr(wp, f + "BiasVector").floatValue.extend(M.rnd(7, seed=50 + i).tolist())
    for i, f in enumerate(["inputGatePeepholeVector", "forgetGatePeepholeVector", "outputGatePeepholeVector"]):
        getattr(wp, f).floatValue.extend(M.rnd(7, seed=60 + i).tolist())
    gru = net.layers.add(name="gru", input=["h"], output=["g"]).gru
    gru.inputVectorSize, gru.outputVectorSize, gru.hasBiasVectors = 7, 4, True
    for i, f in enumerate(["updateGate", "resetGate", "outputGate"]):
        getattr(gru, f + "WeightMatrix").floatValue.extend(M.rnd(4, 7, seed=70 + i).ravel().tolist())
        getattr(gru, f + "RecursionMatrix").floatValue.extend(M.rnd(4, 4, seed=80 + i).ravel().tolist())
        getattr(gru, f + "BiasVector").floatValue.extend(M.rnd(4, seed=90 + i).tolist())
    models["recurrent"] = m

    m = M.base()
    net = M.nn(m)
    M.inner(net, "ip", "x", "a", ic=16, oc=8, seed=100)
    sc = net.layers.add(name="scale", input=["a"], output=["b"]).scale
    sc.shapeScale.append(8)
    sc.scale.floatValue.extend((M.rnd(8, seed=101) + 1).tolist())
    sc.hasBias = True
    sc.shapeBias.append(8)
    sc.bias.floatValue.extend(M.rnd(8, seed=102).tolist())
    M.conv(net, "conv", "b", "c", oc=8, kc=8, k=1, seed=103)
    bias = net.layers.add(name="bias", input=["c"], output=["y"]).bias
    bias.shape.append(8)
    bias.bias.floatValue.extend(M.rnd(8, seed=104).tolist())
    models["folding"] = m

    m = M.base()
    w = M.rnd(8, 40, seed=110)
    w[0] = 0.5  # constant channel
    w[1] = 0.1 + np.linspace(0, 5e-5, 40)  # tiny range
    w[2] = np.repeat([-0.2, 0.3], 20)  # ties
    layer = M.nn(m).layers.add(name="edge", input=["x"], output=["y"]).innerProduct
    layer.inputChannels, layer.outputChannels = 40, 8
    layer.weights.floatValue.extend(w.ravel().tolist())
    models["edge_channels"] = m
    return {k: v.SerializeToString() for k, v in models.items()}


ZOO = _zoo()
SETTINGS = [(n, "linear") for n in range(1, 9)] + [(8, "linear_symmetric"), (16, "linear"), (2, "linear_lut"), (4, "linear_lut"), (8, "linear_lut")]


def _compare(data, nbits, mode, **kw):
    theirs = M.ct_quantize(data, nbits, mode, **kw)
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
    assert M.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)
    assert ZOO[name] == data


@pytest.mark.parametrize("nbits, mode", SETTINGS)
def test_conv_family_same_bytes_except_grouped_deconv_scales(nbits, mode):
    """Grouped deconvolution is the only difference; here deconv has groups=1, so all bytes match."""
    theirs, ours = _compare(ZOO["conv_family"], nbits, mode)
    assert M.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


def _lut_fn(nbits, w):
    return qu._get_linear_lookup_table_and_weight(nbits, w)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_custom_lut_same_bytes(name):
    theirs, ours = _compare(ZOO[name], 3, "custom_lut", lut_function=_lut_fn)
    assert M.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


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
    theirs = M.ct_quantize(ZOO[name], 8, "linear", selector=ct_sel)
    for sel in (SELECTORS[selector](mlqpipe), ct_sel):  # our class, and coremltools' own object
        ours = mlqpipe.quantize_weights(ZOO[name], 8, "linear", selector=sel)
        assert M.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


def test_documented_custom_selector_example_is_reproduced():
    """coremltools' docs example quantizes dense_2 only (the opposite of its comment); we reproduce it."""

    class MyLayerSelector(qu.QuantizedLayerSelector):
        def do_quantize(self, layer, **kwargs):
            ret = super().do_quantize(layer)
            if not ret or layer.name == "dense_nobias":
                return True
            return False

    theirs = M.ct_quantize(ZOO["conv_family"], 8, "linear", selector=MyLayerSelector())
    ours = mlqpipe.quantize_weights(ZOO["conv_family"], 8, "linear", selector=MyLayerSelector())
    assert M.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)
    stored = {r.layer: str(r.storage) for r in mlqpipe.inventory(ours.spec)}
    assert stored["dense_nobias"] == "linear8" and stored["conv"] == "float32"


def test_dequantization_same_bytes():
    q = M.ct_quantize(ZOO["conv_family"], 4, "linear").SerializeToString()
    theirs, ours = _compare(q, None, "dequantization")
    assert M.canonical(ours.SerializeToString()) == theirs.SerializeToString(deterministic=True)


# ---- where coremltools 9.0 is wrong ----------------------------------------------------------------------


def test_kmeans_works_where_coremltools_raises():
    with pytest.raises(TypeError):
        M.ct_quantize(ZOO["conv_family"], 4, "kmeans_lut")
    ours = mlqpipe.quantize_weights(ZOO["conv_family"], 4, "kmeans_lut")
    lin = mlqpipe.quantize_weights(ZOO["conv_family"], 4, "linear_lut")
    ref = {r.id: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(ZOO["conv_family"]).spec)}
    for a, b in zip(mlqpipe.inventory(ours.spec), mlqpipe.inventory(lin.spec)):
        assert len(a.wp.quantization.lookupTableQuantization.floatValue) == 16
        assert np.mean((a.values() - ref[a.id]) ** 2) <= np.mean((b.values() - ref[b.id]) ** 2) + 1e-12


def _conv_bn():
    m = M.base()
    net = M.nn(m)
    M.conv(net, "conv", "x", "c", oc=6, kc=3, seed=200)
    bn = net.layers.add(name="bn", input=["c"], output=["y"]).batchnorm
    bn.channels, bn.epsilon = 6, 1e-3
    for i, f in enumerate(("gamma", "beta", "mean", "variance")):
        vals = M.rnd(6, seed=210 + i) + (1.0 if f in ("gamma", "variance") else 0)
        getattr(bn, f).floatValue.extend(np.abs(vals).tolist() if f == "variance" else vals.tolist())
    return m.SerializeToString()


def test_conv_batchnorm_folds_correctly_where_coremltools_raises():
    data = _conv_bn()
    with pytest.raises(Exception):
        M.ct_quantize(data, 8, "linear")
    ours = mlqpipe.quantize_weights(data, 8, "linear")
    layers = [l.name for l in ours.spec.neuralNetwork.layers]
    assert layers == ["conv"] and list(ours.spec.neuralNetwork.layers[0].output) == ["y"]
    src = {r.field: r.values().astype(np.float64) for r in mlqpipe.inventory(mlqpipe.load_model(data).spec)}
    bn = M.proto().Model.FromString(data).neuralNetwork.layers[1].batchnorm
    g, b, mu, var = (np.array(getattr(bn, f).floatValue, np.float64) for f in ("gamma", "beta", "mean", "variance"))
    s = g / np.sqrt(var + bn.epsilon)
    want_w = src["weights"] * s[:, None, None, None]
    want_b = (src["bias"] - mu) * s + b
    got = {r.field: r.values() for r in mlqpipe.inventory(ours.spec)}
    step = (want_w.reshape(6, -1).max(1) - want_w.reshape(6, -1).min(1)) / 255
    assert np.all(np.abs(got["weights"] - want_w).reshape(6, -1) <= step[:, None] / 2 + 1e-6)
    assert np.allclose(got["bias"], want_b, atol=np.ptp(want_b) / 255)


def test_pipeline_classifier_works_and_outer_version_raised():
    inner = M.proto().Model.FromString(ZOO["conv_family"])
    for kind in ("pipelineClassifier", "pipelineRegressor", "pipeline"):
        p = M.proto().Model(specificationVersion=1)
        pipe = p.pipeline if kind == "pipeline" else getattr(p, kind).pipeline
        pipe.models.add().CopyFrom(inner)
        data = p.SerializeToString()
        if kind != "pipeline":
            with pytest.raises(ValueError, match="has no \"Type\" field"):
                M.ct_quantize(data, 8, "linear")
        ours = mlqpipe.quantize_weights(data, 8, "linear")
        alone = M.ct_quantize(ZOO["conv_family"], 8, "linear")
        got = M.proto().Model.FromString(ours.SerializeToString())
        got_pipe = got.pipeline if kind == "pipeline" else getattr(got, kind).pipeline
        assert got_pipe.models[0].SerializeToString(deterministic=True) == alone.SerializeToString(deterministic=True)
        assert got.specificationVersion == 3
        if kind == "pipeline":
            assert M.ct_quantize(data, 8, "linear").specificationVersion == 1  # coremltools leaves it


def test_float16_weights_quantized_not_skipped():
    m = M.base()
    M.inner(M.nn(m), "half", "x", "y", ic=20, oc=6, seed=300, fp16=True)
    data = m.SerializeToString()
    theirs = M.ct_quantize(data, 8, "linear")
    assert len(theirs.neuralNetwork.layers[0].innerProduct.weights.float16Value)  # skipped
    ours = mlqpipe.quantize_weights(data, 8, "linear")
    rec = {r.field: r for r in mlqpipe.inventory(ours.spec)}
    assert str(rec["weights"].storage) == "linear8" and str(rec["bias"].storage) == "linear8"
    half = np.frombuffer(M.proto().Model.FromString(data).neuralNetwork.layers[0].innerProduct.weights.float16Value, "<f2")
    assert np.abs(rec["weights"].values().ravel() - half).max() <= np.ptp(half) / 255
    # fp16 of an fp16 model: both leave it alone
    assert mlqpipe.inventory(mlqpipe.quantize_weights(data, 16).spec)[0].storage.kind == "float16"


def test_dequantize_float16_where_coremltools_raises():
    m = M.base()
    M.inner(M.nn(m), "half", "x", "y", ic=10, oc=4, seed=301, fp16=True)
    data = m.SerializeToString()
    with pytest.raises(IndexError):
        M.ct_quantize(data, None, "dequantization")
    ours = mlqpipe.quantize_weights(data, None, "dequantization")
    assert {str(r.storage) for r in mlqpipe.inventory(ours.spec)} == {"float32"}


def test_grouped_deconvolution_gets_valid_scale_count():
    m = M.base()
    M.conv(M.nn(m), "gdeconv", "x", "y", oc=8, kc=4, groups=2, deconv=True, seed=400)
    data = m.SerializeToString()
    theirs = M.ct_quantize(data, 8, "linear").neuralNetwork.layers[0].convolution.weights
    ours = mlqpipe.quantize_weights(data, 8, "linear")
    w = ours.spec.neuralNetwork.layers[0].convolution.weights
    assert w.rawValue == theirs.rawValue
    assert len(theirs.quantization.linearQuantization.scale) == 4  # outputChannels / groups: invalid
    assert np.array_equal(np.array(w.quantization.linearQuantization.scale), np.tile(np.array(theirs.quantization.linearQuantization.scale, np.float32), 2))
    before = mlqpipe.load_model(data).spec
    assert introduced_findings(before, ours.spec) == []
    assert {f.rule for f in introduced_findings(before, mlqpipe.load_model(M.ct_quantize(data, 8, "linear")).spec)} == {"scale-count"}


def test_scale_without_bias_scales_the_layer_bias():
    m = M.base()
    net = M.nn(m)
    M.inner(net, "ip", "x", "a", ic=4, oc=3, seed=500)
    sc = net.layers.add(name="s", input=["a"], output=["y"]).scale
    sc.shapeScale.append(3)
    sc.scale.floatValue.extend([2.0, -1.0, 0.5])
    data = m.SerializeToString()
    ours = mlqpipe.quantize_weights(data, 8, "linear", selector=mlqpipe.AdvancedQuantizedLayerSelector(skip_layer_types=["bias"]))
    bias = np.frombuffer(ours.spec.neuralNetwork.layers[0].innerProduct.bias.floatValue, "<f4")
    orig = M.rnd(3, seed=501)
    assert np.array_equal(bias, orig * np.array([2.0, -1.0, 0.5], np.float32))
    theirs = M.ct_quantize(data, 8, "linear", selector=qu.AdvancedQuantizedLayerSelector(skip_layer_types=["bias"]))
    assert np.array_equal(np.array(theirs.neuralNetwork.layers[0].innerProduct.bias.floatValue, np.float32), orig)  # unscaled


def test_updatable_layer_left_alone_with_warning():
    m = M.base()
    M.inner(M.nn(m), "frozen", "x", "a", ic=8, oc=4, seed=600)
    M.inner(M.nn(m), "trainable", "a", "y", ic=4, oc=2, seed=601).isUpdatable = True
    with pytest.warns(UserWarning, match="trainable.*updatable"):
        ours = mlqpipe.quantize_weights(m.SerializeToString(), 8, "linear")
    stored = {r.layer: str(r.storage) for r in mlqpipe.inventory(ours.spec)}
    assert stored == {"frozen": "linear8", "trainable": "float32"}
    assert introduced_findings(mlqpipe.load_model(m).spec, ours.spec) == []


def test_input_spec_object_is_not_modified():
    spec = M.proto().Model.FromString(ZOO["folding"])
    before = spec.SerializeToString()
    mlqpipe.quantize_weights(spec, 4, "linear")
    assert spec.SerializeToString() == before


def test_mixed_float16_and_float32_layers():
    """Create ML style: some layers float16, others float32. The float32 layer's bytes match coremltools;
    the float16 layer, which coremltools skips, is quantized too."""
    m = M.base()
    M.inner(M.nn(m), "half", "x", "a", ic=12, oc=6, seed=700, fp16=True)
    M.inner(M.nn(m), "full", "a", "y", ic=6, oc=4, seed=701)
    data = m.SerializeToString()
    theirs = M.ct_quantize(data, 4, "linear")
    ours = M.proto().Model.FromString(mlqpipe.quantize_weights(data, 4, "linear").SerializeToString())
    assert ours.neuralNetwork.layers[1].SerializeToString(deterministic=True) == theirs.neuralNetwork.layers[1].SerializeToString(deterministic=True)
    assert len(theirs.neuralNetwork.layers[0].innerProduct.weights.float16Value)  # skipped by coremltools
    assert ours.neuralNetwork.layers[0].innerProduct.weights.quantization.numberOfBits == 4


def test_fold_into_float16_layer_writes_one_storage_field():
    """coremltools' scale fold leaves float16Value beside the new floatValue (two storage fields, an
    invalid model that our check catches); ours writes float32 only."""
    m = M.base()
    net = M.nn(m)
    M.conv(net, "conv", "x", "c", oc=4, kc=2, k=1, seed=800, fp16=True)
    sc = net.layers.add(name="s", input=["c"], output=["y"]).scale
    sc.shapeScale.append(4)
    sc.scale.float16Value = np.array([1.5, 2.0, 0.5, -1.0], "<f2").tobytes()
    sc.hasBias = True
    sc.shapeBias.append(4)
    sc.bias.float16Value = np.array([0.1, 0.2, 0.3, 0.4], "<f2").tobytes()
    data = m.SerializeToString()
    theirs = M.ct_quantize(data, 8, "linear")
    findings = check_spec(mlqpipe.load_model(theirs).spec)
    assert "one-storage-field" in {f.rule for f in findings}
    ours = mlqpipe.quantize_weights(data, 8, "linear")
    assert introduced_findings(mlqpipe.load_model(data).spec, ours.spec) == []
    assert [l.name for l in ours.spec.neuralNetwork.layers] == ["conv"]
