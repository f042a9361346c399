"""Where coremltools 9.0 is wrong: assert mlqpipe's behaviour, and that coremltools really differs.

Numbers refer to the expected differences listed for these oracle tests:
 1 kmeans_lut / kmeans raise TypeError in coremltools; 2 conv -> batchnorm folding raises below 16 bits;
 5 float16 weights are skipped below 16 bits; 6 grouped deconvolutions get outputChannels / nGroups
 scales; 7 a scale without bias leaves the previous layer's bias unscaled; 9 updatable layers are
 quantized; 10 a one-value scale + bias folded into a layer without bias leaves a one-value bias.
 (3 and 4, pipelines, are in test_oracle_pipelines.py; 8, dequantizing float16, in
 test_oracle_dequantize.py.)
Further differences found while writing these tests are at the end (E1-E6): coremltools errors, and
mlqpipe's deliberate refusal to quantize already-quantized weights again.
"""

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import mlqpipe  # noqa: E402
from coremltools.models.neural_network import quantization_utils as ctq  # noqa: E402
from coremltools.proto import Model_pb2  # noqa: E402

from tests.oracle import oracle_models as O  # noqa: E402


class QuantizeNothing(mlqpipe.QuantizedLayerSelector):
    """Rejects every layer: below 16 bits both tools still fold, so this shows the folded float weights."""

    def do_quantize(self, layer, **kwargs):
        return False


class CtQuantizeNothing(ctq.QuantizedLayerSelector):
    def do_quantize(self, layer, **kwargs):
        return False


def records(model) -> dict:
    """id -> WeightRecord of an mlqpipe CoreMLModel (or bytes)."""
    spec = model.spec if hasattr(model, "spec") else mlqpipe.load_model(model).spec
    return {r.id: r for r in mlqpipe.inventory(spec)}


def original_layers(data: bytes) -> dict:
    return O.layers_by_name(Model_pb2.Model.FromString(data))


def per_channel_half_step(reference: np.ndarray, nbits: int, axis0: bool = True) -> np.ndarray:
    """Largest error linear quantization may make, per output channel (or one value for 1-D blobs)."""
    rows = reference.reshape(reference.shape[0], -1) if axis0 and reference.ndim > 1 else reference.reshape(1, -1)
    step = (rows.max(axis=1) - rows.min(axis=1)) / ((1 << nbits) - 1)
    return rows, step / 2


def assert_within_linear_error(values, reference, nbits, what):
    rows, half = per_channel_half_step(np.asarray(reference, np.float64), nbits)
    err = np.abs(np.asarray(values, np.float64).reshape(rows.shape) - rows).max(axis=1)
    assert np.all(err <= half * (1 + 1e-4) + 1e-6), f"{what}: error {err.max():g} above half a step {half.max():g}"


# ---------------------------------------------------------------------------------------------------------
# 1. k-means


KMEANS_MODELS = ["dense", "conv_family", "recurrent", "channels"]


@pytest.mark.parametrize("mode", ["kmeans_lut", "kmeans"])
@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("name", KMEANS_MODELS)
def test_kmeans_where_coremltools_raises(name, nbits, mode):
    data = O.zoo_bytes(name)
    with pytest.raises(TypeError):
        O.ct_quantize(data, nbits, mode)
    ours = mlqpipe.quantize_weights(data, nbits, mode)
    ours_ct = Model_pb2.Model.FromString(ours.SerializeToString())
    assert not O.lut_size_ok(ours_ct)
    linear_lut = records(mlqpipe.quantize_weights(data, nbits, "linear_lut"))
    reference = records(mlqpipe.quantize_weights(data, nbits, "linear", selector=QuantizeNothing()))
    k_total = l_total = 0.0
    for rid, rec in records(ours).items():
        assert str(rec.storage) == f"lut{nbits}", rid
        table = np.asarray(rec.wp.quantization.lookupTableQuantization.floatValue, dtype=np.float32)
        assert table.size == 1 << nbits and table.dtype == np.float32
        w = reference[rid].values().astype(np.float64)
        k_err = float(np.sum((rec.values() - w) ** 2))
        l_err = float(np.sum((linear_lut[rid].values() - w) ** 2))
        assert k_err <= l_err * (1 + 1e-3) + 1e-12, f"{rid}: k-means error {k_err:g} > linear_lut {l_err:g}"
        k_total += k_err
        l_total += l_err
    if name != "channels":
        # normal-looking weights: k-means is clearly better than a uniform table (measured: 3.2 dB and up)
        assert k_total == 0 or 10 * np.log10(l_total / k_total) >= 2.0, (k_total, l_total)


# ---------------------------------------------------------------------------------------------------------
# 2. convolution -> batchnorm


def conv_bn_reference(data: bytes):
    """numpy folding of m_conv_batchnorm: {layer: (weights, bias)} in float64."""
    L = original_layers(data)

    def bn_factors(name):
        bn = L[name].batchnorm
        g, b, m, v = (O.wp_values(getattr(bn, f)).astype(np.float64) for f in ("gamma", "beta", "mean", "variance"))
        f = g / np.sqrt(v + np.float64(bn.epsilon))
        return f, b, m

    w1 = O.wp_values(L["conv_bn"].convolution.weights).astype(np.float64).reshape(8, -1)
    b1 = O.wp_values(L["conv_bn"].convolution.bias).astype(np.float64)
    f, beta, mean = bn_factors("bn")
    ref = {"conv_bn": (w1 * f[:, None], (b1 - mean) * f + beta)}
    w2 = O.wp_values(L["conv_nb"].convolution.weights).astype(np.float64).reshape(6, -1)
    f, beta, mean = bn_factors("bn2")
    s = O.wp_values(L["sc2"].scale.scale).astype(np.float64)
    sb = O.wp_values(L["sc2"].scale.bias).astype(np.float64)
    ref["conv_nb"] = (w2 * (f * s)[:, None], ((0 - mean) * f + beta) * s + sb)
    return ref


@pytest.mark.parametrize("nbits, mode", [(8, "linear"), (4, "linear"), (8, "linear_symmetric"), (4, "linear_lut")])
def test_conv_batchnorm_coremltools_raises(nbits, mode):
    data = O.zoo_bytes("conv_batchnorm")
    with pytest.raises(TypeError):
        O.ct_quantize(data, nbits, mode)
    with pytest.raises(TypeError):  # the fold runs before any selection
        O.ct_quantize(data, nbits, mode, selector=CtQuantizeNothing())
    ours = O.ours_quantize(data, nbits, mode)
    kinds = [layer.WhichOneof("layer") for layer in ours.neuralNetwork.layers]
    assert kinds == ["convolution", "convolution"]
    assert [list(layer.output) for layer in ours.neuralNetwork.layers] == [["y"], ["z"]]
    assert all(layer.convolution.hasBias for layer in ours.neuralNetwork.layers)


def test_conv_batchnorm_folded_float_weights_match_numpy():
    data = O.zoo_bytes("conv_batchnorm")
    folded = records(mlqpipe.quantize_weights(data, 8, "linear", selector=QuantizeNothing()))
    for layer, (w, b) in conv_bn_reference(data).items():
        got_w = folded[f"{layer}:weights"]
        got_b = folded[f"{layer}:bias"]
        assert str(got_w.storage) == "float32" and str(got_b.storage) == "float32"
        np.testing.assert_allclose(got_w.values().reshape(w.shape), w, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(got_b.values(), b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("nbits", [8, 6, 4, 2])
def test_conv_batchnorm_quantized_within_quantization_error(nbits):
    data = O.zoo_bytes("conv_batchnorm")
    quantized = records(mlqpipe.quantize_weights(data, nbits, "linear"))
    for layer, (w, b) in conv_bn_reference(data).items():
        assert str(quantized[f"{layer}:weights"].storage) == f"linear{nbits}"
        assert_within_linear_error(quantized[f"{layer}:weights"].values(), w, nbits, f"{layer} weights")
        assert_within_linear_error(quantized[f"{layer}:bias"].values(), b.reshape(1, -1), nbits, f"{layer} bias")


def test_conv_batchnorm_fp16_same_bytes_and_not_folded():
    data = O.zoo_bytes("conv_batchnorm")
    ours = O.ours_quantize(data, 16, "linear")
    O.assert_same(ours, O.ct_quantize(data, 16, "linear"), "conv_batchnorm fp16")
    assert len(ours.neuralNetwork.layers) == 5


# ---------------------------------------------------------------------------------------------------------
# 5. float16 weights


FP16_MODES = [(8, "linear"), (5, "linear"), (1, "linear"), (8, "linear_symmetric"), (2, "linear_lut"), (4, "linear_lut")]


@pytest.mark.parametrize("nbits, mode", FP16_MODES, ids=[f"{m}{n}" for n, m in FP16_MODES])
def test_float16_weights_quantized_from_their_values(nbits, mode):
    data = O.zoo_bytes("mixed_fp16")
    theirs = O.ct_quantize(data, nbits, mode)
    before = O.layers_by_name(Model_pb2.Model.FromString(data))
    after_ct = O.layers_by_name(theirs)
    # coremltools skips the float16 blobs: they come out exactly as they went in
    for name in ("conv16", "ip16"):
        kind = before[name].WhichOneof("layer")
        for field in ("weights", "bias"):
            wp_before = getattr(getattr(before[name], kind), field)
            wp_after = getattr(getattr(after_ct[name], kind), field)
            assert O.storage_fields(wp_after) == ["float16Value"]
            assert wp_after.float16Value == wp_before.float16Value
    # mlqpipe quantizes them as coremltools quantizes the same numbers stored as float32
    ours = O.ours_quantize(data, nbits, mode)
    O.assert_same(ours, O.ct_quantize(O.widened(data), nbits, mode), f"mixed_fp16 {mode}{nbits} vs widened")
    assert all(O.storage_fields(wp) == ["rawValue"] for wp in O.all_weight_params(ours))


def test_float16_weights_left_alone_by_fp16_mode():
    data = O.zoo_bytes("mixed_fp16")
    ours = O.ours_quantize(data, 16, "linear")
    O.assert_same(ours, O.ct_quantize(data, 16, "linear"), "mixed_fp16 fp16")
    for wp_in, wp_out in zip(O.all_weight_params(Model_pb2.Model.FromString(data)), O.all_weight_params(ours)):
        assert O.storage_fields(wp_out) == ["float16Value"]
        if O.storage_fields(wp_in) == ["float16Value"]:
            assert wp_out.float16Value == wp_in.float16Value


# ---------------------------------------------------------------------------------------------------------
# 6. grouped deconvolution


@pytest.mark.parametrize("nbits, mode", [(n, "linear") for n in range(1, 9)] + [(8, "linear_symmetric")])
def test_grouped_deconvolution_gets_one_scale_per_output_channel(nbits, mode):
    data = O.zoo_bytes("grouped_deconv")
    theirs = O.ct_quantize(data, nbits, mode)
    ours = O.ours_quantize(data, nbits, mode)
    patched = Model_pb2.Model()
    patched.CopyFrom(ours)
    for o_layer, t_layer, p_layer in zip(ours.neuralNetwork.layers, theirs.neuralNetwork.layers, patched.neuralNetwork.layers):
        c = o_layer.convolution
        groups = c.nGroups
        o_wp, t_wp = c.weights, t_layer.convolution.weights
        assert o_wp.rawValue == t_wp.rawValue
        t_lq, o_lq = t_wp.quantization.linearQuantization, o_wp.quantization.linearQuantization
        assert len(t_lq.scale) == c.outputChannels // groups  # coremltools: one per group slot
        assert len(o_lq.scale) == c.outputChannels
        np.testing.assert_array_equal(np.asarray(o_lq.scale), np.tile(np.asarray(t_lq.scale), groups))
        np.testing.assert_array_equal(np.asarray(o_lq.bias), np.tile(np.asarray(t_lq.bias), groups))
        p_lq = p_layer.convolution.weights.quantization.linearQuantization
        del p_lq.scale[:], p_lq.bias[:]
        p_lq.scale.extend(t_lq.scale)
        p_lq.bias.extend(t_lq.bias)
    O.assert_same(patched, theirs, "grouped deconvolution, scales aside")


# ---------------------------------------------------------------------------------------------------------
# 7. scale without bias after a layer with bias


def scale_without_bias_model():
    m = O.new_model(outputs=("y", "z"))
    net = O.network(m)
    O.conv(net, "conv", "x", "a", oc=8, kc=4, seed=301)
    O.scale(net, "conv_scale", "a", "y", [8], bias=False, seed=302)
    O.inner(net, "ip", "x", "b", ic=16, oc=10, seed=303)
    O.scale(net, "ip_scale", "b", "z", [10, 1, 1], bias=False, seed=304)
    return m


@pytest.mark.parametrize("nbits", [8, 4])
def test_scale_without_bias_scales_the_layer_bias(nbits):
    m = scale_without_bias_model()
    data = m.SerializeToString()
    L = O.layers_by_name(m)
    skip_bias_ct = ctq.AdvancedQuantizedLayerSelector(skip_layer_types=["bias"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=1)
    skip_bias = mlqpipe.AdvancedQuantizedLayerSelector(skip_layer_types=["bias"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=1)
    theirs = O.ct_quantize(data, nbits, "linear", selector=skip_bias_ct)
    ours = O.ours_quantize(data, nbits, "linear", selector=skip_bias)
    ours_l, theirs_l = O.layers_by_name(ours), O.layers_by_name(theirs)
    assert sorted(ours_l) == sorted(theirs_l) == ["conv", "ip"]
    for layer, kind, scale_layer in (("conv", "convolution", "conv_scale"), ("ip", "innerProduct", "ip_scale")):
        b = O.wp_values(getattr(L[layer], kind).bias)
        s = O.wp_values(L[scale_layer].scale.scale)
        ours_bias = np.asarray(getattr(ours_l[layer], kind).bias.floatValue, dtype=np.float32)
        theirs_bias = np.asarray(getattr(theirs_l[layer], kind).bias.floatValue, dtype=np.float32)
        np.testing.assert_array_equal(ours_bias, (s * b).astype(np.float32))
        np.testing.assert_array_equal(theirs_bias, b)  # coremltools: unscaled, wrong
        assert not np.array_equal(theirs_bias, ours_bias)
        # the weights are scaled alike by both
        assert getattr(ours_l[layer], kind).weights.SerializeToString() == getattr(theirs_l[layer], kind).weights.SerializeToString()


def test_scale_without_bias_default_selector_bias_within_error():
    m = scale_without_bias_model()
    L = O.layers_by_name(m)
    quantized = records(mlqpipe.quantize_weights(m.SerializeToString(), 8, "linear"))
    for layer, kind, scale_layer in (("conv", "convolution", "conv_scale"), ("ip", "innerProduct", "ip_scale")):
        expected = O.wp_values(L[scale_layer].scale.scale) * O.wp_values(getattr(L[layer], kind).bias)
        assert_within_linear_error(quantized[f"{layer}:bias"].values(), expected.reshape(1, -1), 8, layer)


# ---------------------------------------------------------------------------------------------------------
# 9. updatable layers


def updatable_model():
    m = O.new_model(version=4)
    m.isUpdatable = True
    net = O.network(m)
    O.inner(net, "frozen", "x", "a", ic=16, oc=8, seed=311)
    O.relu(net, "relu", "a", "b")
    O.inner(net, "trainable", "b", "y", ic=8, oc=4, seed=312).isUpdatable = True
    return m


@pytest.mark.parametrize("nbits, mode", [(8, "linear"), (4, "linear"), (4, "linear_lut"), (8, "linear_symmetric")])
def test_updatable_layer_left_alone_with_warning(nbits, mode):
    m = updatable_model()
    data = m.SerializeToString()
    theirs = O.ct_quantize(data, nbits, mode)
    with pytest.warns(UserWarning, match="updatable"):
        ours = O.ours_quantize(data, nbits, mode)
    original, ours_l, theirs_l = O.layers_by_name(m), O.layers_by_name(ours), O.layers_by_name(theirs)
    assert O.canon(ours_l["trainable"]) == O.canon(original["trainable"])
    # coremltools quantizes the updatable layer, which Core ML rejects
    assert O.storage_fields(theirs_l["trainable"].innerProduct.weights) == ["rawValue"]
    assert O.canon(ours_l["frozen"]) == O.canon(theirs_l["frozen"])
    patched = Model_pb2.Model()
    patched.CopyFrom(theirs)
    for layer in patched.neuralNetwork.layers:
        if layer.name == "trainable":
            layer.CopyFrom(original["trainable"])
    O.assert_same(ours, patched, "updatable model, trainable layer aside")


def test_updatable_model_fp16():
    """coremltools refuses fp16 for an updatable model; mlqpipe converts the rest and warns."""
    m = updatable_model()
    data = m.SerializeToString()
    with pytest.raises(Exception, match="updatable"):
        O.ct_quantize(data, 16, "linear")
    with pytest.warns(UserWarning, match="updatable"):
        ours = O.ours_quantize(data, 16, "linear")
    original, ours_l = O.layers_by_name(m), O.layers_by_name(ours)
    assert O.canon(ours_l["trainable"]) == O.canon(original["trainable"])
    frozen = ours_l["frozen"].innerProduct
    expected = O.wp_values(original["frozen"].innerProduct.weights).astype(np.float16).tobytes()
    assert frozen.weights.float16Value == expected


# ---------------------------------------------------------------------------------------------------------
# 10. one-value scale and bias folded into a layer without bias


def one_value_scale_model(kind):
    m = O.new_model()
    net = O.network(m)
    if kind == "innerProduct":
        O.inner(net, "layer", "x", "a", ic=16, oc=8, bias=False, seed=321)
    else:
        O.conv(net, "layer", "x", "a", oc=8, kc=4, bias=False, seed=321)
    O.scale(net, "scale", "a", "y", [1], bias=True, bias_shape=[1], seed=322)
    return m


@pytest.mark.parametrize("kind", ["innerProduct", "convolution"])
def test_one_value_scale_bias_broadcast(kind):
    m = one_value_scale_model(kind)
    data = m.SerializeToString()
    L = O.layers_by_name(m)
    s = O.wp_values(L["scale"].scale.scale)
    sb = O.wp_values(L["scale"].scale.bias)
    w = O.wp_values(getattr(L["layer"], kind).weights)
    # coremltools: raises with the default selector, leaves a one-value bias when biases are skipped
    with pytest.raises(Exception, match="does not divide evenly"):
        O.ct_quantize(data, 8, "linear")
    ct_skip = ctq.AdvancedQuantizedLayerSelector(skip_layer_types=["bias"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=1)
    theirs = O.ct_quantize(data, 8, "linear", selector=ct_skip)
    assert len(getattr(theirs.neuralNetwork.layers[0], kind).bias.floatValue) == 1
    # mlqpipe: a bias of outputChannels values
    skip = mlqpipe.AdvancedQuantizedLayerSelector(skip_layer_types=["bias"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=1)
    ours = O.ours_quantize(data, 8, "linear", selector=skip)
    params = getattr(ours.neuralNetwork.layers[0], kind)
    assert [layer.name for layer in ours.neuralNetwork.layers] == ["layer"]
    assert params.hasBias
    np.testing.assert_array_equal(np.asarray(params.bias.floatValue, dtype=np.float32), np.full(8, sb[0], np.float32))
    assert params.weights.SerializeToString() == getattr(theirs.neuralNetwork.layers[0], kind).weights.SerializeToString()
    folded = records(mlqpipe.quantize_weights(data, 8, "linear", selector=QuantizeNothing()))
    np.testing.assert_array_equal(folded["layer:weights"].values().ravel(), (w * s[0]).astype(np.float32))
    quantized = records(mlqpipe.quantize_weights(data, 8, "linear"))
    assert quantized["layer:bias"].values().size == 8
    np.testing.assert_allclose(quantized["layer:bias"].values(), np.full(8, sb[0]), rtol=0, atol=1e-6)


def test_one_value_scale_fp16_same_bytes():
    data = one_value_scale_model("innerProduct").SerializeToString()
    O.assert_same(O.ours_quantize(data, 16, "linear"), O.ct_quantize(data, 16, "linear"), "one-value scale fp16")


# ---------------------------------------------------------------------------------------------------------
# E1. scale folded into a deconvolution: coremltools scales the weights in the wrong layout


@pytest.mark.parametrize("groups", [1, 2])
def test_scale_into_deconvolution_uses_deconvolution_layout(groups):
    m = O.new_model()
    net = O.network(m)
    O.conv(net, "deconv", "x", "a", oc=6, kc=4 * groups, deconv=True, groups=groups, seed=331)
    O.scale(net, "scale", "a", "y", [6], bias=True, seed=332)
    data = m.SerializeToString()
    L = O.layers_by_name(m)
    kc, oc = 4 * groups, 6
    w = O.wp_values(L["deconv"].convolution.weights).reshape(groups, kc // groups, oc // groups, -1)
    s = O.wp_values(L["scale"].scale.scale)
    expected = (w * s.reshape(groups, 1, oc // groups, 1)).astype(np.float32).ravel()
    folded = records(mlqpipe.quantize_weights(data, 8, "linear", selector=QuantizeNothing()))
    np.testing.assert_array_equal(folded["deconv:weights"].values().ravel(), expected)
    b = O.wp_values(L["deconv"].convolution.bias)
    np.testing.assert_array_equal(folded["deconv:bias"].values(), (s * b + O.wp_values(L["scale"].scale.bias)).astype(np.float32))
    theirs = O.ct_quantize(data, 8, "linear", selector=CtQuantizeNothing())
    ct_w = np.asarray(theirs.neuralNetwork.layers[0].convolution.weights.floatValue, dtype=np.float32)
    assert not np.allclose(ct_w, expected)  # coremltools: [outputChannels, rest] layout, wrong here


# ---------------------------------------------------------------------------------------------------------
# E2. fold into a float16 layer: coremltools leaves float16Value next to the new values


@pytest.mark.parametrize("second", ["scale", "bias"])
def test_fold_into_float16_layer_keeps_one_storage_field(second):
    m = O.new_model()
    net = O.network(m)
    O.inner(net, "ip16", "x", "a", ic=16, oc=8, seed=341, fp16=True)
    if second == "scale":
        O.scale(net, "second", "a", "y", [8], bias=True, seed=342)
    else:
        O.bias_layer(net, "second", "a", "y", [8], seed=342)
    data = m.SerializeToString()
    theirs = O.ct_quantize(data, 8, "linear")
    assert any(len(O.storage_fields(wp)) > 1 for wp in O.all_weight_params(theirs))  # invalid model
    ours = O.ours_quantize(data, 8, "linear")
    assert all(len(O.storage_fields(wp)) == 1 for wp in O.all_weight_params(ours))
    L = O.layers_by_name(m)
    w = O.wp_values(L["ip16"].innerProduct.weights).reshape(8, 16)
    b = O.wp_values(L["ip16"].innerProduct.bias)
    if second == "scale":
        s, sb = O.wp_values(L["second"].scale.scale), O.wp_values(L["second"].scale.bias)
        w_ref, b_ref = w * s[:, None], s * b + sb
    else:
        w_ref, b_ref = w, b + O.wp_values(L["second"].bias.bias)
    got = records(mlqpipe.quantize_weights(data, 8, "linear"))
    assert_within_linear_error(got["ip16:weights"].values(), w_ref, 8, "weights")
    assert_within_linear_error(got["ip16:bias"].values(), b_ref.reshape(1, -1), 8, "bias")


# ---------------------------------------------------------------------------------------------------------
# E3. folding away a blob that is also a model output


def test_no_fold_when_the_intermediate_blob_is_a_model_output():
    """coremltools folds conv -> bias even though the conv's output "a" is a declared model output, so no
    layer produces "a" any more; mlqpipe keeps both layers (and quantizes them like coremltools would)."""
    m = O.new_model(outputs=("y", "a"))
    net = O.network(m)
    O.conv(net, "conv", "x", "a", oc=8, kc=4, seed=351)
    O.bias_layer(net, "bias", "a", "y", [8], seed=352)
    data = m.SerializeToString()
    theirs = O.ct_quantize(data, 8, "linear")
    assert "a" not in {out for layer in theirs.neuralNetwork.layers for out in layer.output}
    ours = O.ours_quantize(data, 8, "linear")
    assert [layer.name for layer in ours.neuralNetwork.layers] == ["conv", "bias"]
    assert [list(layer.output) for layer in ours.neuralNetwork.layers] == [["a"], ["y"]]
    # same as coremltools on a model where nothing can fold (the bias layer reading the model input)
    unfoldable = Model_pb2.Model.FromString(data)
    unfoldable.neuralNetwork.layers[1].input[0] = "x"
    expected = O.ct_quantize(unfoldable.SerializeToString(), 8, "linear")
    expected.neuralNetwork.layers[1].input[0] = "a"
    O.assert_same(ours, expected, "model-output blob")


# ---------------------------------------------------------------------------------------------------------
# E4. a blob read inside a nested network is not folded away


def test_no_fold_when_a_nested_network_reads_the_intermediate_blob():
    """coremltools counts readers within one network only: it folds ip -> bias although a layer inside the
    branch reads the ip's output "p", which then no longer exists. mlqpipe keeps the pair."""
    m = O.new_model(inputs=("x", "cond"), outputs=("y",))
    net = O.network(m)
    O.inner(net, "ip", "x", "p", ic=8, oc=8, seed=361)
    O.bias_layer(net, "bias", "p", "y", [8], seed=362)
    branch = net.layers.add(name="br", input=["cond"], output=[]).branch
    O.relu(branch.ifBranch, "reads_p", "p", "z")
    data = m.SerializeToString()
    theirs = O.ct_quantize(data, 8, "linear")
    assert [layer.name for layer in theirs.neuralNetwork.layers] == ["ip", "br"]
    assert "p" not in {out for layer in theirs.neuralNetwork.layers for out in layer.output}
    ours = O.ours_quantize(data, 8, "linear")
    assert [layer.name for layer in ours.neuralNetwork.layers] == ["ip", "bias", "br"]
    assert list(ours.neuralNetwork.layers[0].output) == ["p"]


# ---------------------------------------------------------------------------------------------------------
# E5. already-quantized weights: coremltools skips them silently, mlqpipe refuses


@pytest.mark.parametrize("nbits, mode", [(4, "linear"), (16, "linear"), (4, "linear_lut"), (8, "linear")])
def test_partly_quantized_model_as_coremltools(nbits, mode):
    """A model where only some layers were quantized: coremltools quantizes the float weights and returns
    quantized blobs unchanged; quantize_weights does the same (same bytes), and says which it left alone."""
    data = O.zoo_bytes("dense")
    partly = O.ct_quantize(data, 8, "linear", selector=ctq.MatrixMultiplyLayerSelector(minimum_weight_count=600))
    partly_bytes = partly.SerializeToString()
    assert any(O.storage_fields(wp) == ["rawValue"] for wp in O.all_weight_params(partly))
    assert any(O.storage_fields(wp) == ["floatValue"] for wp in O.all_weight_params(partly))
    theirs = O.ct_quantize(partly_bytes, nbits, mode)
    for before, after in zip(O.all_weight_params(partly), O.all_weight_params(theirs)):
        if O.storage_fields(before) == ["rawValue"]:
            assert O.canon(before) == O.canon(after)
    with pytest.warns(UserWarning, match=r"weight\(s\) already quantized, left as they are: layer "):
        ours = mlqpipe.quantize_weights(partly_bytes, nbits, mode)
    assert ours.SerializeToString() == theirs.SerializeToString(deterministic=True)
    # the advised route (dequantize, then quantize) is tested in test_oracle_dequantize.py


# ---------------------------------------------------------------------------------------------------------
# E6. custom LUT functions returning a table of the wrong size


def _two_entry_lut(nbits, weights):
    flat = np.asarray(weights, dtype=np.float64).ravel()
    table = np.array([flat.min(), flat.max()])
    return table, (np.abs(flat - table[0]) > np.abs(flat - table[1])).astype(np.uint8)


def _oversized_lut(nbits, weights):
    flat = np.asarray(weights, dtype=np.float64).ravel()
    table = np.linspace(flat.min(), flat.max(), (1 << nbits) + 1)
    return table, np.abs(flat[:, None] - table[None, :]).argmin(axis=1) % (1 << nbits)


def test_short_custom_lut_is_padded_to_2_pow_nbits():
    """coremltools writes the 2-entry table as it is (Core ML needs exactly 2**nbits entries); mlqpipe pads
    it with zeros, and the codes still pick the same values."""
    data = O.zoo_bytes("dense")
    theirs = O.ct_quantize(data, 4, "custom_lut", lut_function=_two_entry_lut)
    assert O.lut_size_ok(theirs)  # wrong sizes present
    ours = O.ours_quantize(data, 4, "custom_lut", lut_function=_two_entry_lut)
    assert not O.lut_size_ok(ours)
    for o, t in zip(O.all_weight_params(ours), O.all_weight_params(theirs)):
        assert o.rawValue == t.rawValue
        table = list(o.quantization.lookupTableQuantization.floatValue)
        assert table[:2] == list(t.quantization.lookupTableQuantization.floatValue)
        assert table[2:] == [0.0] * 14


def test_oversized_custom_lut_is_refused():
    data = O.zoo_bytes("dense")
    theirs = O.ct_quantize(data, 2, "custom_lut", lut_function=_oversized_lut)
    assert O.lut_size_ok(theirs)  # coremltools writes 5 entries at 2 bits
    with pytest.raises(mlqpipe.ModelError, match="entries"):
        mlqpipe.quantize_weights(data, 2, "custom_lut", lut_function=_oversized_lut)
