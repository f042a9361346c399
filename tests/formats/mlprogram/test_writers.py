"""formats/mlprogram/writers.py: kernel results written into ML programs — the constexpr op of the
function's opset in place of the const, nothing else in the program changed, read back by our reader and
by coremltools 9.0 as the values we meant, accepted by our check and Core ML's validator."""

import numpy as np
import pytest

import mlqpipe
from mlqpipe.artifacts import read_tree
from mlqpipe.formats.mlprogram.program import walk
from mlqpipe.formats.mlprogram.writers import write_result
from mlqpipe.quant.results import Float16Result, Float32Result

PLAIN = ["mlp_ios16_fp32", "mlp_ios18_fp32", "conv_ios16", "shared_const_ios16", "multifunction_ios18"]
COMPRESSED = ["ios16_affine", "ios16_lut", "ios16_sparse", "ios18_int4_block", "ios18_lut_grouped", "ios18_joint_sparse_lut"]


def _compress(model):
    """fp16 storage for every fp32 weight of rank >= 2, decompression of every compressed one; returns the
    values each record should decode to afterwards."""
    want = {}
    for r in mlqpipe.inventory(model):
        if r.compressed:
            want[r.id] = r.values()
            write_result(r, Float32Result(want[r.id].ravel()))
        elif r.dtype == "fp32" and len(r.shape) >= 2:
            want[r.id] = r.values().astype(np.float16).astype(np.float32)
            write_result(r, Float16Result(r.values().astype(np.float16).ravel()))
    return want


def _ops(model):
    """Every op's bytes with weight-file offsets zeroed (saving moves blobs; that is not a change)."""
    out = {}
    for s in walk(model.spec.mlProgram, ""):
        op = type(s.op).FromString(s.op.SerializeToString())
        values = [e.value for e in op.attributes] + [b.value for e in op.inputs for b in e.value.arguments if b.HasField("value")]
        for v in values:
            if v.HasField("blobFileValue"):
                v.blobFileValue.offset = 0
        out[(s.function, s.block, s.name)] = op.SerializeToString()
    return out


@pytest.mark.parametrize("name", PLAIN + COMPRESSED)
def test_written_weights_read_back_and_nothing_else_changes(mlpackage, tmp_path, name):
    src = mlpackage(name)
    model = mlqpipe.load_model(src)
    before = _ops(model)
    want = _compress(model)
    assert want
    model.save(tmp_path / "out.mlpackage")  # checked: our rules pass
    out = mlqpipe.load_model(tmp_path / "out.mlpackage")
    got = {r.id: r for r in mlqpipe.inventory(out)}
    for rid, values in want.items():
        rec = got[rid]
        assert np.array_equal(rec.values(), values), rid
        assert str(rec.storage) == ("float16" if rec.layer_type == "constexpr_cast" else rec.dtype.replace("fp", "float"))
    after = _ops(out)
    changed = {k for k in before if k in after and before[k] != after[k]}
    assert {k[2] for k in changed} <= {got[rid].layer for rid in want}  # only the weights' own ops
    assert set(after) <= set(before)  # no op added or renamed; decompressed chains lose their upstream ops only
    out.save(tmp_path / "again.mlpackage", check=False)
    assert read_tree(tmp_path / "again.mlpackage") == read_tree(tmp_path / "out.mlpackage")


@pytest.mark.parametrize("name", ["mlp_ios16_fp32", "mlp_ios18_fp32", "ios16_lut", "ios18_int4_block"])
def test_coremltools_reads_our_constexpr_cast_and_decompressed_consts(mlpackage, tmp_path, name):
    ct = pytest.importorskip("coremltools")
    model = mlqpipe.load_model(mlpackage(name))
    want = _compress(model)
    model.save(tmp_path / "out.mlpackage")
    theirs = ct.optimize.coreml.decompress_weights(ct.models.MLModel(str(tmp_path / "out.mlpackage"), skip_model_load=True))
    theirs.save(str(tmp_path / "ct.mlpackage"))
    dense = {r.layer: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(tmp_path / "ct.mlpackage"))}
    for rid, values in want.items():
        layer = rid.rsplit("/", 1)[-1]
        assert np.array_equal(dense[layer], values), layer


def test_a_function_below_ios16_is_refused(mlpackage):
    model = mlqpipe.load_model(mlpackage("mlp_ios15_fp32"))
    rec = next(r for r in mlqpipe.inventory(model) if len(r.shape) == 2)
    with pytest.raises(mlqpipe.ModelError, match="opset CoreML5 has no compressed-weight ops"):
        write_result(rec, Float16Result(rec.values().astype(np.float16).ravel()))
