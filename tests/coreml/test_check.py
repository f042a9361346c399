"""Each rule of the validity check: a model built to break it, and the same model fixed."""

import json

import numpy as np
import pytest

from mlqpipe import CheckError, load_model, quantize_weights
from mlqpipe.cli import main
from mlqpipe.coreml import proto
from mlqpipe.coreml.check import check_spec
from tests.builders import model, network, small_model


def rules(spec):
    return sorted({(f.severity, f.rule) for f in check_spec(spec)})


def test_clean_models_pass():
    assert rules(small_model()) == []
    assert rules(small_model(dtype="<f2")) == [("warning", "spec-version")]  # Core ML's validator accepts it
    m = small_model(dtype="<f2")
    m.specificationVersion = 2
    assert rules(m) == []


def test_real_models_pass(real_model):
    assert check_spec(load_model(real_model).spec) == []


def test_two_storage_fields():
    m = small_model()
    wp = network(m).layers[0].convolution.weights
    wp.float16Value = np.zeros(8 * 4 * 9, "<f2").tobytes()
    findings = check_spec(m)
    assert [(f.rule, f.where) for f in findings] == [("one-storage-field", "conv1:weights")]
    assert "floatValue and float16Value are all set" in findings[0].message


def test_element_count_float32_and_float16():
    m = small_model()
    network(m).layers[2].innerProduct.weights.floatValue = np.zeros(319, "<f4").tobytes()
    f = check_spec(m)
    assert [x.rule for x in f] == ["element-count"] and "holds 319 float32 values; the layer's parameters imply 320" in f[0].message
    m = small_model(dtype="<f2")
    m.specificationVersion = 2
    network(m).layers[2].innerProduct.bias.float16Value = np.zeros(11, "<f2").tobytes()
    assert [x.rule for x in check_spec(m)] == ["element-count"]


def test_missing_bias_data():
    m = small_model()
    network(m).layers[2].innerProduct.ClearField("bias")
    f = check_spec(m)
    assert [(x.rule, x.where) for x in f] == [("missing-data", "dense:bias")]
    network(m).layers[2].innerProduct.hasBias = False
    assert check_spec(m) == []


def test_precision_mix_weights_and_bias():
    m = small_model()
    bias = network(m).layers[2].innerProduct.bias
    bias.float16Value = np.frombuffer(bias.floatValue, "<f4").astype("<f2").tobytes()
    bias.ClearField("floatValue")
    m.specificationVersion = 2
    f = check_spec(m)
    assert [(x.rule, x.where) for x in f] == [("precision-mix", "dense")]


def test_precision_mix_batchnorm():
    m = model()
    bn = network(m).layers.add(name="bn", input=["x"], output=["y"]).batchnorm
    bn.channels = 3
    for i, name in enumerate(("gamma", "beta", "mean", "variance")):
        dtype = "<f2" if i == 3 else "<f4"
        field = "float16Value" if i == 3 else "floatValue"
        setattr(getattr(bn, name), field, np.ones(3, dtype).tobytes())
    m.specificationVersion = 2
    assert rules(m) == [("error", "precision-mix")]


def _quantized(nbits=4, mode="linear"):
    return quantize_weights(small_model(), nbits, mode).spec


def test_quantized_outputs_pass():
    for nbits in range(1, 9):
        for mode in ("linear", "linear_lut", "kmeans_lut"):
            assert rules(_quantized(nbits, mode)) == [], (nbits, mode)


def test_nbits_out_of_range():
    spec = _quantized()
    network(spec).layers[0].convolution.weights.quantization.numberOfBits = 9
    assert ("error", "nbits") in rules(spec)


def test_packed_size_short_and_long():
    spec = _quantized()
    wp = network(spec).layers[0].convolution.weights
    full = wp.rawValue
    wp.rawValue = full[:-1]
    assert rules(spec) == [("error", "packed-size")]
    wp.rawValue = full + b"\0"
    assert rules(spec) == [("warning", "packed-size")]


def test_scale_and_bias_counts():
    spec = _quantized()
    lq = network(spec).layers[0].convolution.weights.quantization.linearQuantization
    lq.scale.append(1.0)  # 9 scales for 8 output channels
    lq.bias.append(0.0)
    assert rules(spec) == [("error", "scale-count")]
    del lq.scale[-1]
    assert rules(spec) == [("error", "bias-count")]
    del lq.bias[:]
    assert rules(spec) == []  # no biases is allowed


def test_lut_size():
    spec = _quantized(3, "linear_lut")
    lut = network(spec).layers[2].innerProduct.weights.quantization.lookupTableQuantization
    del lut.floatValue[-1]
    f = check_spec(spec)
    assert [x.rule for x in f] == ["lut-size"] and "needs exactly 8" in f[0].message


def test_nan_in_scale_table_and_float_data():
    spec = _quantized()
    network(spec).layers[0].convolution.weights.quantization.linearQuantization.scale[0] = float("nan")
    assert rules(spec) == [("error", "finite-values")]
    m = small_model()
    w = np.frombuffer(network(m).layers[2].innerProduct.weights.floatValue, "<f4").copy()
    w[0] = np.inf
    network(m).layers[2].innerProduct.weights.floatValue = w.tobytes()
    assert rules(m) == [("error", "finite-values")]


def test_spec_version_for_quantized_weights():
    spec = _quantized()
    assert spec.specificationVersion == 3
    spec.specificationVersion = 2
    f = check_spec(spec)
    assert [x.rule for x in f] == ["spec-version"] and "needs >= 3" in f[0].message


def test_pipeline_outer_version():
    p = proto.Model(specificationVersion=1)
    inner = p.pipeline.models.add()
    inner.CopyFrom(_quantized())
    assert rules(p) == [("warning", "pipeline-version")]
    p.specificationVersion = 3
    assert rules(p) == []


def test_updatable_quantized_layer():
    spec = _quantized()
    network(spec).layers[0].isUpdatable = True
    assert ("error", "updatable-quantized") in rules(spec)


def test_int8_only_with_dynamic_quantize():
    m = small_model()
    ip = network(m).layers[2].innerProduct
    ip.weights.ClearField("floatValue")
    ip.weights.int8RawValue = np.zeros(320, np.int8).tobytes()
    ip.weights.quantization.numberOfBits = 8
    ip.weights.quantization.linearQuantization.scale.append(0.1)
    m.specificationVersion = 5
    assert rules(m) == [("error", "int8-dynamic")]
    ip.int8DynamicQuantize = True
    assert rules(m) == []


def test_save_refuses_invalid_model_and_writes_nothing(tmp_path):
    q = quantize_weights(small_model(), 4)
    del network(q.spec).layers[0].convolution.weights.quantization.linearQuantization.scale[-1]
    target = tmp_path / "out.mlmodel"
    with pytest.raises(CheckError, match=r"(?s)out\.mlmodel: refusing to write a model Core ML would reject.*conv1:weights.*scale-count"):
        q.save(target)
    assert list(tmp_path.iterdir()) == []


def test_cli_check_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.mlmodel"
    quantize_weights(small_model(), 8).save(good)
    bad_spec = quantize_weights(small_model(), 8).spec
    network(bad_spec).layers[0].convolution.weights.quantization.numberOfBits = 0
    bad = tmp_path / "bad.mlmodel"
    bad.write_bytes(bad_spec.SerializeToString())
    assert main(["check", str(good)]) == 0
    assert "good.mlmodel: OK (0 errors, 0 warnings)" in capsys.readouterr().out
    assert main(["check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.mlmodel: error: conv1:weights: numberOfBits is 0; Core ML allows 1..8 [nbits]" in out
    assert main(["check", str(tmp_path / "missing.mlmodel")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert main(["check", "--json", str(bad)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["findings"][0]["rule"] == "nbits"


def test_vectors_take_one_scale():
    spec = _quantized()
    lq = network(spec).layers[0].convolution.bias.quantization.linearQuantization
    assert len(lq.scale) == 1
    lq.scale.append(1.0)
    lq.bias.append(0.0)
    assert rules(spec) == [("error", "scale-count")]  # Core ML: a bias's expected size is 1


def test_scale_layer_with_channel_shape_may_take_one_scale_per_channel():
    m = model()
    sc = network(m).layers.add(name="s", input=["x"], output=["y"]).scale
    sc.shapeScale.extend([4, 1, 1])
    sc.scale.rawValue = bytes([1, 2, 3, 4])
    sc.scale.quantization.numberOfBits = 8
    sc.scale.quantization.linearQuantization.scale.extend([0.1] * 4)
    m.specificationVersion = 3
    assert rules(m) == []
    sc.shapeScale[:] = [4]
    assert rules(m) == [("error", "scale-count")]


def test_float_only_layer_types():
    m = model()
    ln = network(m).layers.add(name="ln", input=["x"], output=["y"]).layerNormalization
    ln.normalizedShape.append(4)
    ln.gamma.float16Value = np.ones(4, "<f2").tobytes()
    ln.beta.float16Value = np.zeros(4, "<f2").tobytes()
    m.specificationVersion = 4
    assert ("error", "quantized-unsupported") in rules(m)
    m = model()
    c3 = network(m).layers.add(name="c3", input=["x"], output=["y"]).convolution3d
    c3.outputChannels, c3.inputChannels, c3.nGroups = 2, 1, 1
    c3.kernelDepth = c3.kernelHeight = c3.kernelWidth = 1
    c3.weights.rawValue = bytes([7, 8])
    c3.weights.quantization.numberOfBits = 8
    c3.weights.quantization.linearQuantization.scale.append(0.5)
    m.specificationVersion = 5
    assert rules(m) == [("error", "quantized-unsupported")]
