"""Our ML-program message definitions against coremltools' generated ones and the catalog packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlqpipe.formats.mlprogram import proto

from .packages import CATALOG, varint


def model_bytes(package: Path) -> bytes:
    """model.mlmodel's bytes, found through Manifest.json (rootModelIdentifier -> path under Data/)."""
    manifest = json.loads((package / "Manifest.json").read_text())
    entry = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    return (package / "Data" / entry["path"]).read_bytes()


@pytest.fixture(scope="module")
def pb():
    """coremltools' own generated modules (the oracle)."""
    pytest.importorskip("coremltools")
    from coremltools.proto import FeatureTypes_pb2, MIL_pb2, Model_pb2

    return Model_pb2, MIL_pb2, FeatureTypes_pb2


# -- schema ------------------------------------------------------------------------------------------------


def _coreml_descriptor(pb, ours_name: str):
    outer, *inner = ours_name.split("_")
    for module in pb:
        if outer in module.DESCRIPTOR.message_types_by_name:
            d = module.DESCRIPTOR.message_types_by_name[outer]
            for part in inner:
                d = d.nested_types_by_name[part]
            return d
    raise AssertionError(f"coremltools has no message {ours_name}")


_OPAQUE_OK = {"Model", "FeatureType", "ArrayFeatureType", "ImageFeatureType"}  # messages with opaque parts


@pytest.mark.parametrize("name", proto.MESSAGE_NAMES)
def test_every_field_is_declared_with_the_same_number_and_wire_form(pb, name):
    """Each message has exactly coremltools' fields (numbers, names, repetition, oneofs, packing); enums are
    int32 (same varint), and sub-messages are opaque bytes only in the messages we do not look inside."""
    ours = proto.message_class(name).DESCRIPTOR
    theirs = _coreml_descriptor(pb, name)
    assert [f.number for f in sorted(ours.fields, key=lambda f: f.number)] == sorted(f.number for f in theirs.fields)
    for f in ours.fields:
        t = theirs.fields_by_number[f.number]
        assert (f.name, f.is_repeated, f.is_packed) == (t.name, t.is_repeated, t.is_packed), (name, f.name)
        assert (f.containing_oneof and f.containing_oneof.name) == (t.containing_oneof and t.containing_oneof.name)
        if t.type == t.TYPE_ENUM:
            assert f.type == f.TYPE_INT32
        elif t.type == t.TYPE_MESSAGE and f.type == f.TYPE_BYTES:
            assert name in _OPAQUE_OK, (name, f.name)
        elif t.type == t.TYPE_MESSAGE:
            assert f.message_type.name == _ours_name(t.message_type), (name, f.name)
        else:
            assert f.type == t.type, (name, f.name)


def _ours_name(descriptor) -> str:
    """Our flattened name of a coremltools message: CoreML.Specification.MILSpec.Argument.Binding ->
    Argument_Binding."""
    return descriptor.full_name.removeprefix("CoreML.Specification.").removeprefix("MILSpec.").replace(".", "_")


def test_every_mil_message_is_declared(pb):
    _, MIL_pb2, _ = pb

    def names(descriptor):
        yield _ours_name(descriptor)
        for nested in descriptor.nested_types:
            yield from names(nested)

    theirs = {n for d in MIL_pb2.DESCRIPTOR.message_types_by_name.values() for n in names(d)}
    assert sorted(theirs - set(proto.MESSAGE_NAMES)) == []


def test_data_type_constants_are_mils(pb):
    _, MIL_pb2, _ = pb
    theirs = {v.name: v.number for v in MIL_pb2.DataType.DESCRIPTOR.values if v.number}
    assert proto.DATA_TYPE_CODES == theirs
    assert all(getattr(proto, name) == code for name, code in theirs.items())
    assert proto.DATA_TYPE_NAMES == {code: name for name, code in theirs.items()}


# -- catalog round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_load_save_is_byte_identical(mlpackage, name):
    data = model_bytes(mlpackage(name))
    model = proto.Model.FromString(data)
    assert model.WhichOneof("Type") == "mlProgram"
    assert model.SerializeToString() == data
    description = proto.read_description(model)
    assert description.SerializeToString() == model.description


def _walk(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _walk(inner)


def _summary(model, entries) -> dict:
    """function -> (opset, op types in order, [(const name, blob offset or None)]), via our entry helpers
    or coremltools' maps (`entries` turns a map field into a dict)."""
    out = {}
    for fname, function in entries(model.mlProgram.functions).items():
        block = entries(function.block_specializations)[function.opset]
        ops = list(_walk(block))
        consts = []
        for op in ops:
            if op.type == "const":
                attrs = entries(op.attributes)
                val = attrs["val"]
                offset = val.blobFileValue.offset if val.WhichOneof("value") == "blobFileValue" else None
                consts.append((attrs["name"].immediateValue.tensor.strings.values[0], offset))
        out[fname] = (function.opset, [op.type for op in ops], consts)
    return out


@pytest.mark.parametrize(
    "name", ["mlp_ios15_fp32", "conv_ios16", "control_flow_ios17", "multifunction_ios18", "ios18_joint_sparse_lut"]
)
def test_same_program_as_coremltools_reads(pb, mlpackage, name):
    Model_pb2 = pb[0]
    data = model_bytes(mlpackage(name))
    theirs = _summary(Model_pb2.Model.FromString(data), dict)
    ours = _summary(proto.Model.FromString(data), proto.entries_dict)
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    assert any(offset is not None for _, _, consts in ours.values() for _, offset in consts)


def test_multifunction_description_and_shared_weight(mlpackage):
    model = proto.Model.FromString(model_bytes(mlpackage("multifunction_ios18")))
    description = proto.read_description(model)
    assert description.defaultFunctionName == "main_a"
    assert [f.name for f in description.functions] == ["main_a", "main_b"]
    summary = _summary(model, proto.entries_dict)
    offsets = {f: {off for _, off in consts if off is not None} for f, (_, _, consts) in summary.items()}
    assert offsets["main_a"] & offsets["main_b"], "the shared fc1 weight should be one blob used by both"


def test_description_view_reads_the_features(pb, mlpackage):
    Model_pb2 = pb[0]
    data = model_bytes(mlpackage("mlp_ios16_fp32"))
    theirs = Model_pb2.Model.FromString(data).description
    ours = proto.read_description(proto.Model.FromString(data))
    assert [(f.name, list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in ours.input] == [
        (f.name, list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in theirs.input
    ]
    assert ours.input[0].type.multiArrayType.dataType == proto.ARRAY_FLOAT32
    assert proto.entries_dict(ours.metadata.userDefined) == dict(theirs.metadata.userDefined)
    assert proto.read_description(proto.Model()) == proto.ModelDescription()


# -- unknown fields ------------------------------------------------------------------------------------------


_UNKNOWN = {  # field 9001 = varint 7, field 9002 = length-delimited b"mlqpipe" (numbers no message uses)
    "varint": varint(9001 << 3 | 0) + varint(7),
    "bytes": varint(9002 << 3 | 2) + varint(7) + b"mlqpipe",
}


def _first_const(model_program, entries):
    function = entries(model_program.functions)["main"]
    block = entries(function.block_specializations)[function.opset]
    return next(op for op in block.operations if op.type == "const")


def test_unknown_fields_survive_at_every_level(pb, mlpackage):
    """Unknown fields added by coremltools' own messages (an independent writer) to Model, an Operation and
    a Value are kept by ours where they were, and the file round-trips byte for byte."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    Model_pb2 = pb[0]
    theirs = Model_pb2.Model.FromString(model_bytes(mlpackage("mlp_ios16_fp32")))
    op = _first_const(theirs.mlProgram, dict)
    op.MergeFromString(_UNKNOWN["varint"])
    op.attributes["val"].MergeFromString(_UNKNOWN["bytes"])
    theirs.MergeFromString(_UNKNOWN["varint"] + _UNKNOWN["bytes"])
    data = theirs.SerializeToString()

    ours = proto.Model.FromString(data)
    assert ours.SerializeToString() == data
    ours_op = _first_const(ours.mlProgram, proto.entries_dict)
    val = proto.find_entry(ours_op.attributes, "val")

    def fields(message):
        return [(f.field_number, f.data) for f in UnknownFieldSet(message)]

    assert fields(ours) == [(9001, 7), (9002, b"mlqpipe")]
    assert fields(ours_op) == [(9001, 7)]
    assert fields(val) == [(9002, b"mlqpipe")]
    assert val.blobFileValue.fileName == "@model_path/weights/weight.bin"


# -- map order -----------------------------------------------------------------------------------------------


def _reverse_maps(message) -> None:
    """Reverse every map (repeated *Entry field) of our message, recursively."""
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        items = list(value) if field.is_repeated else [value]
        for item in items:
            _reverse_maps(item)
        if field.is_repeated and field.message_type.name.endswith("Entry"):
            copies = [type(item).FromString(item.SerializeToString()) for item in items]
            del value[:]
            value.extend(reversed(copies))


def _map_keys(data: bytes) -> tuple[list[str], dict[str, list[list[str]]]]:
    """The keys of the program's maps in file order: function names, and per function the keys of its
    block specializations, then of each op's inputs and attributes."""
    program = proto.Model.FromString(data).mlProgram
    per_function = {}
    for function in program.functions:
        keys = per_function[function.key] = [[e.key for e in function.value.block_specializations]]
        for block in function.value.block_specializations:
            for op in _walk(block.value):
                keys += [[e.key for e in op.inputs], [e.key for e in op.attributes]]
    return [e.key for e in program.functions], per_function


@pytest.mark.parametrize("name", ["conv_ios16", "multifunction_ios18"])
def test_map_order_is_kept_in_each_order(pb, mlpackage, name):
    """The same model written with its maps in two orders (coremltools' deterministic order, and every map
    reversed): coremltools reads both as the same model, ours keeps each order byte for byte (and the
    entries of each map in the order they were written)."""
    Model_pb2 = pb[0]
    sorted_bytes = Model_pb2.Model.FromString(model_bytes(mlpackage(name))).SerializeToString(deterministic=True)
    reordered = proto.Model.FromString(sorted_bytes)
    _reverse_maps(reordered)
    reversed_bytes = reordered.SerializeToString()
    assert reversed_bytes != sorted_bytes
    assert Model_pb2.Model.FromString(reversed_bytes) == Model_pb2.Model.FromString(sorted_bytes)

    for data in (sorted_bytes, reversed_bytes):
        assert proto.Model.FromString(data).SerializeToString() == data
    functions, keys = _map_keys(sorted_bytes)
    functions_reversed, keys_reversed = _map_keys(reversed_bytes)
    assert functions_reversed == functions[::-1]
    assert keys_reversed == {f: [k[::-1] for k in function_keys] for f, function_keys in keys.items()}
    assert any(len(k) > 1 for function_keys in keys.values() for k in function_keys)


# -- entry helpers -------------------------------------------------------------------------------------------

_keys_st = st.lists(st.text(alphabet="abcxyz_", min_size=1, max_size=4), max_size=8)


def _string_value(text: str):
    v = proto.Value()
    v.immediateValue.tensor.strings.values.append(text)
    return v


@given(keys=_keys_st, extra=st.text(alphabet="abcxyz_", min_size=1, max_size=4))
def test_entries_keep_order_and_read_like_a_map(keys, extra):
    op = proto.Operation(type="t")
    for i, key in enumerate(keys):
        op.attributes.add(key=key, value=_string_value(str(i)))
    data = op.SerializeToString()
    again = proto.Operation.FromString(data)
    assert again.SerializeToString() == data
    assert [e.key for e in again.attributes] == keys
    last = {key: str(i) for i, key in enumerate(keys)}
    as_dict = proto.entries_dict(again.attributes)
    assert {k: v.immediateValue.tensor.strings.values[0] for k, v in as_dict.items()} == last
    for key in last:
        assert proto.find_entry(again.attributes, key).immediateValue.tensor.strings.values[0] == last[key]
    assert proto.find_entry(again.attributes, "NOT") is None

    proto.set_entry(again.attributes, extra, _string_value("new"))
    expected_keys = keys if extra in keys else keys + [extra]
    assert [e.key for e in again.attributes] == expected_keys
    assert proto.find_entry(again.attributes, extra).immediateValue.tensor.strings.values[0] == "new"

    assert proto.remove_entry(again.attributes, extra) is True
    assert [e.key for e in again.attributes] == [k for k in expected_keys if k != extra]
    assert proto.remove_entry(again.attributes, extra) is False


def test_set_entry_assigns_scalars():
    meta = proto.Metadata()
    proto.set_entry(meta.userDefined, "b", "1")
    proto.set_entry(meta.userDefined, "a", "2")
    proto.set_entry(meta.userDefined, "b", "3")
    assert [(e.key, e.value) for e in meta.userDefined] == [("b", "3"), ("a", "2")]
