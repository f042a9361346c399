"""The evaluator reproduces known predictions: the real models' given outputs and scikit-learn's."""

import numpy as np
import pytest

import mlqpipe
from mlqpipe.quality.evaluate.compare import evaluate, predict
from tests.builders import unevaluable_model
from tests.conftest import REPO, SHARED_MODELS


def _shared(name):
    path = SHARED_MODELS / f"{name}.mlmodel"
    if not path.exists():
        pytest.skip("../shared/models is absent")
    return mlqpipe.load_model(path), dict(np.load(SHARED_MODELS / f"{name}.digits28.npz"))


def test_mnist_cnn_reproduces_float_predictions_and_accuracy():
    m, d = _shared("keras_mnist_cnn")
    probs = predict(m.spec, {"image": d["X"]})["output"]
    assert np.array_equal(probs.argmax(axis=1), d["float_pred"])
    assert np.isclose(np.mean(probs.argmax(axis=1) == d["y"]), 0.916)


def test_drawing_embedding_reproduces_float_output():
    m, d = _shared("turi_drawing_embedding")
    emb = predict(m.spec, {"drawing": d["X"]})["embedding"]
    ref = d["float_output"]
    # values reach ~5000: compare relative to each sample's scale (float32 accumulation differs at 1e-7)
    scale = np.abs(ref).max(axis=1, keepdims=True)
    assert np.abs(emb - ref).max() / scale.min() <= 1e-4
    assert np.all(np.abs(emb - ref) <= 1e-4 * scale)


def test_demo_models_match_scikit_learn():
    d = dict(np.load(REPO / "pipelines/demo/digits_test.npz"))
    mlp = mlqpipe.load_model(REPO / "pipelines/demo/digits_mlp.mlmodel")
    cnn = mlqpipe.load_model(REPO / "pipelines/demo/digits_cnn.mlmodel")
    assert np.array_equal(predict(mlp.spec, {"image": d["X"]})["classProbability"].argmax(1), d["sklearn_pred"])
    assert np.array_equal(predict(cnn.spec, {"image": d["X"]})["classProbability"].argmax(1), d["sklearn_cnn_pred"])


def test_activity_classifier_lstm_runs_and_quantized_agrees():
    path = SHARED_MODELS / "turi_activity_classifier.mlmodel"
    if not path.exists():
        pytest.skip("../shared/models is absent")
    m = mlqpipe.load_model(path)
    r = evaluate(m.spec, mlqpipe.quantize_weights(m, 8, "linear").spec, None, samples=64)
    assert r.evaluated and r.random_inputs and r.samples == 64
    assert r.top1_agreement >= 0.95 and r.outputs["activityProbability"]["relative_l2"] < 0.05


def test_quantized_mnist_accuracy_like_coremltools_measured():
    """NOTES: coremltools measured 0.916 (linear 8), 0.918 (linear 4), 0.886 (linear_lut 4) on these digits."""
    m, d = _shared("keras_mnist_cnn")
    for nbits, mode, acc in [(8, "linear", 0.916), (4, "linear", 0.918), (4, "linear_lut", 0.886)]:
        r = evaluate(m.spec, mlqpipe.quantize_weights(m, nbits, mode).spec, {"image": d["X"]}, labels=d["y"])
        assert r.accuracy_float == pytest.approx(0.916)
        assert r.accuracy_quantized == pytest.approx(acc, abs=0.004), (nbits, mode)


def test_embedding_cosine_per_tensor_lut_collapses():
    """NOTES: linear 4-bit keeps a mean cosine of ~0.97; per-tensor linear_lut 4-bit falls to ~0.10."""
    m, d = _shared("turi_drawing_embedding")
    ref = d["float_output"]

    def cosine(q):
        e = predict(q.spec, {"drawing": d["X"]})["embedding"]
        return float(np.mean(np.sum(e * ref, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)))

    assert cosine(mlqpipe.quantize_weights(m, 4, "linear")) > 0.95
    assert cosine(mlqpipe.quantize_weights(m, 4, "linear_lut")) < 0.3


def test_unsupported_layer_is_reported_not_passed():
    m = unevaluable_model()
    r = evaluate(m, m, None, samples=2)
    assert not r.evaluated and "layer 'custom' of type custom" in r.reason
