"""Evaluation uses every sample, in memory-bounded batches, and the float model's outputs are cached."""

import json
import shutil

import numpy as np
import pytest

import mlqpipe
from mlqpipe.cli import main
from mlqpipe.quality.evaluate import compare
from tests.conftest import REPO, SHARED_MODELS

DEMO = REPO / "pipelines" / "demo"


def _specs(path, nbits=4):
    f = mlqpipe.load_model(path).spec
    q = mlqpipe.quantize_weights(path, nbits, "linear").spec
    return f, q


def test_batches_give_the_same_result_as_one_batch():
    data = dict(np.load(DEMO / "digits_test.npz"))
    f, q = _specs(DEMO / "digits_cnn.mlmodel", 2)
    whole = compare.evaluate(f, q, data, names={"image": "X"}, labels=data["y"], memory_mb=4096)
    small = compare.evaluate(f, q, data, names={"image": "X"}, labels=data["y"], memory_mb=16)
    assert whole.evaluated and whole.samples == 397 == small.samples
    assert small.top1_agreement == whole.top1_agreement and small.accuracy_quantized == whole.accuracy_quantized
    for name, o in whole.outputs.items():
        assert small.outputs[name]["relative_l2"] == pytest.approx(o["relative_l2"], rel=1e-9)
        assert small.outputs[name]["max_abs"] == pytest.approx(o["max_abs"], rel=1e-9)


def test_batch_size_follows_the_memory_budget():
    from tests.builders import add_conv, describe, model, network

    m = model()
    add_conv(network(m), "conv", "x", "y", oc=64, kc=3, seed=1)  # about 1 MB of activations per sample
    describe(m, [("x", [3, 64, 64])], [("y", [64, 62, 62])])
    features, n, _ = compare.input_features(m, None, {}, 60)
    small, large = compare.batch_size(m, features, n, 16, {}), compare.batch_size(m, features, n, 1024, {})
    assert 1 <= small < 16 and large == n == 60


def test_every_sample_is_used(tmp_path):
    """More than the 2,000 samples the evaluator once capped silently."""
    data = dict(np.load(DEMO / "digits_test.npz"))
    big = {"X": np.tile(data["X"], (7, 1)), "y": np.tile(data["y"], 7)}
    f, q = _specs(DEMO / "digits_mlp.mlmodel")
    r = compare.evaluate(f, q, big, names={"image": "X"}, labels=big["y"])
    assert r.samples == r.available_samples == 397 * 7
    cut = compare.evaluate(f, q, big, names={"image": "X"}, labels=big["y"], samples=100)
    assert cut.samples == 100 and cut.available_samples == 397 * 7


def test_max_samples_is_shown_in_the_report(tmp_path, monkeypatch):
    for name in ("digits_mlp.mlmodel", "digits_test.npz"):
        shutil.copy(DEMO / name, tmp_path / name)
    (tmp_path / "r.yaml").write_text(
        "version: 1\nmodels:\n  - {input: digits_mlp.mlmodel, output: out/m.mlmodel,\n"
        "     evaluation: {data: digits_test.npz, inputs: {image: X}, labels: y, max_samples: 100, memory_mb: 16}}\n"
        "rules:\n  all: {}\nstages:\n  - {mode: linear, nbits: 8, rules: [all]}\ngates: {max_accuracy_drop: 0.05}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "r.yaml"]) == 0
    ev = json.loads((tmp_path / "out/m.report.json").read_text())["evaluation"]
    assert ev["samples"] == 100 and ev["available_samples"] == 397
    assert "Evaluation on 100 inputs of the 397 in the data (max_samples)" in (tmp_path / "out/m.report.md").read_text()


def test_float_outputs_are_cached_between_builds(tmp_path, monkeypatch, capsys):
    for name in ("digits_mlp.mlmodel", "digits_test.npz"):
        shutil.copy(DEMO / name, tmp_path / name)
    recipe = ("version: 1\nmodels:\n  - {input: digits_mlp.mlmodel, output: out/m.mlmodel,\n"
              "     evaluation: {data: digits_test.npz, inputs: {image: X}, labels: y}}\n"
              "rules:\n  all: {}\nstages:\n  - {mode: linear, nbits: 8, rules: [all]}\ngates: {max_accuracy_drop: THRESHOLD}\n")
    (tmp_path / "r.yaml").write_text(recipe.replace("THRESHOLD", "0.05"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    float_bytes = (tmp_path / "digits_mlp.mlmodel").read_bytes()
    runs = []
    real = compare.run_model

    def counting(spec, features, cache=None):
        runs.append("float" if spec.SerializeToString() == float_bytes else "quantized")
        return real(spec, features, cache)

    monkeypatch.setattr(compare, "run_model", counting)
    assert main(["build", "r.yaml"]) == 0
    assert "float" in runs
    first = json.loads((tmp_path / "out/m.report.json").read_text())["evaluation"]
    runs.clear()
    (tmp_path / "r.yaml").write_text(recipe.replace("THRESHOLD", "0.06"))  # only a gate changed
    assert main(["build", "r.yaml"]) == 0
    assert runs and "float" not in runs  # re-checking the gates ran only the quantized model
    assert json.loads((tmp_path / "out/m.report.json").read_text())["evaluation"] == first
    for entry in (tmp_path / "cache" / "evaluations").rglob("*.npz"):
        entry.write_bytes(b"corrupted")
    runs.clear()
    assert main(["build", "r.yaml", "--force"]) == 0
    assert "float" in runs  # an unreadable entry is recomputed
    assert json.loads((tmp_path / "out/m.report.json").read_text())["evaluation"] == first


def test_real_model_in_batches():
    if not SHARED_MODELS.is_dir():
        pytest.skip("../shared/models is absent")
    path = SHARED_MODELS / "keras_mnist_cnn.mlmodel"
    data = dict(np.load(SHARED_MODELS / "keras_mnist_cnn.digits28.npz"))
    f, q = _specs(path, 8)
    r = compare.evaluate(f, q, data, labels=data["y"], memory_mb=16)
    assert r.samples == 500 and r.accuracy_float == pytest.approx(0.916) and r.accuracy_quantized == pytest.approx(0.916)
