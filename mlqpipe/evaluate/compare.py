"""Feeding a model test data and comparing the quantized model's outputs with the float model's.

Inputs come from an .npz (model input name -> array; a lone input may be called X), or — with a warning in
the result — from seeded random data of the declared shapes. Image inputs get the model's own preprocessing
(scale, biases, channel order). Results: per-output relative L2 / max error, top-1 agreement for
classifiers, and accuracy before/after when labels are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..coreml.description import read_description
from ..coreml.model import NN_TYPES
from .context import Unsupported
from .forward import run_network
from .messages import Int64Vector, Preprocessing, StringVector

MAX_SAMPLES = 2000


@dataclass
class Evaluation:
    evaluated: bool
    reason: str = ""
    samples: int = 0
    random_inputs: bool = False
    top1_agreement: float | None = None
    accuracy_float: float | None = None
    accuracy_quantized: float | None = None
    outputs: dict = field(default_factory=dict)  # name -> {"relative_l2", "max_abs"}

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _network(spec):
    kind = spec.WhichOneof("Type")
    if kind not in NN_TYPES:
        raise Unsupported(f"a {kind} model is not evaluated (neural networks only; pipelines are not evaluated)")
    return getattr(spec, kind)


def _to_rank5(array: np.ndarray, shape: list[int], name: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    n = a.shape[0]
    if list(a.shape[1:]) != list(shape) and int(np.prod(a.shape[1:])) == int(np.prod(shape)):
        a = a.reshape(n, *shape)  # same values per sample, laid out row-major as the model declares
    if list(a.shape[1:]) != list(shape):
        raise Unsupported(f"input {name!r}: data has shape {a.shape[1:]}, the model declares {tuple(shape)}")
    if len(shape) == 1:
        return a.reshape(n, 1, shape[0], 1, 1)
    if len(shape) == 3:
        return a.reshape(n, 1, *shape)
    if len(shape) == 5:
        return a.reshape(n, shape[0], shape[2], shape[3], shape[4])
    raise Unsupported(f"input {name!r}: rank-{len(shape)} arrays are not evaluated (only 1, 3 and 5)")


def _image(array: np.ndarray, feature, nn, name: str) -> np.ndarray:
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
        if pre.featureName not in ("", name):
            continue
        if pre.HasField("meanImage"):
            raise Unsupported(f"input {name!r}: meanImage preprocessing is not evaluated")
        if pre.HasField("scaler"):
            s = pre.scaler
            scale = s.channelScale if s.HasField("channelScale") else 1.0
            bias = np.array([s.grayBias] if gray else ([s.blueBias, s.greenBias, s.redBias] if img.colorSpace == 30 else [s.redBias, s.greenBias, s.blueBias]), np.float32)
            a = a * scale + bias.reshape(1, -1, 1, 1)
    return a[:, None]


def build_feeds(spec, data: dict | None, names: dict, samples: int | None, seed: int = 0):
    """(feeds, n, random) for the model's inputs."""
    desc = read_description(spec)
    nn = _network(spec)
    required = [f for f in desc.input if not f.type.isOptional]
    feeds, n, random = {}, None, data is None
    rng = np.random.default_rng(seed)
    for f in desc.input:
        kind = f.type.WhichOneof("Type")
        key = names.get(f.name) or (f.name if data is not None and f.name in data else ("X" if len(required) == 1 and data is not None and "X" in data else None))
        if data is not None and key is None:
            if f.type.isOptional:
                continue
            raise Unsupported(f"input {f.name!r}: no array for it in the evaluation data (name it under evaluation.inputs)")
        if random:
            count = samples or 16
            if kind == "imageType":
                img = f.type.imageType
                shape = (count, int(img.height), int(img.width)) + (() if img.colorSpace == 10 else (3,))
                arr = rng.integers(0, 256, shape).astype(np.float32)
            elif kind == "multiArrayType":
                if f.type.isOptional:
                    continue
                arr = rng.standard_normal((count, *[int(d) for d in f.type.multiArrayType.shape])).astype(np.float32)
            else:
                raise Unsupported(f"input {f.name!r} of type {kind} cannot be generated")
        else:
            arr = np.asarray(data[key])[: samples or MAX_SAMPLES]
        if kind == "imageType":
            feeds[f.name] = _image(arr, f, nn, f.name)
        elif kind == "multiArrayType":
            feeds[f.name] = _to_rank5(arr, [int(d) for d in f.type.multiArrayType.shape], f.name)
        else:
            raise Unsupported(f"input {f.name!r} of type {kind} is not evaluated")
        n = feeds[f.name].shape[0] if n is None else n
    return feeds, n or 0, random


def class_labels(nn) -> list | None:
    kind = nn.WhichOneof("ClassLabels") if "ClassLabels" in nn.DESCRIPTOR.oneofs_by_name else None
    if kind == "stringClassLabels":
        return list(StringVector.FromString(nn.stringClassLabels).vector)
    if kind == "int64ClassLabels":
        return list(Int64Vector.FromString(nn.int64ClassLabels).vector)
    return None


def outputs_of(spec, blobs: dict) -> dict[str, np.ndarray]:
    """The model's declared outputs that are tensors, flattened per sample; classifiers' probabilities."""
    desc = read_description(spec)
    nn = _network(spec)
    out = {}
    for f in desc.output:
        if f.name in blobs:
            out[f.name] = blobs[f.name].reshape(blobs[f.name].shape[0], -1)
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        prob = nn.labelProbabilityLayerName or desc.predictedProbabilitiesName
        if prob in blobs:
            out[prob] = blobs[prob].reshape(blobs[prob].shape[0], -1)
    return out


def evaluate(float_spec, quant_spec, data: dict | None, *, names: dict | None = None, labels=None, samples: int | None = None) -> Evaluation:
    """Run both models on the same inputs and compare; never raises for layers it cannot run."""
    try:
        feeds, n, random = build_feeds(float_spec, data, names or {}, samples)
        f_out = outputs_of(float_spec, run_network(_network(float_spec), float_spec, feeds))
        q_out = outputs_of(quant_spec, run_network(_network(quant_spec), quant_spec, feeds))
    except Unsupported as e:
        return Evaluation(False, str(e))
    result = Evaluation(True, samples=n, random_inputs=random)
    for name in sorted(f_out):
        if name not in q_out:
            continue
        a, b = f_out[name].astype(np.float64), q_out[name].astype(np.float64)
        norm = np.linalg.norm(a)
        result.outputs[name] = {
            "relative_l2": float(np.linalg.norm(b - a) / norm) if norm else float(np.linalg.norm(b - a)),
            "max_abs": float(np.abs(b - a).max()) if a.size else 0.0,
        }
    nn = _network(float_spec)
    if float_spec.WhichOneof("Type") == "neuralNetworkClassifier":
        prob = nn.labelProbabilityLayerName or read_description(float_spec).predictedProbabilitiesName
        if prob in f_out and prob in q_out:
            fa, qa = f_out[prob].argmax(axis=1), q_out[prob].argmax(axis=1)
            result.top1_agreement = float(np.mean(fa == qa))
            names_ = class_labels(nn)
            if labels is not None and names_ is not None:
                truth = np.asarray(labels)[:n].astype(str)
                lab = np.asarray(names_).astype(str)
                result.accuracy_float = float(np.mean(lab[fa] == truth))
                result.accuracy_quantized = float(np.mean(lab[qa] == truth))
    return result


def predict(spec, data: dict, names: dict | None = None, samples: int | None = None) -> dict[str, np.ndarray]:
    """The float outputs of one model (used to validate the evaluator itself)."""
    feeds, _, _ = build_feeds(spec, data, names or {}, samples)
    return outputs_of(spec, run_network(_network(spec), spec, feeds))
