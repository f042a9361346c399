"""Compressed weights (constexpr.py): every catalog form decoded exactly as coremltools decodes it, the
storage each form is described with, every decode against a small loop-based reference on random shapes
(block sizes, LUT groups, vectors, masks), and located ModelErrors for broken ops.

The oracle is coremltools 9.0: `decompress_weights` for the dense weights (it keeps the chain outputs'
names), and its MIL WeightDecompressor pass applied to the program as loaded, for the outputs of every
constexpr op of a chain (the two outputs of lut_to_sparse included)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import constexpr, proto
from mlqpipe.formats.mlprogram.model import MLProgram, load_package
from mlqpipe.formats.mlprogram.packing import pack_lsb_first
from mlqpipe.formats.mlprogram.program import walk

COMPRESSED = [
    "ios16_affine", "ios16_lut", "ios16_sparse", "conv_ios16_affine", "ios18_int4_block", "ios18_lut_grouped",
    "ios18_lut_3bit", "ios18_lut_vector", "ios18_lut_channel_scale", "ios18_sparse", "ios18_joint_sparse_lut",
    "ios18_joint_sparse_int8",
]  # fmt: skip

# the storage each package's compressed weights are described with (fc1 and fc2, or the conv weights)
DESCRIBED = {
    "ios16_affine": ["linear8 int8 per_channel"] * 2,
    "ios16_lut": ["lut4 per_tensor"] * 2,
    "ios16_sparse": ["sparse 50% zeros"] * 2,
    "conv_ios16_affine": ["linear8 int8 per_channel"] * 3,
    "ios18_int4_block": ["linear4 int4 per_block(32)"] * 2,
    "ios18_lut_grouped": ["lut4 per_grouped_channel(16)"] * 2,
    "ios18_lut_3bit": ["lut3 per_tensor"] * 2,
    "ios18_lut_vector": ["lut4 per_tensor, vector(2)"] * 2,
    "ios18_lut_channel_scale": ["lut4 per_tensor + per_channel_scale"] * 2,
    "ios18_sparse": ["sparse 50% zeros"] * 2,
    "ios18_joint_sparse_lut": ["sparse 50% zeros + lut4 per_tensor"] * 2,
    "ios18_joint_sparse_int8": ["sparse 50% zeros + linear8 int8 per_channel"] * 2,
}


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("coremltools")


def _program_consts(prog) -> dict:
    """(function, output name) -> value of every const of a pymil program, nested blocks included."""
    out = {}

    def visit(fname, block):
        for op in block.operations:
            if op.op_type == "const":
                out[(fname, op.outputs[0].name)] = op.outputs[0].val
            for inner in op.blocks:
                visit(fname, inner)

    for fname, f in prog.functions.items():
        visit(fname, f)
    return out


def _pymil(ct, mlmodel):
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir)


def coremltools_dense(ct, path) -> dict:
    """(function, name) -> value of every const after coremltools' decompress_weights."""
    import coremltools.optimize.coreml as cto

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    return _program_consts(_pymil(ct, cto.decompress_weights(mlmodel)))


def coremltools_materialized(ct, path) -> dict:
    """(function, name) -> value of every const and constexpr output, by coremltools' WeightDecompressor
    pass on the program as loaded (no other pass runs, so every intermediate output keeps its name)."""
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    prog = _pymil(ct, ct.models.MLModel(str(path), skip_model_load=True))
    WeightDecompressor(op_selector=lambda op: True).apply(prog)
    return _program_consts(prog)


def _sites(model):
    sites = list(walk(model.spec.mlProgram, model.source))
    return sites, constexpr.producers(sites)


def _final_constexprs(sites, by_name):
    """Constexpr sites whose outputs feed an op that is not a constexpr (the weights)."""
    feeds_constexpr = {name for s in sites if constexpr.is_constexpr(s.op.type)
                       for e in s.op.inputs for b in e.value.arguments if b.WhichOneof("binding") == "name"
                       for name in [b.name]}
    return [s for s in sites if constexpr.is_constexpr(s.op.type) and not any(o.name in feeds_constexpr for o in s.op.outputs)]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("name", COMPRESSED)
def test_dense_weights_equal_coremltools_decompress_weights(ct, mlpackage, name):
    path = mlpackage(name)
    reference = coremltools_dense(ct, path)
    model = load_package(path)
    sites, by_name = _sites(model)
    finals = _final_constexprs(sites, by_name)
    assert len(finals) == len(DESCRIBED[name])
    for site in finals:
        got = constexpr.decode_chain(model, by_name, site)
        want = reference[(site.function, site.op.outputs[-1].name)]
        assert _same(got, want), site.name
        assert np.abs(got.astype(np.float64) - want).max() == 0


@pytest.mark.parametrize("name", COMPRESSED)
def test_every_constexpr_output_equals_coremltools_materialized_value(ct, mlpackage, name):
    path = mlpackage(name)
    reference = coremltools_materialized(ct, path)
    model = load_package(path)
    sites, by_name = _sites(model)
    checked = 0
    for site in sites:
        if constexpr.is_constexpr(site.op.type):
            got = constexpr.decode_chain(model, by_name, site)
            got = got if isinstance(got, tuple) else (got,)
            assert len(got) == len(site.op.outputs)
            for out, value in zip(site.op.outputs, got):
                assert _same(value, np.asarray(reference[(site.function, out.name)])), out.name
                checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name", COMPRESSED)
def test_each_form_is_described(mlpackage, name):
    model = load_package(mlpackage(name))
    sites, by_name = _sites(model)
    described = [constexpr.describe_chain(model, by_name, s).describe() for s in _final_constexprs(sites, by_name)]
    assert described == DESCRIBED[name]


def test_chain_sites_bytes_and_blob_refs(mlpackage):
    model = load_package(mlpackage("ios18_joint_sparse_lut"))
    sites, by_name = _sites(model)
    final = next(s for s in sites if s.name == "fc1_weight_0_sparsified")
    chain = constexpr.chain_sites(model, by_name, final)
    assert [s.op.type for s in chain] == ["constexpr_lut_to_sparse", "constexpr_sparse_to_dense"]
    # indices_mask uint1 [128, 64] (1024 B) + 4096 uint4 nonzero indices (2048 B) + lut 16 fp32 (64 B)
    assert constexpr.chain_nbytes(model, by_name, final) == 1024 + 2048 + 64
    assert len(constexpr.blob_refs(model, by_name, final)) == 3
    storage = constexpr.describe_chain(model, by_name, final)
    assert (storage.kind, storage.nbits, storage.is_quantized) == ("sparse", 4, True)


def test_forms_and_lookup():
    assert constexpr.form_of("CoreML6") == "ios16" and constexpr.form_of("CoreML7") == "ios16"
    assert constexpr.form_of("CoreML8") == "ios18" and constexpr.form_of("CoreML9") == "ios18"
    assert {t for t, _ in constexpr.OPS} == {
        "constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_sparse_to_dense", "constexpr_cast",
        "constexpr_blockwise_shift_scale", "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"}
    assert constexpr.OPS["constexpr_lut_to_sparse", "ios18"].outputs == 2
    # the iOS16 form by its `shape` parameter, even in an iOS18 function; the iOS18 form without it
    assert constexpr.lookup(_op("constexpr_lut_to_dense", indices=..., lut=..., shape=...), "CoreML8", "w").form == "ios16"
    assert constexpr.lookup(_op("constexpr_lut_to_dense", indices=..., lut=...), "CoreML6", "w").form == "ios18"


# -- hand-made ops: errors and the parts no catalog package has --------------------------------------------

_NUMPY_OF = {proto.FLOAT32: np.float32, proto.FLOAT16: np.float16, proto.INT8: np.int8, proto.UINT8: np.uint8,
             proto.INT32: np.int32, proto.UINT32: np.uint32}
_SUB_BYTE = {proto.UINT1: 1, proto.UINT2: 2, proto.UINT3: 3, proto.UINT4: 4, proto.UINT6: 6}


def value(array, dtype: int):
    """An immediate Value of `array` as MIL type `dtype` (as coremltools encodes immediates)."""
    a = np.asarray(array)
    v = proto.Value()
    tt = v.type.tensorType
    tt.dataType, tt.rank = dtype, a.ndim
    for d in a.shape:
        tt.dimensions.add().constant.size = d
    tensor = v.immediateValue.tensor
    if dtype == proto.STRING:
        tensor.strings.values.extend([str(x) for x in a.reshape(-1)])
    elif dtype in _SUB_BYTE:
        tensor.bytes.values = pack_lsb_first(a.reshape(-1), _SUB_BYTE[dtype])
    elif dtype == proto.INT4:
        tensor.bytes.values = pack_lsb_first(a.reshape(-1).astype(np.int8) & 15, 4)
    elif dtype == proto.FLOAT32:
        tensor.floats.values.extend(a.reshape(-1).tolist())
    elif dtype == proto.INT32:
        tensor.ints.values.extend(a.reshape(-1).tolist())
    else:
        tensor.bytes.values = a.astype(np.dtype(_NUMPY_OF[dtype]).newbyteorder("<")).tobytes()
    return v


def _op(op_type: str, outputs=(), **params):
    op = proto.Operation(type=op_type)
    name = op.attributes.add(key="name").value
    name.type.tensorType.dataType = proto.STRING
    name.immediateValue.tensor.strings.values.append("w")
    for key, v in params.items():
        binding = op.inputs.add(key=key).value.arguments.add()
        if isinstance(v, str):
            binding.name = v
        elif isinstance(v, proto.Value):
            binding.value.CopyFrom(v)
        else:  # a placeholder: only the name matters (lookup)
            binding.name = "_"
    for out_name, dtype, shape in outputs:
        o = op.outputs.add(name=out_name)
        o.type.tensorType.dataType, o.type.tensorType.rank = dtype, len(shape)
        for d in shape:
            o.type.tensorType.dimensions.add().constant.size = d
    return op


def _model(*ops, opset="CoreML8") -> MLProgram:
    spec = proto.Model(specificationVersion=9)
    fn = spec.mlProgram.functions.add(key="main").value
    fn.opset = opset
    block = fn.block_specializations.add(key=opset).value
    block.operations.extend(ops)
    return MLProgram(spec, None, "hand.mlpackage")


def _decode(model, name="w"):
    sites, by_name = _sites(model)
    return constexpr.decode_chain(model, by_name, next(s for s in sites if s.name == name))


def test_sparse_mask_and_data_disagree():
    mask = np.array([[1, 0, 1], [0, 0, 1]], np.uint8)
    op = _op("constexpr_sparse_to_dense", [("w", proto.FLOAT32, (2, 3))],
             nonzero_data=value(np.ones(2, np.float32), proto.FLOAT32), mask=value(mask, proto.UINT1))
    with pytest.raises(ModelError) as e:
        _decode(_model(op))
    assert str(e.value) == ("hand.mlpackage: op 'w' (constexpr_sparse_to_dense): the mask sets 3 positions but "
                            "nonzero_data holds 2 values; the model is damaged (re-export it)")


def test_missing_parameter_unknown_op_and_unbound_name():
    op = _op("constexpr_lut_to_dense", [("w", proto.FLOAT32, (4,))], indices=value(np.zeros(4, np.uint8), proto.UINT2))
    with pytest.raises(ModelError, match=r"^hand.mlpackage: op 'w' \(constexpr_lut_to_dense\): parameter\(s\) lut missing "
                                         r"\(it needs indices, lut\); the model is damaged \(re-export it\)$"):
        _decode(_model(op))
    with pytest.raises(ModelError, match=r"unknown compressed-weight op constexpr_future; mlqpipe knows .* newer mlqpipe"):
        _decode(_model(_op("constexpr_future", [("w", proto.FLOAT32, (4,))])))
    op = _op("constexpr_sparse_to_dense", [("w", proto.FLOAT32, (2,))], nonzero_data="nowhere",
             mask=value(np.ones(2, np.uint8), proto.UINT1))
    with pytest.raises(ModelError, match="bound to 'nowhere', which no op of the function produces"):
        _decode(_model(op))


def test_declared_shape_must_match():
    op = _op("constexpr_blockwise_shift_scale", [("w", proto.FLOAT32, (3, 4))],
             data=value(np.ones((4, 3), np.int8), proto.INT8), scale=value(np.ones((1, 1), np.float32), proto.FLOAT32))
    with pytest.raises(ModelError, match=r"decodes to shape \[4, 3\] but output w is declared \[3, 4\]"):
        _decode(_model(op))


def test_constexpr_cast_both_forms_and_described_as_float16():
    src = np.array([0.5, -2.0, 65504.0], np.float16)
    for opset in ("CoreML6", "CoreML8"):
        op = _op("constexpr_cast", [("w", proto.FLOAT32, (3,))], source_val=value(src, proto.FLOAT16),
                 output_dtype=value(np.array("fp32"), proto.STRING))
        model = _model(op, opset=opset)
        got = _decode(model)
        assert _same(got, src.astype(np.float32))
        sites, by_name = _sites(model)
        storage = constexpr.describe_chain(model, by_name, sites[0])
        assert storage == "float16" and storage.is_float


def test_chain_through_a_const_and_a_lut_quantized_by_shift_scale():
    """An int8 LUT dequantized by blockwise_shift_scale (joint palettize + quantize), the indices bound by
    name to a const op: decoded through both, described as a LUT whose table is linear-quantized."""
    lut_q = np.array([-4, -1, 2, 7], np.int8).reshape(1, 1, 4, 1)
    scale = np.array(0.25, np.float32).reshape(1, 1, 1, 1)
    idx = np.array([[0, 3, 2], [1, 1, 0]], np.uint8)
    const = proto.Operation(type="const")
    const.outputs.add(name="idx").type.CopyFrom(value(idx, proto.UINT2).type)
    const.attributes.add(key="val").value.CopyFrom(value(idx, proto.UINT2))
    lut = _op("constexpr_blockwise_shift_scale", [("lut", proto.FLOAT32, (1, 1, 4, 1))],
              data=value(lut_q, proto.INT8), scale=value(scale, proto.FLOAT32))
    lut.attributes[0].value.immediateValue.tensor.strings.values[0] = "lut_op"
    dense = _op("constexpr_lut_to_dense", [("w", proto.FLOAT32, (2, 3))], indices="idx", lut="lut")
    model = _model(const, lut, dense)
    assert _same(_decode(model), (lut_q.reshape(-1).astype(np.float32) * np.float32(0.25))[idx])
    sites, by_name = _sites(model)
    assert constexpr.describe_chain(model, by_name, sites[-1]).describe() == "lut2 per_tensor + linear8 int8 per_tensor lut"


# -- decodes against loop-based references --------------------------------------------------------------


@st.composite
def blocked_shape(draw, max_rank=3):
    """(shape, per-axis group counts dividing it)."""
    rank = draw(st.integers(1, max_rank))
    groups = [draw(st.integers(1, 3)) for _ in range(rank)]
    blocks = [draw(st.integers(1, 3)) for _ in range(rank)]
    return tuple(g * b for g, b in zip(groups, blocks)), tuple(groups)


def _ints(draw, shape, lo, hi, dtype):
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(lo, hi + 1, size=shape).astype(dtype)


def _floats(draw, shape, dtype):
    seed = draw(st.integers(0, 2**32 - 1))
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(dtype)


@settings(max_examples=40, deadline=None)
@given(st.data(), blocked_shape(), st.sampled_from([np.float32, np.float16]), st.sampled_from(["none", "int", "float"]))
def test_blockwise_shift_scale_matches_loops(data, shaped, float_type, offset_kind):
    shape, groups = shaped
    q = _ints(data.draw, shape, -8, 7, np.int8)
    scale = _floats(data.draw, groups, float_type)
    offset = {"none": None, "int": _ints(data.draw, groups, -8, 7, np.int8), "float": _floats(data.draw, groups, float_type)}[offset_kind]
    params = {"data": q, "scale": scale} | ({} if offset is None else {"offset": offset})
    got = constexpr.OPS["constexpr_blockwise_shift_scale", "ios18"].decode(params, np.dtype(float_type), shape)
    want = np.empty(shape, float_type)
    for idx in np.ndindex(*shape):
        g = tuple(i * n // s for i, n, s in zip(idx, groups, shape))
        x = float_type(q[idx]) - (float_type(0) if offset is None else float_type(offset[g]))
        want[idx] = float_type(x) * scale[g]
    assert _same(got, want)


@settings(max_examples=40, deadline=None)
@given(st.data(), blocked_shape(), st.sampled_from([np.float32, np.float16]), st.booleans(), st.sampled_from([np.int8, np.uint8]))
def test_affine_dequantize_matches_loops(data, shaped, float_type, per_channel, int_type):
    shape, _ = shaped
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis] if per_channel else 1
    lo, hi = (-128, 127) if int_type is np.int8 else (0, 255)
    q = _ints(data.draw, shape, lo, hi, int_type)
    zp = _ints(data.draw, (n,) if per_channel else (), lo, hi, int_type)
    scale = _floats(data.draw, (n,) if per_channel else (), float_type)
    params = {"quantized_data": q, "zero_point": zp, "scale": scale, "axis": np.int32(axis)}
    got = constexpr.OPS["constexpr_affine_dequantize", "ios16"].decode(params, np.dtype(float_type), shape)
    want = np.empty(shape, float_type)
    for idx in np.ndindex(*shape):
        c = idx[axis] if per_channel else ()
        want[idx] = float_type((np.float32(q[idx]) - np.float32(zp[c])) * np.float32(scale[c]))
    assert _same(got, want)


def _lut_reference(indices, lut, vector_axis):
    rank = indices.ndim
    vector = lut.shape[-1]
    out_shape = list(indices.shape)
    if vector > 1:
        out_shape[vector_axis] *= vector
    out = np.zeros(out_shape, lut.dtype)
    for idx in np.ndindex(*indices.shape):
        g = tuple(i * k // n for i, k, n in zip(idx, lut.shape[:rank], indices.shape))
        entry = lut[g + (int(indices[idx]),)]
        for v in range(vector):
            o = list(idx)
            if vector > 1:
                o[vector_axis] = idx[vector_axis] * vector + v
            out[tuple(o)] = entry[v]
    return out


@st.composite
def lut_case(draw):
    shape, groups = draw(blocked_shape())
    nbits = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    vector = draw(st.sampled_from([1, 1, 2, 3]))
    axis = draw(st.integers(0, len(shape) - 1))
    indices = _ints(draw, shape, 0, 2**nbits - 1, np.uint8)
    lut = _floats(draw, groups + (2**nbits, vector), draw(st.sampled_from([np.float32, np.float16])))
    return indices, lut, (axis if vector > 1 else None)


@settings(max_examples=40, deadline=None)
@given(lut_case())
def test_lut_to_dense_ios18_matches_loops(case):
    indices, lut, axis = case
    params = {"indices": indices, "lut": lut} | ({} if axis is None else {"vector_axis": np.int32(axis)})
    want = _lut_reference(indices, lut, axis)
    got = constexpr.OPS["constexpr_lut_to_dense", "ios18"].decode(params, lut.dtype, want.shape)
    assert _same(got, want)


def _pack_reference(codes, nbits) -> np.ndarray:
    """LSB-first packing written with a bit loop (independent of packing.py)."""
    bits = [(int(c) >> j) & 1 for c in codes for j in range(nbits)]
    bits += [0] * (-len(bits) % 8)
    return np.array([sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8)], np.uint8)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.lists(st.integers(1, 5), min_size=1, max_size=3), st.sampled_from([1, 2, 4, 6, 8]))
def test_lut_to_dense_ios16_matches_loops(data, shape, nbits):
    codes = _ints(data.draw, (int(np.prod(shape)),), 0, 2**nbits - 1, np.uint8)
    lut = _floats(data.draw, (2**nbits,), np.float16)
    params = {"indices": _pack_reference(codes, nbits), "lut": lut, "shape": np.array(shape, np.uint32)}
    got = constexpr.OPS["constexpr_lut_to_dense", "ios16"].decode(params, np.dtype(np.float16), tuple(shape))
    want = np.array([lut[c] for c in codes], np.float16).reshape(shape)
    assert _same(got, want)


def _scatter_reference(nonzero, mask):
    out = np.zeros(mask.shape, nonzero.dtype)
    k = 0
    for idx in np.ndindex(*mask.shape):
        if mask[idx]:
            out[idx] = nonzero[k]
            k += 1
    return out


@settings(max_examples=40, deadline=None)
@given(st.data(), st.lists(st.integers(1, 6), min_size=1, max_size=3), st.sampled_from([np.float32, np.int8]))
def test_sparse_to_dense_both_forms_match_loops(data, shape, dtype):
    mask = _ints(data.draw, tuple(shape), 0, 1, np.uint8)
    nonzero = _ints(data.draw, (int(mask.sum()),), 1, 100, dtype)
    want = _scatter_reference(nonzero, mask)
    ios18 = constexpr.OPS["constexpr_sparse_to_dense", "ios18"].decode({"nonzero_data": nonzero, "mask": mask}, np.dtype(dtype), want.shape)
    packed = {"nonzero_data": nonzero, "mask": _pack_reference(mask.reshape(-1), 1), "shape": np.array(shape, np.uint32)}
    ios16 = constexpr.OPS["constexpr_sparse_to_dense", "ios16"].decode(packed, np.dtype(dtype), want.shape)
    assert _same(ios18, want) and _same(ios16, want)


@settings(max_examples=40, deadline=None)
@given(st.data(), lut_case())
def test_lut_to_sparse_matches_loops(data, case):
    indices, lut, axis = case
    mask = _ints(data.draw, indices.shape, 0, 1, np.uint8)
    params = {"indices_mask": mask, "indices_nonzero_data": indices[mask != 0], "lut": lut} | (
        {} if axis is None else {"vector_axis": np.int32(axis)})
    got_mask, got_values = constexpr.OPS["constexpr_lut_to_sparse", "ios18"].decode(params, lut.dtype, None)
    dense = _lut_reference(np.where(mask != 0, indices, 0), lut, axis)
    want_mask = mask if axis is None else np.repeat(mask, lut.shape[-1], axis=axis)
    want_values = np.array([dense[idx] for idx in np.ndindex(*dense.shape) if want_mask[idx]], lut.dtype)
    assert _same(got_mask, want_mask.astype(np.uint8)) and _same(got_values, want_values)


@settings(max_examples=40, deadline=None)
@given(st.data(), blocked_shape(), st.booleans())
def test_sparse_blockwise_shift_scale_matches_loops(data, shaped, with_offset):
    shape, groups = shaped
    mask = _ints(data.draw, shape, 0, 1, np.uint8)
    q = _ints(data.draw, (int(mask.sum()),), -128, 127, np.int8)
    scale = _floats(data.draw, groups, np.float16)
    offset = _ints(data.draw, groups, -128, 127, np.int8) if with_offset else None
    params = {"data_mask": mask, "nonzero_data": q, "scale": scale} | ({"offset": offset} if with_offset else {})
    got_mask, got = constexpr.OPS["constexpr_sparse_blockwise_shift_scale", "ios18"].decode(params, np.dtype(np.float16), None)
    want, k = [], 0
    for idx in np.ndindex(*shape):
        if mask[idx]:
            g = tuple(i * n // s for i, n, s in zip(idx, groups, shape))
            x = np.float16(q[k]) - (np.float16(offset[g]) if with_offset else np.float16(0))
            want.append(np.float16(x) * scale[g])
            k += 1
    assert _same(got_mask, mask) and _same(got, np.array(want, np.float16))


@settings(max_examples=15, deadline=None)
@given(st.data(), lut_case())
def test_vector_and_grouped_luts_match_coremltools_decompress(ct, data, case):
    """coremltools' own decompress functions as a second oracle for forms no catalog package holds
    (grouped vector LUTs, sparse vector LUTs)."""
    from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as c18

    indices, lut, axis = case
    params = {"indices": indices, "lut": lut} | ({} if axis is None else {"vector_axis": np.int32(axis)})
    want = c18.constexpr_lut_to_dense.decompress(indices, lut, axis)
    assert _same(constexpr.OPS["constexpr_lut_to_dense", "ios18"].decode(params, lut.dtype, want.shape), want)
    mask = _ints(data.draw, indices.shape, 0, 1, np.uint8)
    sparse = {"indices_mask": mask, "indices_nonzero_data": indices[mask != 0], "lut": lut} | (
        {} if axis is None else {"vector_axis": np.int32(axis)})
    want_mask, want_values = c18.constexpr_lut_to_sparse.decompress(mask, indices[mask != 0], lut, axis)
    got_mask, got_values = constexpr.OPS["constexpr_lut_to_sparse", "ios18"].decode(sparse, lut.dtype, None)
    assert np.array_equal(got_mask, want_mask) and _same(got_values, want_values)


def test_a_chain_bound_to_itself_is_refused():
    op = _op("constexpr_sparse_to_dense", [("w", proto.FLOAT32, (2,))], nonzero_data="w",
             mask=value(np.ones(2, np.uint8), proto.UINT1))
    with pytest.raises(ModelError, match=r"^hand.mlpackage: op 'w' \(constexpr_sparse_to_dense\): its parameters depend on its own output"):
        _decode(_model(op))


_ANY_DTYPE = st.sampled_from([proto.FLOAT32, proto.FLOAT16, proto.INT8, proto.UINT8, proto.INT32, proto.UINT1, proto.UINT4])


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(sorted({t for t, _ in constexpr.OPS})), st.sampled_from(["CoreML6", "CoreML8"]))
def test_odd_parameters_raise_model_error_only(data, op_type, opset):
    """Whatever shapes and dtypes an op's parameters have, decoding gives a value or a ModelError."""
    entry = constexpr.lookup(_op(op_type), opset, "w")
    params = {}
    for name in entry.required + entry.optional:
        dtype = data.draw(_ANY_DTYPE, label=name)
        shape = tuple(data.draw(st.lists(st.integers(1, 4), max_size=4), label=f"{name} shape"))
        hi = 1 if dtype == proto.UINT1 else 15 if dtype == proto.UINT4 else 3
        params[name] = value(_ints(data.draw, shape, 0, hi, np.int64), dtype)
    if "output_dtype" in params:
        params["output_dtype"] = value(np.array(data.draw(st.sampled_from(["fp32", "int8"]))), proto.STRING)
    out_shape = tuple(data.draw(st.lists(st.integers(1, 4), max_size=3)))
    outputs = [("m", proto.UINT1, out_shape)] * (entry.outputs - 1) + [("w", proto.FLOAT32, out_shape)]
    try:
        _decode(_model(_op(op_type, outputs, **params), opset=opset))
    except ModelError as e:
        assert str(e).startswith(f"hand.mlpackage: op 'w' ({op_type}): ")
