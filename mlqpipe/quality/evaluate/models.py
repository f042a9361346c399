"""Running a whole Core ML model on a batch of samples: named input features in, named output features out.

Feature values carry the sample axis first:
- multiArray: (N, *declared shape), float32 from networks, the declared data type from other models;
  image: float32 (N, H, W) gray or (N, H, W, 3) color, 0..255;
- int64: (N,) int64; double: (N,) float64; string: (N,) of str;
- dictionary: `Probabilities` (keys and an (N, K) array): a classifier's probabilities, a sparse
  oneHotEncoder's or a dictVectorizer's output. A dictionary *input* is given as a `Probabilities` or as N
  python dicts (a list or an object array; `dictionary_feature` converts) through the Python API: an .npz
  cannot hold one without pickle, and mlqpipe loads evaluation data with allow_pickle=False.
Which model types run is one table, `MODELS`; anything else, or any setting whose result Core ML does not
pin down, raises `Unsupported` naming the model type ("not evaluated", never a guessed number).
Neural networks go through forward.py; pipelines feed each model's outputs to the next by name; the other
model types (scaler, normalizer, imputer, featureVectorizer, arrayFeatureExtractor, oneHotEncoder,
dictVectorizer, GLM classifier / regressor) are one small pure function each, computing in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlqpipe.formats.description import DOUBLE, FLOAT32, INT32, read_description
from mlqpipe.formats.nn.structure import NN_TYPES, PIPELINE_TYPES, pipeline_of
from mlqpipe.quality.evaluate import messages_models as mm
from mlqpipe.quality.evaluate.context import Unsupported
from mlqpipe.quality.evaluate.forward import Weights, is_nd, run_network
from mlqpipe.quality.evaluate.messages import Int64Vector, Preprocessing, StringVector


@dataclass
class Probabilities:
    """A dictionary feature for N samples at once: class -> probability for classifiers, and any other
    dictionary (index -> value, word -> count). A key a sample's dictionary lacks is 0 there, which is what
    every reader of dictionaries (dictVectorizer, featureVectorizer) makes of a missing key."""

    labels: list  # the keys
    values: np.ndarray  # (N, K), column k for labels[k]

    def top1(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=object)[self.values.argmax(axis=1)]


def dictionary_feature(rows) -> Probabilities:
    """N python dicts as one dictionary feature (keys in first-seen order)."""
    rows = list(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    column = {k: j for j, k in enumerate(keys)}
    values = np.zeros((len(rows), len(keys)))
    for i, r in enumerate(rows):
        for k, v in r.items():
            values[i, column[k]] = v
    return Probabilities(keys, values)


# --- neural networks ---------------------------------------------------------------------------------------


def class_labels(nn) -> list | None:
    kind = nn.WhichOneof("ClassLabels") if "ClassLabels" in nn.DESCRIPTOR.oneofs_by_name else None
    if kind == "stringClassLabels":
        return list(StringVector.FromString(nn.stringClassLabels).vector)
    if kind == "int64ClassLabels":
        return list(Int64Vector.FromString(nn.int64ClassLabels).vector)
    return None


def _image_blob(array: np.ndarray, feature, nn, nd: bool) -> np.ndarray:
    """An image feature (N, H, W[, 3]) as the blob the network reads, preprocessing applied."""
    img = feature.type.imageType
    a = np.asarray(array, dtype=np.float32)
    n = a.shape[0]
    gray = img.colorSpace == 10
    if gray:
        a = a.reshape(n, 1, int(img.height), int(img.width))
    else:
        a = a.reshape(n, int(img.height), int(img.width), 3).transpose(0, 3, 1, 2)  # RGB arrays
        if img.colorSpace == 30:  # BGR model
            a = a[:, ::-1]
    for raw in nn.preprocessing:
        pre = Preprocessing.FromString(raw)
        if pre.featureName not in ("", feature.name):
            continue
        if pre.HasField("meanImage"):
            raise Unsupported(f"input {feature.name!r}: meanImage preprocessing is not evaluated")
        if pre.HasField("scaler"):
            s = pre.scaler
            scale = s.channelScale if s.HasField("channelScale") else 1.0
            bias = np.array([s.grayBias] if gray else ([s.blueBias, s.greenBias, s.redBias] if img.colorSpace == 30 else
                                                        [s.redBias, s.greenBias, s.blueBias]), np.float32)
            a = a * scale + bias.reshape(1, -1, 1, 1)
    # classic [S=1, B, C, H, W] and ND RANK4 [B=1, C, H, W] are both (N, 1, C, H, W); ND RANK5 adds one more 1
    rank5_in_nd = nd and int(nn.imageInputShapeMapping) == 0
    return a[:, None, None] if rank5_in_nd else a[:, None]


def _array_blob(array: np.ndarray, shape: list[int], name: str, nd: bool) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    n = a.shape[0]
    if not nd and len(shape) in (1, 3) and a.ndim == len(shape) + 2 and list(a.shape[2:]) == list(shape):
        # a sequence per sample, (N, S, *shape): Core ML feeds a rank-5 network [S, 1, C, H, W]
        return a.reshape(n, a.shape[1], *(shape if len(shape) == 3 else [shape[0], 1, 1]))
    if list(a.shape[1:]) != list(shape) and int(np.prod(a.shape[1:])) == int(np.prod(shape)):
        a = a.reshape(n, *shape)  # same values per sample, laid out row-major as the model declares
    if list(a.shape[1:]) != list(shape):
        raise Unsupported(f"input {name!r}: data has shape {a.shape[1:]}, the model declares {tuple(shape)}")
    if nd:
        return a
    if len(shape) == 1:
        return a.reshape(n, 1, shape[0], 1, 1)
    if len(shape) == 3:
        return a.reshape(n, 1, *shape)
    if len(shape) == 5:
        return a.reshape(n, shape[0], shape[2], shape[3], shape[4])
    raise Unsupported(f"input {name!r}: a rank-{len(shape)} array in a rank-5 network (Core ML allows 1, 3 or 5 there)")


def _run_nn(spec, features: dict, weights_cache: dict) -> dict:
    kind = spec.WhichOneof("Type")
    nn = getattr(spec, kind)
    nd = is_nd(nn)
    desc = read_description(spec)
    feeds = {}
    for f in desc.input:
        if f.name not in features:
            if f.type.isOptional:
                continue
            raise Unsupported(f"input {f.name!r}: no value for it")
        t = f.type.WhichOneof("Type")
        if t == "imageType":
            feeds[f.name] = _image_blob(features[f.name], f, nn, nd)
        elif t == "multiArrayType":
            feeds[f.name] = _array_blob(features[f.name], [int(d) for d in f.type.multiArrayType.shape], f.name, nd)
        else:
            raise Unsupported(f"input {f.name!r} of type {t} into a neural network is not evaluated")
    keep = {f.name for f in desc.output} | ({nn.labelProbabilityLayerName} if kind == "neuralNetworkClassifier" else set())
    weights = weights_cache.setdefault(id(spec), Weights(spec))
    blobs = run_network(nn, spec, feeds, keep=keep, weights=weights)
    out = {}
    for f in desc.output:
        if f.name in blobs:
            out[f.name] = blobs[f.name]
    if kind == "neuralNetworkClassifier":
        labels = class_labels(nn)
        prob_blob = nn.labelProbabilityLayerName or next((f.name for f in desc.output if f.name in blobs and f.name != desc.predictedFeatureName), None)
        if labels is None or prob_blob not in blobs:
            raise Unsupported("a classifier whose probabilities are not produced by its network")
        probs = Probabilities(labels, blobs[prob_blob].reshape(blobs[prob_blob].shape[0], -1))
        if probs.values.shape[1] != len(labels):
            raise Unsupported(f"a classifier with {len(labels)} labels whose network gives {probs.values.shape[1]} scores")
        if desc.predictedProbabilitiesName:
            out[desc.predictedProbabilitiesName] = probs
        if desc.predictedFeatureName:
            out[desc.predictedFeatureName] = probs.top1()
    return out


# --- feature values of the other model types ------------------------------------------------------------------

_ARRAY_DTYPES = {FLOAT32: np.float32, DOUBLE: np.float64, INT32: np.int32, 65552: np.float16}


def _value(features: dict, f, kind: str):
    if f.name not in features:
        raise Unsupported(f"{kind}: input {f.name!r} has no value")
    return features[f.name]


def _rows(value, name: str, kind: str, dtype=np.float64) -> np.ndarray:
    """A numeric feature as (N, k): a number per sample is one column, an array is flattened row-major
    (a network's blob and its declared shape hold the same values in the same order)."""
    if isinstance(value, Probabilities):
        raise Unsupported(f"{kind}: input {name!r} is a dictionary where numbers are read")
    a = np.asarray(value)
    if a.dtype.kind not in "fiub":
        raise Unsupported(f"{kind}: input {name!r} holds {a.dtype} values, not numbers")
    a = a.reshape(len(a), -1)
    return a if dtype is None else a.astype(dtype)


def _integers(value, name: str, kind: str) -> np.ndarray:
    """An integer feature as int64 (N, k); float values must be whole numbers."""
    a = _rows(value, name, kind, dtype=None)
    if a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        raise Unsupported(f"{kind}: input {name!r} holds values that are not integers")
    return a.astype(np.int64)


def _integral(y: np.ndarray, name: str, kind: str) -> np.ndarray:
    if y.dtype.kind == "f":
        if not np.array_equal(y, np.round(y)):
            raise Unsupported(f"{kind}: output {name!r} is an integer type and a value is not an integer "
                              "(Core ML fails such a cast)")
    return y


def _as_feature(y: np.ndarray, f, kind: str):
    """Results (N, k) as the value of output feature `f`, in its declared type."""
    t = f.type.WhichOneof("Type")
    n, k = y.shape
    if t in ("doubleType", "int64Type"):
        if k != 1:
            raise Unsupported(f"{kind}: {k} values per sample for the scalar output {f.name!r}")
        return y[:, 0].astype(np.float64) if t == "doubleType" else _integral(y[:, 0], f.name, kind).astype(np.int64)
    if t == "multiArrayType":
        dtype = _ARRAY_DTYPES.get(int(f.type.multiArrayType.dataType), np.float64)
        if np.issubdtype(dtype, np.integer):
            y = _integral(y, f.name, kind)
        shape = [int(d) for d in f.type.multiArrayType.shape]
        return y.reshape(n, *shape).astype(dtype) if shape and int(np.prod(shape)) == k else y.astype(dtype)
    if t == "dictionaryType" and f.type.dictionaryType.WhichOneof("KeyType") == "int64KeyType":
        return Probabilities(list(range(k)), y.astype(np.float64))  # index -> value
    raise Unsupported(f"{kind}: output {f.name!r} of type {t} for numbers")


def _dictionary(value, name: str, kind: str) -> Probabilities:
    if isinstance(value, Probabilities):
        return value
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
        if all(isinstance(r, dict) for r in value):
            return dictionary_feature(value)
    raise Unsupported(f"{kind}: input {name!r} is a dictionary feature: give it as a Probabilities (keys and an "
                      "(N, K) array) or as N dicts")


def _single(desc, kind: str):
    """The one input and one output feature of a transform."""
    if len(desc.input) != 1 or len(desc.output) != 1:
        raise Unsupported(f"{kind} with {len(desc.input)} inputs and {len(desc.output)} outputs "
                          "(Core ML allows one each)")
    return desc.input[0], desc.output[0]


def _samples(features: dict) -> int:
    for v in features.values():
        return len(v.values) if isinstance(v, Probabilities) else len(v)
    raise Unsupported("no input feature says how many samples there are")


# --- transforms ------------------------------------------------------------------------------------------------


def _per_value(values, width: int, default: float, what: str) -> np.ndarray | float:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return default
    if v.size in (1, width):
        return v
    raise Unsupported(f"scaler: {v.size} {what} values for {width} inputs")


def _scaler(p, desc, features: dict) -> dict:
    """scaleValue * (x + shiftValue): one value for all elements or one per element (defaults 1 and 0)."""
    f_in, f_out = _single(desc, "scaler")
    x = _rows(_value(features, f_in, "scaler"), f_in.name, "scaler")
    shift = _per_value(p.shiftValue, x.shape[1], 0.0, "shiftValue")
    y = _per_value(p.scaleValue, x.shape[1], 1.0, "scaleValue") * (x + shift)
    return {f_out.name: _as_feature(y, f_out, "scaler")}


def _normalizer(p, desc, features: dict) -> dict:
    """x / norm(x) over each sample's values. LMax: Core ML documents max(x_i), scikit-learn divides by
    max |x_i|; a sample where the two differ is not evaluated, nor one whose norm is 0 (what Core ML
    gives then is not documented)."""
    f_in, f_out = _single(desc, "normalizer")
    x = _rows(_value(features, f_in, "normalizer"), f_in.name, "normalizer")
    kind = int(p.normType)
    if kind == mm.NORM_L1:
        norm = np.abs(x).sum(axis=1)
    elif kind == mm.NORM_L2:
        norm = np.sqrt(np.einsum("nk,nk->n", x, x))
    elif kind == mm.NORM_LMAX:
        norm = x.max(axis=1)
        if np.any(norm != np.abs(x).max(axis=1)):
            raise Unsupported("normalizer: LMax on a sample where max x_i (Core ML's documented norm) is not "
                              "max |x_i| (scikit-learn's)")
    else:
        raise Unsupported(f"normalizer: normType {kind}")
    if np.any(norm == 0):
        raise Unsupported("normalizer: a sample whose norm is 0 (Core ML does not document the result)")
    return {f_out.name: _as_feature(x / norm[:, None], f_out, "normalizer")}


_IMPUTED_REPLACE = {  # imputed value -> the replace value that goes with it
    "imputedDoubleValue": "replaceDoubleValue", "imputedDoubleArray": "replaceDoubleValue",
    "imputedInt64Value": "replaceInt64Value", "imputedInt64Array": "replaceInt64Value",
    "imputedStringValue": "replaceStringValue",
}


def _imputed(p, which: str):
    """The imputed value: a number, an array of one per element, a string, or a dictionary."""
    v = getattr(p, which)
    if which in ("imputedDoubleArray", "imputedInt64Array"):
        return np.asarray(v.vector, dtype=np.float64 if which == "imputedDoubleArray" else np.int64)
    if which in ("imputedStringDictionary", "imputedInt64Dictionary"):
        return Probabilities([e.key for e in v.map], np.asarray([[e.value for e in v.map]], dtype=np.float64))
    return v


def _imputed_for_all(value, n: int, f_out, kind: str):
    if isinstance(value, Probabilities):
        return Probabilities(value.labels, np.repeat(value.values, n, axis=0))
    if isinstance(value, str):
        return np.full(n, value, dtype=object)
    return _as_feature(np.tile(np.asarray(value).reshape(1, -1), (n, 1)), f_out, kind)


def _imputer(p, desc, features: dict) -> dict:
    """Missing values (equal to the replace value; a NaN replace value matches NaN) become the imputed value,
    one for all elements or one per element. An absent (optional) input becomes the imputed value whole —
    the only imputation of a dictionary, which is passed through when present."""
    f_in, f_out = _single(desc, "imputer")
    which = p.WhichOneof("ImputedValue")
    if which is None:
        raise Unsupported("imputer: no imputed value")
    imputed = _imputed(p, which)
    if f_in.name not in features:
        return {f_out.name: _imputed_for_all(imputed, _samples(features), f_out, "imputer")}
    value = features[f_in.name]
    if isinstance(imputed, Probabilities):
        return {f_out.name: _dictionary(value, f_in.name, "imputer")}
    replace = p.WhichOneof("ReplaceValue")
    if replace != _IMPUTED_REPLACE[which]:
        raise Unsupported(f"imputer: {which} with {replace or 'no replace value'} (which present values are missing "
                          "is not documented)")
    r = getattr(p, replace)
    if which == "imputedStringValue":
        x = np.asarray(value)
        if x.dtype.kind not in "UO":
            raise Unsupported(f"imputer: input {f_in.name!r} holds {x.dtype} values, not strings")
        return {f_out.name: np.where(x.astype(str) == r, imputed, x.astype(str)).astype(object)}
    integer = which.startswith("imputedInt64")
    x = _integers(value, f_in.name, "imputer") if integer else _rows(value, f_in.name, "imputer")
    fill = np.asarray(imputed)
    if fill.ndim and fill.size != x.shape[1]:
        raise Unsupported(f"imputer: {fill.size} imputed values for {x.shape[1]} inputs")
    missing = np.isnan(x) if not integer and math.isnan(r) else x == r
    return {f_out.name: _as_feature(np.where(missing, fill, x), f_out, "imputer")}


def _dense(d: Probabilities, size: int, name: str, kind: str) -> np.ndarray:
    """An index -> value dictionary as its values at indexes 0 .. size-1."""
    keys = np.asarray([k if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else -1 for k in d.labels],
                      dtype=np.int64)
    inside = (keys >= 0) & (keys < size)
    if np.any(d.values[:, ~inside] != 0):
        raise Unsupported(f"{kind}: dictionary {name!r} has a key that is not an index below {size}")
    out = np.zeros((d.values.shape[0], size))
    out[:, keys[inside]] = d.values[:, inside]
    return out


def _feature_vectorizer(p, desc, features: dict) -> dict:
    """The inputList features side by side, in its order: a number is one column, an array its values, an
    int64-keyed dictionary its values at keys 0 .. inputDimensions-1."""
    if len(desc.output) != 1:
        raise Unsupported(f"featureVectorizer with {len(desc.output)} outputs")
    declared = {f.name: f.type.WhichOneof("Type") for f in desc.input}
    parts = []
    for column in p.inputList:
        name, size = column.inputColumn, int(column.inputDimensions)
        if name not in features:
            raise Unsupported(f"featureVectorizer: input {name!r} has no value")
        v = features[name]
        if declared.get(name) == "dictionaryType" or isinstance(v, Probabilities):
            parts.append(_dense(_dictionary(v, name, "featureVectorizer"), size, name, "featureVectorizer"))
            continue
        a = _rows(v, name, "featureVectorizer")
        if a.shape[1] != size:
            raise Unsupported(f"featureVectorizer: input {name!r} has {a.shape[1]} values, inputDimensions says {size}")
        parts.append(a)
    if not parts:
        raise Unsupported("featureVectorizer: an empty inputList")
    return {desc.output[0].name: _as_feature(np.concatenate(parts, axis=1), desc.output[0], "featureVectorizer")}


def _array_feature_extractor(p, desc, features: dict) -> dict:
    """The input array's values at extractIndex. Only arrays with one dimension above 1 (which value an
    index addresses in a multi-dimensional array is not documented)."""
    f_in, f_out = _single(desc, "arrayFeatureExtractor")
    shape = [int(d) for d in f_in.type.multiArrayType.shape]
    if sum(d > 1 for d in shape) > 1:
        raise Unsupported(f"arrayFeatureExtractor: input {f_in.name!r} of shape {shape} (indexes into a "
                          "multi-dimensional array)")
    x = _rows(_value(features, f_in, "arrayFeatureExtractor"), f_in.name, "arrayFeatureExtractor", dtype=None)
    index = np.asarray(p.extractIndex, dtype=np.int64)
    if index.size == 0 or index.max() >= x.shape[1]:
        raise Unsupported(f"arrayFeatureExtractor: indexes {index.tolist()} for an array of {x.shape[1]} values")
    return {f_out.name: _as_feature(x[:, index], f_out, "arrayFeatureExtractor")}


def _positions(categories: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each value's first position in `categories`, -1 where it is none of them."""
    if categories.size == 0:
        return np.full(len(x), -1)
    order = np.argsort(categories, kind="stable")
    ordered = categories[order]
    j = np.minimum(np.searchsorted(ordered, x), len(ordered) - 1)
    return np.where(ordered[j] == x, order[j], -1)


def _one_hot_encoder(p, desc, features: dict) -> dict:
    """1 at the input value's position among the categories. A value in none of them gives zeros with
    IgnoreUnknown; with ErrorOnUnknown Core ML fails the prediction, so it is not evaluated."""
    f_in, f_out = _single(desc, "oneHotEncoder")
    which = p.WhichOneof("CategoryType")
    if which is None:
        raise Unsupported("oneHotEncoder: no categories")
    value = _value(features, f_in, "oneHotEncoder")
    if which == "int64Categories":
        x = _integers(value, f_in.name, "oneHotEncoder")
        if x.shape[1] != 1:
            raise Unsupported(f"oneHotEncoder: input {f_in.name!r} has {x.shape[1]} values per sample")
        x, categories = x[:, 0], np.asarray(getattr(p, which).vector, dtype=np.int64)
    else:
        x = np.asarray(value)
        if x.dtype.kind not in "UO" or x.ndim != 1:
            raise Unsupported(f"oneHotEncoder: input {f_in.name!r} is not one string per sample")
        x, categories = x.astype(str), np.asarray(list(getattr(p, which).vector), dtype=str)
    at = _positions(categories, x)
    known = at >= 0
    if not known.all() and int(p.handleUnknown) != mm.IGNORE_UNKNOWN:
        raise Unsupported(f"oneHotEncoder: value {x[~known][0]!r} is none of its categories (ErrorOnUnknown: Core ML "
                          "fails the prediction)")
    y = np.zeros((len(x), len(categories)))
    y[np.nonzero(known)[0], at[known]] = 1.0
    return {f_out.name: _as_feature(y, f_out, "oneHotEncoder")}


def _dict_vectorizer(p, desc, features: dict) -> dict:
    """Each sample's dictionary as values at its keys' positions in the mapping; keys outside the mapping are
    ignored (as scikit-learn does, and coremltools' tests expect of Core ML). Core ML gives the result as an
    index -> value dictionary."""
    f_in, f_out = _single(desc, "dictVectorizer")
    which = p.WhichOneof("Map")
    if which is None:
        raise Unsupported("dictVectorizer: no mapping")
    d = _dictionary(_value(features, f_in, "dictVectorizer"), f_in.name, "dictVectorizer")
    strings = which == "stringToIndex"
    if any(isinstance(k, str) != strings for k in d.labels):
        raise Unsupported(f"dictVectorizer: input {f_in.name!r} has keys of another type than its "
                          f"{'string' if strings else 'int64'} mapping")
    mapping = list(getattr(p, which).vector)
    position = {}
    for i, key in enumerate(mapping):
        position.setdefault(key, i)
    src = [j for j, k in enumerate(d.labels) if k in position]
    y = np.zeros((d.values.shape[0], len(mapping)))
    y[:, [position[d.labels[j]] for j in src]] = d.values[:, src]
    return {f_out.name: _as_feature(y, f_out, "dictVectorizer")}


# --- generalized linear models ------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


_ERFC = np.frompyfunc(math.erfc, 1, 1)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return _ERFC(-z / math.sqrt(2.0)).astype(np.float64) * 0.5


def _linear(p, desc, features: dict, kind: str) -> np.ndarray:
    """x · w + offset for each weight vector: (N, R). One input only: the order in which Core ML would put
    several inputs side by side is not documented (converters put a featureVectorizer first)."""
    if len(desc.input) != 1:
        raise Unsupported(f"{kind} with {len(desc.input)} inputs")
    rows = [list(w.value) for w in p.weights]
    if not rows or len(p.offset) != len(rows) or len({len(r) for r in rows}) != 1:
        raise Unsupported(f"{kind}: {len(rows)} weight vectors of lengths {sorted({len(r) for r in rows})} and "
                          f"{len(p.offset)} offsets")
    w = np.asarray(rows, dtype=np.float64)
    x = _rows(_value(features, desc.input[0], kind), desc.input[0].name, kind)
    if x.shape[1] != w.shape[1]:
        raise Unsupported(f"{kind}: input {desc.input[0].name!r} has {x.shape[1]} values, the weights {w.shape[1]}")
    return x @ w.T + np.asarray(p.offset, dtype=np.float64)


def _glm_regressor(p, desc, features: dict) -> dict:
    """w · x + offset, then the post-evaluation transform (none, logistic or the normal CDF)."""
    z = _linear(p, desc, features, "glmRegressor")
    if z.shape[1] != 1 or len(desc.output) != 1:
        raise Unsupported(f"glmRegressor with {z.shape[1]} weight vectors and {len(desc.output)} outputs")
    transform = {mm.REGRESSOR_NO_TRANSFORM: lambda v: v, mm.REGRESSOR_LOGIT: _sigmoid,
                 mm.REGRESSOR_PROBIT: _normal_cdf}.get(int(p.postEvaluationTransform))
    if transform is None:
        raise Unsupported(f"glmRegressor: postEvaluationTransform {p.postEvaluationTransform}")
    return {desc.output[0].name: _as_feature(transform(z), desc.output[0], "glmRegressor")}


def _classifier_outputs(desc, probs: Probabilities, kind: str) -> dict:
    """A classifier's outputs: the predicted class under predictedFeatureName, the probabilities as the
    dictionary output."""
    out = {}
    for f in desc.output:
        t = f.type.WhichOneof("Type")
        if f.name == desc.predictedFeatureName or (not desc.predictedFeatureName and t in ("int64Type", "stringType")):
            out[f.name] = probs.top1()
        elif t == "dictionaryType":
            out[f.name] = probs
        else:
            raise Unsupported(f"{kind}: output {f.name!r} of type {t} (a classifier gives a class and probabilities)")
    return out


def _glm_classifier(p, desc, features: dict) -> dict:
    """Class probabilities from the linear scores. Two classes, one weight vector (either encoding): the
    second class has transform(score), the first the rest. OneVsRest over K > 2 classes: K logistic scores
    normalised to sum 1 (scikit-learn's one-vs-rest, which coremltools' tests hold Core ML to). ReferenceClass
    over more than two classes is not documented, so not evaluated."""
    which = p.WhichOneof("ClassLabels")
    if which is None:
        raise Unsupported("glmClassifier: no class labels")
    labels = list(getattr(p, which).vector)
    z = _linear(p, desc, features, "glmClassifier")
    k, r = len(labels), z.shape[1]
    transform = {mm.CLASSIFIER_LOGIT: _sigmoid, mm.CLASSIFIER_PROBIT: _normal_cdf}.get(int(p.postEvaluationTransform))
    if transform is None:
        raise Unsupported(f"glmClassifier: postEvaluationTransform {p.postEvaluationTransform}")
    if k == 2 and r == 1:
        second = transform(z[:, 0])
        probs = np.stack([1.0 - second, second], axis=1)
    elif int(p.classEncoding) == mm.ONE_VS_REST and k == r > 2 and transform is _sigmoid:
        scores = _sigmoid(z)
        probs = scores / scores.sum(axis=1, keepdims=True)
    else:
        names = {mm.REFERENCE_CLASS: "ReferenceClass", mm.ONE_VS_REST: "OneVsRest"}
        encoding = names.get(int(p.classEncoding), f"classEncoding {p.classEncoding}")
        raise Unsupported(f"glmClassifier: {encoding} encoding with {r} weight vectors for {k} classes"
                          f"{' and probit' if transform is _normal_cdf else ''}")
    if not np.all(np.isfinite(probs)):
        raise Unsupported("glmClassifier: probabilities that are not finite")
    return _classifier_outputs(desc, Probabilities(labels, probs), "glmClassifier")


# model type -> fn(parameters, description, features) -> outputs; the parameters are parsed once per model
PARAMETER_MODELS = {
    "scaler": _scaler,
    "normalizer": _normalizer,
    "imputer": _imputer,
    "featureVectorizer": _feature_vectorizer,
    "arrayFeatureExtractor": _array_feature_extractor,
    "oneHotEncoder": _one_hot_encoder,
    "dictVectorizer": _dict_vectorizer,
    "glmClassifier": _glm_classifier,
    "glmRegressor": _glm_regressor,
}
assert set(PARAMETER_MODELS) == set(mm.MODEL_PARAMS)


def _run_parameter_model(spec, features: dict, cache: dict) -> dict:
    kind = spec.WhichOneof("Type")
    entry = cache.get(("parameters", id(spec)))
    if entry is None or entry[0] is not spec:  # the entry keeps the spec alive, so its id is not reused
        entry = (spec, mm.MODEL_PARAMS[kind].FromString(getattr(spec, kind)), read_description(spec))
        cache[("parameters", id(spec))] = entry
    return PARAMETER_MODELS[kind](entry[1], entry[2], features)


# --- pipelines -----------------------------------------------------------------------------------------------


def _run_pipeline(spec, features: dict, weights_cache: dict) -> dict:
    """Each model reads the pipeline's inputs and every earlier model's outputs, by name; the pipeline gives
    the outputs its description declares."""
    available = dict(features)
    for i, sub in enumerate(pipeline_of(spec).models):
        try:
            available.update(run_model(sub, available, weights_cache))
        except Unsupported as e:
            raise Unsupported(f"pipeline models[{i}]: {e}") from e
    desc = read_description(spec)
    missing = [f.name for f in desc.output if f.name not in available]
    if missing:
        raise Unsupported(f"pipeline output {missing[0]!r} is given by none of its models")
    return {f.name: available[f.name] for f in desc.output}


MODELS = ({kind: _run_nn for kind in NN_TYPES} | {kind: _run_pipeline for kind in PIPELINE_TYPES}
          | {kind: _run_parameter_model for kind in PARAMETER_MODELS})


def run_model(spec, features: dict, weights_cache: dict | None = None) -> dict:
    """The model's output features for a batch of input features (see module doc). `weights_cache` keeps
    dequantized weights and parsed parameters across batches."""
    kind = spec.WhichOneof("Type")
    fn = MODELS.get(kind)
    if fn is None:
        raise Unsupported(f"a {kind} model is not evaluated by mlqpipe")
    return fn(spec, features, {} if weights_cache is None else weights_cache)
