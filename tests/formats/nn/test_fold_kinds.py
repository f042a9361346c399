"""formats/nn/fold.py: every fold kind against numpy's arithmetic on the original weights, and every pair
that must not be folded (intermediate blob read twice, a model output, updatable, quantized)."""

import numpy as np
import pytest

import mlqpipe
from mlqpipe.formats.nn.fold import fold_model
from tests.builders import add_activation, add_conv, add_inner_product, describe, layer_types, model, network, set_float


def _f32(wp) -> np.ndarray:
    return np.frombuffer(wp.floatValue, "<f4").astype(np.float64)


def _batchnorm(nn, name, inp, out, c, seed):
    bn = nn.layers.add(name=name, input=[inp], output=[out]).batchnorm
    bn.channels, bn.epsilon = c, 1e-3
    rng = np.random.default_rng(seed)
    values = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.normal(0, 0.1, c), "mean": rng.normal(0, 0.1, c),
              "variance": rng.uniform(0.2, 2.0, c)}
    for f, v in values.items():
        set_float(getattr(bn, f), v)
    return {f: v.astype(np.float32).astype(np.float64) for f, v in values.items()}, 1e-3


def _scale(nn, name, inp, out, c, seed, bias=True, shape=None):
    sc = nn.layers.add(name=name, input=[inp], output=[out]).scale
    shape = shape or [c]
    sc.shapeScale.extend(shape)
    rng = np.random.default_rng(seed)
    s = rng.uniform(-2, 2, int(np.prod(shape))).astype(np.float32)
    set_float(sc.scale, s)
    sb = None
    if bias:
        sc.hasBias = True
        sc.shapeBias.extend(shape)
        sb = rng.normal(0, 0.1, int(np.prod(shape))).astype(np.float32)
        set_float(sc.bias, sb)
    return s.astype(np.float64), None if sb is None else sb.astype(np.float64)


def _bias(nn, name, inp, out, shape, seed):
    layer = nn.layers.add(name=name, input=[inp], output=[out]).bias
    layer.shape.extend(shape)
    b = np.random.default_rng(seed).normal(0, 0.1, int(np.prod(shape))).astype(np.float32)
    set_float(layer.bias, b)
    return b.astype(np.float64)


def _conv_first(bias=True):
    m = model()
    nn = network(m)
    conv = add_conv(nn, "conv", "x", "c", oc=4, kc=3, bias=bias, seed=5).convolution
    w = _f32(conv.weights).reshape(4, -1)
    b = _f32(conv.bias) if bias else np.zeros(4)
    return m, nn, w, b


def _ip_first(bias=True):
    m = model()
    nn = network(m)
    ip = add_inner_product(nn, "ip", "x", "c", ic=5, oc=3, bias=bias, seed=6).innerProduct
    return m, nn, _f32(ip.weights).reshape(3, 5), (_f32(ip.bias) if bias else np.zeros(3))


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_conv_batchnorm():
    m, nn, w, b = _conv_first()
    p, eps = _batchnorm(nn, "bn", "c", "y", 4, seed=7)
    folds = fold_model(m)
    assert [(f.into, f.removed, f.kind) for f in folds] == [("conv", "bn", "batchnorm")]
    assert layer_types(m) == ["convolution"] and list(nn.layers[0].output) == ["y"]
    f = p["gamma"] / np.sqrt(p["variance"] + eps)
    conv = nn.layers[0].convolution
    _close(_f32(conv.weights).reshape(4, -1), w * f[:, None])
    _close(_f32(conv.bias), (b - p["mean"]) * f + p["beta"])


def test_conv_without_bias_batchnorm_gets_a_bias():
    m, nn, w, _ = _conv_first(bias=False)
    p, eps = _batchnorm(nn, "bn", "c", "y", 4, seed=8)
    fold_model(m)
    conv = nn.layers[0].convolution
    f = p["gamma"] / np.sqrt(p["variance"] + eps)
    assert conv.hasBias
    _close(_f32(conv.bias), -p["mean"] * f + p["beta"])


def test_conv_scale():
    m, nn, w, b = _conv_first()
    s, sb = _scale(nn, "sc", "c", "y", 4, seed=9)
    assert [(f.into, f.removed, f.kind) for f in fold_model(m)] == [("conv", "sc", "scale")]
    conv = nn.layers[0].convolution
    _close(_f32(conv.weights).reshape(4, -1), w * s[:, None])
    _close(_f32(conv.bias), s * b + sb)


def test_conv_bias():
    m, nn, w, b = _conv_first()
    bb = _bias(nn, "add_b", "c", "y", [4, 1, 1], seed=10)
    assert [(f.into, f.removed, f.kind) for f in fold_model(m)] == [("conv", "add_b", "bias")]
    conv = nn.layers[0].convolution
    _close(_f32(conv.weights).reshape(4, -1), w)
    _close(_f32(conv.bias), b + bb)


def test_inner_product_scale_without_bias_scales_the_layer_bias():
    m, nn, w, b = _ip_first()
    s, _ = _scale(nn, "sc", "c", "y", 3, seed=11, bias=False)
    assert [(f.into, f.kind) for f in fold_model(m)] == [("ip", "scale")]
    ip = nn.layers[0].innerProduct
    _close(_f32(ip.weights).reshape(3, 5), w * s[:, None])
    _close(_f32(ip.bias), s * b)


def test_inner_product_one_value_scale_is_broadcast():
    m, nn, w, b = _ip_first()
    s, sb = _scale(nn, "sc", "c", "y", 3, seed=12, shape=[1])
    fold_model(m)
    ip = nn.layers[0].innerProduct
    _close(_f32(ip.weights).reshape(3, 5), w * s[0])
    _close(_f32(ip.bias), s[0] * b + sb[0])
    assert _f32(ip.bias).shape == (3,)


def test_inner_product_bias_into_a_layer_without_bias():
    m, nn, w, _ = _ip_first(bias=False)
    bb = _bias(nn, "add_b", "c", "y", [3], seed=13)
    assert [(f.into, f.kind) for f in fold_model(m)] == [("ip", "bias")]
    ip = nn.layers[0].innerProduct
    assert ip.hasBias
    _close(_f32(ip.bias), bb)
    _close(_f32(ip.weights).reshape(3, 5), w)


def test_batchnorm_scale():
    m = model()
    nn = network(m)
    p, _ = _batchnorm(nn, "bn", "x", "b", 4, seed=14)
    s, sb = _scale(nn, "sc", "b", "y", 4, seed=15)
    assert [(f.into, f.removed, f.kind) for f in fold_model(m)] == [("bn", "sc", "scale")]
    assert layer_types(m) == ["batchnorm"]
    bn = nn.layers[0].batchnorm
    _close(_f32(bn.gamma), p["gamma"] * s)
    _close(_f32(bn.beta), p["beta"] * s + sb)
    _close(_f32(bn.mean), p["mean"])
    _close(_f32(bn.variance), p["variance"])


def test_chain_folds_in_order_and_float16_becomes_float32():
    m = model()
    nn = network(m)
    conv = add_conv(nn, "conv", "x", "c", oc=4, kc=3, seed=16, dtype="<f2").convolution
    w = np.frombuffer(conv.weights.float16Value, "<f2").astype(np.float64).reshape(4, -1)
    b = np.frombuffer(conv.bias.float16Value, "<f2").astype(np.float64)
    s, sb = _scale(nn, "sc", "c", "d", 4, seed=17)
    bb = _bias(nn, "add_b", "d", "y", [4], seed=18)
    assert [f.kind for f in fold_model(m)] == ["scale", "bias"]
    conv = nn.layers[0].convolution
    assert not conv.weights.float16Value and not conv.bias.float16Value  # one precision: float32
    _close(_f32(conv.weights).reshape(4, -1), w * s[:, None])
    _close(_f32(conv.bias), s * b + sb + bb)


# --- refusals --------------------------------------------------------------------------------------------


def _unchanged(m):
    before = m.SerializeToString()
    assert fold_model(m) == []
    assert m.SerializeToString() == before


def test_no_fold_when_the_intermediate_blob_has_a_second_reader():
    m, nn, _, _ = _conv_first()
    _batchnorm(nn, "bn", "c", "y", 4, seed=19)
    add_activation(nn, "relu", "c", "z")  # reads the conv's output too
    _unchanged(m)


def test_no_fold_when_a_nested_network_reads_the_intermediate_blob():
    m, nn, _, _ = _ip_first()
    _bias(nn, "add_b", "c", "y", [3], seed=20)
    branch = nn.layers.add(name="branch", input=["cond"], output=[]).branch
    add_activation(branch.ifBranch, "inner_relu", "c", "z")
    _unchanged(m)


def test_no_fold_when_the_intermediate_blob_is_a_model_output():
    m, nn, _, _ = _conv_first()
    _scale(nn, "sc", "c", "y", 4, seed=21)
    describe(m, [("x", [3, 8, 8])], [("y", [4, 6, 6]), ("c", [4, 6, 6])])
    _unchanged(m)
    describe(m, [("x", [3, 8, 8])], [("y", [4, 6, 6])])  # the same model with "c" internal folds
    assert [f.kind for f in fold_model(m)] == ["scale"]


@pytest.mark.parametrize("which", ["first", "second", "blob"])
def test_no_fold_when_a_layer_or_weight_is_updatable(which):
    m, nn, _, _ = _ip_first()
    _scale(nn, "sc", "c", "y", 3, seed=22)
    if which == "first":
        nn.layers[0].isUpdatable = True
    elif which == "second":
        nn.layers[1].isUpdatable = True
    else:
        nn.layers[0].innerProduct.weights.isUpdatable = True
    _unchanged(m)


def test_no_fold_into_a_quantized_layer():
    m = model()
    add_inner_product(network(m), "ip", "x", "c", ic=5, oc=3, seed=23)
    describe(m, [("x", [5])], [("c", [3])])
    spec = mlqpipe.quantize_weights(m, 8, "linear").spec
    for s in (spec, m):  # quantized, and the float original as a control
        _bias(network(s), "add_b", "c", "y", [3], seed=24)
        describe(s, [("x", [5])], [("y", [3])])
    _unchanged(spec)
    assert layer_types(spec) == ["innerProduct", "bias"]
    assert [f.kind for f in fold_model(m)] == ["bias"]


def test_no_fold_of_a_quantized_scale():
    m = model()
    nn = network(m)
    _batchnorm(nn, "bn", "x", "b", 4, seed=25)
    _scale(nn, "sc", "b", "y", 4, seed=26)
    describe(m, [("x", [4, 2, 2])], [("y", [4, 2, 2])])
    spec = mlqpipe.quantize_weights(m, 8, "linear", selector=lambda rec: rec.layer == "sc").spec
    assert {r.id: str(r.storage) for r in mlqpipe.inventory(spec) if r.layer == "sc"} == {"sc:scale": "linear8", "sc:bias": "linear8"}
    _unchanged(spec)
    assert [f.kind for f in fold_model(m)] == ["scale"]  # the float original folds


def test_no_fold_when_shapes_do_not_line_up():
    m, nn, _, _ = _conv_first()
    _bias(nn, "add_b", "c", "y", [2], seed=27)  # 2 values for 4 channels
    _unchanged(m)
