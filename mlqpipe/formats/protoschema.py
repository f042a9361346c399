"""Protobuf message classes from a small text schema, in a private descriptor pool.

Why not generated `_pb2` modules: they pin a protoc version and would be copies of other projects' files;
field numbers are public facts of the Core ML specification, so each format writes its messages as a table
(`formats/nn/proto.py`, `formats/mlprogram/proto.py`) and this module builds the descriptors at import time.

Schema format: `message NAME` opens a message; a field line is `NUMBER NAME TYPE [repeated]` where TYPE is a
protobuf scalar name or a message of the same schema; `oneof NAME` opens a group whose fields are indented
four or more spaces (the group ends at the first less-indented field). Files use proto2 semantics, so every
singular field has presence and an explicitly written default survives a round trip.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_SCALARS = {
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
}
_PACKABLE = {"int32", "int64", "uint32", "uint64", "bool", "float", "double"}


def _file_descriptor(schema: str, package: str) -> descriptor_pb2.FileDescriptorProto:
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
    msg = None
    oneof_index = None
    for raw in schema.splitlines():
        line = raw.strip()
        if not line:
            continue
        words = line.split()
        indent = len(raw) - len(raw.lstrip())
        if words[0] == "message":
            msg = fdp.message_type.add(name=words[1])
            oneof_index = None
            continue
        if words[0] == "oneof":
            msg.oneof_decl.add(name=words[1])
            oneof_index = len(msg.oneof_decl) - 1
            continue
        number, name, type_name = int(words[0]), words[1], words[2]
        repeated = "repeated" in words[3:]
        field = msg.field.add(name=name, number=number, json_name=name)
        field.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        if type_name in _SCALARS:
            field.type = _SCALARS[type_name]
            if repeated and type_name in _PACKABLE:
                field.options.packed = True
        else:
            field.type = F.TYPE_MESSAGE
            field.type_name = f".{package}.{type_name}"
        if indent >= 4 and oneof_index is not None:
            field.oneof_index = oneof_index
        else:
            oneof_index = None
    return fdp


def build_messages(schema: str, package: str) -> dict:
    """Message classes for a schema written in the small format above, in a private descriptor pool."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor(schema, package))
    file_desc = pool.FindFileByName(f"{package}.proto")
    return {name: message_factory.GetMessageClass(d) for name, d in file_desc.message_types_by_name.items()}


# Core ML's Model message: its header fields and every model type of its `Type` oneof, by field number.
# Each format declares the types it looks inside (`model_message(pipeline="Pipeline", ...)`); the others stay
# opaque bytes, which keeps them byte for byte on a round trip.
_MODEL_TYPES = """
200 pipelineClassifier
201 pipelineRegressor
202 pipeline
300 glmRegressor
301 supportVectorRegressor
302 treeEnsembleRegressor
303 neuralNetworkRegressor
304 bayesianProbitRegressor
400 glmClassifier
401 supportVectorClassifier
402 treeEnsembleClassifier
403 neuralNetworkClassifier
404 kNearestNeighborsClassifier
500 neuralNetwork
501 itemSimilarityRecommender
502 mlProgram
555 customModel
556 linkedModel
560 classConfidenceThresholding
600 oneHotEncoder
601 imputer
602 featureVectorizer
603 dictVectorizer
604 scaler
606 categoricalMapping
607 normalizer
609 arrayFeatureExtractor
610 nonMaximumSuppression
900 identity
2000 textClassifier
2001 wordTagger
2002 visionFeaturePrint
2003 soundAnalysisPreprocessing
2004 gazetteer
2005 wordEmbedding
2006 audioFeaturePrint
3000 serializedModel
"""


def model_message(**typed: str) -> str:
    """The schema text of `message Model`: every field declared, `typed` model types as messages."""
    entries = [line.split() for line in _MODEL_TYPES.strip().splitlines()]
    unknown = set(typed) - {name for _, name in entries}
    if unknown:
        raise ValueError(f"not model types of Core ML's Model: {sorted(unknown)}")
    oneof = "\n".join(f"    {number} {name} {typed.get(name, 'bytes')}" for number, name in entries)
    return ("message Model\n  1 specificationVersion int32\n  2 description bytes\n  10 isUpdatable bool\n"
            f"  oneof Type\n{oneof}\n")
