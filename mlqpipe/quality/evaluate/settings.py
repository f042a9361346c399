"""Do a recipe's evaluation settings fit its model and data? Checked by `validate` and `plan`, before any
build, so a typo in `labels:` is a located error and never a traceback halfway through a release build.

Only the .npz headers are read (names, shapes), never the arrays: validating stays cheap for large data.
"""

from __future__ import annotations

import zipfile
from math import prod

import numpy as np

from mlqpipe.formats.description import read_description

CLASSIFIER_TYPES = ("neuralNetworkClassifier", "pipelineClassifier")
ACCURACY_GATES = ("min_accuracy", "max_accuracy_drop")


def is_classifier(spec) -> bool:
    """A classifier model: one of the classifier types, or an ML program that names its predicted class
    (a converter's `classifier_config`: the program ends with a `classify` op)."""
    kind = spec.WhichOneof("Type")
    return kind in CLASSIFIER_TYPES or (kind == "mlProgram" and bool(read_description(spec).predictedFeatureName))


def npz_headers(path) -> dict[str, tuple[int, ...]]:
    """Array name -> shape, from the .npy headers inside an .npz (no array data is read)."""
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, _ = reader(f)
            shapes[info.filename[: -len(".npy")]] = tuple(int(d) for d in shape)
    return shapes


def array_name(feature, mapping: dict, available, required_inputs: int) -> str | None:
    """The data array that feeds a model input: the one `evaluation.inputs` names, else the array of the
    input's own name, else `X` when the model has one required input. The evaluator and `validate` both
    ask this, so what validates is what runs."""
    if feature.name in mapping:
        return mapping[feature.name]
    if feature.name in available:
        return feature.name
    return "X" if required_inputs == 1 and "X" in available else None


def _feature_size(feature) -> tuple[int, str] | None:
    """Values per sample a model input takes, and how to say it; None for types the evaluator does not feed."""
    kind = feature.type.WhichOneof("Type")
    if kind == "imageType":
        img = feature.type.imageType
        channels = 1 if img.colorSpace == 10 else 3
        return int(img.height) * int(img.width) * channels, f"a {int(img.height)}x{int(img.width)} {'gray' if channels == 1 else 'color'} image"
    if kind == "multiArrayType":
        shape = [int(d) for d in feature.type.multiArrayType.shape]
        return prod(shape), f"shape {'x'.join(map(str, shape))}"
    return None


def evaluation_problems(spec, evaluation, gates) -> list[tuple[tuple, str, str]]:
    """Problems as (setting path, message, hint); the path is inside the model's settings
    (("evaluation", "labels"), ("gates", "min_accuracy"), ...)."""
    problems: list[tuple[tuple, str, str]] = []
    kind = spec.WhichOneof("Type")
    classifier = is_classifier(spec)
    what = ("this ML program has no class labels (a converter's classifier_config adds them)" if kind == "mlProgram"
            else f"this model is a {kind}")
    if gates.min_top1_agreement is not None and not classifier:
        problems.append((("gates", "min_top1_agreement"), f"top-1 agreement needs a classifier; {what}",
                         "use max_output_error for other models"))
    labels = evaluation.labels if evaluation is not None else None
    for gate in ACCURACY_GATES:
        if getattr(gates, gate) is None:
            continue
        if not classifier:
            problems.append((("gates", gate), f"accuracy needs a classifier; {what}", "use max_output_error"))
        elif labels is None or evaluation.data is None:
            problems.append((("gates", gate), "accuracy needs true labels: evaluation.data (an .npz) and evaluation.labels (its array of labels)", ""))
    if evaluation is None or evaluation.data is None:
        return problems
    data = evaluation.data
    try:
        arrays = npz_headers(data)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        problems.append((("evaluation", "data"), f"evaluation data {data.name} is not a readable .npz ({e})", "write it with numpy.savez"))
        return problems
    have = ", ".join(sorted(arrays)) or "no arrays"
    desc = read_description(spec)
    inputs = {f.name: f for f in desc.input}
    mapping = dict(evaluation.inputs)
    for name, array in sorted(mapping.items()):
        if name not in inputs:
            problems.append((("evaluation", "inputs", name), f"'{name}' is not an input of this model (its inputs: {', '.join(inputs) or 'none'})",
                             "the keys of evaluation.inputs are model input names (see `mlqpipe inspect MODEL`)"))
        if array not in arrays:
            problems.append((("evaluation", "inputs", name), f"array '{array}' is not in {data.name} (it has: {have})", ""))
    required = [f for f in desc.input if not f.type.isOptional]
    samples = {}
    for f in desc.input:
        array = array_name(f, mapping, arrays, len(required))
        if array is None:
            if not f.type.isOptional:
                problems.append((("evaluation", "inputs"), f"model input '{f.name}' has no array in {data.name} (it has: {have})",
                                 f"name one: inputs: {{{f.name}: ARRAY}}"))
            continue
        if array not in arrays:
            continue  # reported above
        shape, size = arrays[array], _feature_size(f)
        if size is not None and shape and prod(shape[1:]) != size[0]:
            problems.append((("evaluation", "inputs", f.name) if f.name in mapping else ("evaluation", "data"),
                             f"array '{array}' holds {prod(shape[1:])} values per sample (shape {shape}); model input '{f.name}' takes {size[1]} ({size[0]} values)",
                             "the first axis is the sample axis"))
        samples[array] = shape[0] if shape else 0
    if labels is not None:
        if labels not in arrays:
            problems.append((("evaluation", "labels"), f"array '{labels}' is not in {data.name} (it has: {have})", ""))
        else:
            samples[labels] = arrays[labels][0] if arrays[labels] else 0
    if len(set(samples.values())) > 1:
        counts = ", ".join(f"'{a}' {n}" for a, n in sorted(samples.items()))
        problems.append((("evaluation", "data"), f"arrays of {data.name} disagree on the number of samples ({counts})", ""))
    return problems
