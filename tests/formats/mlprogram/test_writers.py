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
COMPRESSED = ["ios16_affine", "ios16_lut", "ios16_sparse", "ios18_int4_block", "ios18_lut_grouped", "ios18_joint_sparse_lut",
              "ios18_joint_sparse_int8", "ios18_lut_channel_scale"]


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


affine = pytest.importorskip("mlqpipe.quant.affine")
palette = pytest.importorskip("mlqpipe.quant.palette")
prune = pytest.importorskip("mlqpipe.quant.prune")

# (kernel, settings, decode) per compression; the weight's output axis is 0 for linear layers
KINDS = {
    "int8_per_channel": lambda: (affine.linear_quantize, affine.AffineSettings(), affine.dequantize),
    "uint8_linear_per_tensor": lambda: (affine.linear_quantize, affine.AffineSettings(mode="linear", dtype="uint8", granularity="per_tensor"),
                                        affine.dequantize),
    "lut4_uniform": lambda: (palette.palettize, palette.PaletteSettings(mode="uniform", nbits=4), palette.depalettize),
    "sparse50": lambda: (prune.prune, prune.PruneSettings(target_sparsity=0.5), prune.densify),
}
IOS18_KINDS = {
    "int4_per_block": lambda: (affine.linear_quantize, affine.AffineSettings(dtype="int4", granularity="per_block", block_size=32),
                               affine.dequantize),
    "lut4_grouped": lambda: (palette.palettize, palette.PaletteSettings(mode="uniform", nbits=4, granularity="per_grouped_channel",
                                                                        group_size=16), palette.depalettize),
    "lut3": lambda: (palette.palettize, palette.PaletteSettings(mode="uniform", nbits=3), palette.depalettize),
    "lut4_per_channel_scale": lambda: (palette.palettize, palette.PaletteSettings(mode="uniform", nbits=4, enable_per_channel_scale=True),
                                       palette.depalettize),
}
CASES = [("mlp_ios16_fp32", k) for k in KINDS] + [("mlp_ios18_fp32", k) for k in [*KINDS, *IOS18_KINDS]]


@pytest.mark.parametrize("name, kind", CASES)
def test_compressed_weights_decode_in_coremltools_as_we_meant(mlpackage, tmp_path, name, kind):
    ct = pytest.importorskip("coremltools")
    kernel, settings, decode = {**KINDS, **IOS18_KINDS}[kind]()
    model = mlqpipe.load_model(mlpackage(name))
    want = {}
    for r in mlqpipe.inventory(model):
        if len(r.shape) == 2 and r.count >= 1024:
            result = kernel(r.values(), settings)
            want[r.layer] = np.asarray(decode(result), np.float32).reshape(r.shape)
            write_result(r, result)
    model.save(tmp_path / "out.mlpackage")  # our check accepts it
    ours = {r.layer: r for r in mlqpipe.inventory(mlqpipe.load_model(tmp_path / "out.mlpackage"))}
    for layer, values in want.items():
        assert ours[layer].compressed and np.array_equal(ours[layer].values(), values), layer
    theirs = ct.optimize.coreml.decompress_weights(ct.models.MLModel(str(tmp_path / "out.mlpackage"), skip_model_load=True))
    theirs.save(str(tmp_path / "ct.mlpackage"))
    dense = {r.layer: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(tmp_path / "ct.mlpackage"))}
    for layer, values in want.items():
        assert np.array_equal(dense[layer], values), layer


@pytest.mark.parametrize("kind, message", [("int4_per_block", "int4 codes needs iOS18"), ("lut3", "a 3-bit LUT needs iOS18"),
                                           ("lut4_grouped", "per-grouped-channel or vector palettization needs iOS18"),
                                           ("lut4_per_channel_scale", "a per-channel-scaled LUT needs iOS18")])
def test_ios18_only_forms_are_refused_on_ios16(mlpackage, kind, message):
    kernel, settings, _ = IOS18_KINDS[kind]()
    model = mlqpipe.load_model(mlpackage("mlp_ios16_fp32"))
    rec = next(r for r in mlqpipe.inventory(model) if len(r.shape) == 2)
    with pytest.raises(mlqpipe.ModelError, match=message):
        write_result(rec, kernel(rec.values(), settings))
