"""Evaluating ML programs (compare.evaluate through the MIL interpreter): outputs and accuracy equal to the
same computation in numpy, before and after compression; classifier labels from `classify`; the float
outputs cached by the program's weights; image inputs; refusals that say "not evaluated" and why.

The models are MIL-builder programs converted by coremltools 9.0 (test-only; skipped without it), so the
reference values are numpy's own arithmetic on the same weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import mlqpipe
from mlqpipe.quality.evaluate import compare
from mlqpipe.quality.evaluate.compare import FloatCache, evaluate, predict
from tests.quality.digits_linear import digits, fit, softmax_probs, write_classifier

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb  # noqa: E402

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    x, y = digits()
    weight, bias = fit(x, y)
    root = tmp_path_factory.mktemp("evaluate-mlprogram")
    write_classifier(root / "int.mlpackage", weight, bias, list(range(10)))
    write_classifier(root / "str.mlpackage", weight, bias, [f"digit {i}" for i in range(10)])
    return root, weight, bias


def test_a_classifier_program_is_evaluated_as_numpy_computes_it(trained):
    root, weight, bias = trained
    x, y = digits()
    model = mlqpipe.load_model(root / "int.mlpackage")
    probs = softmax_probs(x, weight, bias)
    got = predict(model, {"x": x})["classLabel_probs"]
    assert got.shape == (len(x), 10)
    assert np.abs(got - probs).max() <= 1e-5
    r = evaluate(model, model, {"x": x}, labels=y)
    assert r.evaluated and r.samples == len(x)
    expected = float(np.mean(probs.argmax(1) == y))
    assert expected > 0.85  # the classifier is a real one
    assert r.accuracy_float == r.accuracy_quantized == pytest.approx(expected, abs=1 / len(x))
    assert r.top1_agreement == 1.0 and r.outputs["classLabel_probs"]["relative_l2"] == 0.0


def test_string_class_labels_are_compared_as_labels(trained):
    root, _, _ = trained
    x, y = digits()
    model = mlqpipe.load_model(root / "str.mlpackage")
    r = evaluate(model, model, {"x": x}, labels=np.array([f"digit {i}" for i in y]))
    assert r.evaluated and r.accuracy_float > 0.85 and r.top1_agreement == 1.0


def test_after_compression_the_accuracy_is_that_of_the_decoded_weights(trained):
    root, weight, bias = trained
    x, y = digits()
    float_model = mlqpipe.load_model(root / "int.mlpackage")
    import mlqpipe.optimize as opt

    config = opt.OptimizationConfig(global_config=opt.OpPalettizerConfig(mode="kmeans", nbits=2, weight_threshold=100))
    quantized = mlqpipe.palettize_weights(root / "int.mlpackage", config)
    decoded = next(r for r in mlqpipe.inventory(quantized) if r.compressed and r.values().size == weight.size).values()
    assert not np.array_equal(decoded, weight)
    want_probs = softmax_probs(x, decoded.astype(np.float32), bias)
    r = evaluate(float_model, quantized, {"x": x}, labels=y)
    assert r.accuracy_quantized == pytest.approx(float(np.mean(want_probs.argmax(1) == y)), abs=1 / len(x))
    assert r.top1_agreement == pytest.approx(float(np.mean(want_probs.argmax(1) == softmax_probs(x, weight, bias).argmax(1))), abs=1 / len(x))
    ref = softmax_probs(x, weight, bias)
    rel = float(np.linalg.norm(want_probs - ref) / np.linalg.norm(ref))
    assert r.outputs["classLabel_probs"]["relative_l2"] == pytest.approx(rel, rel=1e-3)


def test_float_outputs_are_cached_by_the_program_and_its_weights(trained, tmp_path, monkeypatch):
    root, weight, bias = trained
    x, y = digits()
    model = mlqpipe.load_model(root / "int.mlpackage")
    cache = FloatCache(tmp_path / "cache")
    first = evaluate(model, model, {"x": x}, labels=y, cache=cache)
    runs = []
    real = compare.run_program
    monkeypatch.setattr(compare, "run_program", lambda m, f, c: runs.append(m) or real(m, f, c))
    again = evaluate(model, model, {"x": x}, labels=y, cache=cache)
    assert again.as_dict() == first.as_dict()
    assert len(runs) >= 1 and all(m is model for m in runs)  # the quantized side; the float side came from the cache
    float_runs = len(runs)
    # the same program with other weights: another key, so the float model runs again
    other = tmp_path / "other.mlpackage"
    write_classifier(other, weight[::-1].copy(), bias, list(range(10)))
    twin = mlqpipe.load_model(other)
    assert twin.spec.mlProgram == model.spec.mlProgram  # same ops and names: only weight.bin differs
    assert FloatCache.key(twin, {"x": x}, len(x)) != FloatCache.key(model, {"x": x}, len(x))
    runs.clear()
    evaluate(twin, model, {"x": x}, labels=y, cache=cache)
    assert any(m is twin for m in runs) and float_runs >= 1


def test_image_inputs_are_fed_as_the_program_takes_them(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3 * 4 * 5)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 4, 5))], opset_version=ct.target.iOS16)
    def prog(image):
        return mb.linear(x=mb.reshape(x=image, shape=[1, 60]), weight=w, name="fc")

    path = tmp_path / "image.mlpackage"
    ct.convert(prog, convert_to="mlprogram", inputs=[ct.ImageType(name="image", shape=(1, 3, 4, 5), scale=1 / 255.0,
                                                                  bias=[-0.5, -0.25, 0.0], color_layout=ct.colorlayout.BGR)],
               compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16).save(str(path))
    model = mlqpipe.load_model(path)
    images = rng.integers(0, 256, (6, 4, 5, 3)).astype(np.float32)  # RGB, height x width x channel, as for neural networks
    bgr = images.transpose(0, 3, 1, 2)[:, ::-1]
    expected = (bgr / 255.0 + np.array([-0.5, -0.25, 0.0], np.float32).reshape(1, 3, 1, 1)).reshape(6, 60) @ w.T
    (got,) = predict(model, {"image": images}).values()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_what_cannot_be_evaluated_says_so(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8))], opset_version=ct.target.iOS16)
    def prog(x):  # random numbers: no evaluation can reproduce them
        return mb.add(x=x, y=mb.random_normal(shape=np.array([1, 8], np.int32), name="noise"), name="noisy")

    path = tmp_path / "noise.mlpackage"
    ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY, minimum_deployment_target=ct.target.iOS16).save(str(path))
    model = mlqpipe.load_model(path)
    from mlqpipe.quality.mil import OPS

    assert "random_normal" not in OPS
    r = evaluate(model, model, None, samples=4)
    assert not r.evaluated and r.reason == "not evaluated: op noise of type random_normal"
    batch = evaluate(model, model, {"x": np.zeros((4, 7), np.float32)})
    assert not batch.evaluated and batch.reason == "input 'x': 7 values per sample, function 'main' takes 8 (shape [1, 8])"


def test_a_program_with_a_fixed_batch_is_not_fed_samples(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 8))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.relu(x=x, name="r")

    path = tmp_path / "batch2.mlpackage"
    ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY, minimum_deployment_target=ct.target.iOS16).save(str(path))
    r = evaluate(mlqpipe.load_model(path), mlqpipe.load_model(path), None, samples=4)
    assert not r.evaluated
    assert r.reason == "input 'x' is declared [2, 8]: mlqpipe feeds samples on a leading axis of size 1 (convert the model with a batch of 1)"


def test_a_copy_of_a_package_evaluates_like_the_package(trained, tmp_path):
    root, _, _ = trained
    x, y = digits()
    shutil.copytree(root / "int.mlpackage", tmp_path / "copy.mlpackage")
    a, b = mlqpipe.load_model(root / "int.mlpackage"), mlqpipe.load_model(tmp_path / "copy.mlpackage")
    assert FloatCache.key(a, {"x": x}, len(x)) == FloatCache.key(b, {"x": x}, len(x))
    assert evaluate(a, b, {"x": x}, labels=y).top1_agreement == 1.0
