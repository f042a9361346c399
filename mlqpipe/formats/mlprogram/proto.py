"""Our own protobuf definitions of Core ML's Model message with an ML program (MIL.proto) inside.

Same approach as `formats/nn/proto.py` (descriptors built at import time from the table below; field numbers
are public facts of the Core ML specification), with three choices that keep load -> save byte-identical:

- every field of every message from Model down to TensorValue is declared, so re-serialisation keeps the
  original field order; model types other than mlProgram, and ModelDescription, stay opaque `bytes`
  (`read_description` parses a copy: ModelDescription's metadata map cannot be reordered that way);
- protobuf maps (Program.functions, Operation.inputs, every `attributes`, ...) are declared as repeated
  entry messages {1 key, 2 value}, which is their wire format: the entries keep the input's order, whereas
  a real map is re-serialised in an arbitrary order (coremltools itself writes them in a random order per
  process). Use `entries_dict` / `find_entry` / `set_entry` to read and edit them;
- proto2 semantics: every singular field has presence, so an explicitly written default survives.

MIL's `DataType` enum is declared as int32 (the same varint on the wire); its values are module constants.
TensorValue's repeated values (`floats.values` ...) are packed repeated scalars as in MIL.proto: immediate
values are small in practice (coremltools puts arrays of >= 10 elements of the blob dtypes into weight.bin).
Nested Core ML messages are flattened as `Outer_Inner` (Argument.Binding -> `Argument_Binding`).
"""

from __future__ import annotations

from mlqpipe.formats import description
from mlqpipe.formats.protoschema import build_messages, model_message

# Core ML's ModelDescription messages (formats/description.py) that MIL's path uses
_DESCRIPTION_MESSAGES = ("ModelDescription", "FunctionDescription", "Metadata", "Metadata_UserDefinedEntry",
                         "FeatureDescription", "FeatureType", "ArrayFeatureType", "ImageFeatureType",
                         "StateFeatureType")

_PACKAGE = "mlqpipe.formats.mlprogram"

_MODEL = model_message(mlProgram="Program")

# MIL.proto (package CoreML.Specification.MILSpec). `*Entry` messages are the maps' wire form.
_MIL = """
message Program
  1 version int64
  2 functions Program_FunctionsEntry repeated
  3 docString string
  4 attributes Program_AttributesEntry repeated

message Program_FunctionsEntry
  1 key string
  2 value Function

message Program_AttributesEntry
  1 key string
  2 value Value

message Function
  1 inputs NamedValueType repeated
  2 opset string
  3 block_specializations Function_BlockSpecializationsEntry repeated
  4 attributes Function_AttributesEntry repeated

message Function_BlockSpecializationsEntry
  1 key string
  2 value Block

message Function_AttributesEntry
  1 key string
  2 value Value

message Block
  1 inputs NamedValueType repeated
  2 outputs string repeated
  3 operations Operation repeated
  4 attributes Block_AttributesEntry repeated

message Block_AttributesEntry
  1 key string
  2 value Value

message Argument
  1 arguments Argument_Binding repeated

message Argument_Binding
  oneof binding
    1 name string
    2 value Value

message Operation
  1 type string
  2 inputs Operation_InputsEntry repeated
  3 outputs NamedValueType repeated
  4 blocks Block repeated
  5 attributes Operation_AttributesEntry repeated

message Operation_InputsEntry
  1 key string
  2 value Argument

message Operation_AttributesEntry
  1 key string
  2 value Value

message NamedValueType
  1 name string
  2 type ValueType

message ValueType
  oneof type
    1 tensorType TensorType
    2 listType ListType
    3 tupleType TupleType
    4 dictionaryType DictionaryType
    5 stateType StateType

message TensorType
  1 dataType int32
  2 rank int64
  3 dimensions Dimension repeated
  4 attributes TensorType_AttributesEntry repeated

message TensorType_AttributesEntry
  1 key string
  2 value Value

message TupleType
  1 types ValueType repeated

message ListType
  1 type ValueType
  2 length Dimension

message DictionaryType
  1 keyType ValueType
  2 valueType ValueType

message StateType
  1 wrappedType ValueType

message Dimension
  oneof dimension
    1 constant Dimension_ConstantDimension
    2 unknown Dimension_UnknownDimension

message Dimension_ConstantDimension
  1 size uint64

message Dimension_UnknownDimension
  1 variadic bool

message Value
  1 docString string
  2 type ValueType
  oneof value
    3 immediateValue Value_ImmediateValue
    5 blobFileValue Value_BlobFileValue

message Value_ImmediateValue
  oneof value
    1 tensor TensorValue
    2 tuple TupleValue
    3 list ListValue
    4 dictionary DictionaryValue

message Value_BlobFileValue
  1 fileName string
  2 offset uint64

message TensorValue
  oneof value
    1 floats TensorValue_RepeatedFloats
    2 ints TensorValue_RepeatedInts
    3 bools TensorValue_RepeatedBools
    4 strings TensorValue_RepeatedStrings
    5 longInts TensorValue_RepeatedLongInts
    6 doubles TensorValue_RepeatedDoubles
    7 bytes TensorValue_RepeatedBytes

message TensorValue_RepeatedFloats
  1 values float repeated

message TensorValue_RepeatedDoubles
  1 values double repeated

message TensorValue_RepeatedInts
  1 values int32 repeated

message TensorValue_RepeatedLongInts
  1 values int64 repeated

message TensorValue_RepeatedBools
  1 values bool repeated

message TensorValue_RepeatedStrings
  1 values string repeated

message TensorValue_RepeatedBytes
  1 values bytes

message TupleValue
  1 values Value repeated

message ListValue
  1 values Value repeated

message DictionaryValue
  1 values DictionaryValue_KeyValuePair repeated

message DictionaryValue_KeyValuePair
  1 key Value
  2 value Value
"""

_CLASSES = {**{n: description.message_class(n) for n in _DESCRIPTION_MESSAGES}, **build_messages(_MODEL + _MIL, _PACKAGE)}
MESSAGE_NAMES: tuple[str, ...] = tuple(_CLASSES)  # every message of the path, the shared description's included

Model = _CLASSES["Model"]
ModelDescription = description.ModelDescription
FunctionDescription = _CLASSES["FunctionDescription"]
Metadata = _CLASSES["Metadata"]
FeatureDescription = _CLASSES["FeatureDescription"]
FeatureType = _CLASSES["FeatureType"]
ArrayFeatureType = _CLASSES["ArrayFeatureType"]
ImageFeatureType = _CLASSES["ImageFeatureType"]
StateFeatureType = _CLASSES["StateFeatureType"]
Program = _CLASSES["Program"]
Function = _CLASSES["Function"]
Block = _CLASSES["Block"]
Operation = _CLASSES["Operation"]
Argument = _CLASSES["Argument"]
Argument_Binding = _CLASSES["Argument_Binding"]
NamedValueType = _CLASSES["NamedValueType"]
ValueType = _CLASSES["ValueType"]
TensorType = _CLASSES["TensorType"]
TupleType = _CLASSES["TupleType"]
ListType = _CLASSES["ListType"]
DictionaryType = _CLASSES["DictionaryType"]
StateType = _CLASSES["StateType"]
Dimension = _CLASSES["Dimension"]
Dimension_ConstantDimension = _CLASSES["Dimension_ConstantDimension"]
Dimension_UnknownDimension = _CLASSES["Dimension_UnknownDimension"]
Value = _CLASSES["Value"]
Value_ImmediateValue = _CLASSES["Value_ImmediateValue"]
Value_BlobFileValue = _CLASSES["Value_BlobFileValue"]
TensorValue = _CLASSES["TensorValue"]
TupleValue = _CLASSES["TupleValue"]
ListValue = _CLASSES["ListValue"]
DictionaryValue = _CLASSES["DictionaryValue"]


def message_class(name: str):
    """The message class called `name` in our definitions, e.g. "Operation_InputsEntry" (tests, builders)."""
    return _CLASSES[name]


# MIL DataType enum values (MIL.proto). weight.bin's blob dtype codes are other numbers (MLPROGRAM.md §3).
BOOL, STRING = 1, 2
FLOAT16, FLOAT32, FLOAT64, BFLOAT16 = 10, 11, 12, 13
INT8, INT16, INT32, INT64, INT4 = 21, 22, 23, 24, 25
UINT8, UINT16, UINT32, UINT64, UINT4, UINT2, UINT1, UINT6, UINT3 = 31, 32, 33, 34, 35, 36, 37, 38, 39
FLOAT8E4M3FN, FLOAT8E5M2 = 40, 41

DATA_TYPE_CODES: dict[str, int] = {
    "BOOL": BOOL, "STRING": STRING,
    "FLOAT16": FLOAT16, "FLOAT32": FLOAT32, "FLOAT64": FLOAT64, "BFLOAT16": BFLOAT16,
    "INT8": INT8, "INT16": INT16, "INT32": INT32, "INT64": INT64, "INT4": INT4,
    "UINT8": UINT8, "UINT16": UINT16, "UINT32": UINT32, "UINT64": UINT64,
    "UINT4": UINT4, "UINT2": UINT2, "UINT1": UINT1, "UINT6": UINT6, "UINT3": UINT3,
    "FLOAT8E4M3FN": FLOAT8E4M3FN, "FLOAT8E5M2": FLOAT8E5M2,
}  # fmt: skip
DATA_TYPE_NAMES: dict[int, str] = {code: name for name, code in DATA_TYPE_CODES.items()}

# ArrayFeatureType.ArrayDataType (model inputs/outputs): a different enum from MIL's DataType.
ARRAY_FLOAT16, ARRAY_FLOAT32, ARRAY_DOUBLE, ARRAY_INT32 = 65552, 65568, 65600, 131104


# -- map entries -----------------------------------------------------------------------------------------------


def entries_dict(entries) -> dict:
    """{key: value} of repeated map entries (the last entry of a repeated key wins, as in protobuf maps)."""
    return {entry.key: entry.value for entry in entries}


def find_entry(entries, key: str):
    """The value of the entry called `key` (the last one if repeated, as protobuf maps do), else None."""
    found = None
    for entry in entries:
        if entry.key == key:
            found = entry.value
    return found


def set_entry(entries, key: str, value) -> None:
    """Set entry `key` to `value` (a message is copied, a scalar assigned): in place where the key already
    is (every entry of a repeated key), appended at the end otherwise, so the other entries keep their
    order."""
    targets = [entry for entry in entries if entry.key == key] or [entries.add(key=key)]
    for entry in targets:
        if hasattr(value, "DESCRIPTOR"):
            entry.value.CopyFrom(value)
        else:
            entry.value = value


def remove_entry(entries, key: str) -> bool:
    """Remove every entry called `key`; True when there was one. The others keep their order."""
    doomed = [i for i, entry in enumerate(entries) if entry.key == key]
    for i in reversed(doomed):
        del entries[i]
    return bool(doomed)


read_description = description.read_description  # a parsed copy: edits change nothing until serialised back
