"""Core ML's ModelDescription (inputs, outputs, their types, functions, metadata), shared by every format.

Each format's Model keeps its description as opaque bytes so a load/save round trip cannot reorder its
metadata map; this module parses a copy when a feature's name or type is needed, and builds descriptions
for the models mlqpipe makes itself (tests, the demo). Field order = field numbers.
"""

from __future__ import annotations

from mlqpipe.formats.protoschema import build_messages

_SCHEMA = """
message ModelDescription
  1 input FeatureDescription repeated
  10 output FeatureDescription repeated
  11 predictedFeatureName string
  12 predictedProbabilitiesName string
  13 state FeatureDescription repeated
  20 functions FunctionDescription repeated
  21 defaultFunctionName string
  50 trainingInput FeatureDescription repeated
  100 metadata Metadata

message FunctionDescription
  1 name string
  2 input FeatureDescription repeated
  3 output FeatureDescription repeated
  4 predictedFeatureName string
  5 predictedProbabilitiesName string
  6 state FeatureDescription repeated

message Metadata
  1 shortDescription string
  2 versionString string
  3 author string
  4 license string
  100 userDefined Metadata_UserDefinedEntry repeated

message Metadata_UserDefinedEntry
  1 key string
  2 value string

message FeatureDescription
  1 name string
  2 shortDescription string
  3 type FeatureType

message FeatureType
  oneof Type
    1 int64Type bytes
    2 doubleType bytes
    3 stringType bytes
    4 imageType ImageFeatureType
    5 multiArrayType ArrayFeatureType
    6 dictionaryType DictionaryFeatureType
    7 sequenceType bytes
    8 stateType StateFeatureType
  1000 isOptional bool

message ArrayFeatureType
  1 shape int64 repeated
  2 dataType int32
  oneof ShapeFlexibility
    21 enumeratedShapes bytes
    31 shapeRange bytes
  oneof defaultOptionalValue
    41 intDefaultValue int32
    51 floatDefaultValue float
    61 doubleDefaultValue double

message ImageFeatureType
  1 width int64
  2 height int64
  3 colorSpace int32
  oneof SizeFlexibility
    21 enumeratedSizes bytes
    31 imageSizeRange bytes

message StateFeatureType
  oneof Type
    1 arrayType ArrayFeatureType

message DictionaryFeatureType
  oneof KeyType
    1 int64KeyType bytes
    2 stringKeyType bytes
"""

_CLASSES = build_messages(_SCHEMA, "mlqpipe.description")
ModelDescription = _CLASSES["ModelDescription"]


def message_class(name: str):
    return _CLASSES[name]


FLOAT32, DOUBLE, INT32 = 65568, 65600, 131104  # ArrayFeatureType.ArrayDataType values
GRAYSCALE, RGB, BGR = 10, 20, 30  # ImageFeatureType.ColorSpace values


def read_description(spec):
    """The parsed ModelDescription of a Model message (empty when absent)."""
    return ModelDescription.FromString(spec.description) if spec.HasField("description") else ModelDescription()

_ARRAY_TYPES = {FLOAT32: "float32", DOUBLE: "double", INT32: "int32", 65552: "float16"}
_COLOR = {GRAYSCALE: "gray", RGB: "RGB", BGR: "BGR"}


def feature_rows(spec) -> dict[str, list[dict]]:  # spec: a Model message, or a ModelDescription
    """{"inputs": [...], "outputs": [...]}: name, type and shape of each feature, as `mlqpipe inspect` shows
    them (users need the input names for `evaluation.inputs`)."""

    def row(f) -> dict:
        t = f.type
        kind = t.WhichOneof("Type")
        out = {"name": f.name, "type": kind.removesuffix("Type") if kind else "unknown", "shape": None, "optional": bool(t.isOptional)}
        if kind == "multiArrayType":
            out["type"] = f"multiArray {_ARRAY_TYPES.get(t.multiArrayType.dataType, t.multiArrayType.dataType)}"
            out["shape"] = [int(d) for d in t.multiArrayType.shape]
        elif kind == "imageType":
            img = t.imageType
            out["type"] = f"image {_COLOR.get(img.colorSpace, img.colorSpace)}"
            out["shape"] = [int(img.height), int(img.width)]
        return out

    desc = spec if isinstance(spec, ModelDescription) else read_description(spec)
    return {"inputs": [row(f) for f in desc.input], "outputs": [row(f) for f in desc.output]}


def describe(model, inputs, outputs, data_type: int = FLOAT32):
    """Declare multi-array inputs and outputs [(name, shape), ...] on a Model message we build ourselves
    (tests, benchmarks, the demo): a model without them breaks Core ML's rules. Returns the model."""
    desc = ModelDescription()
    for features, pairs in ((desc.input, inputs), (desc.output, outputs)):
        for name, shape in pairs:
            t = features.add(name=name).type.multiArrayType
            t.shape.extend(shape)
            t.dataType = data_type
    model.description = desc.SerializeToString()
    return model

