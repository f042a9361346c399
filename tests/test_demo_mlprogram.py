"""The ML-program demo: pipelines/demo/digits_mlp.mlpackage is exactly what make_mlprogram.py makes, Core ML,
coremltools and mlqpipe read it as the .mlmodel's classifier (same weights, same labels and probabilities, a
`classify` head laid out as coremltools' classifier_config lays it out), and every ML-program recipe in
pipelines/ builds from it into packages that pass both checkers, incrementally; the demo recipe is gated on
held-out accuracy like the neural-network demo."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mlqpipe
from mlqpipe.artifacts import digest, mapping_digest, read_tree, write_tree
from mlqpipe.cli import main
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.description import read_description
from mlqpipe.formats.mlprogram.check import check_program
from mlqpipe.quality.evaluate.compare import evaluate, predict
from mlqpipe.quality.evaluate.models import class_labels
from mlqpipe.quality.mil import run
from mlqpipe.recipe import load_recipe
from tests.conftest import REPO, _validator, validate_models

DEMO = REPO / "pipelines" / "demo"
PACKAGE = DEMO / "digits_mlp.mlpackage"
NN_MODEL = DEMO / "digits_mlp.mlmodel"
WEIGHT_NAMES = [f"dense_{i}_{part}" for i in (1, 2, 3) for part in ("weight", "bias")]
LABEL, SCORES = "classLabel", "classProbability"  # the .mlmodel's predictedFeatureName / predictedProbabilitiesName
RECIPES = ["demo/demo_mlprogram.yaml", *sorted(p.name for p in (REPO / "pipelines").glob("mlprogram_*.yaml"))]


@functools.cache
def _script():
    """pipelines/demo/make_mlprogram.py as a module (registered first: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location("make_mlprogram", DEMO / "make_mlprogram.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nn_weights() -> dict[str, np.ndarray]:
    """The .mlmodel's dense weights by ML-program const name, read by mlqpipe's neural-network loader."""
    records = mlqpipe.inventory(NN_MODEL)
    names = {"weights": "weight", "bias": "bias"}
    return {f"{r.layer}_{names[r.field]}": r.values() for r in records if r.layer_type == "innerProduct"}


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    return dict(np.load(DEMO / "digits_test.npz"))


# --- an independent reader and forward pass --------------------------------------------------------------------


def _blob(weight_bin: bytes, offset: int, count: int) -> np.ndarray:
    """float32 data of the blob whose 64-byte record is at `offset` (MLPROGRAM.md §3), read with struct."""
    sentinel, code, size, data_offset = struct.unpack_from("<IIQQ", weight_bin, offset)
    assert (sentinel, code, size) == (0xDEADBEEF, 2, 4 * count)  # float32
    return np.frombuffer(weight_bin, "<f4", count, data_offset)


def _const(op, weight_bin: bytes) -> np.ndarray:
    val = proto.find_entry(op.attributes, "val")
    shape = tuple(int(d.constant.size) for d in val.type.tensorType.dimensions)
    if val.HasField("blobFileValue"):
        assert val.blobFileValue.fileName == "@model_path/weights/weight.bin"
        return _blob(weight_bin, val.blobFileValue.offset, int(np.prod(shape))).reshape(shape)
    tensor = val.immediateValue.tensor
    return np.array(getattr(tensor, tensor.WhichOneof("value")).values).reshape(shape)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


_OPS = {
    "mul": lambda a: a["x"] * a["y"],
    "linear": lambda a: a["x"] @ a["weight"].T + a["bias"],
    "relu": lambda a: np.maximum(a["x"], 0),
    "softmax": lambda a: _softmax(a["x"], int(a["axis"])),
}


def _classes(op) -> list:
    """`classify`'s list literal of rank-0 label tensors (int64 or string), read straight from the message."""
    (binding,) = proto.find_entry(op.inputs, "classes").arguments
    tensors = [v.immediateValue.tensor for v in binding.value.immediateValue.list.values]
    return [getattr(t, t.WhichOneof("value")).values[0] for t in tensors]


def run_package(package: Path, x: np.ndarray, weights: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the program for a batch `x`, by interpreting its ops with numpy (`classify`
    = the class of the highest probability, its scores = the probabilities); `weights` (const name -> array)
    replaces consts or stands for compressed ones."""
    files = read_tree(package)
    spec = proto.Model.FromString(files["Data/com.apple.CoreML/model.mlmodel"])
    weight_bin = files.get("Data/com.apple.CoreML/weights/weight.bin", b"")
    fn = proto.find_entry(spec.mlProgram.functions, "main")
    block = proto.find_entry(fn.block_specializations, fn.opset)
    env = {fn.inputs[0].name: x.astype(np.float32)}
    for op in block.operations:
        name = op.outputs[0].name
        if weights is not None and name in weights:
            env[name] = weights[name]
        elif op.type == "const":
            env[name] = _const(op, weight_bin)
        elif op.type in _OPS:
            env[name] = _OPS[op.type]({e.key: env[e.value.arguments[0].name] for e in op.inputs})
        elif op.type == "classify":
            p = env[proto.find_entry(op.inputs, "probabilities").arguments[0].name]
            env[name], env[op.outputs[1].name] = np.array(_classes(op))[p.argmax(-1)], p
    label, scores = block.outputs
    return env[label], env[scores]


# --- the committed package ---------------------------------------------------------------------------------------


def test_committed_package_is_the_scripts_output(tmp_path):
    """Byte for byte, in memory and from a fresh process (which also shows the output is deterministic)."""
    files = _script().package_files()
    assert read_tree(PACKAGE) == files
    assert digest(PACKAGE) == mapping_digest(files)
    done = subprocess.run([sys.executable, str(DEMO / "make_mlprogram.py"), "--output", str(tmp_path / "fresh.mlpackage")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert digest(tmp_path / "fresh.mlpackage") == digest(PACKAGE)
    assert sum(len(b) for b in files.values()) < 100_000  # small enough to commit


def test_package_loads_and_passes_mlqpipe_check(nn_weights):
    model = mlqpipe.load_model(PACKAGE)
    assert isinstance(model, mlqpipe.MLProgram)
    assert model.spec.specificationVersion == 9
    main_fn = proto.find_entry(model.spec.mlProgram.functions, "main")
    assert main_fn.opset == "CoreML8"
    block = proto.find_entry(main_fn.block_specializations, "CoreML8")
    assert list(block.outputs) == [LABEL, SCORES]
    assert [op.type for op in block.operations][-2:] == ["softmax", "classify"]
    assert _classes(block.operations[-1]) == list(range(10))
    assert check_program(model) == []
    records = mlqpipe.inventory(model)
    assert [r.id for r in records] == WEIGHT_NAMES
    assert all(str(r.storage) == "float32" and r.layer_type == "const" for r in records)
    for r in records:
        np.testing.assert_array_equal(r.values(), nn_weights[r.id])
    assert main(["check", str(PACKAGE)]) == 0


def test_description_is_the_mlmodels_classifier_interface():
    """Same input, output names and kinds, predicted feature names and labels as digits_mlp.mlmodel."""
    nn = mlqpipe.load_model(NN_MODEL).spec
    want, got = read_description(nn), read_description(mlqpipe.load_model(PACKAGE).spec)
    assert [(f.name, f.type.WhichOneof("Type")) for f in got.output] == [(LABEL, "int64Type"), (SCORES, "dictionaryType")]
    assert [(f.name, f.type.SerializeToString()) for f in got.output] == [(f.name, f.type.SerializeToString()) for f in want.output]
    assert got.output[1].type.dictionaryType.WhichOneof("KeyType") == "int64KeyType"
    assert (got.predictedFeatureName, got.predictedProbabilitiesName) == (LABEL, SCORES)
    assert (got.predictedFeatureName, got.predictedProbabilitiesName) == (want.predictedFeatureName, want.predictedProbabilitiesName)
    assert [(f.name, list(f.type.multiArrayType.shape)) for f in got.input] == [("image", [1, 64])]
    assert class_labels(nn.neuralNetworkClassifier) == list(range(10))


def test_core_ml_validator_accepts_it(coreml_validate, tmp_path):
    """The committed package, and the same MLP with string labels (stringType / stringKeyType features)."""
    make = _script()
    mlp = make.read_mlp()
    strings = tmp_path / "strings.mlpackage"
    write_tree(strings, make.files_of(make.Mlp(mlp.input_scale, mlp.layers, tuple(f"digit {c}" for c in mlp.classes))))
    assert coreml_validate([PACKAGE, strings]) == {PACKAGE: None, strings: None}


def test_coremltools_reads_the_mlmodels_weights(tmp_path, nn_weights):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    package = tmp_path / "digits_mlp.mlpackage"
    shutil.copytree(PACKAGE, package)  # coremltools reads a copy: the repository's stays untouched
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = load_mil(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    ops = list(program.functions["main"].operations)
    consts = {op.name: op.outputs[0].val for op in ops if op.op_type == "const"}
    assert sorted(k for k, v in consts.items() if isinstance(v, np.ndarray) and v.size >= 10) == sorted(WEIGHT_NAMES)
    for name in WEIGHT_NAMES:
        assert consts[name].dtype == np.float32
        np.testing.assert_array_equal(consts[name], nn_weights[name])
    assert consts["input_scale"] == np.float32(1 / 16)
    assert [op.op_type for op in ops if op.op_type != "const"] == ["mul", "linear", "relu", "linear", "relu", "linear", "softmax",
                                                                   "classify"]
    head = ops[-1]
    assert [int(c) for c in head.classes.val] == list(range(10))
    assert [o.name for o in head.outputs] == [o.name for o in program.functions["main"].outputs] == [LABEL, SCORES]
    assert [(f.name, list(f.type.multiArrayType.shape)) for f in spec.description.input] == [("image", [1, 64])]
    assert [(f.name, f.type.WhichOneof("Type")) for f in spec.description.output] == [(LABEL, "int64Type"), (SCORES, "dictionaryType")]
    assert (spec.description.predictedFeatureName, spec.description.predictedProbabilitiesName) == (LABEL, SCORES)


@pytest.fixture(scope="module")
def coremltools_classifiers() -> dict[str, tuple]:
    """coremltools' own layout of a classifier program, per kind of label: a tiny linear + softmax MIL program
    converted with classifier_config (no passes, iOS18), as (classify op, Model spec) of coremltools' messages."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    def tiny():  # a new program per conversion: converting with classifier_config adds the head in place
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS18)
        def program(x):
            return mb.softmax(x=mb.linear(x=x, weight=np.ones((3, 4), np.float32)), axis=-1)

        return program

    out = {}
    for kind, classes in {"int64": [0, 1, 2], "string": ["zero", "one", "two"]}.items():
        model = ct.convert(tiny(), convert_to="mlprogram", classifier_config=ct.ClassifierConfig(classes),
                           pass_pipeline=ct.PassPipeline.EMPTY, minimum_deployment_target=ct.target.iOS18)
        spec = model.get_spec()
        fn = spec.mlProgram.functions["main"]
        op = fn.block_specializations[fn.opset].operations[-1]
        assert op.type == "classify"
        out[kind] = classes, op, spec
    return out


@pytest.mark.parametrize("kind", ["int64", "string"])
def test_classifier_head_is_laid_out_as_coremltools_does(coremltools_classifiers, kind):
    """The script's `classify` op and description against coremltools' for the same labels, message by
    message: the list-literal `classes` binding, both output types, the output features and predicted names
    (only the op's name and the features' descriptions are ours)."""
    classes, ct_op, ct_spec = coremltools_classifiers[kind]
    ct_desc = ct_spec.description
    make = _script()
    mlp = make.Mlp(1.0, (make.Dense("d", np.ones((3, 4), np.float32), np.zeros(3, np.float32)),), tuple(classes),
                   ct_desc.predictedFeatureName, ct_desc.predictedProbabilitiesName)
    op = make.classify(mlp, "probabilities")
    assert [e.key for e in op.inputs] == ["probabilities", "classes"]  # coremltools' map order is random per process
    assert sorted(ct_op.inputs) == sorted(e.key for e in op.inputs)
    assert proto.find_entry(op.inputs, "classes").SerializeToString() == ct_op.inputs["classes"].SerializeToString()
    assert [o.SerializeToString() for o in op.outputs] == [o.SerializeToString() for o in ct_op.outputs]
    desc = proto.ModelDescription.FromString(make.description(mlp))
    assert [(f.name, f.type.SerializeToString()) for f in desc.output] == \
        [(f.name, f.type.SerializeToString()) for f in ct_desc.output]
    assert (desc.predictedFeatureName, desc.predictedProbabilitiesName) == (ct_desc.predictedFeatureName, ct_desc.predictedProbabilitiesName)


def test_program_predicts_what_the_mlmodel_predicts(digits):
    """mlqpipe's neural-network evaluator on the .mlmodel, numpy on the package's own ops and weights."""
    expected = predict(mlqpipe.load_model(NN_MODEL).spec, digits, names={"image": "X"})[SCORES]
    labels, got = run_package(PACKAGE, digits["X"])
    assert got.shape == expected.shape == (len(digits["y"]), 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(labels, expected.argmax(1))
    assert np.array_equal(labels, digits["sklearn_pred"])  # the classifier it was trained as


def test_evaluators_agree_on_the_two_demos(digits):
    """mlqpipe's neural-network evaluator on the .mlmodel and its ML-program evaluator (MIL interpreter) on the
    package: the same class on every held-out digit, probabilities within 1e-5, the same accuracy."""
    nn, program = mlqpipe.load_model(NN_MODEL).spec, mlqpipe.load_model(PACKAGE)
    names = {"image": "X"}
    want, got = predict(nn, digits, names=names), predict(program, digits, names=names)
    n = len(digits["y"])
    assert got[SCORES].shape == want[SCORES].shape == (n, 10)
    np.testing.assert_allclose(got[SCORES], want[SCORES], rtol=0, atol=1e-5)
    labels = np.asarray(class_labels(nn.neuralNetworkClassifier))[want[SCORES].argmax(1)]
    assert np.array_equal(got[LABEL].reshape(n), labels)
    assert np.array_equal(labels, digits["sklearn_pred"])
    on_nn, on_program = (evaluate(m, m, digits, names=names, labels=digits["y"]) for m in (nn, program))
    assert on_program.evaluated and on_program.top1_agreement == 1.0
    assert on_program.accuracy_float == on_nn.accuracy_float == np.mean(labels == digits["y"])
    one = run(program, {"image": digits["X"][:1].astype(np.float32)})  # the interpreter: a rank-0 int64 label
    assert one[LABEL].shape == () and one[LABEL].dtype == np.int64 and int(one[LABEL]) == labels[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 24), min_size=2, max_size=5), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(2.0**-10, 2.0**10, width=32), strings=st.booleans())
def test_any_mlp_becomes_a_program_computing_it(tmp_path_factory, sizes, seed, scale, strings):
    """The script's builder on other MLPs and labels (tensors under 10 elements go inline, a package may need
    no weight file; int64 or string labels): mlqpipe loads and checks the package, its weights are the MLP's,
    it computes the MLP's class and probabilities, and mlqpipe's evaluator reads it as that classifier."""
    rng = np.random.default_rng(seed)
    make = _script()
    layers = tuple(make.Dense(f"dense_{i + 1}", rng.standard_normal((n_out, n_in)).astype(np.float32),
                              rng.standard_normal(n_out).astype(np.float32))
                   for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])))
    ids = rng.permutation(1000)[: sizes[-1]].tolist()  # distinct labels in any order
    classes = tuple(f"class {i}" for i in ids) if strings else tuple(ids)
    mlp = make.Mlp(scale, layers, classes)
    files = make.files_of(mlp)
    assert make.files_of(mlp) == files
    package = tmp_path_factory.mktemp("mlp") / "mlp.mlpackage"
    write_tree(package, files)
    model = mlqpipe.load_model(package)
    assert check_program(model) == []
    weights = {f"{d.name}_{part}": getattr(d, part) for d in layers for part in ("weight", "bias")}
    records = mlqpipe.inventory(model)
    assert [r.id for r in records] == [k for k, v in weights.items() if v.size >= 10]
    for r in records:
        np.testing.assert_array_equal(r.values(), weights[r.id])
    x = rng.uniform(0, 16, (5, sizes[0])).astype(np.float32)
    h = x * np.float32(scale)
    for i, d in enumerate(layers):
        h = h @ d.weight.T + d.bias
        h = np.maximum(h, 0) if i < len(layers) - 1 else h
    labels, probabilities = run_package(package, x)
    np.testing.assert_allclose(probabilities, _softmax(h, -1), rtol=1e-5, atol=1e-7)
    assert labels.tolist() == [classes[k] for k in probabilities.argmax(1)]
    desc = read_description(model.spec)
    assert (desc.predictedFeatureName, desc.output[0].type.WhichOneof("Type")) == (LABEL, "stringType" if strings else "int64Type")
    scores = predict(model, {"image": x})[SCORES]  # mlqpipe's evaluator through its MIL interpreter
    np.testing.assert_allclose(scores, probabilities, rtol=1e-5, atol=1e-7)


# --- the ML-program recipes ----------------------------------------------------------------------------------------

# per recipe: the op types holding each weight in the output (a chain "upstream+last"), the worst relative RMS
# error of a decoded weight, the lowest top-1 agreement with the float program on the held-out digits
LUT, AFFINE = "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"
EXPECTED = {
    "demo/demo_mlprogram.yaml": (
        {"dense_1_weight": LUT, "dense_2_weight": LUT, "dense_3_weight": AFFINE, **{f"dense_{i}_bias": "const" for i in (1, 2, 3)}},
        0.12, 0.98),
    "mlprogram_int4_block.yaml": (
        {**{f"dense_{i}_weight": AFFINE for i in (1, 2, 3)}, **{f"dense_{i}_bias": "const" for i in (1, 2, 3)}},
        0.10, 0.98),
    "mlprogram_prune_palettize.yaml": (
        {**dict.fromkeys(["dense_1_weight", "dense_2_weight"], "constexpr_lut_to_sparse+constexpr_sparse_to_dense"),
         **dict.fromkeys(["dense_3_weight", "dense_1_bias", "dense_2_bias", "dense_3_bias"], "const")},
        0.30, 0.95),
    "mlprogram_int8_lut.yaml": (
        {**dict.fromkeys(["dense_1_weight", "dense_2_weight"], f"{AFFINE}+{LUT}"),
         **dict.fromkeys(["dense_3_weight", "dense_1_bias", "dense_2_bias", "dense_3_bias"], "const")},
        0.12, 0.98),
}
# per recipe: the shapes (and MIL dtypes) of parameters of a weight's last op, which show the granularity
PARAMETERS = {
    "demo/demo_mlprogram.yaml": {("dense_1_weight", "lut"): (8, 1, 16, 1), ("dense_2_weight", "lut"): (4, 1, 16, 1),
                                 ("dense_3_weight", "scale"): (10, 1), ("dense_3_weight", "data"): "int8"},
    "mlprogram_int4_block.yaml": {("dense_1_weight", "scale"): (128, 2), ("dense_2_weight", "scale"): (64, 4),
                                  ("dense_3_weight", "scale"): (10, 2), ("dense_1_weight", "data"): "int4"},
    "mlprogram_prune_palettize.yaml": {},
    "mlprogram_int8_lut.yaml": {("dense_1_weight", "indices"): "uint4"},
}


def test_every_mlprogram_recipe_is_listed():
    assert sorted(EXPECTED) == sorted(RECIPES)
    assert all((REPO / "pipelines" / r).read_text().startswith("# yaml-language-server: $schema=") for r in RECIPES)


@pytest.fixture()
def project(tmp_path, monkeypatch) -> Path:
    """The demo package and the ML-program recipes at their places in a copy of pipelines/."""
    shutil.copytree(PACKAGE, tmp_path / "pipelines" / "demo" / PACKAGE.name)
    shutil.copy(DEMO / "digits_test.npz", tmp_path / "pipelines" / "demo" / "digits_test.npz")
    for name in RECIPES:
        shutil.copy(REPO / "pipelines" / name, tmp_path / "pipelines" / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _build(capsys, recipe: str) -> list[str]:
    """The tasks one `mlqpipe build` ran."""
    status = main(["build", recipe])
    out = capsys.readouterr()
    assert status == 0, out
    return [line[3:].strip() for line in out.out.splitlines() if line.startswith(".  ")]


def _rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


def _parameter(model, rec, parameter: str):
    """The shape of a parameter of the weight's last op, or its MIL dtype name for "data" / "indices"."""
    value = proto.find_entry(rec.handle.site.op.inputs, parameter).arguments[0].value
    if parameter in ("data", "indices"):
        return proto.DATA_TYPE_NAMES[value.type.tensorType.dataType].lower()
    return model.value_array(value, rec.where).shape


def _assert_gated_on_accuracy(report: dict, job, float_labels: np.ndarray, digits: dict) -> None:
    """The build evaluated the program on the held-out digits (accuracy before = the float program's, as numpy
    computes it) and applied every gate to a measured number."""
    ev = report["evaluation"]
    assert ev["evaluated"] and ev["samples"] == len(digits["y"]) and not ev["random_inputs"], ev
    assert ev["accuracy_float"] == pytest.approx(np.mean(float_labels == digits["y"]), abs=1e-6)
    assert ev["accuracy_quantized"] >= ev["accuracy_float"] - job.gates.max_accuracy_drop
    gates = {g["gate"]: g for g in report["gates"]}
    assert set(gates) == {"min_compression", "min_top1_agreement", "max_accuracy_drop"}
    for g in gates.values():
        assert g["applied"] and g["passed"] and isinstance(g["value"], (int, float)), g
    assert gates["max_accuracy_drop"]["value"] == pytest.approx(ev["accuracy_float"] - ev["accuracy_quantized"], abs=1e-5)
    assert gates["min_top1_agreement"]["value"] == pytest.approx(ev["top1_agreement"], abs=1e-6)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_checked_outputs_once(project, capsys, name, nn_weights, digits):
    path = f"pipelines/{name}"
    assert main(["validate", path]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert _build(capsys, path)
    recipe = load_recipe(path)
    op_types, max_error, min_agreement = EXPECTED[name]
    floats = run_package(PACKAGE, digits["X"])[0]
    for job in recipe.models:
        out = mlqpipe.load_model(job.output)
        assert check_program(out) == []
        if _validator() is not None:  # Core ML's validator, where it runs
            assert validate_models([job.output]) == {job.output: None}
        records = {r.id: r for r in mlqpipe.inventory(out)}
        assert {i: r.layer_type for i, r in records.items()} == op_types
        decoded = {i: r.values() for i, r in records.items()}
        for (weight, parameter), want in PARAMETERS[name].items():
            assert _parameter(out, records[weight], parameter) == want, (weight, parameter)
        errors = {i: _rel_rms(decoded[i], nn_weights[i]) for i in decoded}
        agreement = np.mean(run_package(job.output, digits["X"], decoded)[0] == floats)
        assert max(errors.values()) < max_error, errors
        assert agreement >= min_agreement, agreement
        report = json.loads(recipe.report_paths(job)[0].read_text())
        assert report["status"] == "passed"
        assert report["totals"]["compression"] >= job.gates.min_compression
        assert all(p.is_file() for p in recipe.written_reports(job))
        if name == "demo/demo_mlprogram.yaml":
            _assert_gated_on_accuracy(report, job, floats, digits)
    assert main(["check", *(str(job.output) for job in recipe.models)]) == 0
    assert _build(capsys, path) == []  # the second build re-runs nothing


def test_demo_fails_a_gate_it_cannot_pass(project, capsys):
    """1-bit LUTs on the big matrices with no accuracy drop allowed: the build fails (exit status 1), the report
    says so with the measured drop, and no package is shipped — the one from the passing build is removed."""
    path = project / "pipelines" / "demo" / "demo_mlprogram.yaml"
    recipe = load_recipe(path)
    (job,) = recipe.models
    assert _build(capsys, str(path)) and job.output.is_dir()
    text = path.read_text()
    tight = text.replace("    nbits: 4\n", "    nbits: 1\n").replace("  max_accuracy_drop: 0.01 ", "  max_accuracy_drop: 0.0  ")
    assert tight.count("nbits: 1") == 1 and "max_accuracy_drop: 0.0 " in tight
    path.write_text(tight)
    assert main(["build", str(path)]) == 1
    capsys.readouterr()
    assert not job.output.exists()
    report = json.loads(recipe.report_paths(job)[0].read_text())
    assert report["status"] == "failed"
    (drop,) = [g for g in report["gates"] if g["gate"] == "max_accuracy_drop"]
    assert drop["threshold"] == 0.0 and drop["passed"] is False and drop["value"] > 0
    assert report["evaluation"]["accuracy_quantized"] < report["evaluation"]["accuracy_float"]
