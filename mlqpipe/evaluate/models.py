"""Running a whole Core ML model on a batch of samples: named input features in, named output features out.

Feature values carry the sample axis first:
- multiArray: float32 (N, *declared shape); image: float32 (N, H, W) gray or (N, H, W, 3) color, 0..255;
- int64 / double: (N,); string: (N,) of str;
- dictionary (a classifier's probabilities): `Probabilities` (labels and an (N, K) array).
Which model types run is one table, `MODELS`; anything else raises `Unsupported` ("not evaluated").
Neural networks go through forward.py; pipelines feed each model's outputs to the next by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..coreml.description import read_description
from ..coreml.model import NN_TYPES, PIPELINE_TYPES, pipeline_of
from .context import Unsupported
from .forward import Weights, is_nd, run_network
from .messages import Int64Vector, Preprocessing, StringVector


@dataclass
class Probabilities:
    """A dictionary feature of class -> probability, for N samples at once."""

    labels: list
    values: np.ndarray  # (N, K), column k for labels[k]

    def top1(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=object)[self.values.argmax(axis=1)]


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


# --- pipelines -----------------------------------------------------------------------------------------------


def _run_pipeline(spec, features: dict, weights_cache: dict) -> dict:
    """Each model reads the pipeline's inputs and every earlier model's outputs, by name."""
    available = dict(features)
    for sub in pipeline_of(spec).models:
        available.update(run_model(sub, available, weights_cache))
    desc = read_description(spec)
    return {f.name: available[f.name] for f in desc.output if f.name in available}


MODELS = {kind: _run_nn for kind in NN_TYPES} | {kind: _run_pipeline for kind in PIPELINE_TYPES}


def run_model(spec, features: dict, weights_cache: dict | None = None) -> dict:
    """The model's output features for a batch of input features (see module doc). `weights_cache` keeps
    dequantized weights across batches."""
    kind = spec.WhichOneof("Type")
    fn = MODELS.get(kind)
    if fn is None:
        raise Unsupported(f"a {kind} model is not evaluated by mlqpipe")
    return fn(spec, features, {} if weights_cache is None else weights_cache)
