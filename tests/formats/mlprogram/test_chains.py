"""iOS18 constexpr chains (formats/mlprogram/writers.py, readback.py; quant/joint.py): per-channel-scaled
LUTs, quantized LUTs and pruned weights whose values are palettized or quantized.

What is asserted: the chains we write decode (our decoder and coremltools' decompress_weights) to exactly
what the nested result says; they pass our check and Core ML's validator (tests/conftest.py judges every
package written under tmp_path); the weight's op keeps its name and output, the upstream ops sit right
before it with typed outputs; coremltools' own joint outputs, read back, hold exactly the parameters our
joint kernels compute from the same input weight, and ours are written op for op as coremltools writes
them (k-means excepted: mlqpipe's k-means is not scikit-learn's, so there only the structure, the mask
and the scales are compared); a read-back weight can be compressed again on top; iOS16 refuses chains.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import mlqpipe
from mlqpipe.formats.mlprogram import constexpr, proto
from mlqpipe.formats.mlprogram.check import check_program
from mlqpipe.formats.mlprogram.program import op_name, tensor_type, walk
from mlqpipe.formats.mlprogram.readback import compressed_result
from mlqpipe.formats.mlprogram import writers
from mlqpipe.formats.mlprogram.writers import write_result
from mlqpipe.quant import joint
from mlqpipe.quant.affine import AffineSettings
from mlqpipe.quant.palette import PaletteSettings, palettize
from mlqpipe.quant.prune import PruneSettings, prune
from mlqpipe.quant.results import AffineResult, Float16Result, Float32Result, PaletteResult, SparseResult

from . import packages as P

UNIFORM4 = PaletteSettings(mode="uniform", nbits=4)
GROUPED4 = PaletteSettings(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16)
PCS = PaletteSettings(mode="uniform", nbits=4, enable_per_channel_scale=True)
HALF = PruneSettings(target_sparsity=0.5)
PER_TENSOR = AffineSettings(granularity="per_tensor")

# kind -> (result of a weight, the chain's op types with their name suffixes, upstream first)
SS, LD, LS, SD, SBS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_lut_to_sparse",
                       "constexpr_sparse_to_dense", "constexpr_sparse_blockwise_shift_scale")
CHAINS = {
    "per_channel_scale": (lambda w: palettize(w, PCS), [(SS, "_lut_pcs"), (LD, "")]),
    "grouped_per_channel_scale": (lambda w: palettize(w, PaletteSettings(mode="uniform", nbits=3, granularity="per_grouped_channel",
                                                                          group_size=16, enable_per_channel_scale=True)),
                                  [(SS, "_lut_pcs"), (LD, "")]),
    "lut_int8": (lambda w: joint.quantize_lut(palettize(w, UNIFORM4)), [(SS, "_lut_quantized"), (LD, "")]),
    "lut_uint8_per_channel_scale": (lambda w: joint.quantize_lut(palettize(w, PCS), "uint8", "linear"),
                                    [(SS, "_lut_quantized"), (SS, "_lut_pcs"), (LD, "")]),
    "sparse_lut": (lambda w: joint.palettize_nonzero(prune(w, HALF), UNIFORM4), [(LS, "_nonzero_palettized"), (SD, "")]),
    "sparse_lut2_grouped": (lambda w: joint.palettize_nonzero(prune(w, HALF), PaletteSettings(mode="uniform", nbits=2,
                                                                                              granularity="per_grouped_channel", group_size=8)),
                            [(LS, "_nonzero_palettized"), (SD, "")]),
    "sparse_int8": (lambda w: joint.quantize_nonzero(prune(w, HALF), AffineSettings()), [(SBS, "_nonzero_quantized"), (SD, "")]),
    "sparse_uint4_block": (lambda w: joint.quantize_nonzero(prune(w, HALF), AffineSettings(mode="linear", dtype="uint4",
                                                                                           granularity="per_block", block_size=16)),
                           [(SBS, "_nonzero_quantized"), (SD, "")]),
    "sparse_lut_int8": (lambda w: joint.quantize_nonzero(joint.palettize_nonzero(prune(w, HALF), UNIFORM4), PER_TENSOR),
                        [(SS, "_nonzero_palettized_lut_quantized"), (LS, "_nonzero_palettized"), (SD, "")]),
}


# -- helpers ------------------------------------------------------------------------------------------------


def _big(model):
    return [r for r in mlqpipe.inventory(model) if len(r.shape) == 2 and r.count >= 1024]


def _write(model, make) -> dict:
    """Write `make(values)` into every big weight; {layer: the dense values it must decode to}."""
    want = {}
    for r in _big(model):
        result = make(r.values())
        want[r.layer] = joint.dense(result).astype(np.float32)
        write_result(r, result)
    return want


def _by_consumer(model) -> dict:
    """The weights (rank 2) by the op reading them: the names coremltools' passes keep."""
    return {r.consumers[0].op: r for r in mlqpipe.inventory(model) if r.consumers and len(r.shape) == 2}


def _chain(rec) -> list:
    """[(op type, {parameter: (MIL dtype, array)} of its literals)] of a weight's chain, upstream first."""
    model = rec.handle.model
    out = []
    for s in constexpr.chain_sites(model, rec.handle.producers, rec.handle.site):
        literals = {k: (v.type.tensorType.dataType, np.asarray(constexpr.read_value(model, v, "")))
                    for k, v in constexpr.parameter_values(s.op).items() if v is not None and not isinstance(v, str)}
        out.append((s.op.type, literals))
    return out


def _same_chain(ours, theirs, values=True) -> None:
    """Same op types in order, the same literal parameters (dtype, shape and, with `values`, numbers) where
    both hold a literal (coremltools binds some masks where we do, or the reverse)."""
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    for (kind, a), (_, b) in zip(ours, theirs):
        for key in a.keys() & b.keys():
            assert a[key][0] == b[key][0] and a[key][1].shape == b[key][1].shape, (kind, key)
            if values:
                assert np.array_equal(a[key][1], b[key][1]), (kind, key)


def _same_result(a, b) -> None:
    """Nested results equal field by field (arrays: same dtype, shape and numbers)."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        return
    if a is None or isinstance(a, (int, str)):
        assert a == b
        return
    for field in a.__dataclass_fields__:
        _same_result(getattr(a, field), getattr(b, field))


def _decompressed(ct, path: Path, tmp_path: Path) -> dict:
    theirs = ct.optimize.coreml.decompress_weights(ct.models.MLModel(str(path), skip_model_load=True))
    theirs.save(str(tmp_path / "ct.mlpackage"))
    return {r.layer: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(tmp_path / "ct.mlpackage"))}


def _fp16_model():
    """iOS18, fp16 consts between casts: linear "fc" [128, 96] and matmul "mm" y [128, 84], both >= 10,000
    values (coremltools' k-means of fp16 weights that large is its exact kmeans1d)."""
    from coremltools.converters.mil.mil import Builder as mb

    w, b, y = P._weights(21, (128, 96), (128,), (128, 84), dtype=np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 96))], opset_version=P._target(18))
    def prog(x):
        x = mb.cast(x=x, dtype="fp16", name="x_fp16")
        x = mb.relu(x=mb.linear(x=x, weight=w, bias=b, name="fc"), name="relu")
        return mb.cast(x=mb.matmul(x=x, y=y, name="mm"), dtype="fp32", name="y")

    return P._convert(prog, 18)


@pytest.fixture(scope="module")
def extra():
    """coremltools' joint outputs beyond the catalog, built from the catalog's iOS18 MLP (or, `fp16_*`, from
    `fp16_base`) on first use, outside pytest's base temp like the catalog: they are inputs."""
    ct = pytest.importorskip("coremltools")
    recipes = {
        "fp16_sparse": (P._prune(target_sparsity=0.5),),
        "fp16_sparse_kmeans": (P._prune(target_sparsity=0.5), P._palettize(mode="kmeans", nbits=4, joint_compression=True)),
        "lut_int8": (P._palettize(mode="uniform", nbits=4), P._joint_quantize(dtype="int8", granularity="per_tensor")),
        "lut_uint8_linear_grouped": (P._palettize(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16),
                                     P._joint_quantize(mode="linear", dtype="uint8", granularity="per_tensor")),
        "lut_per_channel_scale": (P._palettize(mode="uniform", nbits=4, enable_per_channel_scale=True),),
        "sparse_lut_grouped": (P._prune(target_sparsity=0.5),
                               P._palettize(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16, joint_compression=True)),
        "sparse_lut_int8": (P._prune(target_sparsity=0.5), P._palettize(mode="uniform", nbits=4, joint_compression=True),
                            P._joint_quantize(dtype="int8", granularity="per_tensor")),
    }
    directory = Path(tempfile.mkdtemp(prefix="mlqpipe-chains-"))
    built: dict = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = directory / f"{name}.mlpackage"
            if name == "fp16_base":
                _fp16_model().save(str(built[name]))
            else:
                base = P._mlp18
                if name.startswith("fp16_"):
                    base = lambda: ct.models.MLModel(str(get("fp16_base")), skip_model_load=True)  # noqa: E731
                P._compressed(base, *recipes[name])(built[name])
        return built[name]

    yield get
    shutil.rmtree(directory, ignore_errors=True)


# -- writing chains -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CHAINS))
def test_written_chains_decode_as_meant_with_typed_upstream_ops_before_the_weight(mlpackage, tmp_path, kind):
    ct = pytest.importorskip("coremltools")
    make, ops = CHAINS[kind]
    model = mlqpipe.load_model(mlpackage("mlp_ios18_fp32"))
    names_before = [s.name for s in walk(model.spec.mlProgram, "")]
    want = _write(model, make)
    assert not [f for f in check_program(model) if f.severity == "error"]
    model.save(tmp_path / "out.mlpackage")
    out = mlqpipe.load_model(tmp_path / "out.mlpackage")
    recs = {r.layer: r for r in mlqpipe.inventory(out)}
    order = [s for s in walk(out.spec.mlProgram, "")]
    added = []
    for layer, values in want.items():
        rec = recs[layer]  # the weight's op keeps its name (and output: its consumer still reads it)
        assert np.array_equal(rec.values(), values), layer
        assert rec.layer_type == "+".join(t for t, _ in ops)
        at = next(i for i, s in enumerate(order) if s.name == layer)
        chain = order[at - len(ops) + 1: at + 1]
        assert [(s.op.type, s.name) for s in chain] == [(t, layer + suffix) for t, suffix in ops]
        assert rec.handle.site.op.outputs[0].name == layer
        for s in chain[:-1]:
            added.append(s.name)
            types = [tensor_type(o.type) for o in s.op.outputs]
            if s.op.type in (LS, SBS):  # (mask, values)
                count = int(np.count_nonzero(values))
                assert [o.name for o in s.op.outputs] == [f"{s.name}_0", f"{s.name}_1"]
                assert types == [(proto.UINT1, rec.shape), (proto.FLOAT32, (count,))]
            else:
                assert [o.name for o in s.op.outputs] == [s.name] and types[0][0] == proto.FLOAT32
    assert [s.name for s in order if s.name not in added] == names_before  # nothing else added, moved or renamed
    dense = _decompressed(ct, tmp_path / "out.mlpackage", tmp_path)
    for layer, values in want.items():
        assert np.array_equal(dense[layer], values), layer


def test_a_weight_shared_by_two_functions_gets_the_chain_in_both_stored_once(mlpackage, tmp_path):
    model = mlqpipe.load_model(mlpackage("multifunction_ios18"))
    shared = next(r for r in mlqpipe.inventory(model) if len(r.functions) == 2)
    result = CHAINS["sparse_lut_int8"][0](shared.values())
    write_result(shared, result)
    model.save(tmp_path / "out.mlpackage")
    out = mlqpipe.load_model(tmp_path / "out.mlpackage")
    rec = next(r for r in mlqpipe.inventory(out) if r.layer == shared.layer)
    assert rec.functions == shared.functions  # one record: both chains read the same blobs
    assert np.array_equal(rec.values(), joint.dense(result))
    for function in shared.functions:
        names = [s.name for s in walk(out.spec.mlProgram, "") if s.function == function]
        assert names.count(f"{shared.layer}_nonzero_palettized") == 1


def test_rewriting_a_chain_names_new_ops_uniquely_and_drops_the_old_ones(mlpackage, tmp_path):
    model = mlqpipe.load_model(mlpackage("mlp_ios18_fp32"))
    rec = _big(model)[0]
    w = rec.values()  # (a record's values are read through the chain it had when it was listed)
    again, twice = palettize(w, GROUPED4), joint.quantize_lut(palettize(w, PCS))
    write_result(rec, palettize(w, PCS))
    write_result(rec, twice)  # the old upstream op still holds its name while the new one is named
    names = [s.name for s in walk(model.spec.mlProgram, "")]
    assert f"{rec.layer}_lut_pcs" not in names and f"{rec.layer}_lut_pcs_1" in names
    write_result(rec, again)  # no upstream ops any more
    assert not [n for n in (s.name for s in walk(model.spec.mlProgram, "")) if n.startswith(f"{rec.layer}_")]
    model.save(tmp_path / "out.mlpackage")
    out = {r.layer: r for r in mlqpipe.inventory(mlqpipe.load_model(tmp_path / "out.mlpackage"))}
    assert np.array_equal(out[rec.layer].values(), joint.dense(again))


@pytest.mark.parametrize("kind, message", [
    ("per_channel_scale", "a per-channel-scaled LUT needs iOS18"),
    ("lut_int8", r"a LUT quantized to int8 \(joint compression\) needs iOS18"),
    ("sparse_lut", r"joint compression \(a pruned weight's palettized values\) needs iOS18"),
    ("sparse_int8", r"joint compression \(a pruned weight's quantized values\) needs iOS18"),
])
def test_chains_are_refused_below_ios18(mlpackage, kind, message):
    model = mlqpipe.load_model(mlpackage("mlp_ios16_fp32"))
    rec = _big(model)[0]
    with pytest.raises(mlqpipe.ModelError, match=message + r" \(opset CoreML8\); this function's opset is CoreML6"):
        write_result(rec, CHAINS[kind][0](rec.values()))


# -- coremltools' joint outputs -------------------------------------------------------------------------------

# (package, where it comes from, our kernels on the input weight); every one uses coremltools' exact modes
PARITY = {
    "ios18_joint_sparse_int8": ("catalog", lambda w: joint.quantize_nonzero(prune(w, HALF), AffineSettings())),
    "lut_int8": ("extra", CHAINS["lut_int8"][0]),
    "lut_uint8_linear_grouped": ("extra", lambda w: joint.quantize_lut(palettize(w, GROUPED4), "uint8", "linear")),
    "lut_per_channel_scale": ("extra", CHAINS["per_channel_scale"][0]),
    "sparse_lut_grouped": ("extra", lambda w: joint.palettize_nonzero(prune(w, HALF), GROUPED4)),
    "sparse_lut_int8": ("extra", CHAINS["sparse_lut_int8"][0]),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_coremltools_joint_outputs_hold_what_our_kernels_compute_written_as_we_write_them(mlpackage, extra, tmp_path, name):
    source, make = PARITY[name]
    theirs = _by_consumer(mlqpipe.load_model(mlpackage(name) if source == "catalog" else extra(name)))
    model = mlqpipe.load_model(mlpackage("mlp_ios18_fp32"))
    inputs = _by_consumer(model)
    for consumer in ("fc1", "fc2"):
        ours = make(inputs[consumer].values())
        _same_result(ours, compressed_result(theirs[consumer]))  # their parameters, read back
        write_result(inputs[consumer], ours)
        written = _by_consumer(model)[consumer]  # listed again: a record reads the chain it had when listed
        _same_chain(_chain(written), _chain(theirs[consumer]))  # the ops and their literal parameters


@pytest.mark.parametrize("name, make", [
    ("ios18_joint_sparse_lut", lambda w: joint.palettize_nonzero(prune(w, HALF), PaletteSettings(mode="kmeans", nbits=4))),
    ("ios18_lut_channel_scale", lambda w: palettize(w, PaletteSettings(mode="kmeans", nbits=4, enable_per_channel_scale=True))),
])
def test_coremltools_kmeans_joint_outputs_match_ours_but_for_the_tables(mlpackage, name, make):
    theirs = _by_consumer(mlqpipe.load_model(mlpackage(name)))
    model = mlqpipe.load_model(mlpackage("mlp_ios18_fp32"))
    inputs = _by_consumer(model)
    for consumer in ("fc1", "fc2"):
        w = inputs[consumer].values()
        ours, ref = make(w), compressed_result(theirs[consumer])
        if isinstance(ref, SparseResult):
            assert np.array_equal(ours.mask, ref.mask)
            ours_p, ref_p = ours.nonzero, ref.nonzero
            assert np.abs(ours_p.lut).min() < 1e-6  # the pruned zeros are palettized too: a table entry sits at 0
        else:
            assert np.array_equal(ours.per_channel_scale, ref.per_channel_scale)
            ours_p, ref_p = ours, ref
        assert ours_p.lut.shape == ref_p.lut.shape and ours_p.indices.shape == ref_p.indices.shape
        error = np.mean((joint.dense(ours) - w) ** 2)
        assert error <= np.mean((joint.dense(ref) - w) ** 2) * 1.01  # mlqpipe's 1-D k-means is at least as close
        write_result(inputs[consumer], ours)
        _same_chain(_chain(_by_consumer(model)[consumer]), _chain(theirs[consumer]), values=False)


# -- reading back -------------------------------------------------------------------------------------------

READ_BACK = {  # catalog package -> the result type each compressed weight reads back as (and its nesting)
    "ios16_affine": AffineResult, "conv_ios16_affine": AffineResult, "ios16_lut": PaletteResult, "ios16_sparse": SparseResult,
    "ios18_int4_block": AffineResult, "ios18_lut_grouped": PaletteResult, "ios18_lut_3bit": PaletteResult,
    "ios18_lut_vector": PaletteResult, "ios18_lut_channel_scale": PaletteResult, "ios18_sparse": SparseResult,
    "ios18_joint_sparse_lut": (SparseResult, PaletteResult), "ios18_joint_sparse_int8": (SparseResult, AffineResult),
}


@pytest.mark.parametrize("name", list(READ_BACK))
def test_compressed_weights_read_back_as_results_that_decode_to_them_and_write_back_the_same(mlpackage, tmp_path, name):
    expected = READ_BACK[name] if isinstance(READ_BACK[name], tuple) else (READ_BACK[name], np.ndarray)
    model = mlqpipe.load_model(mlpackage(name))
    want = {}
    for rec in mlqpipe.inventory(model):
        result = compressed_result(rec)
        if not rec.compressed:
            assert result is None
            continue
        assert type(result) is expected[0]
        if isinstance(result, SparseResult):
            assert isinstance(result.nonzero, expected[1])
        want[rec.layer] = rec.values()
        assert np.array_equal(joint.dense(result).astype(np.float32), want[rec.layer]), rec.layer
        write_result(rec, result)
    assert want
    model.save(tmp_path / "out.mlpackage")
    out = {r.layer: r for r in mlqpipe.inventory(mlqpipe.load_model(tmp_path / "out.mlpackage"))}
    for layer, values in want.items():
        assert np.array_equal(out[layer].values(), values), layer


def test_fp16_storage_and_plain_consts_read_back_as_none(mlpackage):
    model = mlqpipe.load_model(mlpackage("mlp_ios18_fp32"))
    rec = _big(model)[0]
    assert compressed_result(rec) is None
    write_result(rec, Float16Result(rec.values().astype(np.float16).ravel()))
    rec = next(r for r in mlqpipe.inventory(model) if r.layer == rec.layer)
    assert rec.layer_type == "constexpr_cast" and compressed_result(rec) is None


def test_a_pruned_weight_is_compressed_again_on_top_stage_by_stage(mlpackage, tmp_path):
    """What `joint: true` stages do: read back, compress on top, write; then once more (quantize its LUT)."""
    ct = pytest.importorskip("coremltools")
    model = mlqpipe.load_model(mlpackage("ios18_sparse"))
    count = len(list(walk(model.spec.mlProgram, "")))
    want = {}
    for rec in (r for r in mlqpipe.inventory(model) if r.compressed):
        result = joint.palettize_nonzero(compressed_result(rec), GROUPED4)
        write_result(rec, result)
    model.save(tmp_path / "one.mlpackage")
    model = mlqpipe.load_model(tmp_path / "one.mlpackage")
    for rec in (r for r in mlqpipe.inventory(model) if r.compressed):
        result = joint.quantize_nonzero(compressed_result(rec), PER_TENSOR)
        want[rec.layer] = joint.dense(result)
        write_result(rec, result)
    model.save(tmp_path / "two.mlpackage")
    out = mlqpipe.load_model(tmp_path / "two.mlpackage")
    assert len(list(walk(out.spec.mlProgram, ""))) == count + 2 * len(want)  # per weight: lut_to_sparse, its LUT's op
    recs = {r.layer: r for r in mlqpipe.inventory(out)}
    for layer, values in want.items():
        assert recs[layer].layer_type == f"{SS}+{LS}+{SD}" and np.array_equal(recs[layer].values(), values)
    dense = _decompressed(ct, tmp_path / "two.mlpackage", tmp_path)
    for layer, values in want.items():
        assert np.array_equal(dense[layer], values), layer


def test_rewriting_a_joint_weight_removes_its_old_upstream_ops(mlpackage, tmp_path):
    model = mlqpipe.load_model(mlpackage("ios18_joint_sparse_lut"))
    count = len(list(walk(model.spec.mlProgram, "")))
    recs = [r for r in mlqpipe.inventory(model) if r.compressed]
    for rec in recs:
        values = rec.values()
        write_result(rec, SparseResult(values != 0, values[values != 0]))
    assert len(list(walk(model.spec.mlProgram, ""))) == count - len(recs)
    assert not [s for s in walk(model.spec.mlProgram, "") if s.op.type == LS]
    model.save(tmp_path / "out.mlpackage")


def test_decompressing_a_chain_leaves_no_constexpr_behind(mlpackage, tmp_path):
    model = mlqpipe.load_model(mlpackage("ios18_lut_channel_scale"))
    for rec in (r for r in mlqpipe.inventory(model) if r.compressed):
        write_result(rec, Float32Result(rec.values().ravel()))
    assert not [s for s in walk(model.spec.mlProgram, "") if s.op.type.startswith("constexpr_")]
    assert all(op_name(s.op) for s in walk(model.spec.mlProgram, ""))
    model.save(tmp_path / "out.mlpackage")


def test_damaged_parameters_of_a_read_back_weight_raise_a_located_model_error(mlpackage):
    model = mlqpipe.load_model(mlpackage("ios16_lut"))
    rec = next(r for r in mlqpipe.inventory(model) if r.compressed)
    short = proto.Value()
    short.type.tensorType.dataType = proto.UINT8
    short.type.tensorType.rank = 1
    short.type.tensorType.dimensions.add().constant.size = 3
    short.immediateValue.tensor.bytes.values = b"\x01\x02\x03"
    proto.set_entry(rec.handle.site.op.attributes, "indices", short)
    need = rec.count * 4 // 8
    with pytest.raises(mlqpipe.ModelError, match=rf"op '{rec.layer}' \(constexpr_lut_to_dense\): 3 bytes of packed codes; "
                                                 rf"{rec.count} values of 4 bits need {need} \(the model is damaged: re-export it\)"):
        compressed_result(rec)


@pytest.mark.parametrize("kind", ["per_channel_scale", "lut_uint8_per_channel_scale", "sparse_lut", "sparse_int8", "sparse_lut_int8"])
def test_chains_of_fp16_weights_keep_fp16_tables_scales_and_values(extra, tmp_path, kind):
    ct = pytest.importorskip("coremltools")
    model = mlqpipe.load_model(extra("fp16_base"))
    want = {}
    for r in _big(model):
        result = CHAINS[kind][0](_fp16(r))
        want[r.layer] = joint.dense(result)
        assert want[r.layer].dtype == np.float16
        write_result(r, result)
    model.save(tmp_path / "out.mlpackage")
    out = mlqpipe.load_model(tmp_path / "out.mlpackage")
    for rec in (r for r in mlqpipe.inventory(out) if r.layer in want):
        assert rec.dtype == "fp16" and np.array_equal(rec.values(), want[rec.layer].astype(np.float32))
        for kind_, literals in _chain(rec):
            assert all(dtype != proto.FLOAT32 for dtype, _ in literals.values()), kind_
    dense = _decompressed(ct, tmp_path / "out.mlpackage", tmp_path)
    for layer, values in want.items():
        assert np.array_equal(dense[layer], values.astype(np.float32)), layer


def _fp16(rec) -> np.ndarray:
    return rec.values().astype(np.float16)  # exact: the weight is fp16


def test_an_fp16_pruned_weight_is_palettized_by_exact_kmeans_as_coremltools_does(extra):
    """fp16 weights of >= 10,000 values: coremltools runs its exact 1-D k-means (kmeans1d) on the dense
    pruned weight, which mlqpipe reproduces: the joint LUT and indices are bit for bit the same."""
    pruned = _by_consumer(mlqpipe.load_model(extra("fp16_sparse")))
    theirs = _by_consumer(mlqpipe.load_model(extra("fp16_sparse_kmeans")))
    assert set(pruned) == set(theirs) == {"fc", "mm"}
    for consumer, rec in pruned.items():
        settings_ = PaletteSettings(mode="kmeans", nbits=4, channel_axis=rec.axis)
        ours = joint.palettize_nonzero(compressed_result(rec), settings_)
        _same_result(ours, compressed_result(theirs[consumer]))


class _Rec:
    dtype = "fp32"
    where = "op 'w' (const)"


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from([(4, 6), (8, 2), (4, 2, 3), (2, 4, 2)]), axis=st.integers(0, 2), groups=st.sampled_from([1, 2]),
       nbits=st.sampled_from([1, 2, 4]), quantized=st.booleans(), data=st.data())
def test_canonical_per_channel_scaled_luts_decode_as_scaling_the_dense_weight(shape, axis, groups, nbits, quantized, data):
    """The written form (LUT repeated along the scale's axes, then scaled) against the definition (scale the
    looked-up weight), for any grouping axis: equal bit for bit."""
    axis %= len(shape)
    w = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-2, 2, width=32)))
    r = palettize(w, PaletteSettings(mode="uniform", nbits=nbits, granularity="per_grouped_channel", group_size=shape[axis] // groups,
                                     channel_axis=axis, enable_per_channel_scale=True))
    if quantized:
        r = joint.quantize_lut(r, "uint8", "linear")
    scale, repeats = writers._lut_scale(_Rec, r.per_channel_scale, np.shape(r.lut.data if quantized else r.lut))
    table = writers._repeat_table(r.lut, repeats)
    table = constexpr.dequantize_blockwise(table.data, table.scale, table.zero_point) if quantized else table
    scaled = constexpr.dequantize_blockwise(table, scale, None)
    assert np.array_equal(constexpr.lut_lookup(r.indices, scaled, None), joint.dense(r))
