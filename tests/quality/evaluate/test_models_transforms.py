"""Core ML's feature transforms (scaler, normalizer, imputer, featureVectorizer, arrayFeatureExtractor,
oneHotEncoder, dictVectorizer) against scikit-learn's estimators and numpy, alone and in the pipelines
coremltools' converters write."""

from __future__ import annotations

import numpy as np
import pytest

from mlqpipe.quality.evaluate.context import Unsupported
from mlqpipe.quality.evaluate.models import Probabilities
from tests.quality.evaluate import model_specs as ms
from tests.quality.evaluate.harness import assert_close

sk_pre = pytest.importorskip("sklearn.preprocessing")


def _data(n=40, width=4, seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, (n, width))


def test_scaler_matches_standard_scaler(tmp_path):
    x = _data()
    sk = sk_pre.StandardScaler().fit(x)
    spec = ms.scaler(sk, "x", "y", 4)
    ms.save(tmp_path, scaler=spec)
    out = ms.run(spec, {"x": x})["y"]
    assert out.shape == (40, 4) and out.dtype == np.float64
    assert_close(out, sk.transform(x))


def test_scaler_of_numbers_one_value_and_int64_input():
    dt = ms.datatypes()
    spec = ms.transform("scaler", [("n", dt.Int64())], [("y", dt.Double())])
    spec.scaler.shiftValue.append(1.5)
    spec.scaler.scaleValue.append(-2.0)
    out = ms.run(spec, {"n": np.array([0, 3, -7], dtype=np.int64)})["y"]
    assert out.shape == (3,)
    assert np.array_equal(out, [-3.0, -9.0, 11.0])


def test_scaler_to_int64_refuses_a_lossy_cast():
    dt = ms.datatypes()
    spec = ms.transform("scaler", [("n", dt.Int64())], [("y", dt.Int64())])
    spec.scaler.scaleValue.append(2.0)
    assert ms.run(spec, {"n": np.array([1, 2])})["y"].tolist() == [2, 4]
    spec.scaler.scaleValue[0] = 0.5
    with pytest.raises(Unsupported, match="scaler: output 'y' is an integer type"):
        ms.run(spec, {"n": np.array([1, 2])})


@pytest.mark.parametrize("norm,code", [("l1", "L1"), ("l2", "L2"), ("max", "LMax")])
def test_normalizer_matches_scikit_learn(norm, code, tmp_path):
    x = np.random.default_rng(1).random((30, 5))  # LMax: the largest value is the largest magnitude
    dt = ms.datatypes()
    spec = ms.transform("normalizer", [("x", dt.Array(5))], [("y", dt.Array(5))])
    spec.normalizer.normType = getattr(spec.normalizer, code)
    ms.save(tmp_path, normalizer=spec)
    assert_close(ms.run(spec, {"x": x})["y"], sk_pre.Normalizer(norm=norm).fit_transform(x))


def test_normalizer_refuses_what_core_ml_does_not_document():
    dt = ms.datatypes()
    spec = ms.transform("normalizer", [("x", dt.Array(3))], [("y", dt.Array(3))])
    spec.normalizer.normType = spec.normalizer.LMax
    with pytest.raises(Unsupported, match="normalizer: LMax"):
        ms.run(spec, {"x": np.array([[1.0, -5.0, 2.0]])})
    spec.normalizer.normType = spec.normalizer.L2
    with pytest.raises(Unsupported, match="normalizer: a sample whose norm is 0"):
        ms.run(spec, {"x": np.array([[1.0, 0, 0], [0, 0, 0]])})


@pytest.mark.parametrize("missing", [np.nan, -1.0])
def test_imputer_array_matches_simple_imputer(missing, tmp_path):
    from sklearn.impute import SimpleImputer

    x = np.round(_data(seed=2), 1)
    x[np.random.default_rng(3).random(x.shape) < 0.2] = missing
    sk = SimpleImputer(missing_values=missing, strategy="mean").fit(x)
    dt = ms.datatypes()
    spec = ms.transform("imputer", [("x", dt.Array(4))], [("y", dt.Array(4))])
    spec.imputer.imputedDoubleArray.vector.extend(sk.statistics_.tolist())
    spec.imputer.replaceDoubleValue = missing
    ms.save(tmp_path, imputer=spec)
    assert_close(ms.run(spec, {"x": x})["y"], sk.transform(x))


def test_imputer_of_one_value_int64_and_string():
    dt = ms.datatypes()
    spec = ms.transform("imputer", [("x", dt.Array(3))], [("y", dt.Array(3))])
    spec.imputer.imputedDoubleValue, spec.imputer.replaceDoubleValue = 9.0, 0.0
    assert ms.run(spec, {"x": np.array([[0.0, 1, 0]])})["y"].tolist() == [[9.0, 1.0, 9.0]]

    spec = ms.transform("imputer", [("n", dt.Int64())], [("m", dt.Int64())])
    spec.imputer.imputedInt64Value, spec.imputer.replaceInt64Value = 7, -1
    out = ms.run(spec, {"n": np.array([3, -1, 0])})["m"]
    assert out.dtype == np.int64 and out.tolist() == [3, 7, 0]

    spec = ms.transform("imputer", [("s", dt.String())], [("t", dt.String())])
    spec.imputer.imputedStringValue, spec.imputer.replaceStringValue = "unknown", ""
    assert ms.run(spec, {"s": np.array(["a", "", "b"])})["t"].tolist() == ["a", "unknown", "b"]


def test_imputer_gives_an_absent_input_the_imputed_value_and_passes_dictionaries():
    dt = ms.datatypes()
    spec = ms.transform("imputer", [("d", dt.Dictionary(str))], [("e", dt.Dictionary(str))])
    spec.imputer.imputedStringDictionary.map["a"] = 2.0
    spec.description.input[0].type.isOptional = True
    out = ms.run(spec, {"other": np.zeros(3)})["e"]
    assert out.labels == ["a"] and out.values.tolist() == [[2.0]] * 3
    given = [{"b": 1.0}, {"a": 4.0, "b": 0.5}]
    out = ms.run(spec, {"d": given})["e"]
    assert out.labels == ["b", "a"] and out.values.tolist() == [[1.0, 0.0], [0.5, 4.0]]


def test_imputer_without_its_replace_value_is_not_evaluated():
    dt = ms.datatypes()
    spec = ms.transform("imputer", [("n", dt.Int64())], [("m", dt.Int64())])
    spec.imputer.imputedInt64Value = 7
    with pytest.raises(Unsupported, match="imputer: imputedInt64Value with no replace value"):
        ms.run(spec, {"n": np.array([1])})


def test_feature_vectorizer_puts_numbers_arrays_and_index_dictionaries_side_by_side(tmp_path):
    dt = ms.datatypes()
    inputs = [("a", dt.Double()), ("b", dt.Array(2)), ("c", dt.Int64()), ("d", dt.Dictionary(int))]
    spec = ms.transform("featureVectorizer", inputs, [("v", dt.Array(7))])
    for name, size in [("b", 2), ("a", 1), ("d", 3), ("c", 1)]:
        col = spec.featureVectorizer.inputList.add()
        col.inputColumn, col.inputDimensions = name, size
    ms.save(tmp_path, vectorizer=spec)
    feeds = {"a": np.array([1.0, 2.0]), "b": np.array([[3.0, 4.0], [5.0, 6.0]]), "c": np.array([7, 8]),
             "d": Probabilities([2, 0], np.array([[9.0, 10.0], [0.0, 11.0]]))}
    out = ms.run(spec, feeds)["v"]
    assert out.tolist() == [[3, 4, 1, 10, 0, 9, 7], [5, 6, 2, 11, 0, 0, 8]]
    feeds["d"] = Probabilities([5], np.array([[1.0], [0.0]]))
    with pytest.raises(Unsupported, match="featureVectorizer: dictionary 'd' has a key"):
        ms.run(spec, feeds)


def test_array_feature_extractor_gives_arrays_doubles_and_int64(tmp_path):
    dt = ms.datatypes()
    x = np.array([[10.0, 11, 12, 13], [20, 21, 22, 23]])
    cases = {"array": (dt.Array(2), [3, 1], [[13, 11], [23, 21]]), "double": (dt.Double(), [2], [12, 22]),
             "int64": (dt.Int64(), [0], [10, 20])}
    for name, (kind, index, expected) in cases.items():
        spec = ms.transform("arrayFeatureExtractor", [("x", dt.Array(4))], [("y", kind)])
        spec.arrayFeatureExtractor.extractIndex.extend(index)
        ms.save(tmp_path, **{f"extract_{name}": spec})
        out = ms.run(spec, {"x": x})["y"]
        assert out.tolist() == expected
        assert out.dtype == (np.int64 if name == "int64" else np.float64)
    spec.arrayFeatureExtractor.extractIndex[0] = 4
    with pytest.raises(Unsupported, match="arrayFeatureExtractor: indexes"):
        ms.run(spec, {"x": x})


@pytest.mark.parametrize("strings", [False, True])
def test_one_hot_encoder_matches_scikit_learn(strings, tmp_path):
    values = np.array(["b", "a", "c", "a", "d"]) if strings else np.array([5, 2, 9, 2, 4])
    sk = sk_pre.OneHotEncoder(handle_unknown="ignore").fit(values[:3, None])
    dt = ms.datatypes()
    spec = ms.transform("oneHotEncoder", [("v", dt.String() if strings else dt.Int64())], [("y", dt.Array(3))])
    categories = spec.oneHotEncoder.stringCategories if strings else spec.oneHotEncoder.int64Categories
    categories.vector.extend(sk.categories_[0].tolist())
    spec.oneHotEncoder.handleUnknown = spec.oneHotEncoder.IgnoreUnknown
    ms.save(tmp_path, one_hot=spec)
    out = ms.run(spec, {"v": values})["y"]
    assert np.array_equal(out, sk.transform(values[:, None]).toarray())  # the unknown "d" / 4: zeros
    spec.oneHotEncoder.handleUnknown = spec.oneHotEncoder.ErrorOnUnknown
    with pytest.raises(Unsupported, match="oneHotEncoder: value .* is none of its categories"):
        ms.run(spec, {"v": values})


def test_one_hot_encoder_pipeline_as_the_scikit_learn_converter_writes_it(tmp_path):
    """coremltools' converter: arrayFeatureExtractor (int64) per column -> sparse oneHotEncoder (an index
    dictionary) -> featureVectorizer."""
    dt = ms.datatypes()
    x = np.array([[0, 1], [1, 0], [2, 2], [0, 2], [1, 1]], dtype=np.float64)
    sk = sk_pre.OneHotEncoder().fit(x)
    models, columns = [], []
    for i, cats in enumerate(sk.categories_):
        ext = ms.transform("arrayFeatureExtractor", [("x", dt.Array(2))], [(f"c{i}", dt.Int64())])
        ext.arrayFeatureExtractor.extractIndex.append(i)
        ohe = ms.transform("oneHotEncoder", [(f"c{i}", dt.Int64())], [(f"c{i}", dt.Dictionary(int))])
        ohe.oneHotEncoder.outputSparse = True
        ohe.oneHotEncoder.int64Categories.vector.extend(cats.astype(int).tolist())
        models += [ext, ohe]
        columns.append((f"c{i}", len(cats)))
    width = sum(n for _, n in columns)
    vec = ms.transform("featureVectorizer", [(n, dt.Dictionary(int)) for n, _ in columns], [("y", dt.Array(width))])
    for name, n in columns:
        col = vec.featureVectorizer.inputList.add()
        col.inputColumn, col.inputDimensions = name, n
    spec = ms.pipeline("pipeline", [("x", dt.Array(2))], [("y", dt.Array(width))], models + [vec])
    ms.save(tmp_path, one_hot_pipeline=spec)
    assert np.array_equal(ms.run(spec, {"x": x})["y"], sk.transform(x).toarray())


def test_dict_vectorizer_matches_scikit_learn(tmp_path):
    """Dictionaries come as N python dicts or as a Probabilities; keys outside the mapping are ignored."""
    from sklearn.feature_extraction import DictVectorizer

    train = [{"foo": 1, "bar": 3}, {"bar": 4, "baz": 2}, {"bar": 1, "quux": 1, "quuux": 2}]
    test = train + [{}, {"nothing": 21, "foo": 2}]
    sk = DictVectorizer(sparse=False).fit(train)
    dt = ms.datatypes()
    width = len(sk.feature_names_)
    dv = ms.transform("dictVectorizer", [("d", dt.Dictionary(str))], [("idx", dt.Dictionary(int))])
    dv.dictVectorizer.stringToIndex.vector.extend(sk.feature_names_)
    vec = ms.transform("featureVectorizer", [("idx", dt.Dictionary(int))], [("y", dt.Array(width))])
    col = vec.featureVectorizer.inputList.add()
    col.inputColumn, col.inputDimensions = "idx", width
    spec = ms.pipeline("pipeline", [("d", dt.Dictionary(str))], [("y", dt.Array(width))], [dv, vec])
    ms.save(tmp_path, dict_vectorizer=spec)
    expected = sk.transform(test)
    assert np.array_equal(ms.run(spec, {"d": test})["y"], expected)
    assert np.array_equal(ms.run(spec, {"d": np.array(test, dtype=object)})["y"], expected)
    keys = ["quux", "nothing", "foo", "bar", "baz", "quuux"]
    as_probabilities = Probabilities(keys, np.array([[r.get(k, 0) for k in keys] for r in test], dtype=float))
    assert np.array_equal(ms.run(spec, {"d": as_probabilities})["y"], expected)
    with pytest.raises(Unsupported, match="dictVectorizer: input 'd' is a dictionary feature"):
        ms.run(spec, {"d": expected})
