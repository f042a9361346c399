"""Fuzzed models: truncated, bit-flipped, random and wrong-message bytes, shapes that lie, NaN/Inf, empty
layers, constant channels — a ModelError naming the file or layer, or a correct result; never another
exception. Counts of cases run are printed by pytest -v -s (hypothesis statistics)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mlqpipe
from mlqpipe import ModelError
from mlqpipe.formats.nn import proto
from mlqpipe.formats.nn.check import check_spec, introduced_findings
from tests.builders import add_conv, add_inner_product, model, network, small_model
from tests.conftest import REPO

SEED = (REPO / "pipelines/demo/digits_mlp.mlmodel").read_bytes()
CNN = (REPO / "pipelines/demo/digits_cnn.mlmodel").read_bytes()
SMALL = small_model().SerializeToString()


def _survives(data: bytes, nbits=8, mode="linear"):
    """Load, quantize and check; only ModelError may escape, and any result must pass Core ML's rules."""
    try:
        q = mlqpipe.quantize_weights(data, nbits, mode)
    except ModelError as e:
        assert str(e) and ("<bytes>" in str(e) or "layer" in str(e) or "model" in str(e)), str(e)
        return "error"
    except mlqpipe.CheckError:  # pragma: no cover - CheckError is a ModelError
        raise
    findings = [f for f in check_spec(q.spec) if f.severity == "error"]
    # an input that was already invalid may stay invalid in layers we did not touch; a touched one may not
    touched = {r.id for r in mlqpipe.inventory(q.spec) if r.storage.is_quantized}
    assert not [f for f in findings if f.where in touched], findings
    return "ok"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([SEED, CNN, SMALL]), st.floats(0, 1))
def test_truncated(data, fraction):
    _survives(data[: int(len(data) * fraction)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([SEED, CNN, SMALL]), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flips(data, flips):
    b = bytearray(data)
    for where, bit in flips:
        b[min(int(where * len(b)), len(b) - 1)] ^= 1 << bit
    _survives(bytes(b))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes(data):
    _survives(data)


@pytest.mark.parametrize("message", ["WeightParams", "NeuralNetworkLayer", "ConvolutionLayerParams", "Pipeline"])
def test_valid_protobuf_of_the_wrong_message(message):
    cls = proto.message_class(message)
    m = cls()
    if message == "WeightParams":
        m.floatValue = np.ones(10, "<f4").tobytes()
    elif message == "NeuralNetworkLayer":
        m.name = "x"
    elif message == "ConvolutionLayerParams":
        m.outputChannels = 3
    else:
        m.names.append("a")
    assert _survives(m.SerializeToString()) == "error"


def test_model_over_protobuf_limit(monkeypatch):
    import mlqpipe.formats.nn.model as mm

    monkeypatch.setattr(mm, "_MAX_PROTO", 1000)  # stands for 2 GB: the same check, at a testable size
    with pytest.raises(ModelError, match="exceeds protobuf's 2 GB message limit"):
        mlqpipe.load_model(SEED)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(-3, 3), st.sampled_from(["linear", "linear_lut", "kmeans_lut", "fp16"]))
def test_declared_shape_lies(ic, oc, delta, mode):
    m = model()
    layer = add_inner_product(network(m), "ip", "x", "y", ic, oc, seed=ic * 13 + oc)
    n = max(ic * oc + delta, 0)
    layer.innerProduct.weights.floatValue = np.ones(n, "<f4").tobytes()
    outcome = _survives(m.SerializeToString(), 16 if mode == "fp16" else 4, "linear" if mode == "fp16" else mode)
    assert outcome == ("ok" if delta == 0 else "error")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("nbits, mode", [(8, "linear"), (4, "linear_lut"), (4, "kmeans_lut"), (16, "linear"), (3, "linear_symmetric")])
def test_nan_inf_named_in_every_mode(bad, nbits, mode):
    m = small_model()
    w = np.frombuffer(network(m).layers[2].innerProduct.weights.floatValue, "<f4").copy()
    w[5] = bad
    network(m).layers[2].innerProduct.weights.floatValue = w.tobytes()
    with pytest.raises(ModelError, match=r"layer 'dense' \(innerProduct\) field weights: 1 NaN or Inf"):
        mlqpipe.quantize_weights(m, nbits, mode)


def test_zero_size_layers():
    m = model()
    add_inner_product(network(m), "empty", "x", "y", 0, 5, seed=1)
    add_conv(network(m), "noout", "y", "z", oc=0, kc=2, seed=2)
    for nbits, mode in [(8, "linear"), (4, "kmeans_lut"), (16, "linear")]:
        q = mlqpipe.quantize_weights(m.SerializeToString(), nbits, mode)
        assert [f for f in introduced_findings(m, q.spec) if f.severity == "error"] == []


@pytest.mark.parametrize("nbits, mode", [(8, "linear"), (2, "linear"), (8, "linear_symmetric"), (4, "linear_lut"), (4, "kmeans_lut")])
def test_constant_channels_are_exact(nbits, mode):
    m = model()
    layer = add_inner_product(network(m), "ip", "x", "y", 6, 4, seed=3)
    w = np.repeat(np.array([0.5, -0.25, 0.0, 3.0], "<f4"), 6)
    layer.innerProduct.weights.floatValue = w.tobytes()
    q = mlqpipe.quantize_weights(m, nbits, mode)
    got = {r.field: r.values() for r in mlqpipe.inventory(q.spec)}["weights"].ravel()
    if mode == "linear_symmetric":  # a one-value channel is represented within half a step of its magnitude
        assert np.allclose(got, w, atol=np.abs(w).max() / (2 ** (nbits - 1) - 1) / 2 + 1e-7)
    elif mode in ("linear", "kmeans_lut"):
        assert np.array_equal(got, w)
    else:
        assert np.abs(got - w).max() <= (w.max() - w.min()) / (2**nbits - 1) / 2 + 1e-6
