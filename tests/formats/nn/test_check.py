"""Each rule of the validity check: a model built to break it, and the same model fixed (the rules that
are not about weights also confirmed against Core ML's own validator, when it can run here)."""

import json
from pathlib import Path

import numpy as np
import pytest

from mlqpipe import CheckError, load_model, quantize_weights
from mlqpipe.cli import main
from mlqpipe.formats.nn import proto
from mlqpipe.formats.nn.check import check_spec
from tests import builders
from tests.builders import describe, model, network


def rules(spec):
    return sorted({(f.severity, f.rule) for f in check_spec(spec)})


def small_model(dtype="<f4"):
    """The builders' model with its input and output declared: Core ML needs them (rule undefined-input)."""
    return describe(builders.small_model(dtype), [("x", [4, 4, 4])], [("y", [10])])


def declared(m, inputs=("x",), outputs=("y",)):
    return describe(m, [(n, [4]) for n in inputs], [(n, [4]) for n in outputs])


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
    assert rules(declared(m)) == [("error", "precision-mix")]


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
    p = declared(proto.Model(specificationVersion=1))
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


@pytest.mark.invalid_models("bad.mlmodel", reason="numberOfBits 0: the model `mlqpipe check` must fail on")
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
    assert rules(declared(m)) == []
    sc.shapeScale[:] = [4]
    assert rules(m) == [("error", "scale-count")]


def test_float_only_layer_types():
    m = model()
    ln = network(m).layers.add(name="ln", input=["x"], output=["y"]).layerNormalization
    ln.normalizedShape.append(4)
    ln.gamma.float16Value = np.ones(4, "<f2").tobytes()
    ln.beta.float16Value = np.zeros(4, "<f2").tobytes()
    m.specificationVersion = 4
    assert rules(declared(m)) == [("error", "quantized-unsupported")]
    m = model()
    c3 = network(m).layers.add(name="c3", input=["x"], output=["y"]).convolution3d
    c3.outputChannels, c3.inputChannels, c3.nGroups = 2, 1, 1
    c3.kernelDepth = c3.kernelHeight = c3.kernelWidth = 1
    c3.weights.rawValue = bytes([7, 8])
    c3.weights.quantization.numberOfBits = 8
    c3.weights.quantization.linearQuantization.scale.append(0.5)
    m.specificationVersion = 5
    assert rules(declared(m)) == [("error", "quantized-unsupported")]


# Rules that are not about weights, each confirmed against Core ML's own validator ----------------------

SIGMOID, TANH = bytes([0xC2, 0x02, 0x00]), bytes([0xF2, 0x01, 0x00])  # serialized ActivationParams


def _oracle(validate, tmp_path, **models) -> dict:
    """coreml-validate's verdict (None: loads) for each model, written under its name."""
    paths = {}
    for name, m in models.items():
        paths[name] = tmp_path / f"{name}.mlmodel"
        paths[name].write_bytes(m.SerializeToString())
    verdicts = validate(paths.values())
    return {name: verdicts[p] for name, p in paths.items()}


def recurrent_model(kind, n_in, n_out):
    """One float recurrent layer reading x (3 values) and the first n_in - 1 state inputs."""
    from mlqpipe.formats.nn.layers import weight_slots

    m = model()
    ins, outs = ["x", "h0", "c0", "h1", "c1"][:n_in], ["y", "h", "c", "hb", "cb"][:n_out]
    layer = network(m).layers.add(name="rnn", input=ins, output=outs)
    p = getattr(layer, kind)
    p.inputVectorSize, p.outputVectorSize = 3, 2
    if kind == "simpleRecurrent":
        p.activation = TANH
    elif kind == "gru":
        p.activations.extend([SIGMOID, TANH])
    elif kind == "uniDirectionalLSTM":
        p.activations.extend([SIGMOID, TANH, TANH])
        p.weightParams.SetInParent()
    else:
        p.activationsForwardLSTM.extend([SIGMOID, TANH, TANH])
        p.activationsBackwardLSTM.extend([SIGMOID, TANH, TANH])
        p.weightParams.add(), p.weightParams.add()
    for slot in weight_slots(layer):
        if slot.expected:
            slot.wp.floatValue = np.full(int(np.prod(slot.shape)), 0.1, "<f4").tobytes()
    return describe(m, [(n, [3] if n == "x" else [2]) for n in ins], [(n, [2]) for n in outs])


# (inputs, outputs) Core ML accepts, and a count it rejects
_RECURRENT = {
    "simpleRecurrent": ((2, 2), (1, 2), "has 1 inputs but expects exactly 2"),
    "gru": ((1, 2), (1, 1), "has 1 outputs but expects exactly 2"),
    "uniDirectionalLSTM": ((1, 3), (4, 3), "has 4 inputs but expects at most 3"),
    "biDirectionalLSTM": ((5, 5), (1, 4), "has 4 outputs but expects exactly 5"),
}


@pytest.mark.parametrize("kind", list(_RECURRENT))
def test_recurrent_layer_needs_its_state_inputs_and_outputs(kind):
    good, bad, _ = _RECURRENT[kind]
    assert rules(recurrent_model(kind, *good)) == []
    f = check_spec(recurrent_model(kind, *bad))
    assert [(x.severity, x.rule, x.where) for x in f] == [("error", "recurrent-io", "rnn")]
    assert f"{kind} has {bad[0]} input(s) and {bad[1]} output(s)" in f[0].message


@pytest.mark.invalid_models("bad*.mlmodel", reason="recurrent layers without their state blobs: Core ML must reject them")
@pytest.mark.parametrize("kind", list(_RECURRENT))
def test_recurrent_io_matches_core_ml(kind, coreml_validate, tmp_path):
    good, bad, message = _RECURRENT[kind]
    low, high = bad[0] - 1, bad[0] + 1
    cases = {"good": good, "bad": bad, "bad_in": (low, good[1]) if low >= 0 else (high, good[1]), "bad_out": (good[0], good[1] + 1)}
    cases = {k: v for k, v in cases.items() if k == "good" or v != good}
    verdicts = _oracle(coreml_validate, tmp_path, **{k: recurrent_model(kind, *v) for k, v in cases.items()})
    for name, (n_in, n_out) in cases.items():
        ours = ("error", "recurrent-io") in rules(recurrent_model(kind, n_in, n_out))
        assert ours == (verdicts[name] is not None), (name, n_in, n_out, verdicts[name])
    assert message in verdicts["bad"]


def _copy(nn, name, inp, out):
    layer = nn.layers.add(name=name, input=[inp], output=[out])
    layer.copy = b""
    return layer


def nested_model(kind, *, both_branches=True, condition_network=False, reader="b"):
    """x -> cond; a branch (or loop) whose sub-networks write b; then a layer reading `reader`."""
    m = model(version=4)
    nn = network(m)
    nn.arrayInputShapeMapping = 1  # EXACT_ARRAY_MAPPING: Core ML needs it beside iOS 13 layers
    _copy(nn, "c0", "x", "cond")
    if kind == "branch":
        br = nn.layers.add(name="br", input=["cond"]).branch
        _copy(br.ifBranch, "then", "x", "b")  # reads the enclosing network's blob
        if both_branches:
            _copy(br.elseBranch, "else", "cond", "b")
    else:
        loop = nn.layers.add(name="lp").loop
        loop.maxLoopIterations = 2
        _copy(loop.bodyNetwork, "body", "x", "b")
        if condition_network:
            loop.conditionVar = "go"
            _copy(loop.conditionNetwork, "cn", "cond", "go")
    _copy(nn, "out", reader, "y")
    return declared(m)


def pipeline_model(second_reads="h"):
    """A pipeline of two networks, x -> h -> y; the second declares `second_reads` as its input."""
    def stage(name, inp, out):
        m = model(version=4)
        network(m).arrayInputShapeMapping = 1
        _copy(network(m), name, inp, out)
        return declared(m, (inp,), (out,))

    p = declared(proto.Model(specificationVersion=4))
    p.pipeline.models.add().CopyFrom(stage("a", "x", "h"))
    p.pipeline.models.add().CopyFrom(stage("b", second_reads, "y"))
    return p


def _undeclared(m):
    m.ClearField("description")
    return m


_GRAPHS = {  # name -> (model, the finding's place or None when Core ML accepts it)
    "undeclared_input": (lambda: _undeclared(builders.small_model()), "conv1"),
    "declared_input": (lambda: small_model(), None),
    "unwritten_blob": (lambda: declared(_with_reader(small_model(), "ghost")), "late"),
    "written_blob": (lambda: declared(_with_reader(small_model(), "r1")), None),
    "branch_both_write": (lambda: nested_model("branch"), None),
    "branch_then_only": (lambda: nested_model("branch", both_branches=False), "out"),
    "loop_body": (lambda: nested_model("loop"), None),
    "loop_with_condition": (lambda: nested_model("loop", condition_network=True), "out"),
    "pipeline_chain": (lambda: pipeline_model(), None),
    "pipeline_unknown": (lambda: pipeline_model("q"), "models[1]"),
}


def _with_reader(m, blob):
    builders.add_activation(network(m), "late", blob, "z")  # a ReLU: a layer of Core ML's first version
    return m


@pytest.mark.parametrize("name", list(_GRAPHS))
def test_undefined_input(name):
    build, where = _GRAPHS[name]
    findings = check_spec(build())
    assert [(f.severity, f.rule, f.where) for f in findings] == ([("error", "undefined-input", where)] if where else [])


def test_undefined_input_messages():
    (f,) = check_spec(nested_model("branch", both_branches=False))
    assert f.message == "reads 'b', which is not a model input and no earlier layer writes"
    m = nested_model("branch")
    network(m).layers[1].branch.ifBranch.layers[0].input[0] = "nowhere"
    (f,) = check_spec(m)
    assert (f.where, f.message) == ("br.ifBranch/then", "reads 'nowhere', which is not a model input and no earlier layer of this or an enclosing network writes")
    (f,) = check_spec(pipeline_model("q"))
    assert f.message == "model input 'q' is neither an input of the pipeline nor an output of a model before it"


@pytest.mark.invalid_models("undeclared_input.mlmodel", "unwritten_blob.mlmodel", "branch_then_only.mlmodel",
                            "loop_with_condition.mlmodel", "pipeline_unknown.mlmodel",
                            reason="blobs read before they are written: Core ML must reject them")
def test_undefined_input_matches_core_ml(coreml_validate, tmp_path):
    verdicts = _oracle(coreml_validate, tmp_path, **{name: build() for name, (build, _) in _GRAPHS.items()})
    assert {name: verdicts[name] is not None for name in _GRAPHS} == {name: where is not None for name, (_, where) in _GRAPHS.items()}
    assert "consumes an input named 'ghost' which is not present in this network" in verdicts["unwritten_blob"]
    assert "consumes an input named 'b' which is not present in this network" in verdicts["branch_then_only"]
    assert "the input 'q' of model" in verdicts["pipeline_unknown"]


@pytest.mark.parametrize("version, ok", [(0, False), (1, True), (10, True), (11, False), (2**31 - 1, False)])
def test_spec_version_unknown(version, ok):
    m = small_model()
    m.specificationVersion = version
    assert [r for r in rules(m) if r[0] == "error"] == ([] if ok else [("error", "spec-version-unknown")])
    p = pipeline_model()
    p.pipeline.models[1].specificationVersion = version
    p.specificationVersion = max(version, 4)
    f = [x for x in check_spec(p) if x.rule == "spec-version-unknown"]
    assert [x.where for x in f] == ([] if ok else (["model"] if version > 10 else []) + ["models[1]"])


@pytest.mark.invalid_models("v0.mlmodel", "v11.mlmodel", "inner11.mlmodel", reason="specification versions Core ML does not know")
def test_spec_version_unknown_matches_core_ml(coreml_validate, tmp_path):
    models = {}
    for version in (0, 1, 10, 11):
        models[f"v{version}"] = small_model()
        models[f"v{version}"].specificationVersion = version
    models["inner11"] = pipeline_model()
    models["inner11"].pipeline.models[0].specificationVersion = 11
    verdicts = _oracle(coreml_validate, tmp_path, **models)
    assert {k: v is None for k, v in verdicts.items()} == {"v0": False, "v1": True, "v10": True, "v11": False, "inner11": False}
    assert "supports model version 10 or earlier" in verdicts["v11"] and "supports model version 10" in verdicts["inner11"]
    assert "version field missing or corrupt" in verdicts["v0"]
    assert all(("error", "spec-version-unknown") in rules(m) for k, m in models.items() if verdicts[k])


def test_structure_rules_on_real_and_demo_models(real_model):
    from mlqpipe.formats.nn.check import structure_findings

    for path in [real_model, *sorted(Path(__file__).resolve().parents[3].glob("pipelines/demo/*.mlmodel"))]:
        assert structure_findings(load_model(path).spec) == [], path


@pytest.mark.invalid_models("q.mlmodel", reason="quantized from an input that reads an undefined blob, kept as the user's model is")
def test_invalid_input_quantizes_with_a_warning_and_saves(tmp_path):
    m = declared(_with_reader(small_model(), "ghost"), outputs=("y", "z"))
    with pytest.warns(UserWarning, match=r"<spec>: the input already breaks a Core ML rule; quantizing it as it is: "
                                         r"error: late: reads 'ghost'.*\[undefined-input\]") as caught:
        q = quantize_weights(m, 8)
    assert len([w for w in caught if "undefined-input" in str(w.message)]) == 1
    assert q.inherited_findings and all(f.rule == "undefined-input" for f in q.inherited_findings)
    q.save(tmp_path / "q.mlmodel")  # the problem was the input's: not refused
    assert load_model(tmp_path / "q.mlmodel").spec.neuralNetwork.layers[0].convolution.weights.quantization.numberOfBits == 8
    # a problem quantizing did not bring is still refused
    network(q.spec).layers[0].output[0] = "renamed"
    with pytest.raises(CheckError, match=r"relu1: reads 'c1'.*undefined-input"):
        q.save(tmp_path / "q2.mlmodel")
    assert not (tmp_path / "q2.mlmodel").exists()


@pytest.mark.invalid_models("m.mlmodel", "out/m.mlmodel", reason="an input reading an undefined blob, and its quantized copy")
def test_invalid_input_quantizes_from_a_recipe_with_a_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.mlmodel").write_bytes(declared(_with_reader(small_model(), "ghost"), outputs=("y", "z")).SerializeToString())
    (tmp_path / "r.yaml").write_text("version: 1\nmodels:\n  - {input: m.mlmodel, output: out/m.mlmodel}\nrules:\n  all: {}\n"
                                     "stages:\n  - {mode: linear, nbits: 8, rules: [all]}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "r.yaml"]) == 0
    err = capsys.readouterr().err
    assert "mlqpipe: warning: m.mlmodel: the input already breaks a Core ML rule; quantizing it as it is: " \
           "error: late: reads 'ghost', which is not a model input and no earlier layer writes [undefined-input]" in err, err
    assert err.count("mlqpipe: warning:") == 1
    assert (tmp_path / "out" / "m.mlmodel").exists()
