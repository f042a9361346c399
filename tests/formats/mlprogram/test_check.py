"""The ML-program check (mlprogram/check.py): every catalog package passes; each rule, broken on purpose in a
copy of a catalog package (model.mlmodel edited through our messages, or weight.bin bytes rewritten), gives
exactly its finding with its exact message; Core ML's validator (coreml-validate) is asked about every broken
copy, and where it rejects one too that is asserted (and the test marks the copy `invalid_models`).

Broken copies are written as `bad.mlpackage` under tmp_path; the tree-wide validator check (tests/conftest.py)
judges them after the test, so a case whose copy Core ML rejects applies the `invalid_models` mark itself."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlqpipe.errors import CheckError
from mlqpipe.formats.base import Finding
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.blob import BY_NAME, BlobWriter
from mlqpipe.formats.mlprogram.check import (
    CONSTEXPR_CHECKS, RULE_NAMES, _view, check_program, raise_on_errors, structure_findings,
)
from mlqpipe.formats.mlprogram.model import MLProgram, load_package
from mlqpipe.formats.mlprogram.package import read_layout
from mlqpipe.formats.mlprogram.program import op_name
from tests.conftest import _validator, validate_models

from .packages import CATALOG, NEEDS_TORCH

WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"
DISAGREE = "the model and its weight file disagree (re-export the model)"


# -- helpers ------------------------------------------------------------------------------------------------


def _main_block(spec, function: str = "main"):
    fn = proto.find_entry(spec.mlProgram.functions, function)
    return proto.find_entry(fn.block_specializations, fn.opset)


def _op(spec, name: str, function: str = "main"):
    return next(op for op in _main_block(spec, function).operations if op_name(op) == name)


def _value(op, key: str):
    """The literal Value of parameter `key` (an attribute, or an input bound to a value)."""
    found = proto.find_entry(op.attributes, key)
    if found is not None:
        return found
    return proto.find_entry(op.inputs, key).arguments[0].value


def _set_dims(value_type, dims) -> None:
    t = value_type.tensorType
    del t.dimensions[:]
    for d in dims:
        t.dimensions.add().constant.size = d
    t.rank = len(dims)


def _description(spec):
    return proto.read_description(spec)


def _set_description(spec, desc) -> None:
    spec.description = desc.SerializeToString()


def _blob_offset(spec, op: str, key: str) -> int:
    return _value(_op(spec, op), key).blobFileValue.offset


def _data_offset(package: Path, record: int) -> int:
    with open(package / WEIGHTS, "rb") as f:
        f.seek(record + 16)
        return struct.unpack("<Q", f.read(8))[0]


def _patch(package: Path, at: int, data: bytes) -> None:
    with open(package / WEIGHTS, "r+b") as f:
        f.seek(at)
        f.write(data)


def _read(package: Path, at: int, size: int) -> bytes:
    with open(package / WEIGHTS, "rb") as f:
        f.seek(at)
        return f.read(size)


def broken(mlpackage, tmp_path, name: str, edit=None, weights=None) -> tuple[Path, MLProgram]:
    """A copy of catalog package `name` as tmp_path/bad.mlpackage: `edit(spec)` applied to its model.mlmodel
    (written back), then `weights(package, spec)` rewriting weight.bin bytes. The model is built directly (not
    through load_package, which refuses some of the broken programs on its own)."""
    package = tmp_path / "bad.mlpackage"
    shutil.copytree(mlpackage(name), package)
    layout = read_layout(package)
    spec = proto.Model.FromString(layout.model_path.read_bytes())
    if edit is not None:
        edit(spec)
        layout.model_path.write_bytes(spec.SerializeToString())
    if weights is not None:
        weights(package, spec)
    return package, MLProgram(spec, read_layout(package), str(package))


def _core_ml(request, package: Path, rejects: str | None) -> None:
    """Ask coreml-validate about the broken copy: it must reject it with a message containing `rejects`, or
    accept it (None). A rejected copy is expected by the tree-wide check through the invalid_models mark."""
    if rejects is not None:
        request.applymarker(pytest.mark.invalid_models("bad.mlpackage", reason="a rule broken on purpose"))
    if _validator() is None:
        return
    verdict = validate_models([package])[package]
    if rejects is None:
        assert verdict is None, verdict
    else:
        assert verdict is not None and rejects in verdict, verdict


def _summary(findings) -> list[tuple[str, str, str, str]]:
    return [(f.severity, f.rule, f.where, f.message) for f in findings]


# -- every catalog package passes -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_catalog_packages_have_no_error(mlpackage, name):
    model = load_package(mlpackage(name))
    assert [f for f in check_program(model) if f.severity == "error"] == []
    raise_on_errors(model, where="out.mlpackage")  # and so saving them is allowed


def test_rule_names_are_short_kebab_case():
    assert len(set(RULE_NAMES)) == len(RULE_NAMES)
    assert all(n.replace("-", "").isalpha() and n == n.lower() for n in RULE_NAMES)


# -- one broken rule, one finding -----------------------------------------------------------------------------


def _spec_version(v):
    def edit(spec):
        spec.specificationVersion = v

    return edit


def _opset(new: str, rename_block: bool = True, function: str = "main"):
    def edit(spec):
        fn = proto.find_entry(spec.mlProgram.functions, function)
        if rename_block:
            for e in fn.block_specializations:
                if e.key == fn.opset:
                    e.key = new
        fn.opset = new

    return edit


def _rename_output(op: str, new: str, rebind: dict | None = None):
    """Op `op`'s first output becomes `new`; consumers in `rebind` ({op: param}) are rebound to it."""

    def edit(spec):
        _op(spec, op).outputs[0].name = new
        for consumer, param in (rebind or {}).items():
            proto.find_entry(_op(spec, consumer).inputs, param).arguments[0].name = new

    return edit


def _bind(op: str, param: str, name: str):
    def edit(spec):
        proto.find_entry(_op(spec, op).inputs, param).arguments[0].name = name

    return edit


def _cond_block_output(spec):
    cond = _op(spec, "branch")
    cond.blocks[0].outputs[0] = "fc_false"


def _extra_specialization(spec):
    fn = proto.find_entry(spec.mlProgram.functions, "main")
    block = proto.Block()
    block.CopyFrom(_main_block(spec))
    block.outputs[0] = "relu2"
    proto.set_entry(fn.block_specializations, "CoreML7", block)


def _describe_output(new: str):
    def edit(spec):
        desc = _description(spec)
        desc.output[0].name = new
        _set_description(spec, desc)

    return edit


def _rename_described_function(spec):
    desc = _description(spec)
    desc.functions[1].name = "main_c"
    _set_description(spec, desc)


def _default_function(spec):
    desc = _description(spec)
    desc.defaultFunctionName = "main_z"
    _set_description(spec, desc)


def _const_val_type(op: str, dtype=None, dims=None):
    def edit(spec):
        value = _value(_op(spec, op), "val")
        if dtype is not None:
            value.type.tensorType.dataType = dtype
        if dims is not None:
            _set_dims(value.type, dims)

    return edit


def _param_type(op: str, key: str, dtype=None, dims=None):
    def edit(spec):
        value = _value(_op(spec, op), key)
        if dtype is not None:
            value.type.tensorType.dataType = dtype
        if dims is not None:
            _set_dims(value.type, dims)

    return edit


def _output_dtype(op: str, dtype: int):
    def edit(spec):
        _op(spec, op).outputs[0].type.tensorType.dataType = dtype

    return edit


def _immediate_ints(op: str, key: str, values):
    def edit(spec):
        ints = _value(_op(spec, op), key).immediateValue.tensor.ints.values
        del ints[:]
        ints.extend(values)

    return edit


def _immediate_bytes(op: str, key: str, data: bytes):
    def edit(spec):
        _value(_op(spec, op), key).immediateValue.tensor.bytes.values = data

    return edit


def _remove_input(op: str, key: str):
    def edit(spec):
        assert proto.remove_entry(_op(spec, op).inputs, key)

    return edit


def _add_literal_input(op: str, key: str):
    def edit(spec):
        binding = _op(spec, op).inputs.add(key=key).value.arguments.add()
        binding.value.CopyFrom(_value(_op(spec, op), "vector_axis"))

    return edit


def _lut_nan(spec):
    floats = _value(_op(spec, "fc1_weight_0_palettized"), "lut").immediateValue.tensor.floats.values
    floats[3] = float("nan")


def _sentinel(package, spec):
    _patch(package, _blob_offset(spec, "fc1_weight_0", "val"), struct.pack("<I", 0xCAFEF00D))


def _weight_nan(package, spec):
    data = _data_offset(package, _blob_offset(spec, "fc1_weight_0", "val"))
    _patch(package, data + 8, struct.pack("<ff", np.nan, np.inf))


def _clear_mask_bit(op: str, key: str):
    """Clear the lowest set bit of the first non-zero byte of a mask blob."""

    def weights(package, spec):
        data = _data_offset(package, _blob_offset(spec, op, key))
        raw = _read(package, data, 1024)
        i = next(k for k, b in enumerate(raw) if b)
        _patch(package, data + i, bytes([raw[i] & (raw[i] - 1)]))

    return weights


def _extra_blob_file(package, spec):
    """weights/extra.bin with one uint1 blob of 3 values whose 5 unused bits are not all zero."""
    with BlobWriter(package / "Data/com.apple.CoreML/weights/extra.bin") as w:
        assert w.add(b"\x0b", BY_NAME["uint1"].code, padding_bits=5) == 64


def _uint32_bytes(*values) -> bytes:
    return np.array(values, dtype="<u4").tobytes()


def _added_op(op_type: str, out_dtype: int, out_dims, **params):
    """Append a constexpr op `extra` (its output unused) with literal parameters: name -> (MIL dtype, dims,
    TensorValue field, values) — as attributes before iOS18, inputs from it (by the function's opset)."""

    def edit(spec):
        fn = proto.find_entry(spec.mlProgram.functions, "main")
        block = _main_block(spec)
        op = block.operations.add(type=op_type)
        name = op.attributes.add(key="name").value
        name.type.tensorType.dataType = proto.STRING
        name.immediateValue.tensor.strings.values.append("extra")
        out = op.outputs.add(name="extra")
        out.type.tensorType.dataType = out_dtype
        _set_dims(out.type, out_dims)
        for key, (dtype, dims, kind, values) in params.items():
            if fn.opset == "CoreML8":
                value = op.inputs.add(key=key).value.arguments.add().value
            else:
                value = op.attributes.add(key=key).value
            value.type.tensorType.dataType = dtype
            _set_dims(value.type, dims)
            tensor = value.immediateValue.tensor
            if kind == "blob":  # values: (fileName, offset)
                value.ClearField("immediateValue")
                value.blobFileValue.fileName, value.blobFileValue.offset = values
            elif kind == "bytes":
                tensor.bytes.values = values
            else:
                getattr(tensor, kind).values.extend(values)

    return edit


# (id, catalog package, spec edit, weight.bin edit, expected findings, Core ML's rejection message or None)
CASES = [
    ("spec-version-unknown", "mlp_ios16_fp32", _spec_version(11), None,
     [("error", "spec-version-unknown", "model", "specificationVersion is 11, newer than any Core ML release knows; Core ML loads 1..10")],
     "newer version of Xcode"),
    ("opset-block", "mlp_ios16_fp32", _opset("CoreML5", rename_block=False), None,
     [("error", "opset-block", "main", "opset 'CoreML5' names none of the function's blocks ('CoreML6')")],
     "[mil-check]"),
    ("opset-unknown", "mlp_ios16_fp32", _opset("CoreML42"), None,
     [("error", "opset-block", "main", "opset 'CoreML42' is not one Core ML knows (CoreML5, CoreML6, CoreML7, CoreML8, CoreML9)")],
     None),
    ("specialization-outputs", "mlp_ios16_fp32", _extra_specialization, None,
     [("error", "specialization-outputs", "main", "block 'CoreML7' returns ['relu2'], block 'CoreML6' returns ['fc3']; "
                                                  "all specializations must have the same outputs")],
     None),
    ("identifier", "mlp_ios16_fp32", _rename_output("relu1", "relu 1", {"fc2": "x"}), None,
     [("error", "identifier", "main/relu1", "output 'relu 1' is not a MIL identifier ([A-Za-z_][A-Za-z0-9_@]*)")],
     "[mil-check]"),
    ("undefined-value", "mlp_ios16_fp32", _bind("fc2", "x", "relu9"), None,
     [("error", "undefined-value", "main/fc2", "parameter 'x' reads 'relu9', which is defined nowhere before it in its scope")],
     "[mil-check]"),
    ("undefined-block-output", "control_flow_ios17", _cond_block_output, None,
     [("error", "undefined-value", "main/branch.blocks[0]", "block output 'fc_false' is not defined in the block or an enclosing scope")],
     "[mil-check]"),
    ("duplicate-value", "mlp_ios16_fp32", _rename_output("relu2", "relu1", {"fc3": "x"}), None,
     [("error", "duplicate-value", "main/relu2", "output 'relu1' is already defined in this scope")],
     "defined more than once"),
    ("spec-version", "ios16_lut", _spec_version(6), None,
     [("error", "spec-version", "model", "specificationVersion 6 is too low: function 'main' uses opset CoreML6 (iOS16), which needs >= 7")],
     None),  # Core ML's open-source validator accepts it: it does not derive a minimum from the opset
    ("spec-version-multifunction", "multifunction_ios18", lambda s: [_opset("CoreML7", function=f)(s) for f in ("main_a", "main_b")]
     and _spec_version(8)(s), None,
     [("error", "spec-version", "model", "specificationVersion 8 is too low: 2 functions (multifunction models need iOS18), which needs >= 9")],
     "Multi-function syntax is only valid in specification verison >= 9"),
    ("op-opset-constexpr-ios15", "ios16_lut", _opset("CoreML5"), None,
     [("error", "op-opset", f"main/fc{i}_weight_0_palettized", "constexpr_lut_to_dense needs opset CoreML6 (iOS16) or later; "
       "function 'main' is CoreML5 (iOS15)") for i in (1, 2)],
     None),
    ("op-opset-ios18-op", "ios18_int4_block", _opset("CoreML7"), None,
     [("error", "op-opset", f"main/fc{i}_weight_0_quantized", "constexpr_blockwise_shift_scale needs opset CoreML8 (iOS18) or "
       "later; function 'main' is CoreML7") for i in (1, 2)],
     None),
    ("op-opset-attributes-in-ios18", "ios16_lut", lambda s: _opset("CoreML8")(s) or _spec_version(9)(s), None,
     [("error", "op-opset", f"main/fc{i}_weight_0_palettized", "constexpr_lut_to_dense in a CoreML8 function takes its "
       "parameters as inputs (the iOS18 form), but 'indices', 'lut', 'shape' are attributes") for i in (1, 2)],
     None),
    ("op-opset-inputs-in-ios16", "ios18_lut_3bit", _opset("CoreML7"), None,
     [("error", "op-opset", f"main/fc{i}_weight_0_palettized", "constexpr_lut_to_dense in a CoreML7 function takes its "
       "parameters as attributes (the iOS16 form), but 'indices', 'lut' are inputs") for i in (1, 2)],
     None),
    ("description", "mlp_ios16_fp32", _describe_output("y"), None,
     [("error", "description", "main", "the description lists outputs ['y'], function 'main' returns ['fc3']")],
     "[mil-check]"),
    ("description-function", "multifunction_ios18", _rename_described_function, None,
     [("error", "description", "model", "the description describes function 'main_c', which is not in the program")],
     "model description names function 'main_c' that the program lacks"),
    ("description-default", "multifunction_ios18", _default_function, None,
     [("error", "description", "model", "the default function 'main_z' is not in the program (functions: main_a, main_b)")],
     "INVALID_DEFAULT_FUNCTION_NAME"),
    ("blob-sentinel", "mlp_ios16_fp32", None, _sentinel,
     [("error", "blob", "main/fc1_weight_0", f"parameter 'val': {WEIGHTS}: blob at offset 64: sentinel 0xcafef00d is not "
       "0xDEADBEEF; the file is corrupt (re-export the model)")],
     "[mil-check]"),
    ("blob-dtype", "mlp_ios16_fp32", _const_val_type("fc1_weight_0", dtype=proto.FLOAT16), None,
     [("error", "blob", "main/fc1_weight_0", f"parameter 'val': {WEIGHTS}: blob at offset 64: the blob holds float32 (code 2), "
       f"the model declares float16 (code 1); {DISAGREE}")],
     "[mil-check]"),
    ("blob-count", "mlp_ios16_fp32", _const_val_type("fc1_weight_0", dims=(64, 64)), None,
     [("error", "blob", "main/fc1_weight_0", f"parameter 'val': {WEIGHTS}: blob at offset 64: the blob holds 8192 float32 "
       f"values, the model declares 4096; {DISAGREE}")],
     "[mil-check]"),
    ("blob-not-storable", "mlp_ios16_fp32", _const_val_type("fc1_weight_0", dtype=proto.INT64), None,
     [("error", "blob", "main/fc1_weight_0", "parameter 'val': int64 cannot be stored in a weight file")],
     "[mil-check]"),
    ("immediate-value", "mlp_ios16_fp32", _const_val_type("fc3_bias_0", dims=(5,)), None,
     [("error", "immediate-value", "main/fc3_bias_0", "parameter 'val': immediate value holds 4 values, its type says 5")],
     None),
    ("padding-bits-uint1", "mlp_ios18_fp32",
     _added_op("constexpr_sparse_to_dense", proto.FLOAT32, (3,), nonzero_data=(proto.FLOAT32, (2,), "floats", [1.0, 2.0]),
               mask=(proto.UINT1, (3,), "bytes", b"\x0b")), None,
     [("error", "padding-bits", "main/extra", "parameter 'mask': the unused bits after its 3 uint1 values are not zero")],
     None),
    ("padding-bits-blob", "mlp_ios18_fp32",
     _added_op("constexpr_sparse_to_dense", proto.FLOAT32, (3,), nonzero_data=(proto.FLOAT32, (2,), "floats", [1.0, 2.0]),
               mask=(proto.UINT1, (3,), "blob", ("@model_path/weights/extra.bin", 64))), _extra_blob_file,
     [("error", "padding-bits", "main/extra", "parameter 'mask': the unused bits after its 3 uint1 values are not zero")],
     None),
    ("padding-bits-packed-mask", "mlp_ios16_fp32",
     _added_op("constexpr_sparse_to_dense", proto.FLOAT32, (3,), nonzero_data=(proto.FLOAT32, (2,), "floats", [1.0, 2.0]),
               mask=(proto.UINT8, (1,), "bytes", b"\x13"), shape=(proto.UINT32, (1,), "bytes", _uint32_bytes(3))), None,
     [("error", "padding-bits", "main/extra", "parameter 'mask': the unused bits after its 3 packed 1-bit values are not zero")],
     None),
    ("padding-bits-packed-indices", "mlp_ios16_fp32",
     _added_op("constexpr_lut_to_dense", proto.FLOAT32, (3,), lut=(proto.FLOAT32, (2,), "floats", [1.0, 2.0]),
               indices=(proto.UINT8, (1,), "bytes", b"\x85"), shape=(proto.UINT32, (1,), "bytes", _uint32_bytes(3))), None,
     [("error", "padding-bits", "main/extra", "parameter 'indices': the unused bits after its 3 packed 1-bit values are not zero")],
     None),
    ("lut-size-ios16", "mlp_ios16_fp32",
     _added_op("constexpr_lut_to_dense", proto.FLOAT32, (3,), lut=(proto.FLOAT32, (8,), "floats", [0.0] * 8),
               indices=(proto.UINT8, (2,), "bytes", b"\x00\x00"), shape=(proto.UINT32, (1,), "bytes", _uint32_bytes(3))), None,
     [("error", "constexpr", "main/extra", "lut has 8 entries; CoreML6 allows 2, 4, 16, 64, 256 (3-bit LUTs need iOS18: opset CoreML8)")],
     None),
    ("cast-output-dtype", "mlp_ios16_fp32",
     _added_op("constexpr_cast", proto.FLOAT32, (2,), source_val=(proto.FLOAT16, (2,), "bytes", np.ones(2, "<f2").tobytes()),
               output_dtype=(proto.STRING, (), "strings", ["fp16"])), None,
     [("error", "constexpr", "main/extra", "output_dtype is 'fp16'; only 'fp32' is supported")],
     None),
    ("affine-axis", "ios16_affine", _immediate_ints("fc1_weight_0_quantized", "axis", [2]), None,
     [("error", "constexpr", "main/fc1_weight_0_quantized", "axis 2 is outside -2..1 (quantized_data has rank 2)")],
     None),
    ("affine-axis-dtype", "ios16_affine", _param_type("fc1_weight_0_quantized", "axis", dtype=proto.INT64), None,
     [("error", "constexpr", "main/fc1_weight_0_quantized", "parameter 'axis' is int64; constexpr_affine_dequantize takes int32 in CoreML6")],
     None),
    ("int4-needs-ios18", "mlp_ios16_fp32",
     _added_op("constexpr_affine_dequantize", proto.FLOAT32, (2,), quantized_data=(proto.INT4, (2,), "bytes", b"\x21"),
               zero_point=(proto.INT8, (), "bytes", b"\x00"), scale=(proto.FLOAT32, (), "floats", [0.5]),
               axis=(proto.INT32, (), "ints", [0])), None,
     [("error", "constexpr", "main/extra", "parameter 'quantized_data' is int4; constexpr_affine_dequantize takes int8/uint8 "
       "in CoreML6 (int4 data need iOS18: opset CoreML8)")],
     None),
    ("per-grouped-channel-needs-ios18", "mlp_ios16_fp32",
     _added_op("constexpr_lut_to_dense", proto.FLOAT32, (2, 2), lut=(proto.FLOAT32, (2, 1, 2, 1), "floats", [0.0, 1.0, 2.0, 3.0]),
               indices=(proto.UINT8, (1,), "bytes", b"\x06"), shape=(proto.UINT32, (2,), "bytes", _uint32_bytes(2, 2))), None,
     [("error", "constexpr", "main/extra", "parameter 'lut' has rank 4; constexpr_lut_to_dense needs rank 1")],
     None),
    ("affine-scale-count", "ios16_affine", _immediate_ints("fc1_weight_0_quantized", "axis", [1]), None,
     [("error", "constexpr", "main/fc1_weight_0_quantized", f"{p} has 128 values; axis 1 of quantized_data has 64") for p in ("scale", "zero_point")],
     None),
    ("shift-scale-blocks", "ios18_int4_block", _param_type("fc1_weight_0_quantized", "scale", dims=(2, 128)), None,
     [("error", "constexpr", "main/fc1_weight_0_quantized", "dimension 1: 64 data values are not a whole number of blocks of the 128 scales")],
     None),
    ("shift-scale-missing-scale", "ios18_int4_block", _remove_input("fc1_weight_0_quantized", "scale"), None,
     [("error", "constexpr", "main/fc1_weight_0_quantized", "parameter 'scale' is missing")],
     None),
    ("offset-dtype", "mlp_ios18_fp32",
     _added_op("constexpr_blockwise_shift_scale", proto.FLOAT32, (2,), data=(proto.INT8, (2,), "bytes", b"\x01\x02"),
               scale=(proto.FLOAT32, (1,), "floats", [0.5]), offset=(proto.UINT8, (1,), "bytes", b"\x01")), None,
     [("error", "constexpr", "main/extra", "offset is uint8; an integer offset must have the data's dtype (int8)")],
     None),
    ("lut-entries", "ios18_lut_grouped", _param_type("fc1_weight_0_palettized", "lut", dims=(16, 1, 8, 1)), None,
     [("error", "constexpr", "main/fc1_weight_0_palettized", "lut has 8 entries per palette; uint4 indices need 16")],
     None),
    ("lut-vector-axis-missing", "ios18_lut_vector", _remove_input("fc1_weight_0_palettized", "vector_axis"), None,
     [("error", "constexpr", "main/fc1_weight_0_palettized", "lut holds vectors of 2 values; vector_axis is missing")],
     None),
    ("lut-vector-axis-range", "ios18_lut_vector", _immediate_ints("fc1_weight_0_palettized", "vector_axis", [2]), None,
     [("error", "constexpr", "main/fc1_weight_0_palettized", "vector_axis 2 is outside -2..1")],
     None),
    ("unexpected-parameter", "ios18_lut_vector", _add_literal_input("fc1_weight_0_palettized", "scale"), None,
     [("error", "constexpr", "main/fc1_weight_0_palettized", "unexpected parameter(s) 'scale'")],
     None),
    ("sparse-popcount-ios18", "ios18_sparse", None, _clear_mask_bit("fc1_weight_0_sparsified", "mask"),
     [("error", "constexpr", "main/fc1_weight_0_sparsified", "mask has 4095 bits set; nonzero_data holds 4096 values")],
     None),
    ("sparse-popcount-ios16", "ios16_sparse", None, _clear_mask_bit("fc1_weight_0_sparsified", "mask"),
     [("error", "constexpr", "main/fc1_weight_0_sparsified", "mask has 4095 bits set; nonzero_data holds 4096 values")],
     None),
    ("joint-popcount", "ios18_joint_sparse_int8", None,
     _clear_mask_bit("fc1_weight_0_sparsified_nonzero_data_0_quantized", "data_mask"),
     [("error", "constexpr", "main/fc1_weight_0_sparsified_nonzero_data_0_quantized",
       "data_mask has 4095 bits set; nonzero_data holds 4096 values"),
      # coremltools stores the equal masks of both ops once: the sparse_to_dense's mask changed too
      ("error", "constexpr", "main/fc1_weight_0_sparsified", "mask has 4095 bits set; nonzero_data holds 4096 values")],
     None),
    ("constexpr-output-shape", "ios16_lut", _immediate_bytes("fc1_weight_0_palettized", "shape", _uint32_bytes(64, 128)), None,
     [("error", "constexpr-output", "main/fc1_weight_0_palettized", "output 'fc1_weight_0_palettized' is declared fp32[128, 64]; "
       "its parameters give fp32[64, 128]")],
     None),
    ("constexpr-output-dtype", "ios18_int4_block", _output_dtype("fc1_weight_0_quantized", proto.FLOAT16), None,
     [("error", "constexpr-output", "main/fc1_weight_0_quantized", "output 'fc1_weight_0_quantized' is declared fp16[128, 64]; "
       "its parameters give fp32[128, 64]")],
     None),
    ("finite-values-lut", "ios18_lut_3bit", _lut_nan, None,
     [("error", "finite-values", "main/fc1_weight_0_palettized", "parameter 'lut': 1 NaN or Inf value(s) in a compressed weight's parameters")],
     None),
    ("finite-values-const", "mlp_ios16_fp32", None, _weight_nan,
     [("warning", "finite-values", "main/fc1_weight_0", "2 NaN or Inf weight value(s)")],
     None),
]


@pytest.mark.parametrize(("case", "name", "edit", "weights", "expected", "rejects"), CASES, ids=[c[0] for c in CASES])
def test_each_rule_broken_alone_gives_its_finding(mlpackage, tmp_path, request, case, name, edit, weights, expected, rejects):
    package, model = broken(mlpackage, tmp_path, name, edit, weights)
    assert _summary(check_program(model)) == expected
    _core_ml(request, package, rejects)


def test_every_rule_has_a_case():
    assert {rule for c in CASES for _, rule, _, _ in c[4]} == set(RULE_NAMES)


# -- structure rules: no weight data --------------------------------------------------------------------------


@pytest.mark.invalid_models("bad.mlpackage", reason="its weight.bin is deleted on purpose")
def test_structure_findings_read_no_weight_data(mlpackage, tmp_path):
    package, model = broken(mlpackage, tmp_path, "ios16_lut", _spec_version(6))
    (package / WEIGHTS).unlink()  # a missing weight file is the weight rules' finding, never the structure rules'
    assert _summary(structure_findings(model)) == [
        ("error", "spec-version", "model", "specificationVersion 6 is too low: function 'main' uses opset CoreML6 (iOS16), which needs >= 7")
    ]
    blob = [f for f in check_program(model) if f.rule == "blob"]
    assert len(blob) == 7 and all("weight.bin) does not exist; the package is incomplete" in f.message for f in blob)


def test_structure_findings_are_the_cheap_rules(mlpackage, tmp_path):
    _, model = broken(mlpackage, tmp_path, "ios18_sparse", None, _clear_mask_bit("fc1_weight_0_sparsified", "mask"))
    assert structure_findings(model) == []
    assert [f.rule for f in check_program(model)] == ["constexpr"]


# -- while_loop block inputs are block-local ------------------------------------------------------------------


def test_sibling_blocks_may_declare_the_same_inputs(mlpackage):
    """coremltools gives both blocks of a while_loop the same inputs: allowed (coreml-validate refuses it)."""
    model = load_package(mlpackage("control_flow_ios17"))
    loop = next(op for op in _main_block(model.spec).operations if op.type == "while_loop")
    assert [i.name for i in loop.blocks[0].inputs] == [i.name for i in loop.blocks[1].inputs]
    assert structure_findings(model) == []


@pytest.mark.invalid_models("bad.mlpackage", reason="a block input named like an outer value, on purpose")
def test_a_block_input_shadowing_an_outer_value_is_defined_twice(mlpackage, tmp_path):
    def edit(spec):
        loop = next(op for op in _main_block(spec).operations if op.type == "while_loop")
        loop.blocks[1].inputs[1].name = "x"
        proto.find_entry(next(op for op in loop.blocks[1].operations if op_name(op) == "fc_body").inputs, "x").arguments[0].name = "x"

    _, model = broken(mlpackage, tmp_path, "control_flow_ios17", edit)
    assert _summary(structure_findings(model)) == [
        ("error", "duplicate-value", "main/loop", "input 'x' of block 1 is already defined in an enclosing scope")
    ]


# -- raise_on_errors ----------------------------------------------------------------------------------------


@pytest.mark.invalid_models("bad.mlpackage", reason="three rules broken on purpose")
def test_raise_on_errors_lists_every_error(mlpackage, tmp_path):
    def edit(spec):
        _spec_version(6)(spec)
        _describe_output("y")(spec)

    _, model = broken(mlpackage, tmp_path, "ios16_lut", edit, _sentinel_of("fc2_weight_0_palettized", "lut"))
    with pytest.raises(CheckError) as e:
        raise_on_errors(model, where="out.mlpackage")
    errors = [f for f in check_program(model) if f.severity == "error"]
    assert [f.rule for f in errors] == ["spec-version", "description", "blob"]
    assert e.value.findings == errors
    lines = "\n".join(f"  {f}" for f in errors)
    assert str(e.value) == f"out.mlpackage: refusing to write a model Core ML would reject (3 problem(s)):\n{lines}"


def _sentinel_of(op: str, key: str):
    def weights(package, spec):
        _patch(package, _blob_offset(spec, op, key), b"\0\0\0\0")

    return weights


@pytest.mark.invalid_models("bad.mlpackage", reason="an undefined value on purpose")
def test_warnings_do_not_raise_and_inherited_errors_pass(mlpackage, tmp_path):
    _, model = broken(mlpackage, tmp_path, "mlp_ios16_fp32", _bind("fc2", "x", "relu9"), _weight_nan)
    findings = check_program(model)
    assert [(f.severity, f.rule) for f in findings] == [("error", "undefined-value"), ("warning", "finite-values")]
    with pytest.raises(CheckError):
        raise_on_errors(model)
    raise_on_errors(model, inherited=[findings[0]])  # what the input already broke is the user's
    model.inherited_findings = (findings[0],)
    raise_on_errors(model)


@pytest.mark.invalid_models("bad.mlpackage", reason="an undefined value on purpose")
def test_save_refuses_a_broken_program(mlpackage, tmp_path):
    _, model = broken(mlpackage, tmp_path, "mlp_ios16_fp32", _bind("fc2", "x", "relu9"))
    with pytest.raises(CheckError, match=r"refusing to write a model Core ML would reject \(1 problem"):
        model.save(tmp_path / "out.mlpackage")
    assert not (tmp_path / "out.mlpackage").exists()


def test_finding_is_the_shared_type(mlpackage):
    f = check_program(load_package(mlpackage("mlp_ios16_fp32")))
    assert f == [] and isinstance(Finding("error", "x", "y", "z"), Finding)


def test_catalog_lists_no_unknown_torch_package():
    assert NEEDS_TORCH <= set(CATALOG)


# -- never an exception: fuzzed programs ----------------------------------------------------------------------

_FUZZ_PACKAGES = ("ios16_lut", "ios16_sparse", "ios16_affine", "ios18_joint_sparse_lut", "ios18_joint_sparse_int8",
                  "ios18_lut_vector", "ios18_lut_channel_scale", "control_flow_ios17")
_OP_TYPES = sorted({"const", "linear", "constexpr_unknown"} | {t for t, _ in CONSTEXPR_CHECKS})
_MUTATION = st.tuples(
    st.sampled_from(["dtype", "dims", "type", "remove", "rebind", "opset", "output"]),
    st.integers(0, 10**6),
    st.sampled_from([0, 1, 2, 10, 11, 21, 23, 24, 25, 31, 33, 35, 37, 39, 99]),
    st.lists(st.integers(0, 300), max_size=5),
)


def _values_and_keys(op):
    out = [(e.key, e.value) for e in op.attributes if e.key != "name"]
    out += [(e.key, b.value) for e in op.inputs for b in e.value.arguments if b.HasField("value")]
    return out


def _fuzz(model, mutation) -> None:
    kind, pick, dtype, dims = mutation
    spec = model.spec
    sites = _view(model).sites  # every op in walk order, nested blocks included
    if not sites:  # the opset names no block
        return
    op = sites[pick % len(sites)].op
    values = _values_and_keys(op)
    if kind == "dtype" and values:
        values[pick % len(values)][1].type.tensorType.dataType = dtype
    elif kind == "dims" and values:
        _set_dims(values[pick % len(values)][1].type, dims)
    elif kind == "type":
        op.type = _OP_TYPES[pick % len(_OP_TYPES)]
    elif kind == "remove" and len(op.inputs):
        del op.inputs[pick % len(op.inputs)]
    elif kind == "rebind" and len(op.inputs):
        op.inputs[pick % len(op.inputs)].value.arguments[0].name = f"v{dtype}"
    elif kind == "opset":
        fn = spec.mlProgram.functions[0].value
        fn.opset = ["CoreML5", "CoreML6", "CoreML7", "CoreML8", "CoreML9", "x"][pick % 6]
    elif kind == "output" and len(op.outputs):
        out = op.outputs[pick % len(op.outputs)]
        out.type.tensorType.dataType = dtype
        _set_dims(out.type, dims)


@pytest.fixture(scope="module")
def fuzz_models(mlpackage):
    return {name: load_package(mlpackage(name)) for name in _FUZZ_PACKAGES}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(_FUZZ_PACKAGES), mutations=st.lists(_MUTATION, min_size=1, max_size=3))
def test_fuzzed_programs_give_findings_never_an_exception(fuzz_models, name, mutations):
    source = fuzz_models[name]
    model = MLProgram(proto.Model.FromString(source.spec.SerializeToString()), source.layout, source.source)
    for mutation in mutations:
        _fuzz(model, mutation)
    findings = check_program(model)
    assert all(isinstance(f, Finding) and f.severity in ("error", "warning") and f.rule in RULE_NAMES for f in findings)
    assert set(structure_findings(model)) <= set(findings)
