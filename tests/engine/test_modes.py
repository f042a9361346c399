"""engine/modes.py: each mode on one weight record of a small model — the storage it writes, its nbits, and
the round-trip error, checked against bounds computed here with numpy from the float weights."""

import numpy as np
import pytest

from mlqpipe.engine.modes import ModeSettings, apply_mode, canonical_mode, check_settings
from mlqpipe.errors import ModelError
from mlqpipe.formats.nn.inventory import inventory
from tests.builders import add_conv, add_inner_product, model, network


def _spec(dtype="<f4"):
    """innerProduct 'ip' (6 out x 20 in, bias) and a conv 'conv' (4 out, 3 in, 3x3): channels of different ranges."""
    m = model()
    nn = network(m)
    layer = add_inner_product(nn, "ip", "x", "h", ic=20, oc=6, seed=11, dtype=dtype)
    w = np.frombuffer(layer.innerProduct.weights.floatValue or layer.innerProduct.weights.float16Value,
                      "<f4" if dtype == "<f4" else "<f2").astype(np.float32).reshape(6, 20)
    w = w * np.array([0.1, 1, 3, 0.01, 10, 0.5], np.float32)[:, None]  # very different per-channel ranges
    if dtype == "<f4":
        layer.innerProduct.weights.floatValue = w.astype("<f4").tobytes()
    else:
        layer.innerProduct.weights.float16Value = w.astype("<f2").tobytes()
    add_conv(nn, "conv", "h", "y", oc=4, kc=3, seed=12, dtype=dtype)
    return m


def _record(spec, rid):
    return next(r for r in inventory(spec) if r.id == rid)


def _apply(mode, nbits=8, rid="ip:weights", dtype="<f4", **kw):
    spec = _spec(dtype)
    before = _record(spec, rid).values().astype(np.float64)
    changed = apply_mode(_record(spec, rid), ModeSettings(mode, nbits, **kw))
    after = _record(spec, rid)
    return spec, before, after, changed


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_linear_per_channel_half_step(nbits):
    spec, w, rec, changed = _apply("linear", nbits)
    assert changed and str(rec.storage) == f"linear{nbits}" and rec.storage.kind == "linear" and rec.storage.nbits == nbits
    lq = rec.wp.quantization.linearQuantization
    assert len(lq.scale) == 6 and len(lq.bias) == 6  # one per output channel
    rows = w.reshape(6, -1)
    step = (rows.max(1) - rows.min(1)) / (2**nbits - 1)
    np.testing.assert_allclose(np.asarray(lq.scale, np.float64), step, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lq.bias, np.float64), rows.min(1), rtol=1e-6)
    err = np.abs(rec.values().reshape(6, -1) - rows).max(1)
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    # per channel, not per tensor: the smallest channel's error is far below a per-tensor step
    assert err[3] < (w.max() - w.min()) / (2**nbits - 1) / 20
    # the other record of the layer is untouched
    assert str(_record(spec, "ip:bias").storage) == "float32"


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_linear_symmetric_scale_and_error(nbits):
    _, w, rec, _ = _apply("linear_symmetric", nbits)
    assert str(rec.storage) == f"linear{nbits}"
    rows = w.reshape(6, -1)
    scale = np.abs(rows).max(1) / (2 ** (nbits - 1) - 1)
    lq = rec.wp.quantization.linearQuantization
    np.testing.assert_allclose(np.asarray(lq.scale, np.float64), scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lq.bias, np.float64), -(2 ** (nbits - 1)) * scale, rtol=1e-6)
    err = np.abs(rec.values().reshape(6, -1) - rows).max(1)
    assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("nbits", [1, 3, 4])
def test_linear_lut_is_one_uniform_table_for_the_tensor(nbits):
    _, w, rec, _ = _apply("linear_lut", nbits)
    assert str(rec.storage) == f"lut{nbits}" and rec.storage.kind == "lut"
    table = np.asarray(rec.wp.quantization.lookupTableQuantization.floatValue, np.float64)
    step = (w.max() - w.min()) / (2**nbits - 1)
    np.testing.assert_allclose(table, w.min() + step * np.arange(2**nbits), rtol=1e-5, atol=1e-6)
    got = rec.values().astype(np.float64).ravel()
    assert np.all(np.isin(got.astype(np.float32), table.astype(np.float32)))
    assert np.abs(got - w.ravel()).max() <= step / 2 * (1 + 1e-5) + 1e-7


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_kmeans_lut_no_worse_than_linear_lut(nbits):
    _, w, rec, _ = _apply("kmeans", nbits)  # the alias
    assert str(rec.storage) == f"lut{nbits}"
    table = np.asarray(rec.wp.quantization.lookupTableQuantization.floatValue, np.float32)
    assert table.size == 2**nbits
    got = rec.values()
    assert np.all(np.isin(got, table))
    # every weight gets its nearest table entry
    nearest = table[np.abs(w.ravel()[:, None] - table[None, :].astype(np.float64)).argmin(1)]
    np.testing.assert_allclose(np.abs(got.ravel() - w.ravel()), np.abs(nearest - w.ravel()), rtol=1e-5, atol=1e-7)
    _, _, lin, _ = _apply("linear_lut", nbits)
    k_err = np.sum((got.astype(np.float64).ravel() - w.ravel()) ** 2)
    l_err = np.sum((lin.values().astype(np.float64).ravel() - w.ravel()) ** 2)
    assert k_err <= l_err * (1 + 1e-6)


def test_custom_lut_stores_the_functions_table_and_codes():
    calls = []

    def fn(nbits, weights):
        calls.append((nbits, weights.shape))
        table = np.array([-1.0, -0.1, 0.1, 1.0], np.float32)
        return table, np.abs(weights.reshape(-1, 1) - table[None, :]).argmin(1)

    _, w, rec, _ = _apply("custom_lut", 2, lut_function=fn)
    assert calls == [(2, (6, 20))] and str(rec.storage) == "lut2"
    table = np.array([-1.0, -0.1, 0.1, 1.0], np.float32)
    want = table[np.abs(w.ravel()[:, None] - table[None, :]).argmin(1)]
    np.testing.assert_array_equal(rec.values().ravel(), want)


def test_custom_lut_errors_name_the_weight():
    with pytest.raises(ModelError, match="custom_lut needs a callable"):
        _apply("custom_lut", 2)

    def boom(nbits, weights):
        raise RuntimeError("no table")

    with pytest.raises(ModelError, match=r"layer 'ip' \(innerProduct\) field weights: custom LUT function raised RuntimeError: no table"):
        _apply("custom_lut", 2, lut_function=boom)


def test_fp16_rounds_to_nearest_float16():
    _, w, rec, changed = _apply("fp16")
    assert changed and str(rec.storage) == "float16" and rec.storage.nbits == 16
    np.testing.assert_array_equal(rec.values().ravel(), w.astype(np.float32).astype(np.float16).astype(np.float32).ravel())
    assert len(rec.wp.float16Value) == 2 * 120 and not rec.wp.floatValue


def test_fp16_of_float16_and_dequantize_of_float32_do_nothing():
    spec = _spec("<f2")
    blob = _record(spec, "ip:weights").wp.float16Value
    assert apply_mode(_record(spec, "ip:weights"), ModeSettings("float16")) is False
    assert _record(spec, "ip:weights").wp.float16Value == blob
    spec = _spec()
    blob = _record(spec, "ip:weights").wp.floatValue
    assert apply_mode(_record(spec, "ip:weights"), ModeSettings("dequantization")) is False
    assert _record(spec, "ip:weights").wp.floatValue == blob


@pytest.mark.parametrize("mode, nbits", [("linear", 3), ("linear_lut", 4), ("fp16", 16)])
def test_dequantize_returns_the_quantized_values_as_float32(mode, nbits):
    spec, w, rec, _ = _apply(mode, nbits)
    quantized = rec.values().copy()
    assert apply_mode(_record(spec, "ip:weights"), ModeSettings("dequantize")) is True
    back = _record(spec, "ip:weights")
    assert str(back.storage) == "float32" and not back.wp.HasField("quantization")
    np.testing.assert_array_equal(back.values(), quantized)


def test_quantizing_a_quantized_blob_is_refused():
    spec, _, _, _ = _apply("linear", 8)
    for mode in ("linear", "kmeans_lut", "fp16"):
        with pytest.raises(ModelError, match=r"ip.*already quantized \(linear8\); dequantize it first"):
            apply_mode(_record(spec, "ip:weights"), ModeSettings(mode, 4))


def test_float16_weights_quantized_from_their_float16_values():
    _, w, rec, _ = _apply("linear", 8, dtype="<f2")
    rows = w.reshape(6, -1)  # w: the float16 numbers themselves
    step = (rows.max(1) - rows.min(1)) / 255
    assert str(rec.storage) == "linear8"
    assert np.all(np.abs(rec.values().reshape(6, -1) - rows).max(1) <= step / 2 * (1 + 1e-5) + 1e-7)


def test_conv_weights_get_one_scale_per_output_channel():
    _, w, rec, _ = _apply("linear", 4, rid="conv:weights")
    rows = w.reshape(4, -1)
    step = (rows.max(1) - rows.min(1)) / 15
    assert len(rec.wp.quantization.linearQuantization.scale) == 4
    assert np.all(np.abs(rec.values().reshape(4, -1) - rows).max(1) <= step / 2 * (1 + 1e-5) + 1e-7)


def test_a_bias_is_one_channel():
    _, w, rec, _ = _apply("linear", 2, rid="ip:bias")
    step = (w.max() - w.min()) / 3
    assert len(rec.wp.quantization.linearQuantization.scale) == 1
    assert np.abs(rec.values() - w).max() <= step / 2 * (1 + 1e-5) + 1e-7


@pytest.mark.parametrize("mode, nbits, message", [
    ("linear", 0, "nbits must be 1..8, got 0"),
    ("linear", 9, "nbits must be 1..8, got 9"),
    ("linear_lut", True, "nbits must be an integer"),
    ("linear_symmetric", 1, "linear_symmetric: nbits must be 2..8"),
    ("nope", 8, "unknown quantization mode 'nope'"),
])
def test_impossible_settings_are_refused(mode, nbits, message):
    with pytest.raises(ModelError, match=message):
        check_settings(mode, nbits)


def test_possible_settings_and_aliases():
    for mode, nbits in [("linear", 1), ("linear", 8), ("linear_symmetric", 2), ("kmeans", 4), ("fp16", None), ("dequantization", None)]:
        check_settings(mode, nbits)
    assert [canonical_mode(m) for m in ("kmeans", "dequantization", "float16", "linear")] == ["kmeans_lut", "dequantize", "fp16", "linear"]


def test_float16_overflow_is_refused():
    spec = _spec()
    rec = _record(spec, "ip:bias")
    values = np.zeros(6, np.float32)
    values[:2] = [65504.0, -1.5]
    rec.wp.floatValue = values.tobytes()
    assert apply_mode(_record(spec, "ip:bias"), ModeSettings("fp16")) is True
    assert _record(spec, "ip:bias").values()[:2].tolist() == [65504.0, -1.5]
    rec = _record(spec, "ip:weights")
    values = rec.values().ravel().copy()
    values[7] = -70000.0
    rec.wp.floatValue = values.astype("<f4").tobytes()
    with pytest.raises(ModelError, match=r"layer 'ip' \(innerProduct\) field weights: values up to 70000 do not fit float16"):
        apply_mode(_record(spec, "ip:weights"), ModeSettings("fp16"))
    assert str(_record(spec, "ip:weights").storage) == "float32"  # left as it was
