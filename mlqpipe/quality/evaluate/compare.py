"""Feeding a model test data and comparing the quantized model's outputs with the float model's.

Inputs come from an .npz (model input name -> array; a lone input may be called X), or — marked in the
result — from seeded random data of the declared shapes. Every sample is used (or the first `max_samples`,
which the report shows), in batches sized to a memory budget, and the comparison is accumulated batch by
batch: per-output relative L2 / max error, top-1 agreement for classifiers, accuracy before/after with labels.
The float model's outputs can be cached (`FloatCache`), so re-checking a recipe only runs the quantized model.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field

import numpy as np

from mlqpipe.formats.description import read_description
from mlqpipe.quality.evaluate.context import Unsupported
from mlqpipe.quality.evaluate.models import Probabilities, run_model
from mlqpipe.quality.evaluate.program import content_digest, is_program, run_program
from mlqpipe.quality.evaluate.settings import array_name, is_classifier
from mlqpipe.terminal import StatusLine

EVALUATOR_VERSION = 3  # bump when evaluation results change: invalidates cached float outputs
DEFAULT_MEMORY_MB = 512  # activations of one batch (weights come on top: about the float model's size)


@dataclass
class Evaluation:
    evaluated: bool
    reason: str = ""
    samples: int = 0
    random_inputs: bool = False
    available_samples: int = 0  # how many the data holds (samples < this when max_samples cut it)
    top1_agreement: float | None = None
    accuracy_float: float | None = None
    accuracy_quantized: float | None = None
    outputs: dict = field(default_factory=dict)  # name -> {"relative_l2", "max_abs"}

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# --- the model: a neural network's spec (or any spec models.py runs), or an ML program -----------------------


def _spec(m):
    return m.spec if is_program(m) else m


def _run(m, features: dict, cache: dict) -> dict:
    return run_program(m, features, cache) if is_program(m) else run_model(m, features, cache)


def _digest(m) -> bytes:
    return content_digest(m) if is_program(m) else hashlib.sha256(m.SerializeToString()).digest()


# --- inputs ------------------------------------------------------------------------------------------------


def input_features(spec, data: dict | None, names: dict, samples: int | None, seed: int = 0) -> tuple[dict, int, bool]:
    """(features, number of samples, random) for the model's inputs, whole (batches are cut from them)."""
    desc = read_description(_spec(spec))
    required = [f for f in desc.input if not f.type.isOptional]
    features, n = {}, None
    random = data is None
    rng = np.random.default_rng(seed)
    for f in desc.input:
        kind = f.type.WhichOneof("Type")
        if random:
            count = samples or 16
            if kind == "imageType":
                img = f.type.imageType
                features[f.name] = rng.integers(0, 256, (count, int(img.height), int(img.width)) + (() if img.colorSpace == 10 else (3,))).astype(np.float32)
            elif kind == "multiArrayType":
                if f.type.isOptional:
                    continue
                features[f.name] = rng.standard_normal((count, *[int(d) for d in f.type.multiArrayType.shape])).astype(np.float32)
            elif f.type.isOptional:
                continue
            else:
                raise Unsupported(f"input {f.name!r} of type {kind} cannot be generated")
        else:
            key = array_name(f, names, data, len(required))
            if key is None:
                if f.type.isOptional:
                    continue
                raise Unsupported(f"input {f.name!r}: no array for it in the evaluation data (name it under evaluation.inputs)")
            features[f.name] = np.asarray(data[key])
        count = len(features[f.name])
        if n is not None and count != n:
            raise Unsupported(f"input {f.name!r}: {count} samples, other inputs have {n}")
        n = count
    n = n or 0
    if samples is not None and not random:
        n = min(n, samples)
    return features, n, random


def _batch(features: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in features.items()}


def batch_size(spec, features: dict, n: int, memory_mb: int, weights_cache: dict) -> int:
    """Samples per batch so one batch's activations stay within `memory_mb`: measured on one sample (the
    peak numpy allocation while it runs, as tracemalloc sees it)."""
    import tracemalloc

    if n <= 1:
        return max(n, 1)
    _run(spec, _batch(features, 0, 1), weights_cache)  # weights read outside the measurement
    tracemalloc.start()
    try:
        _run(spec, _batch(features, 0, 1), weights_cache)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return int(max(1, min(n, (memory_mb << 20) // max(peak, 1))))


# --- comparing -----------------------------------------------------------------------------------------------


def _numeric(value) -> np.ndarray | None:
    if isinstance(value, Probabilities):
        return value.values.astype(np.float64)
    a = np.asarray(value)
    return a.reshape(a.shape[0], -1).astype(np.float64) if a.dtype.kind in "fiub" else None


def _labels_of(spec, out: dict):
    """Each sample's predicted class, for classifiers (None otherwise)."""
    spec = _spec(spec)
    if not is_classifier(spec):
        return None
    desc = read_description(spec)
    if desc.predictedFeatureName in out:
        return np.asarray(out[desc.predictedFeatureName]).reshape(-1)
    probs = next((v for v in out.values() if isinstance(v, Probabilities)), None)
    return None if probs is None else probs.top1()


class _Tally:
    """Sums over batches: everything the comparison reports, without keeping outputs."""

    def __init__(self, labels_output: str = ""):
        self.labels_output = labels_output  # a classifier's predicted class: compared by top-1 agreement, not as numbers
        self.err2, self.ref2, self.max_abs = {}, {}, {}
        self.agree = self.correct_f = self.correct_q = self.n = self.labelled = 0
        self.classifier = False

    def add(self, f_out: dict, q_out: dict, f_labels, q_labels, truth):
        for name in sorted(f_out):
            if name == self.labels_output:
                continue
            a, b = _numeric(f_out[name]), _numeric(q_out.get(name)) if name in q_out else None
            if a is None or b is None or a.shape != b.shape:
                continue
            d = b - a
            self.err2[name] = self.err2.get(name, 0.0) + float(np.sum(d * d))
            self.ref2[name] = self.ref2.get(name, 0.0) + float(np.sum(a * a))
            self.max_abs[name] = max(self.max_abs.get(name, 0.0), float(np.abs(d).max()) if d.size else 0.0)
        first = next(iter(f_out.values()), None)
        self.n += 0 if first is None else (len(first.values) if isinstance(first, Probabilities) else len(first))
        if f_labels is not None and q_labels is not None:
            self.classifier = True
            self.agree += int(np.sum(f_labels.astype(str) == q_labels.astype(str)))
            if truth is not None:
                t = np.asarray(truth).astype(str)
                self.correct_f += int(np.sum(f_labels.astype(str) == t))
                self.correct_q += int(np.sum(q_labels.astype(str) == t))
                self.labelled += len(t)

    def result(self, n, random, available) -> Evaluation:
        r = Evaluation(True, samples=n, random_inputs=random, available_samples=available)
        for name in self.err2:
            ref = np.sqrt(self.ref2[name])
            err = np.sqrt(self.err2[name])
            r.outputs[name] = {"relative_l2": float(err / ref) if ref else float(err), "max_abs": self.max_abs[name]}
        if self.classifier and self.n:
            r.top1_agreement = self.agree / self.n
            if self.labelled:
                r.accuracy_float = self.correct_f / self.labelled
                r.accuracy_quantized = self.correct_q / self.labelled
        return r


class FloatCache:
    """The float model's outputs on the evaluation data, stored under the cache directory by a key of the
    float model's bytes, the inputs and the evaluator version: re-checking gates runs only the quantized model."""

    def __init__(self, root):
        from pathlib import Path

        self.root = Path(root) / "evaluations"

    @staticmethod
    def key(float_spec, features: dict, n: int) -> str:
        h = hashlib.sha256(f"mlqpipe-evaluation {EVALUATOR_VERSION} {n}\n".encode())
        h.update(_digest(float_spec))
        for name in sorted(features):
            a = np.ascontiguousarray(features[name][:n])
            h.update(f"{name} {a.dtype} {a.shape}\n".encode())
            h.update(hashlib.sha256(a.tobytes()).digest())
        return h.hexdigest()

    def _path(self, key: str):
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> dict | None:
        """The whole float outputs (name -> array or Probabilities), or None when absent or unreadable."""
        try:
            with np.load(self._path(key), allow_pickle=False) as z:  # plain arrays only: a shared cache stays data
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        out = {}
        for k, v in arrays.items():
            name, _, part = k.rpartition(".")
            if part == "array":
                out[name] = v
            elif part == "values":
                if f"{name}.labels" not in arrays:
                    return None
                out[name] = Probabilities(arrays[f"{name}.labels"].tolist(), v)
        return out

    def put(self, key: str, outputs: dict) -> None:
        import io

        from mlqpipe.fileio import atomic_write

        arrays = {}
        for name, v in outputs.items():
            if isinstance(v, Probabilities):
                arrays[f"{name}.values"], arrays[f"{name}.labels"] = v.values, np.asarray(v.labels)
            else:
                a = np.asarray(v)
                arrays[f"{name}.array"] = a.astype(str) if a.dtype == object else a
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            atomic_write(self._path(key), buf.getvalue())
        except OSError:
            pass  # a cache that cannot be written only costs time


def _concat(batches: list[dict]) -> dict:
    out = {}
    for name in batches[0]:
        parts = [b[name] for b in batches]
        if isinstance(parts[0], Probabilities):
            out[name] = Probabilities(parts[0].labels, np.concatenate([p.values for p in parts]))
        else:
            out[name] = np.concatenate([np.asarray(p) for p in parts])
    return out


def _slice(outputs: dict, start: int, stop: int) -> dict:
    return {k: Probabilities(v.labels, v.values[start:stop]) if isinstance(v, Probabilities) else v[start:stop]
            for k, v in outputs.items()}


def evaluate(float_spec, quant_spec, data: dict | None, *, names: dict | None = None, labels=None, samples: int | None = None,
             memory_mb: int = DEFAULT_MEMORY_MB, cache: FloatCache | None = None, what: str = "model") -> Evaluation:
    """Run both models on the same inputs, batch by batch, and compare; never raises for layers it cannot run."""
    try:
        features, n, random = input_features(float_spec, data, names or {}, samples)
        available = n if random else min((len(v) for v in features.values()), default=0)
        if labels is not None and len(labels) < n:
            raise Unsupported(f"{len(labels)} labels for {n} samples")
        wf, wq = {}, {}
        size = batch_size(quant_spec, features, n, memory_mb, wq)  # the quantized model runs in any case
        if cache is not None and any(np.asarray(v).dtype == object for v in features.values()):
            cache = None  # Python objects (dictionary inputs from the API) have no stable bytes to key on
        key = FloatCache.key(float_spec, features, n) if cache is not None else None
        cached = cache.get(key) if cache is not None else None
        floats = [] if cached is None else None
        spec = _spec(float_spec)
        tally = _Tally(read_description(spec).predictedFeatureName if is_classifier(spec) else "")
        progress = StatusLine()
        try:
            for start in range(0, n, size):
                batch = _batch(features, start, min(start + size, n))
                f_out = _slice(cached, start, start + size) if cached is not None else _run(float_spec, batch, wf)
                if floats is not None:
                    floats.append(f_out)
                q_out = _run(quant_spec, batch, wq)
                truth = None if labels is None else np.asarray(labels)[start : start + len(next(iter(batch.values())))]
                tally.add(f_out, q_out, _labels_of(float_spec, f_out), _labels_of(quant_spec, q_out), truth)
                progress.show(f"evaluating {what}: {min(start + size, n)}/{n} samples")
        finally:
            progress.clear()
        if cache is not None and floats:
            cache.put(key, _concat(floats))
    except Unsupported as e:
        return Evaluation(False, str(e))
    return tally.result(n, random, available)


def predict(spec, data: dict, names: dict | None = None, samples: int | None = None) -> dict[str, np.ndarray]:
    """The float outputs of one model, flattened per sample (used to validate the evaluator itself)."""
    features, n, _ = input_features(spec, data, names or {}, samples)
    out = _run(spec, _batch(features, 0, n), {})
    return {k: _numeric(v).astype(np.float32) for k, v in out.items() if _numeric(v) is not None}
