"""The ML-program demo: pipelines/demo/digits_mlp.mlpackage is exactly what make_mlprogram.py makes, Core ML,
coremltools and mlqpipe read it as the .mlmodel's MLP (same weights, same predictions), and every ML-program
recipe in pipelines/ builds from it into packages that pass both checkers, incrementally."""

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
from mlqpipe.formats.mlprogram.check import check_program
from mlqpipe.quality.evaluate.compare import predict
from mlqpipe.recipe import load_recipe
from tests.conftest import REPO, _validator, validate_models

DEMO = REPO / "pipelines" / "demo"
PACKAGE = DEMO / "digits_mlp.mlpackage"
NN_MODEL = DEMO / "digits_mlp.mlmodel"
WEIGHT_NAMES = [f"dense_{i}_{part}" for i in (1, 2, 3) for part in ("weight", "bias")]
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


def run_package(package: Path, x: np.ndarray, weights: dict | None = None) -> np.ndarray:
    """The program's output for a batch `x`, by interpreting its ops with numpy; `weights` (const name ->
    array) replaces consts or stands for compressed ones."""
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
    return env[block.outputs[0]]


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
    assert proto.find_entry(model.spec.mlProgram.functions, "main").opset == "CoreML8"
    assert check_program(model) == []
    records = mlqpipe.inventory(model)
    assert [r.id for r in records] == WEIGHT_NAMES
    assert all(str(r.storage) == "float32" and r.layer_type == "const" for r in records)
    for r in records:
        np.testing.assert_array_equal(r.values(), nn_weights[r.id])
    assert main(["check", str(PACKAGE)]) == 0


def test_core_ml_validator_accepts_it(coreml_validate):
    assert coreml_validate([PACKAGE]) == {PACKAGE: None}


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
    assert sorted(k for k, v in consts.items() if np.size(v) >= 10) == sorted(WEIGHT_NAMES)
    for name in WEIGHT_NAMES:
        assert consts[name].dtype == np.float32
        np.testing.assert_array_equal(consts[name], nn_weights[name])
    assert consts["input_scale"] == np.float32(1 / 16)
    assert [op.op_type for op in ops if op.op_type != "const"] == ["mul", "linear", "relu", "linear", "relu", "linear", "softmax"]
    assert [(f.name, list(f.type.multiArrayType.shape)) for f in spec.description.input] == [("image", [1, 64])]


def test_program_predicts_what_the_mlmodel_predicts(digits):
    """mlqpipe's neural-network evaluator on the .mlmodel, numpy on the package's own ops and weights."""
    expected = predict(mlqpipe.load_model(NN_MODEL).spec, digits, names={"image": "X"})["classProbability"]
    got = run_package(PACKAGE, digits["X"])
    assert got.shape == expected.shape == (len(digits["y"]), 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert np.array_equal(got.argmax(1), digits["sklearn_pred"])  # the classifier it was trained as


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 24), min_size=2, max_size=5), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(2.0**-10, 2.0**10, width=32))
def test_any_mlp_becomes_a_program_computing_it(tmp_path_factory, sizes, seed, scale):
    """The script's builder on other MLPs (tensors under 10 elements go inline, a package may need no weight
    file): mlqpipe loads and checks the package, its weights are the MLP's, and it computes the MLP."""
    rng = np.random.default_rng(seed)
    make = _script()
    layers = tuple(make.Dense(f"dense_{i + 1}", rng.standard_normal((n_out, n_in)).astype(np.float32),
                              rng.standard_normal(n_out).astype(np.float32))
                   for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])))
    mlp = make.Mlp(scale, layers)
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
    np.testing.assert_allclose(run_package(package, x), _softmax(h, -1), rtol=1e-5, atol=1e-7)


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


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_checked_outputs_once(project, capsys, name, nn_weights, digits):
    path = f"pipelines/{name}"
    assert main(["validate", path]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert _build(capsys, path)
    recipe = load_recipe(path)
    op_types, max_error, min_agreement = EXPECTED[name]
    floats = run_package(PACKAGE, digits["X"]).argmax(1)
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
        agreement = np.mean(run_package(job.output, digits["X"], decoded).argmax(1) == floats)
        assert max(errors.values()) < max_error, errors
        assert agreement >= min_agreement, agreement
        report = json.loads(recipe.report_paths(job)[0].read_text())
        assert report["status"] == "passed"
        assert report["totals"]["compression"] >= job.gates.min_compression
        assert all(p.is_file() for p in recipe.written_reports(job))
    assert main(["check", *(str(job.output) for job in recipe.models)]) == 0
    assert _build(capsys, path) == []  # the second build re-runs nothing
