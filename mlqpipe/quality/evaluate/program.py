"""ML programs as the comparison sees them: features in, features out, through the MIL interpreter.

The features are those of models.py (samples on axis 0: multiArray (N, ...) of the declared values per
sample, images (N, H, W) gray or (N, H, W, 3) color, 0..255). A program's inputs are tensors of a fixed
shape, usually with a batch of 1 ([1, ...]); each sample is fed as one such tensor, so N samples are one
call of the interpreter (which runs them at once where that gives the per-sample result). An image input
is a [1, C, H, W] tensor of the program (its preprocessing is in the program's ops). A classifier's
scores (a dictionary output of `classify`) come back as `Probabilities` keyed by the op's classes.
"""

from __future__ import annotations

import hashlib
from math import prod

import numpy as np

from mlqpipe.formats.description import read_description
from mlqpipe.quality.evaluate.context import Unsupported
from mlqpipe.quality.evaluate.models import Probabilities

_BGR = 30  # ImageFeatureType.ColorSpace
_GRAY = 10


def is_program(m) -> bool:
    from mlqpipe.formats.mlprogram.model import MLProgram

    return isinstance(m, MLProgram)


def content_digest(m) -> bytes:
    """What the program computes: its spec and the numbers of every weight-file value (the float outputs
    cached for it are valid exactly as long as these are the same)."""
    from mlqpipe.formats.mlprogram.model import blob_values

    h = hashlib.sha256(b"mlqpipe-mlprogram\n")
    h.update(hashlib.sha256(m.spec.SerializeToString()).digest())
    for site, value in blob_values(m.spec):
        a = np.ascontiguousarray(m.value_array(value, f"{m.source}: op {site.op.type}"))
        h.update(f"{a.dtype} {a.shape}\n".encode())
        h.update(hashlib.sha256(a.data).digest())
    return h.digest()


def _interpreter(m, cache: dict):
    from mlqpipe.quality.mil import Interpreter

    found = cache.get("interpreter")
    if found is None or found.model is not m:
        found = cache["interpreter"] = Interpreter(m)  # decoded weights live as long as the cache
    return found


def _feed(feature, value, dims: tuple, where: str) -> np.ndarray:
    """One input's samples as the function's tensor takes them: (N, *dims[1:]) for a [1, ...] input."""
    if not dims or dims[0] not in (1, None) or None in dims[1:]:
        raise Unsupported(f"input {feature.name!r} is declared {list(dims)}: mlqpipe feeds samples on a leading axis of "
                          "size 1 (convert the model with a batch of 1)")
    a = np.asarray(value)
    n = a.shape[0] if a.ndim else 0
    if feature.type.WhichOneof("Type") == "imageType":
        img = feature.type.imageType
        a = a.astype(np.float32).reshape(n, int(img.height), int(img.width), *(() if img.colorSpace == _GRAY else (3,)))
        a = a[:, None] if img.colorSpace == _GRAY else a.transpose(0, 3, 1, 2)
        if img.colorSpace == _BGR:
            a = a[:, ::-1]
    per_sample = prod(dims[1:])
    if a.size != n * per_sample:
        raise Unsupported(f"input {feature.name!r}: {a.size // max(n, 1)} values per sample, {where} takes {per_sample} "
                          f"(shape {list(dims)})")
    return np.ascontiguousarray(a.reshape(n, *dims[1:]))


def _classes(interpreter) -> dict[str, list]:
    """Dictionary output name -> the classes of the `classify` op that makes it."""
    from mlqpipe.quality.mil.interpreter import literal_input

    out = {}
    for op in interpreter.block.operations:
        if op.type == "classify" and len(op.outputs) == 2:
            values = literal_input(interpreter.model, op, "classes")
            classes = values[0] if len(values) == 1 and isinstance(values[0], list) else values
            out[op.outputs[1].name] = [c.item() if isinstance(c, np.generic) else c for c in classes]
    return out


def run_program(m, features: dict, cache: dict) -> dict:
    """The program's output features for a batch of input features (see the module docstring)."""
    from mlqpipe.quality.mil import Unsupported as NotEvaluated

    try:
        interpreter = _interpreter(m, cache)
        dims = {name: d.dims for name, d in interpreter.inputs}
        feeds = {}
        for f in read_description(m.spec).input:
            if f.name not in features:
                if f.type.isOptional:
                    continue
                raise Unsupported(f"input {f.name!r}: no value for it")
            if dims.get(f.name) is None:
                raise Unsupported(f"input {f.name!r} is not an input of function {interpreter.function!r}")
            feeds[f.name] = _feed(f, features[f.name], dims[f.name], f"function {interpreter.function!r}")
        got = interpreter.run(feeds)
        if "classes" not in cache:
            cache["classes"] = _classes(interpreter)
    except NotEvaluated as e:
        raise Unsupported(str(e)) from None
    out = {}
    for name, value in got.items():
        classes = cache["classes"].get(name)
        if classes is not None:
            scores = np.asarray(value, dtype=np.float64)
            out[name] = Probabilities(classes, scores.reshape(scores.shape[0] if scores.ndim > 1 else 1, -1))
        else:
            out[name] = value
    return out
