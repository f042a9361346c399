"""Core ML's GLM classifier and regressor against scikit-learn's fitted models (LinearRegression,
LogisticRegression, one-vs-rest) and scipy's normal CDF."""

from __future__ import annotations

import numpy as np
import pytest

from mlqpipe.quality.evaluate.context import Unsupported
from mlqpipe.quality.evaluate.models import Probabilities
from tests.quality.evaluate import model_specs as ms
from tests.quality.evaluate.harness import assert_close

linear_model = pytest.importorskip("sklearn.linear_model")


def _data(n=60, width=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 2.0, (n, width))


@pytest.mark.parametrize("transform", ["NoTransform", "Logit", "Probit"])
def test_glm_regressor_matches_linear_regression(transform, tmp_path):
    from scipy.stats import norm

    x = _data()
    y = x @ np.array([0.5, -1.0, 0.25]) + 0.3 + np.random.default_rng(1).normal(0, 0.1, len(x))
    sk = linear_model.LinearRegression().fit(x, y)
    spec = ms.glm_regressor(sk.coef_, sk.intercept_, "x", 3, transform_name=transform)
    ms.save(tmp_path, glm=spec)
    out = ms.run(spec, {"x": x})["prediction"]
    z = sk.predict(x)
    expected = {"NoTransform": z, "Logit": 1 / (1 + np.exp(-z)), "Probit": norm.cdf(z)}[transform]
    assert out.shape == (60,) and out.dtype == np.float64
    assert_close(out, expected)


def test_binary_logistic_regression_with_string_labels(tmp_path):
    x = _data()
    labels = np.where(x[:, 0] + 0.5 * x[:, 1] > 0.2, "Foo", "Bar")
    sk = linear_model.LogisticRegression().fit(x, labels)
    spec = ms.glm_classifier(sk.coef_, sk.intercept_, sk.classes_, "x", 3)
    ms.save(tmp_path, glm=spec)
    out = ms.run(spec, {"x": x})
    probs = out["classProbability"]
    assert isinstance(probs, Probabilities) and probs.labels == ["Bar", "Foo"]
    assert_close(probs.values, sk.predict_proba(x))
    assert out["classLabel"].tolist() == sk.predict(x).tolist()


def test_one_vs_rest_logistic_regression_with_int64_labels(tmp_path):
    from sklearn.multiclass import OneVsRestClassifier

    x = _data(n=90, seed=2)
    y = np.digitize(x[:, 0] - x[:, 2], [-1.5, 0.0, 1.5]) + 1  # classes 1..4
    sk = OneVsRestClassifier(linear_model.LogisticRegression()).fit(x, y)
    coefs = np.vstack([e.coef_ for e in sk.estimators_])
    intercepts = np.concatenate([e.intercept_ for e in sk.estimators_])
    spec = ms.glm_classifier(coefs, intercepts, sk.classes_.tolist(), "x", 3)
    ms.save(tmp_path, glm=spec)
    out = ms.run(spec, {"x": x})
    assert out["classProbability"].labels == [1, 2, 3, 4]
    assert_close(out["classProbability"].values, sk.predict_proba(x))
    assert out["classLabel"].tolist() == sk.predict(x).tolist()


def test_probit_and_reference_class_for_two_classes(tmp_path):
    from scipy.stats import norm

    x = _data(n=20)
    w, b = np.array([0.7, -0.2, 0.1]), -0.3
    for one_vs_rest in (True, False):
        spec = ms.glm_classifier(w, [b], [0, 1], "x", 3, one_vs_rest=one_vs_rest, probit=True)
        ms.save(tmp_path, **{f"probit_{one_vs_rest}": spec})
        second = norm.cdf(x @ w + b)
        assert_close(ms.run(spec, {"x": x})["classProbability"].values, np.stack([1 - second, second], 1))


def test_what_core_ml_does_not_document_is_not_evaluated():
    x = _data(n=5)
    spec = ms.glm_classifier(np.ones((2, 3)), [0.0, 0.0], ["a", "b", "c"], "x", 3, one_vs_rest=False)
    with pytest.raises(Unsupported, match="glmClassifier: ReferenceClass encoding with 2 weight vectors for 3 classes"):
        ms.run(spec, {"x": x})
    dt = ms.datatypes()
    spec = ms.regressor("glmRegressor", [("a", dt.Double()), ("b", dt.Double())])
    spec.glmRegressor.weights.add().value.extend([1.0, 2.0])
    spec.glmRegressor.offset.append(0.0)
    with pytest.raises(Unsupported, match="glmRegressor with 2 inputs"):
        ms.run(spec, {"a": x[:, 0], "b": x[:, 1]})
