"""Pipelines, pipelineClassifier and pipelineRegressor, built with coremltools' pipeline classes: every model
reads earlier outputs by name; transforms, GLMs and neural networks mixed; classifier pipelines through
compare.evaluate (top-1 agreement, accuracy), quantized by mlqpipe."""

from __future__ import annotations

import numpy as np
import pytest

import mlqpipe
from mlqpipe.formats.nn.model import load_model
from mlqpipe.quality.evaluate.compare import FloatCache, evaluate
from mlqpipe.quality.evaluate.context import Unsupported
from tests.quality.evaluate import model_specs as ms
from tests.quality.evaluate.harness import assert_close

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import Normalizer, StandardScaler  # noqa: E402


@pytest.fixture(scope="module")
def iris():
    d = load_iris()
    order = np.random.default_rng(0).permutation(len(d.target))
    names = np.asarray(d.target_names)
    return d.data[order], names[d.target[order]]


def _imputer(sk, inp, out, width):
    dt = ms.datatypes()
    spec = ms.transform("imputer", [(inp, dt.Array(width))], [(out, dt.Array(width))])
    spec.imputer.imputedDoubleArray.vector.extend(sk.statistics_.tolist())
    spec.imputer.replaceDoubleValue = float("nan")
    return spec


def _with_holes(x, seed=1):
    x = x.copy()
    x[np.random.default_rng(seed).random(x.shape) < 0.1] = np.nan
    return x


def test_pipeline_of_transforms_matches_scikit_learn(iris, tmp_path):
    x = _with_holes(iris[0])
    sk = make_pipeline(SimpleImputer(), StandardScaler(), Normalizer()).fit(x)
    dt = ms.datatypes()
    norm = ms.transform("normalizer", [("s", dt.Array(4))], [("y", dt.Array(4))])
    norm.normalizer.normType = norm.normalizer.L2
    spec = ms.pipeline("pipeline", [("x", dt.Array(4))], [("y", dt.Array(4))],
                       [_imputer(sk[0], "x", "f", 4), ms.scaler(sk[1], "f", "s", 4), norm])
    ms.save(tmp_path, transforms=spec)
    assert_close(ms.run(spec, {"x": x})["y"], sk.transform(x))


def test_pipeline_regressor_imputer_scaler_glm(iris, tmp_path):
    x, target = _with_holes(iris[0][:, :3]), iris[0][:, 3]
    sk = make_pipeline(SimpleImputer(), StandardScaler(), LinearRegression()).fit(x, target)
    dt = ms.datatypes()
    spec = ms.pipeline("pipelineRegressor", [("x", dt.Array(3))], "width",
                       [_imputer(sk[0], "x", "f", 3), ms.scaler(sk[1], "f", "s", 3),
                        ms.glm_regressor(sk[2].coef_, sk[2].intercept_, "s", 3, output="width")])
    ms.save(tmp_path, regressor=spec)
    assert_close(ms.run(spec, {"x": x})["width"], sk.predict(x))


def _one_vs_rest(x, labels, **kw):
    """A one-vs-rest logistic regression (what a Core ML GLM classifier computes) and its weights."""
    from sklearn.multiclass import OneVsRestClassifier

    ovr = OneVsRestClassifier(LogisticRegression(**kw)).fit(x, labels)
    return ovr, np.vstack([e.coef_ for e in ovr.estimators_]), np.concatenate([e.intercept_ for e in ovr.estimators_])


def _ours(spec):
    return load_model(spec.SerializeToString()).spec


def test_pipeline_classifier_scaler_glm_through_compare(iris, tmp_path):
    x, labels = iris
    scaler = StandardScaler().fit(x)
    ovr, coefs, intercepts = _one_vs_rest(scaler.transform(x), labels)
    dt = ms.datatypes()
    spec = ms.pipeline("pipelineClassifier", [("x", dt.Array(4))], list(ovr.classes_),
                       [ms.scaler(scaler, "x", "s", 4), ms.glm_classifier(coefs, intercepts, ovr.classes_, "s", 4)])
    ms.save(tmp_path, classifier=spec)
    out = ms.run(spec, {"x": x})
    assert set(out) == {"classLabel", "classProbability"}
    assert out["classProbability"].labels == list(ovr.classes_)
    assert_close(out["classProbability"].values, ovr.predict_proba(scaler.transform(x)))
    expected = ovr.predict(scaler.transform(x))
    assert out["classLabel"].tolist() == expected.tolist()
    r = evaluate(_ours(spec), _ours(spec), {"x": x}, labels=labels)
    assert r.evaluated, r.reason
    assert r.samples == 150 and r.top1_agreement == 1.0
    assert r.accuracy_float == r.accuracy_quantized == pytest.approx(np.mean(expected == labels))
    assert r.outputs["classProbability"]["relative_l2"] == 0.0


def test_neural_network_feeding_a_glm_classifier(iris, tmp_path):
    """A network computes features (innerProduct + ReLU); a one-vs-rest GLM classifies them."""
    x, labels = iris
    rng = np.random.default_rng(4)
    w, b = rng.normal(0, 0.5, (4, 6)), rng.normal(0, 0.5, 6)
    hidden = np.maximum(x @ w + b, 0.0)
    ovr, coefs, intercepts = _one_vs_rest(hidden, labels, max_iter=1000)
    net = ms.network([(w, b), (np.eye(6), np.zeros(6))], "x", 4, "h")  # relu(x w + b), then the identity
    dt = ms.datatypes()
    spec = ms.pipeline("pipelineClassifier", [("x", dt.Array(4))], list(ovr.classes_),
                       [net, ms.glm_classifier(coefs, intercepts, ovr.classes_, "h", 6)])
    ms.save(tmp_path, network_glm=spec)
    out = ms.run(spec, {"x": x})
    assert_close(out["classProbability"].values, ovr.predict_proba(hidden))
    assert out["classLabel"].tolist() == ovr.predict(hidden).tolist()


@pytest.fixture(scope="module")
def scaler_network_classifier(iris):
    """pipelineClassifier: scaler -> neural network classifier (a scikit-learn MLP), and the MLP."""
    x, labels = iris
    sk = make_pipeline(StandardScaler(), MLPClassifier((16,), max_iter=3000, random_state=0)).fit(x, labels)
    dt = ms.datatypes()
    net = ms.network(list(zip(sk[1].coefs_, sk[1].intercepts_)), "s", 4, "classProbability",
                     classifier_labels=list(sk[1].classes_))
    spec = ms.pipeline("pipelineClassifier", [("x", dt.Array(4))], list(sk[1].classes_),
                       [ms.scaler(sk[0], "x", "s", 4), net])
    return spec, sk


def test_scaler_feeding_a_neural_network_classifier(iris, scaler_network_classifier, tmp_path):
    x, _ = iris
    spec, sk = scaler_network_classifier
    ms.save(tmp_path, scaler_network=spec)
    out = ms.run(spec, {"x": x})
    assert out["classProbability"].labels == list(sk.classes_)
    assert_close(out["classProbability"].values, sk.predict_proba(x))
    assert out["classLabel"].tolist() == sk.predict(x).tolist()


def test_quantized_pipeline_classifier_evaluates_with_top1_and_accuracy(iris, scaler_network_classifier, tmp_path):
    x, labels = iris
    spec, sk = scaler_network_classifier
    float_model = load_model(spec.SerializeToString())
    quantized = mlqpipe.quantize_weights(spec.SerializeToString(), 8, "linear")
    assert quantized.spec.SerializeToString() != float_model.spec.SerializeToString()
    quantized.save(tmp_path / "quantized.mlmodel")
    r = evaluate(float_model.spec, quantized.spec, {"x": x}, labels=labels)
    assert r.evaluated, r.reason
    assert r.samples == 150
    assert r.accuracy_float == pytest.approx(sk.score(x, labels))
    assert r.top1_agreement >= 0.95
    assert abs(r.accuracy_quantized - r.accuracy_float) <= 0.05
    assert 0 < r.outputs["classProbability"]["relative_l2"] < 0.05
    # one sample per batch, and the float outputs (labels, probabilities) from the cache: the same numbers
    cache = FloatCache(tmp_path / "cache")
    for _ in range(2):
        again = evaluate(float_model.spec, quantized.spec, {"x": x}, labels=labels, memory_mb=0, cache=cache)
        assert (again.top1_agreement, again.accuracy_float, again.accuracy_quantized) == \
            (r.top1_agreement, r.accuracy_float, r.accuracy_quantized)
        assert again.outputs["classProbability"]["relative_l2"] == pytest.approx(r.outputs["classProbability"]["relative_l2"])
    one_bit = mlqpipe.quantize_weights(spec.SerializeToString(), 1, "linear")
    worse = evaluate(float_model.spec, one_bit.spec, {"x": x}, labels=labels)
    assert worse.outputs["classProbability"]["relative_l2"] > 10 * r.outputs["classProbability"]["relative_l2"]


def test_nested_pipeline_and_pipeline_names(iris, tmp_path):
    x = iris[0]
    sk = StandardScaler().fit(x)
    dt = ms.datatypes()
    inner = ms.pipeline("pipeline", [("x", dt.Array(4))], [("s", dt.Array(4))], [ms.scaler(sk, "x", "s", 4)])
    ext = ms.transform("arrayFeatureExtractor", [("s", dt.Array(4))], [("first", dt.Double())])
    ext.arrayFeatureExtractor.extractIndex.append(0)
    spec = ms.pipeline("pipeline", [("x", dt.Array(4))], [("first", dt.Double()), ("s", dt.Array(4))], [inner, ext])
    spec.pipeline.names.extend(["scale", "pick"])
    ms.save(tmp_path, nested=spec)
    out = ms.run(spec, {"x": x})
    assert_close(out["s"], sk.transform(x))
    assert_close(out["first"], sk.transform(x)[:, 0])


def test_a_model_type_not_evaluated_is_named(iris):
    x = iris[0]
    dt = ms.datatypes()
    scaler = ms.scaler(StandardScaler().fit(x), "x", "s", 4)
    trees = ms.regressor("treeEnsembleRegressor", [("s", dt.Array(4))], "y")
    spec = ms.pipeline("pipelineRegressor", [("x", dt.Array(4))], "y", [scaler, trees])
    with pytest.raises(Unsupported, match=r"pipeline models\[1\]: a treeEnsembleRegressor model is not evaluated"):
        ms.run(spec, {"x": x})
    r = evaluate(_ours(spec), _ours(spec), {"x": x})
    assert not r.evaluated and "treeEnsembleRegressor" in r.reason


def test_a_pipeline_output_no_model_gives_is_not_evaluated(iris):
    x = iris[0]
    dt = ms.datatypes()
    spec = ms.pipeline("pipeline", [("x", dt.Array(4))], [("t", dt.Array(4))], [ms.scaler(StandardScaler().fit(x), "x", "s", 4)])
    with pytest.raises(Unsupported, match="pipeline output 't' is given by none of its models"):
        ms.run(spec, {"x": x})
