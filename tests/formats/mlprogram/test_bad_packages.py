"""Bad .mlpackage inputs to load_package and MLProgram.save: each is one ModelError naming the package and
the op or blob, the input is byte-identical afterwards and nothing is written; fuzzed packages (truncations
and bit flips of weight.bin and model.mlmodel, mutated manifests) give a ModelError or a model that reads
and saves, never another exception or a partial output; a failed or killed save leaves no partial package.

Weight files are checked at load (`check_blob_references`): every blobFileValue's file, its 64-byte record
(sentinel, dtype, bounds) and the declared dtype and element count, so the error names the op that needs the
blob. Broken packages are named `bad.mlpackage` and marked `invalid_models`: Core ML's validator must reject
them too (an oracle that they are broken; it aborts, which counts as a rejection, on a weight file shorter
than its header, a blob reference to model.mlmodel and a Git LFS pointer weight file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlqpipe import artifacts
from mlqpipe.artifacts import ArtifactError
from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.blob import BlobFile
from mlqpipe.formats.mlprogram.model import blob_values, load_package
from mlqpipe.formats.mlprogram.package import PACKAGE_FILES
from mlqpipe.formats.mlprogram.program import active_block, functions, walk
from tests.conftest import REPO
from .packages import varint

W = PACKAGE_FILES.weight_relpath
M = PACKAGE_FILES.model_relpath
WEIGHTS = "Data/com.apple.CoreML/weights"
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 1234\n"
DAMAGED = "the package is damaged (re-export the model)"
INCOMPLETE = "the package is incomplete (copy the whole .mlpackage directory, or re-export the model)"
CORRUPT = "the file is corrupt (re-export the model)"
TRUNCATED = "the file is truncated (re-export the model)"
DISAGREE = "the model and its weight file disagree (re-export the model)"
BAD = pytest.mark.invalid_models("bad.mlpackage", reason="broken on purpose: Core ML must refuse it too")
BASE = "mlp_ios16_fp32"  # consts fc1_weight_0 [128, 64] @64, fc1_bias_0 @32896, fc2_weight_0 @33472, ...


# --- helpers ------------------------------------------------------------------------------------------------


def copy_of(mlpackage, tmp_path: Path, target: str = "bad.mlpackage", name: str = BASE) -> Path:
    return Path(shutil.copytree(mlpackage(name), tmp_path / target))


def spec_of(pkg: Path):
    return proto.Model.FromString((pkg / M).read_bytes())


def edit_spec(pkg: Path, change) -> Path:
    spec = spec_of(pkg)
    change(spec)
    (pkg / M).write_bytes(spec.SerializeToString())
    return pkg


def main_block(spec):
    (name, function), *_ = functions(spec.mlProgram)
    return active_block(name, function, "test")


def op(spec, name: str):
    return next(s.op for s in walk(spec.mlProgram, "test") if s.name == name)


def val(spec, const: str):
    return proto.find_entry(op(spec, const).attributes, "val")


def state(path: Path):
    """What must not change: the path's digest (None when it is not a readable tree or file) and the
    names beside it."""
    try:
        d = artifacts.digest(path)
    except (OSError, ArtifactError):
        d = None
    return d, sorted(os.listdir(path.parent))


def refused(pkg: Path) -> str:
    """load_package's one-line ModelError; the package and its folder are unchanged."""
    before = state(pkg)
    with pytest.raises(ModelError) as info:
        load_package(pkg)
    assert state(pkg) == before
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{pkg}: "), message
    return message


def save_refused(model, out: Path, **kw) -> str:
    """MLProgram.save's ModelError: no `out`, nothing left beside it, the input unchanged."""
    before, beside = state(model.layout.root), sorted(os.listdir(out.parent))
    with pytest.raises(ModelError) as info:
        model.save(out, **kw)
    assert not os.path.lexists(out) and sorted(os.listdir(out.parent)) == beside
    assert state(model.layout.root) == before
    return str(info.value)


def write_pipeline(pkg: Path, inner: bytes) -> None:
    """model.mlmodel as a Pipeline (Model field 202, Pipeline.models = 1) holding one model."""
    spec = proto.Model.FromString(inner)
    outer = proto.Model(specificationVersion=spec.specificationVersion, description=spec.description)
    outer.pipeline = varint(1 << 3 | 2) + varint(len(inner)) + inner  # field 1, length-delimited
    pkg.joinpath(M).write_bytes(outer.SerializeToString())


# --- the package itself -------------------------------------------------------------------------------------


def _no_manifest(p):
    (p / "Manifest.json").unlink()


def _manifest_directory(p):
    (p / "Manifest.json").unlink()
    (p / "Manifest.json").mkdir()


def _empty_directory(p):
    shutil.rmtree(p)
    p.mkdir()


def _no_root_model(p):
    (p / M).unlink()


def _model_link_loop(p):
    (p / M).unlink()
    os.symlink("model.mlmodel", p / M)


def _manifest_link_loop(p):
    (p / "Manifest.json").unlink()
    os.symlink("Manifest.json", p / "Manifest.json")


def _model_root_id(p) -> str:
    return json.loads((p / "Manifest.json").read_bytes())["rootModelIdentifier"]


LAYOUT_CASES = [
    pytest.param(_no_manifest, "bad.mlpackage", "no Manifest.json, so not a model package (an .mlpackage directory "
                 f"holds Manifest.json and Data/); {INCOMPLETE}", marks=BAD, id="no-manifest"),
    pytest.param(lambda p: (p / "Manifest.json").write_bytes(b'{"fileFormatVersion": "1.0.0",'), "bad.mlpackage",
                 "Manifest.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 31 "
                 f"(char 30)); {DAMAGED}", marks=BAD, id="manifest-not-json"),
    pytest.param(lambda p: (p / "Manifest.json").write_bytes(b"[]"), "bad.mlpackage",
                 f"Manifest.json holds an array, not an object; {DAMAGED}", marks=BAD, id="manifest-array"),
    pytest.param(_manifest_directory, "bad.mlpackage",
                 f"Manifest.json cannot be read (Is a directory); {DAMAGED}", marks=BAD, id="manifest-directory"),
    pytest.param(_empty_directory, "bad.mlpackage", "no Manifest.json, so not a model package (an .mlpackage "
                 f"directory holds Manifest.json and Data/); {INCOMPLETE}", marks=BAD, id="empty-directory"),
    pytest.param(_no_root_model, "bad.mlpackage", "item {root!r} (model.mlmodel): Data/com.apple.CoreML/model.mlmodel "
                 f"does not exist; {INCOMPLETE}", marks=BAD, id="root-model-missing"),
    pytest.param(_model_link_loop, "bad.mlpackage", "item {root!r} (model.mlmodel): Data/com.apple.CoreML/model.mlmodel "
                 f"does not exist; {INCOMPLETE}", marks=BAD, id="model-link-loop"),
    pytest.param(_manifest_link_loop, "bad.mlpackage", "Manifest.json cannot be read (Too many levels of symbolic "
                 f"links); {DAMAGED}", marks=BAD, id="manifest-link-loop"),
    pytest.param(lambda p: (p / W).write_bytes(LFS), "bad.mlpackage", "Data/com.apple.CoreML/weights/weight.bin is a Git LFS "
                 "pointer, not the file itself; run `git lfs pull` in the repository it came from", marks=BAD, id="lfs-weights"),
    pytest.param(lambda p: (p / M).write_bytes(LFS), "bad.mlpackage", "Data/com.apple.CoreML/model.mlmodel is a Git "
                 "LFS pointer, not the file itself; run `git lfs pull` in the repository it came from", marks=BAD,
                 id="lfs-model"),
    pytest.param(lambda p: (p / "Manifest.json").write_bytes(LFS), "bad.mlpackage", "Manifest.json is a Git LFS "
                 "pointer, not the file itself; run `git lfs pull` in the repository it came from", marks=BAD,
                 id="lfs-manifest"),
]


@pytest.mark.parametrize("damage, target, message", LAYOUT_CASES)
def test_package_refusals(mlpackage, tmp_path, damage, target, message):
    pkg = copy_of(mlpackage, tmp_path, target)
    root = _model_root_id(pkg)
    damage(pkg)
    assert refused(pkg) == f"{pkg}: " + message.format(root=root)


def test_paths_that_are_not_packages(mlpackage, tmp_path):
    src = mlpackage(BASE)
    assert refused(tmp_path / "absent.mlpackage") == (f"{tmp_path}/absent.mlpackage: no such model package (check the "
                                                      "path; an ML program is a .mlpackage directory)")
    zipped = "a zipped package: unzip it first (an .mlpackage is a directory holding Manifest.json and Data/)"
    for name in ("zipped.mlpackage", "m.mlpackage.zip", "renamed.bin"):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for f in sorted(src.rglob("*")):
                z.write(f, f.relative_to(src.parent).as_posix())
        assert refused(tmp_path / name) == f"{tmp_path / name}: {zipped}"
    (tmp_path / "file.mlpackage").write_bytes((src / M).read_bytes())
    assert refused(tmp_path / "file.mlpackage") == (f"{tmp_path}/file.mlpackage: not a directory; an ML program is a "
                                                    ".mlpackage directory holding Manifest.json and Data/")
    compiled = ("compiled Core ML model (.mlmodelc); mlqpipe needs the source .mlpackage or .mlmodel (the one it was "
                "compiled from)")
    (tmp_path / "m.mlmodelc").mkdir()
    (tmp_path / "m.mlmodelc/coremldata.bin").write_bytes(b"\0" * 16)
    assert refused(tmp_path / "m.mlmodelc") == f"{tmp_path}/m.mlmodelc: {compiled}"
    shutil.copytree(src, tmp_path / "x.mlmodelc")  # a package renamed .mlmodelc is still refused by its name
    assert refused(tmp_path / "x.mlmodelc") == f"{tmp_path}/x.mlmodelc: {compiled}"
    os.symlink("loop.mlpackage", tmp_path / "loop.mlpackage")
    assert refused(tmp_path / "loop.mlpackage") == (f"{tmp_path}/loop.mlpackage: a symbolic link loop, not a model "
                                                    "package; point the link at the .mlpackage directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
@pytest.mark.parametrize("which, message", [
    (M, "Data/com.apple.CoreML/model.mlmodel: cannot read: Permission denied"),
    (W, "op 'fc1_weight_0' (const in main): Data/com.apple.CoreML/weights/weight.bin: cannot be read (Permission "
        "denied); check the path and its permissions"),
    ("Manifest.json", f"Manifest.json cannot be read (Permission denied); {DAMAGED}"),
])
def test_permission_denied(mlpackage, tmp_path, which, message):
    pkg = copy_of(mlpackage, tmp_path, "m.mlpackage")
    os.chmod(pkg / which, 0)
    try:
        assert refused(pkg) == f"{pkg}: {message}"
    finally:
        os.chmod(pkg / which, 0o644)


# --- model.mlmodel ------------------------------------------------------------------------------------------

NOT_PARSED = ("Data/com.apple.CoreML/model.mlmodel is not a valid Core ML model (protobuf parse failed: Error parsing "
              "message with type 'mlqpipe.formats.mlprogram.Model': Wire format was corrupt); is it corrupt?")


@BAD
@pytest.mark.parametrize("content, message", [
    (lambda m: b"", f"Data/com.apple.CoreML/model.mlmodel is empty; {DAMAGED}"),
    (lambda m: b"\xff" * 100, NOT_PARSED),
    (lambda m: m[: len(m) // 2], NOT_PARSED),
    (lambda m: proto.Model(specificationVersion=7).SerializeToString(),
     "Data/com.apple.CoreML/model.mlmodel holds no model type, not an ML program"),
], ids=["empty", "garbage", "truncated", "no-type"])
def test_model_files_that_are_no_model(mlpackage, tmp_path, content, message):
    pkg = copy_of(mlpackage, tmp_path)
    (pkg / M).write_bytes(content((pkg / M).read_bytes()))
    assert refused(pkg) == f"{pkg}: {message}"


@BAD
def test_text_that_is_not_utf8(mlpackage, tmp_path):
    """Our proto2 parser hands such a string over as bytes; Core ML's proto3 parser refuses the model."""
    pkg = copy_of(mlpackage, tmp_path)
    data = (pkg / M).read_bytes()
    assert data.count(b"@model_path/") == 5
    (pkg / M).write_bytes(data.replace(b"@model_path/", b"@mod\xe5l_path/"))
    assert refused(pkg) == (f"{pkg}: {M}: Value_BlobFileValue.fileName is not valid UTF-8 text; Core ML cannot read the "
                            "model (is it corrupt? re-export the model)")


def test_string_consts_read_and_strings_of_another_dtype_are_refused(mlpackage, tmp_path):
    pkg = copy_of(mlpackage, tmp_path, "m.mlpackage", name="conv_ios16")
    model = load_package(pkg)
    assert model.op_parameters(op(model.spec, "conv_pad_type_0"), "pad")["val"] == np.array("same", dtype=object)
    val(model.spec, "conv_pad_type_0").type.tensorType.dataType = proto.FLOAT32
    with pytest.raises(ModelError) as info:
        model.op_parameters(op(model.spec, "conv_pad_type_0"), "conv_pad_type_0")
    assert str(info.value) == ("conv_pad_type_0 parameter val: an immediate value of dtype FLOAT32 holds strings; the "
                               "model is damaged")


def test_other_model_types(mlpackage, tmp_path):
    from tests.builders import small_model

    pkg = copy_of(mlpackage, tmp_path, "nn.mlpackage")  # Core ML reads a neural network in a package
    (pkg / M).write_bytes(small_model().SerializeToString())
    assert refused(pkg) == (f"{pkg}: Data/com.apple.CoreML/model.mlmodel holds a neuralNetwork model, not an ML "
                            "program; save neural networks as .mlmodel files")
    pkg = copy_of(mlpackage, tmp_path, "pipeline.mlpackage")
    write_pipeline(pkg, (pkg / M).read_bytes())
    assert refused(pkg) == (f"{pkg}: Data/com.apple.CoreML/model.mlmodel holds a pipeline model, not an ML program; "
                            "pipelines inside packages (e.g. a detector followed by non-maximum suppression) are not "
                            "supported yet: compress the ML program before assembling the pipeline")


@BAD
def test_a_function_without_its_opset_block(mlpackage, tmp_path):
    pkg = edit_spec(copy_of(mlpackage, tmp_path), lambda s: setattr(s.mlProgram.functions[0].value, "opset", "CoreML99"))
    assert refused(pkg) == (f"{pkg}: function 'main' declares opset 'CoreML99' but has no block for it (blocks: "
                            "CoreML6); the model is damaged (re-export it)")


# --- weight files: checked at load, the error names the op ------------------------------------------------------


def _set_blob(const: str, **fields):
    def change(spec):
        ref = val(spec, const).blobFileValue
        for k, v in fields.items():
            setattr(ref, k, v)
    return change


def _bytes_at(at: int, data: bytes):
    def change(pkg):
        b = bytearray((pkg / W).read_bytes())
        b[at : at + len(data)] = data
        (pkg / W).write_bytes(bytes(b))
    return change


def _truncate(size: int):
    def change(pkg):
        (pkg / W).write_bytes((pkg / W).read_bytes()[:size])
    return change


def _declare(const: str, dtype=None, shape=None):
    def change(spec):
        t = val(spec, const).type.tensorType
        if dtype is not None:
            t.dataType = dtype
        if shape is not None:
            del t.dimensions[:]
            for n in shape:
                t.dimensions.add().constant.size = n
            t.rank = len(shape)
    return change


def _untyped(spec):
    val(spec, "fc1_weight_0").type.Clear()


FC1 = "op 'fc1_weight_0' (const in main)"
WB = "Data/com.apple.CoreML/weights/weight.bin"
BLOB_CASES = [
    pytest.param(lambda p: (p / W).unlink(), None, "bad.mlpackage",
                 f"{FC1}: blob file '@model_path/weights/weight.bin' ({WB}) does not exist; {INCOMPLETE}",
                 marks=BAD, id="missing"),
    pytest.param(_truncate(40000), None, "bad.mlpackage",
                 f"op 'fc2_weight_0' (const in main): {WB}: blob at offset 33472: its 32768 bytes of data at offset "
                 f"33536 end beyond the end of the file (40000 bytes); {TRUNCATED}", marks=BAD, id="truncated-data"),
    pytest.param(_truncate(33472 + 32), None, "bad.mlpackage",
                 f"op 'fc2_weight_0' (const in main): {WB}: blob at offset 33472: the offset is outside the blob "
                 "records of this 33504-byte file; the model refers to another weight file or this one is truncated "
                 "(re-export the model)", marks=BAD, id="truncated-record"),
    pytest.param(_truncate(10), None, "bad.mlpackage",
                 f"{FC1}: {WB}: 10 bytes is shorter than the 64-byte blob storage header; {TRUNCATED}", marks=BAD,
                 id="truncated-header"),
    pytest.param(_truncate(0), None, "bad.mlpackage",
                 f"{FC1}: {WB}: the file is empty, it has no blob storage header; {TRUNCATED}", marks=BAD, id="empty"),
    pytest.param(lambda p: ((p / W).unlink(), (p / W).mkdir()), None, "bad.mlpackage",
                 f"{FC1}: blob file '@model_path/weights/weight.bin' ({WB}) is a folder, not a file; {DAMAGED}",
                 marks=BAD, id="folder"),
    pytest.param(_bytes_at(4, struct.pack("<I", 3)), None, "bad.mlpackage",
                 f"{FC1}: {WB}: blob storage version 3, expected 2; this is not an ML-program weight file (re-export "
                 "the model)", marks=BAD, id="version"),
    pytest.param(_bytes_at(33472, struct.pack("<I", 0xDEADBEEE)), None, "bad.mlpackage",
                 f"op 'fc2_weight_0' (const in main): {WB}: blob at offset 33472: sentinel 0xdeadbeee is not "
                 f"0xDEADBEEF; {CORRUPT}", marks=BAD, id="sentinel"),
    pytest.param(_bytes_at(68, struct.pack("<I", 1)), None, "bad.mlpackage",
                 f"{FC1}: {WB}: blob at offset 64: the blob holds float16 (code 1), the model declares float32 (code 2); "
                 f"{DISAGREE}", marks=BAD, id="blob-dtype"),
    pytest.param(_bytes_at(68, struct.pack("<I", 99)), None, "bad.mlpackage",
                 f"{FC1}: {WB}: blob at offset 64: unknown data type code 99 (known: 1..17); the file is corrupt or from "
                 "a newer Core ML (re-export the model)", marks=BAD, id="unknown-dtype"),
    pytest.param(None, _declare("fc1_weight_0", dtype=proto.FLOAT16), "bad.mlpackage",
                 f"{FC1}: {WB}: blob at offset 64: the blob holds float32 (code 2), the model declares float16 "
                 f"(code 1); {DISAGREE}", marks=BAD, id="declared-dtype"),
    pytest.param(None, _declare("fc1_weight_0", shape=(128, 63)), "bad.mlpackage",
                 f"{FC1}: {WB}: blob at offset 64: the blob holds 8192 float32 values, the model declares 8064; "
                 f"{DISAGREE}", marks=BAD, id="count"),
    pytest.param(None, _declare("fc1_weight_0", dtype=proto.INT64), "bad.mlpackage",
                 f"{FC1}: dtype INT64 cannot be stored in a weight file", marks=BAD, id="no-blob-dtype"),
    pytest.param(None, _untyped, "bad.mlpackage",
                 f"{FC1}: a weight-file value without a tensor type; the model is damaged", marks=BAD, id="untyped"),
    pytest.param(None, _set_blob("fc1_weight_0", offset=1 << 40), "bad.mlpackage",
                 f"{FC1}: {WB}: blob at offset {1 << 40}: the offset is outside the blob records of this 67712-byte "
                 "file; the model refers to another weight file or this one is truncated (re-export the model)",
                 marks=BAD, id="offset-beyond"),
    pytest.param(None, _set_blob("fc2_weight_0", offset=33472 + 8), "bad.mlpackage",
                 f"op 'fc2_weight_0' (const in main): {WB}: blob at offset 33480: the offset is not a multiple of 64 "
                 "(blob records are 64-byte aligned); the offset or the file is corrupt (re-export the model)",
                 marks=BAD, id="offset-misaligned"),
    pytest.param(None, _set_blob("fc2_weight_0", offset=0), "bad.mlpackage",
                 f"op 'fc2_weight_0' (const in main): {WB}: blob at offset 0: the offset is outside the blob records "
                 "of this 67712-byte file; the model refers to another weight file or this one is truncated (re-export "
                 "the model)", marks=BAD, id="offset-header"),
    pytest.param(None, _set_blob("fc1_weight_0", fileName="@model_path/model.mlmodel"), "bad.mlpackage",
                 f"{FC1}: blob file '@model_path/model.mlmodel' is a reference outside the weights folder; weights must "
                 "be in Data/com.apple.CoreML/weights/ and named '@model_path/...' (re-export the model)",
                 marks=BAD, id="outside-weights"),
    pytest.param(None, _set_blob("fc1_weight_0", fileName="@model_path/weights/../../../Manifest.json"), "bad.mlpackage",
                 f"{FC1}: blob file '@model_path/weights/../../../Manifest.json' is a reference outside the weights "
                 "folder; weights must be in Data/com.apple.CoreML/weights/ and named '@model_path/...' (re-export the "
                 "model)", marks=BAD, id="dotdot"),
    pytest.param(None, _set_blob("fc1_weight_0", fileName="/etc/passwd"), "bad.mlpackage",
                 f"{FC1}: blob file '/etc/passwd' is a reference outside the weights folder; weights must be in "
                 "Data/com.apple.CoreML/weights/ and named '@model_path/...' (re-export the model)", marks=BAD, id="absolute"),
    pytest.param(None, _set_blob("fc1_bias_0", fileName="@model_path/weights/other.bin"), "bad.mlpackage",
                 "op 'fc1_bias_0' (const in main): blob file '@model_path/weights/other.bin' "
                 f"(Data/com.apple.CoreML/weights/other.bin) does not exist; {INCOMPLETE}", marks=BAD, id="other-file"),
]


@pytest.mark.parametrize("damage_file, damage_spec, target, message", BLOB_CASES)
def test_weight_file_refusals_name_the_op(mlpackage, tmp_path, damage_file, damage_spec, target, message):
    pkg = copy_of(mlpackage, tmp_path, target)
    if damage_file:
        damage_file(pkg)
    if damage_spec:
        edit_spec(pkg, damage_spec)
    assert refused(pkg) == f"{pkg}: {message}"


@BAD
def test_constexpr_parameters_are_named(mlpackage, tmp_path):
    """iOS18 constexpr parameters are input bindings; the message names the op and the parameter."""
    pkg = copy_of(mlpackage, tmp_path, name="ios18_int4_block")
    spec = spec_of(pkg)
    site = next(s for s in walk(spec.mlProgram, "test") if s.op.type == "constexpr_blockwise_shift_scale")
    offset = proto.find_entry(site.op.inputs, "data").arguments[0].value.blobFileValue.offset
    b = bytearray((pkg / W).read_bytes())
    b[offset : offset + 4] = bytes(4)
    (pkg / W).write_bytes(bytes(b))
    assert refused(pkg) == (f"{pkg}: op {site.name!r} (constexpr_blockwise_shift_scale in main) parameter 'data': {WB}: "
                            f"blob at offset {offset}: sentinel 0x00000000 is not 0xDEADBEEF; {CORRUPT}")


def test_no_weight_file_is_needed_without_blob_values(mlpackage, tmp_path):
    pkg = copy_of(mlpackage, tmp_path, "m.mlpackage", name="no_weights_ios16")
    assert not (pkg / W).exists()
    model = load_package(pkg)
    assert list(blob_values(model.spec)) == []
    model.save(tmp_path / "out.mlpackage", check=False)
    assert load_package(tmp_path / "out.mlpackage").spec == model.spec and not (tmp_path / "out.mlpackage" / W).exists()


def test_several_weight_files_in_the_weights_folder(mlpackage, tmp_path):
    pkg = copy_of(mlpackage, tmp_path, "m.mlpackage")
    shutil.copyfile(pkg / W, pkg / WEIGHTS / "second.bin")
    edit_spec(pkg, _set_blob("fc2_weight_0", fileName="@model_path/weights/second.bin"))
    model = load_package(pkg)
    original = load_package(mlpackage(BASE))
    values = {s.name: np.array(model.value_array(v, s.name)) for s, v in blob_values(model.spec)}
    assert values.keys() == {s.name for s, _ in blob_values(original.spec)}
    for s, v in blob_values(original.spec):
        np.testing.assert_array_equal(values[s.name], original.value_array(v, s.name))
    out = tmp_path / "out.mlpackage"
    model.save(out, check=False)
    assert sorted(p.name for p in (out / WEIGHTS).iterdir()) == ["second.bin", "weight.bin"]
    with BlobFile(out / WEIGHTS / "second.bin") as second:
        assert second.count == 1  # only the blob fc2 refers to
    again = load_package(out)
    for s, v in blob_values(again.spec):
        np.testing.assert_array_equal(again.value_array(v, s.name), values[s.name])


# --- the load-time check is cheap ------------------------------------------------------------------------------

_RECORD = struct.Struct("<IIQQQ32x")


def _big_package(src: Path, root: Path, blobs: int, per_blob: int) -> Path:
    """`src` plus `blobs` unused fp32 consts [per_blob] in a sparse second weight file (only headers and
    records are written: the data are holes), i.e. blobs * per_blob weights."""
    pkg = Path(shutil.copytree(src, root))
    size = per_blob * 4
    stride = 64 + -(-size // 64) * 64
    with open(pkg / WEIGHTS / "big.bin", "wb") as f:
        f.write(struct.pack("<II56x", blobs, 2))
        for i in range(blobs):
            f.seek(64 + i * stride)
            f.write(_RECORD.pack(0xDEADBEEF, 2, size, 64 + i * stride + 64, 0))
        f.truncate(64 + blobs * stride - (stride - 64 - size))

    def add_consts(spec):
        block = main_block(spec)
        for i in range(blobs):
            c = block.operations.add(type="const")
            c.outputs.add(name=f"big_{i}").type.tensorType.dataType = proto.FLOAT32
            t = c.outputs[0].type.tensorType
            t.rank = 1
            t.dimensions.add().constant.size = per_blob
            name = proto.Value()
            name.type.tensorType.dataType = proto.STRING
            name.immediateValue.tensor.strings.values.append(f"big_{i}")
            proto.set_entry(c.attributes, "name", name)
            v = proto.Value()
            v.type.CopyFrom(c.outputs[0].type)
            v.blobFileValue.fileName = "@model_path/weights/big.bin"
            v.blobFileValue.offset = 64 + i * stride
            proto.set_entry(c.attributes, "val", v)

    return edit_spec(pkg, add_consts)


def test_the_load_time_check_reads_records_only_and_is_fast(mlpackage, tmp_path, monkeypatch):
    """50M weights (200 MB, sparse) in 200 blobs: the check reads 200 records, no data, in milliseconds."""
    pkg = _big_package(mlpackage(BASE), tmp_path / "big.mlpackage", blobs=200, per_blob=250_000)
    assert (pkg / WEIGHTS / "big.bin").stat().st_size > 200_000_000
    for reader in ("array", "raw", "span"):
        monkeypatch.setattr(BlobFile, reader, lambda *a, **k: pytest.fail("the load-time check read blob data"))
    started = time.perf_counter()
    model = load_package(pkg)
    seconds = time.perf_counter() - started
    assert len(list(blob_values(model.spec))) == 205
    assert seconds < 0.5, f"load_package took {seconds:.3f} s for 205 blobs"
    last = 64 + 199 * 1_000_064
    with open(pkg / WEIGHTS / "big.bin", "r+b") as f:  # the last record broken: found, and named
        f.seek(last)
        f.write(struct.pack("<I", 0))
    with pytest.raises(ModelError) as info:
        load_package(pkg)
    assert str(info.value) == (f"{pkg}: op 'big_199' (const in main): {WEIGHTS}/big.bin: blob at offset {last}: "
                               f"sentinel 0x00000000 is not 0xDEADBEEF; {CORRUPT}")
    with open(pkg / WEIGHTS / "big.bin", "r+b") as f:
        f.seek(last)
        f.write(struct.pack("<I", 0xDEADBEEF))


# --- undefined variables -----------------------------------------------------------------------------------------


def _unbound(spec):
    linear = op(spec, "fc2")
    proto.find_entry(linear.inputs, "x").arguments[0].name = "nowhere"


@pytest.mark.invalid_models("bad.mlpackage", "out.mlpackage", reason="an op reads a variable nothing defines")
def test_an_undefined_variable_loads_and_is_refused_by_a_checked_save(mlpackage, tmp_path):
    pkg = edit_spec(copy_of(mlpackage, tmp_path), _unbound)
    model = load_package(pkg)  # an SSA error is check.py's to report, not the loader's
    assert model.op_parameters(op(model.spec, "fc2"), "fc2")["x"] == "nowhere"
    model.save(tmp_path / "out.mlpackage", check=False)  # an unchecked save writes what it was given
    assert spec_of(tmp_path / "out.mlpackage") == model.spec
    pytest.importorskip("mlqpipe.formats.mlprogram.check")
    message = save_refused(model, tmp_path / "checked.mlpackage")
    assert re.match(rf"{re.escape(str(tmp_path))}/checked\.mlpackage: .*main/fc2: parameter 'x' reads 'nowhere'", message,
                    re.S), message


# --- saving: a failed or killed save leaves nothing partial, the next save heals ---------------------------------


def test_a_weight_file_truncated_after_load_fails_the_save_and_the_next_save_heals(mlpackage, tmp_path):
    pkg = copy_of(mlpackage, tmp_path, "m.mlpackage")
    model = load_package(pkg)
    good = (pkg / W).read_bytes()
    (pkg / W).write_bytes(good[:40000])  # fc1 copies, fc2's data are cut: the save fails partway
    out = tmp_path / "out.mlpackage"
    assert save_refused(model, out, check=False) == (f"{pkg}: {WB}: blob at offset 33472: its 32768 bytes of data at "
                                                     f"offset 33536 end beyond the end of the file (40000 bytes); {TRUNCATED}")
    (pkg / W).write_bytes(good)
    model.save(out, check=False)
    assert artifacts.leftovers(out) == [] and sorted(os.listdir(tmp_path)) == ["m.mlpackage", "out.mlpackage"]
    assert (out / W).read_bytes() == good and spec_of(out) == model.spec


def test_a_weight_file_that_shrinks_while_mapped_is_an_error_not_a_crash(mlpackage, tmp_path):
    """Reading a mapped page past the end of a truncated file would kill the process (SIGBUS): a BlobFile
    refuses first, and a model maps a weight file that changed since it was opened anew."""
    pkg = copy_of(mlpackage, tmp_path, "m.mlpackage")
    good = (pkg / W).read_bytes()
    with BlobFile(pkg / W, "weight.bin") as blobs:
        blobs.array(33472, 2, 8192)
        with open(pkg / W, "r+b") as f:
            f.truncate(4096)
        with pytest.raises(ModelError) as info:
            blobs.array(33472, 2, 8192)
    assert str(info.value) == (f"weight.bin: the file shrank from {len(good)} to 4096 bytes while it was open (another "
                               "program changed it); restore the file and load the model again")
    (pkg / W).write_bytes(good)
    model = load_package(pkg)
    site, value = next(iter(blob_values(model.spec)))
    model.value_array(value, site.name)  # the weight file is now open and mapped
    with open(pkg / W, "r+b") as f:
        f.truncate(4096)
    assert save_refused(model, tmp_path / "out.mlpackage", check=False) == (
        f"{pkg}: {WB}: blob at offset 64: its 32768 bytes of data at offset 128 end beyond the end of the file (4096 "
        f"bytes); {TRUNCATED}")
    (pkg / W).write_bytes(good)
    model.save(tmp_path / "out.mlpackage", check=False)
    assert (tmp_path / "out.mlpackage" / W).read_bytes() == good


_KILLED_SAVE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from mlqpipe.formats.mlprogram import blob, model as m
    copies = []
    real = blob.BlobWriter.copy_from
    def copy_from(self, reader, offset):
        copies.append(offset)
        if len(copies) == 3:
            os._exit(9)  # killed in the middle of weight.bin
        return real(self, reader, offset)
    blob.BlobWriter.copy_from = copy_from
    m.load_package(sys.argv[1]).save(sys.argv[2], check=False)
""")


def test_a_killed_save_leaves_no_package_and_the_next_save_heals(mlpackage, tmp_path):
    pkg = copy_of(mlpackage, tmp_path, "m.mlpackage")
    out = tmp_path / "out.mlpackage"
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(pkg), str(out), str(REPO)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert not out.exists() and [lo.state for lo in artifacts.leftovers(out)] == ["tmp"]
    model = load_package(pkg)
    model.save(out, check=False)
    assert artifacts.leftovers(out) == [] and sorted(os.listdir(tmp_path)) == ["m.mlpackage", "out.mlpackage"]
    assert (out / W).read_bytes() == (pkg / W).read_bytes() and spec_of(out) == model.spec


# --- fuzzing -------------------------------------------------------------------------------------------------------

FUZZED = ["mlp_ios16_fp32", "ios18_int4_block", "ios16_lut"]


def _survives(pkg: Path) -> str:
    """load, read every parameter (every blob value included), save unchecked, reload: a ModelError or
    success at each step, nothing else; a refused save leaves no output and nothing beside it; the input
    is unchanged."""
    out = pkg.parent / "out.mlpackage"
    before = state(pkg)
    try:
        model = load_package(pkg)
    except ModelError as e:
        assert str(e).startswith(f"{pkg}: ") and "\n" not in str(e), str(e)
        assert state(pkg) == before
        return "refused at load"
    try:
        for s in walk(model.spec.mlProgram, str(pkg)):
            model.op_parameters(s.op, s.name)
        for s, v in blob_values(model.spec):
            model.value_array(v, s.name)
        model.save(out, check=False)
    except ModelError as e:
        assert str(e) and not os.path.lexists(out), str(e)
        assert sorted(os.listdir(pkg.parent)) == [pkg.name]
        return "refused when read or saved"
    finally:
        model.close()
    assert state(pkg)[0] == before[0] and sorted(os.listdir(pkg.parent)) == sorted([pkg.name, out.name])
    again = load_package(out)  # what was saved reads back, with the same values
    for (s, v), (_, w) in zip(blob_values(model.spec), blob_values(again.spec)):
        np.testing.assert_array_equal(again.value_array(w, s.name), model.value_array(v, s.name))
    return "read and saved"


def _fuzz_case(tmp_path_factory, mlpackage, name: str) -> Path:
    return Path(shutil.copytree(mlpackage(name), tmp_path_factory.mktemp("fuzz") / "in.pkg"))


def _run(pkg: Path) -> None:
    try:
        event(_survives(pkg))
    finally:
        shutil.rmtree(pkg.parent)  # nothing left for the validator: fuzzed outputs are judged by _survives


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(name=st.sampled_from(FUZZED), which=st.sampled_from([W, M]), fraction=st.floats(0, 1))
def test_fuzzed_truncations(tmp_path_factory, mlpackage, name, which, fraction):
    pkg = _fuzz_case(tmp_path_factory, mlpackage, name)
    data = (pkg / which).read_bytes()
    (pkg / which).write_bytes(data[: int(len(data) * fraction)])
    _run(pkg)


@FUZZ
@given(name=st.sampled_from(FUZZED), which=st.sampled_from([W, M]),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8))
def test_fuzzed_bit_flips(tmp_path_factory, mlpackage, name, which, flips):
    pkg = _fuzz_case(tmp_path_factory, mlpackage, name)
    b = bytearray((pkg / which).read_bytes())
    for where, bit in flips:
        b[min(int(where * len(b)), len(b) - 1)] ^= 1 << bit
    (pkg / which).write_bytes(bytes(b))
    _run(pkg)


@FUZZ
@given(name=st.sampled_from(FUZZED),
       records=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzzed_blob_records(tmp_path_factory, mlpackage, name, records):
    """Bytes of the header and the first records overwritten: where bit flips at random rarely land."""
    pkg = _fuzz_case(tmp_path_factory, mlpackage, name)
    b = bytearray((pkg / W).read_bytes())
    offsets = [0] + sorted({v.blobFileValue.offset for _, v in blob_values(spec_of(pkg))})
    for record, at, byte in records:
        b[offsets[record % len(offsets)] + at] = byte
    (pkg / W).write_bytes(bytes(b))
    _run(pkg)


MANIFEST_EDITS = st.lists(st.tuples(
    st.sampled_from(["fileFormatVersion", "rootModelIdentifier", "model/path", "model/name", "weights/path",
                     "weights/name", "weights/author", "model", "weights"]),
    st.sampled_from(["delete", "set"]),
    st.none() | st.integers() | st.text(max_size=6) | st.sampled_from(["com.apple.CoreML", "com.apple.CoreML/weights",
                                                                        "weights", "..", "1.0.1", "0.1.0"])),
    min_size=1, max_size=4)


@FUZZ
@given(name=st.sampled_from(FUZZED), edits=MANIFEST_EDITS, cut=st.none() | st.floats(0, 1))
def test_fuzzed_manifests(tmp_path_factory, mlpackage, name, edits, cut):
    pkg = _fuzz_case(tmp_path_factory, mlpackage, name)
    m = json.loads((pkg / "Manifest.json").read_bytes())
    entries = m["itemInfoEntries"]
    ids = {"model": m["rootModelIdentifier"], "weights": next(i for i in entries if i != m["rootModelIdentifier"])}
    for path, how, value in edits:
        item, _, key = path.partition("/")
        if item not in ids:  # a top-level key
            target, key = m, path
        elif not key:  # a whole item
            target, key = entries, ids[item]
        else:  # a key of an item (gone if deleted before)
            target = entries.get(ids[item])
        if not isinstance(target, dict):
            continue
        if how == "delete":
            target.pop(key, None)
        else:
            target[key] = value
    data = json.dumps(m).encode("utf-8", "surrogatepass")
    (pkg / "Manifest.json").write_bytes(data if cut is None else data[: int(len(data) * cut)])
    _run(pkg)
