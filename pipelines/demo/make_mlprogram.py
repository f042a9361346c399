"""Make the ML-program demo model: `digits_mlp.mlmodel` (the demo's MLP) as an iOS18 ML program.

Writes `digits_mlp.mlpackage`: the same classifier — input `image` [1, 64] float32 (pixel values 0..16) scaled
by 1/16, three dense layers with relu between, softmax, then `classify` over the .mlmodel's class labels — as
a MIL program of opset CoreML8 (specification version 9, iOS18), so every compression mode applies without
raising the deployment target. The weights are the .mlmodel's, read with mlqpipe's own loader; every float32
tensor of at least 10 elements (the matrices and the biases) is stored in weight.bin, as coremltools stores them.

The classifier is laid out as coremltools 9.0 lays out a conversion with `classifier_config`: the `classify`
op binds its `classes` as a list literal (a list of rank-0 int64 or string tensors), returns the label (a
rank-0 tensor) and the scores (a dictionary of label -> float64), and the description declares them as
int64/string and dictionary features named by predictedFeatureName / predictedProbabilitiesName — here the
.mlmodel's own names (classLabel, classProbability), so both demos have the same outputs.

Written only with mlqpipe's messages and package/blob writers (no coremltools, no scikit-learn), and
deterministic: the same .mlmodel gives the same bytes in any process (Manifest.json's identifiers are derived
from the model's content). The package is committed; rerun this script after changing digits_mlp.mlmodel:
`python pipelines/demo/make_mlprogram.py [--output PATH]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mlqpipe
from mlqpipe.artifacts import mapping_digest
from mlqpipe.errors import ModelError
from mlqpipe.formats.description import FLOAT32 as ARRAY_FLOAT32
from mlqpipe.formats.description import ModelDescription, read_description
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.blob import BLOB_CODE_OF_MIL, BlobWriter
from mlqpipe.formats.mlprogram.package import MANIFEST_NAME, PACKAGE_FILES, new_manifest, write_package
from mlqpipe.quality.evaluate.models import class_labels

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "digits_mlp.mlmodel"
TARGET = HERE / "digits_mlp.mlpackage"
OPSET, SPEC_VERSION = "CoreML8", 9  # iOS18
INPUT, PROBABILITIES = "image", "probabilities"  # PROBABILITIES: the softmax's output, classify's input
LABEL, SCORES = "classLabel", "classProbability"  # the .mlmodel's predictedFeatureName / predictedProbabilitiesName
BLOB_MIN_ELEMENTS = 10  # smaller tensors are stored inline, as coremltools does


@dataclass(frozen=True)
class Dense:
    """One dense layer: weight [out, in] (Core ML's and MIL linear's layout), bias [out]."""

    name: str
    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class Mlp:
    """What the demo .mlmodel computes: classify(softmax(dense_n(... relu(dense_1(input_scale * image))))),
    `classes` (all int or all str, one per output) naming the outputs; `label` / `scores` name the features."""

    input_scale: float
    layers: tuple[Dense, ...]
    classes: tuple[int, ...] | tuple[str, ...]
    label: str = LABEL
    scores: str = SCORES

    @property
    def n_inputs(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def n_outputs(self) -> int:
        return int(self.layers[-1].weight.shape[0])


# --- reading the neural network ----------------------------------------------------------------------------


def read_mlp(path: Path = SOURCE) -> Mlp:
    """The demo MLP's weights, through mlqpipe's neural-network loader and inventory. Refuses any other
    layer sequence than scale, (innerProduct, relu)*, innerProduct, softmax: the program below is that."""
    model = mlqpipe.load_model(path)
    layers = model.spec.neuralNetworkClassifier.layers
    kinds = [layer.WhichOneof("layer") for layer in layers]
    n = (len(kinds) - 2) // 2 + 1
    expected = ["scale"] + ["innerProduct", "activation"] * (n - 1) + ["innerProduct", "softmax"]
    relus = all(layers[i].activation.WhichOneof("NonlinearityType") == "ReLU" for i in range(2, 2 * n, 2))
    if kinds != expected or not relus:
        raise ModelError(f"{path}: layers {kinds} are not the demo MLP (scale, innerProduct + ReLU ..., "
                         "innerProduct, softmax); regenerate it with make_model.py")
    records = {(r.layer, r.field): r for r in mlqpipe.inventory(model)}
    scale = records[(layers[0].name, "scale")].values().reshape(-1)
    dense = tuple(Dense(layer.name, records[(layer.name, "weights")].values().astype(np.float32),
                        records[(layer.name, "bias")].values().astype(np.float32).reshape(-1))
                  for layer in layers if layer.WhichOneof("layer") == "innerProduct")
    classes = class_labels(model.spec.neuralNetworkClassifier)
    desc = read_description(model.spec)
    if not classes or len(classes) != dense[-1].weight.shape[0] or not desc.predictedProbabilitiesName:
        raise ModelError(f"{path}: the classifier has {len(classes or [])} class labels for {dense[-1].weight.shape[0]} "
                         "outputs, or no predictedProbabilitiesName; regenerate it with make_model.py")
    return Mlp(float(scale[0]), dense, tuple(classes), desc.predictedFeatureName, desc.predictedProbabilitiesName)


# --- MIL building blocks (mlqpipe has no from-scratch program builder; these are the few pieces needed) ------


def tensor_type(dtype: int, shape: tuple[int, ...]) -> "proto.ValueType":
    """A tensor ValueType; a scalar has no rank field, as coremltools writes it."""
    vt = proto.ValueType()
    vt.tensorType.dataType = dtype
    if shape:
        vt.tensorType.rank = len(shape)
        for d in shape:
            vt.tensorType.dimensions.add().constant.size = int(d)
    return vt


def string_value(text: str) -> "proto.Value":
    v = proto.Value()
    v.type.CopyFrom(tensor_type(proto.STRING, ()))
    v.immediateValue.tensor.strings.values.append(text)
    return v


def tensor_value(array: np.ndarray, blobs: BlobWriter) -> "proto.Value":
    """A const's `val`: float32 arrays of >= 10 elements in weight.bin, everything else inline."""
    dtype = {np.dtype(np.float32): proto.FLOAT32, np.dtype(np.int32): proto.INT32}[array.dtype]
    v = proto.Value()
    v.type.CopyFrom(tensor_type(dtype, array.shape))
    if dtype == proto.FLOAT32 and array.size >= BLOB_MIN_ELEMENTS:
        v.blobFileValue.fileName = PACKAGE_FILES.blob_file_name
        v.blobFileValue.offset = blobs.add(np.ascontiguousarray(array), BLOB_CODE_OF_MIL[dtype])
    elif dtype == proto.FLOAT32:
        v.immediateValue.tensor.floats.values.extend(array.reshape(-1).tolist())
    else:
        v.immediateValue.tensor.ints.values.extend(array.reshape(-1).tolist())
    return v


def operation(op_type: str, name: str, inputs: dict[str, str], out_shape: tuple[int, ...], out_dtype: int = proto.FLOAT32,
              attributes: dict | None = None) -> "proto.Operation":
    """An op whose one output is called like the op, inputs bound by name, and the `name` attribute every
    op carries (after the others, as coremltools orders a const's `val` and `name`)."""
    op = proto.Operation(type=op_type)
    for key, bound in inputs.items():
        op.inputs.add(key=key).value.arguments.add(name=bound)
    op.outputs.add(name=name).type.CopyFrom(tensor_type(out_dtype, out_shape))
    for key, value in {**(attributes or {}), "name": string_value(name)}.items():
        op.attributes.add(key=key).value.CopyFrom(value)
    return op


def label_dtype(classes) -> int:
    """INT64 for int labels, STRING for str labels (Core ML's two kinds of class label)."""
    if all(isinstance(c, str) for c in classes):
        return proto.STRING
    if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in classes):
        return proto.INT64
    raise ModelError(f"class labels {list(classes)[:5]}...: Core ML labels are all int64 or all strings")


def label_value(label, dtype: int) -> "proto.Value":
    """One class label as a rank-0 tensor literal (an element of `classify`'s `classes` list)."""
    v = proto.Value()
    v.type.CopyFrom(tensor_type(dtype, ()))
    if dtype == proto.STRING:
        v.immediateValue.tensor.strings.values.append(label)
    else:
        v.immediateValue.tensor.longInts.values.append(int(label))
    return v


def classes_value(classes) -> "proto.Value":
    """`classify`'s `classes`: a list literal of rank-0 label tensors with a constant length, bound in place
    (not a const op), as coremltools writes it."""
    dtype = label_dtype(classes)
    v = proto.Value()
    v.type.listType.type.CopyFrom(tensor_type(dtype, ()))
    v.type.listType.length.constant.size = len(classes)
    v.immediateValue.list.values.extend(label_value(c, dtype) for c in classes)
    return v


def classify(mlp: Mlp, probabilities: str) -> "proto.Operation":
    """The classifier head: outputs the top label (rank-0 int64/string) and the scores (dictionary label ->
    float64, the value type coremltools declares), named like the description's features."""
    dtype = label_dtype(mlp.classes)
    op = proto.Operation(type="classify")
    op.inputs.add(key="probabilities").value.arguments.add(name=probabilities)
    op.inputs.add(key="classes").value.arguments.add().value.CopyFrom(classes_value(mlp.classes))
    op.outputs.add(name=mlp.label).type.CopyFrom(tensor_type(dtype, ()))
    scores = op.outputs.add(name=mlp.scores).type.dictionaryType
    scores.keyType.CopyFrom(tensor_type(dtype, ()))
    scores.valueType.CopyFrom(tensor_type(proto.FLOAT64, ()))
    op.attributes.add(key="name").value.CopyFrom(string_value("classify"))
    return op


def const(name: str, array: np.ndarray, blobs: BlobWriter) -> "proto.Operation":
    value = tensor_value(array, blobs)
    dtype = value.type.tensorType.dataType
    return operation("const", name, {}, array.shape, dtype, {"val": value})


# --- the program ---------------------------------------------------------------------------------------------


def mlp_operations(mlp: Mlp, blobs: BlobWriter) -> list:
    """The ops of `main`, in order; constants are written to `blobs` as they come (weight.bin's order)."""
    batch = (1,)
    ops = [const("input_scale", np.array(mlp.input_scale, np.float32), blobs),
           operation("mul", "scaled", {"x": INPUT, "y": "input_scale"}, batch + (mlp.n_inputs,))]
    x = "scaled"
    for i, layer in enumerate(mlp.layers):
        out = batch + (layer.weight.shape[0],)
        weight, bias = f"{layer.name}_weight", f"{layer.name}_bias"
        ops += [const(weight, layer.weight, blobs), const(bias, layer.bias, blobs),
                operation("linear", layer.name, {"x": x, "weight": weight, "bias": bias}, out)]
        x = layer.name
        if i < len(mlp.layers) - 1:
            relu = f"relu_{i + 1}"
            ops.append(operation("relu", relu, {"x": x}, out))
            x = relu
    ops += [const("softmax_axis", np.array(-1, np.int32), blobs),
            operation("softmax", PROBABILITIES, {"x": x, "axis": "softmax_axis"}, batch + (mlp.n_outputs,)),
            classify(mlp, PROBABILITIES)]
    return ops


def description(mlp: Mlp) -> bytes:
    desc = ModelDescription()
    image = desc.input.add(name=INPUT, shortDescription="8x8 digit, pixel values 0..16, row major")
    image.type.multiArrayType.shape.extend([1, mlp.n_inputs])
    image.type.multiArrayType.dataType = ARRAY_FLOAT32
    label = desc.output.add(name=mlp.label, shortDescription="the most likely class")
    scores = desc.output.add(name=mlp.scores, shortDescription="probability of each class")
    if label_dtype(mlp.classes) == proto.STRING:
        label.type.stringType = b""
        scores.type.dictionaryType.stringKeyType = b""
    else:
        label.type.int64Type = b""
        scores.type.dictionaryType.int64KeyType = b""
    desc.predictedFeatureName, desc.predictedProbabilitiesName = mlp.label, mlp.scores
    desc.metadata.shortDescription = "The mlqpipe demo's digits MLP (digits_mlp.mlmodel) as an iOS18 ML program"
    return desc.SerializeToString()


def build_model(mlp: Mlp) -> tuple["proto.Model", bytes | None]:
    """(Model message, weight.bin bytes, None when every tensor is inline) of the program."""
    buffer = io.BytesIO()
    with BlobWriter(buffer) as blobs:
        ops = mlp_operations(mlp, blobs)
    weights = buffer.getvalue() if blobs.count else None
    model = proto.Model(specificationVersion=SPEC_VERSION)
    model.description = description(mlp)
    program = model.mlProgram
    program.version = 1
    main = program.functions.add(key="main").value
    main.inputs.add(name=INPUT).type.CopyFrom(tensor_type(proto.FLOAT32, (1, mlp.n_inputs)))
    main.opset = OPSET
    block = main.block_specializations.add(key=OPSET).value
    block.outputs.extend([mlp.label, mlp.scores])
    block.operations.extend(ops)
    return model, weights


def package_files(source: Path = SOURCE) -> dict[str, bytes]:
    """{path in the package: bytes} of the package made from the .mlmodel `source`."""
    return files_of(read_mlp(source))


def files_of(mlp: Mlp) -> dict[str, bytes]:
    """{path in the package: bytes} of the program of `mlp`, laid out as coremltools lays a package out."""
    model, weights = build_model(mlp)
    model_bytes = model.SerializeToString()
    files = {MANIFEST_NAME: new_manifest(hashlib.sha256(model_bytes).hexdigest(), has_weights=weights is not None),
             PACKAGE_FILES.model_relpath: model_bytes}
    return files if weights is None else {**files, PACKAGE_FILES.weight_relpath: weights}


def write(path: Path = TARGET, source: Path = SOURCE) -> str:
    """Write the package (atomically: a complete new directory replaces the old one); returns its tree digest."""
    files = package_files(source)

    def fill(root: Path) -> None:
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)

    write_package(path, fill)
    return mapping_digest(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=TARGET, help=f"the package to write (default: {TARGET.name} here)")
    args = parser.parse_args(argv)
    digest = write(args.output)
    size = sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file())
    print(f"wrote {args.output} ({size} bytes, tree digest {digest[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
