"""The ML-program inventory (inventory.py): the exact records of every catalog package (ids, consumers,
shapes, channel axes, storage of every compressed form, functions, nested blocks, shared consts), values
equal to what coremltools reads or decodes, the 9/10-element line between parameters and weights, and
values read through the weight file's memory map."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from mlqpipe.formats.base import WeightRecord
from mlqpipe.formats.mlprogram.inventory import Consumer, MLWeightRecord, inventory, parameters
from mlqpipe.formats.mlprogram.model import load_package

from .packages import CATALOG, NEEDS_TORCH
from .test_constexpr import coremltools_dense

MLP_SUFFIX = {
    "mlp_ios15_fp32": ("", "const"), "mlp_ios16_fp32": ("", "const"), "mlp_ios17_fp16": ("", "const"),
    "mlp_ios18_fp32": ("", "const"),
    "ios16_affine": ("_quantized", "constexpr_affine_dequantize"),
    "ios16_lut": ("_palettized", "constexpr_lut_to_dense"),
    "ios16_sparse": ("_sparsified", "constexpr_sparse_to_dense"),
    "ios18_int4_block": ("_quantized", "constexpr_blockwise_shift_scale"),
    "ios18_lut_grouped": ("_palettized", "constexpr_lut_to_dense"),
    "ios18_lut_3bit": ("_palettized", "constexpr_lut_to_dense"),
    "ios18_lut_vector": ("_palettized", "constexpr_lut_to_dense"),
    "ios18_lut_channel_scale": ("_palettized_pcs", "constexpr_blockwise_shift_scale+constexpr_lut_to_dense"),
    "ios18_sparse": ("_sparsified", "constexpr_sparse_to_dense"),
    "ios18_joint_sparse_lut": ("_sparsified", "constexpr_lut_to_sparse+constexpr_sparse_to_dense"),
    "ios18_joint_sparse_int8": ("_sparsified", "constexpr_sparse_blockwise_shift_scale+constexpr_sparse_to_dense"),
}  # fmt: skip
STORAGE = {  # of fc1 and fc2's weights
    "mlp_ios15_fp32": "float32", "mlp_ios16_fp32": "float32", "mlp_ios17_fp16": "float16", "mlp_ios18_fp32": "float32",
    "ios16_affine": "linear8 int8 per_channel", "ios16_lut": "lut4 per_tensor", "ios16_sparse": "sparse 50% zeros",
    "ios18_int4_block": "linear4 int4 per_block(32)", "ios18_lut_grouped": "lut4 per_grouped_channel(16)",
    "ios18_lut_3bit": "lut3 per_tensor", "ios18_lut_vector": "lut4 per_tensor, vector(2)",
    "ios18_lut_channel_scale": "lut4 per_tensor + per_channel_scale", "ios18_sparse": "sparse 50% zeros",
    "ios18_joint_sparse_lut": "sparse 50% zeros + lut4 per_tensor",
    "ios18_joint_sparse_int8": "sparse 50% zeros + linear8 int8 per_channel",
}  # fmt: skip


def row(r: MLWeightRecord) -> tuple:
    return (r.id, r.layer_type, r.field, r.shape, r.dtype, r.axis, r.input_axis, r.storage.describe(), r.consumers, r.functions)


def lin(op: str, param: str) -> tuple:
    return (Consumer(op, "linear", param),)


def mlp_rows(name: str) -> list[tuple]:
    suffix, kind = MLP_SUFFIX[name]
    dt, plain = ("fp16", "float16") if "fp16" in name else ("fp32", "float32")
    weight = STORAGE[name]
    main = ("main",)
    return [
        (f"fc1_weight_0{suffix}", kind, "weight", (128, 64), dt, 0, 1, weight, lin("fc1", "weight"), main),
        ("fc1_bias_0", "const", "bias", (128,), dt, 0, None, plain, lin("fc1", "bias"), main),
        (f"fc2_weight_0{suffix}", kind, "weight", (64, 128), dt, 0, 1, weight, lin("fc2", "weight"), main),
        ("fc2_bias_0", "const", "bias", (64,), dt, 0, None, plain, lin("fc2", "bias"), main),
        ("fc3_weight_0", "const", "weight", (4, 64), dt, 0, 1, plain, lin("fc3", "weight"), main),
    ]  # fc3_bias_0 (4 values) is a parameter


def _conv_rows(affine: bool) -> list[tuple]:
    q, kind = ("_quantized", "constexpr_affine_dequantize") if affine else ("", "const")
    st = "linear8 int8 per_channel" if affine else "float32"
    deconv = "deconv_has_output_shape" if affine else "deconv"  # coremltools' pipeline rebuilt it
    m = ("main",)
    return [
        (f"conv_weight_0{q}", kind, "weight", (16, 8, 3, 3), "fp32", 0, 1, st, (Consumer("conv", "conv", "weight"),), m),
        ("conv_bias_0", "const", "bias", (16,), "fp32", 0, None, "float32", (Consumer("conv", "conv", "bias"),), m),
        (f"deconv_weight_0{q}", kind, "weight", (16, 8, 3, 3), "fp32", 1, 0, st, (Consumer(deconv, "conv_transpose", "weight"),), m),
        (f"mm_y_0{q}", kind, "y", (16, 12), "fp32", 1, 0, st, (Consumer("mm", "matmul", "y"),), m),
    ]


def _fp32(id_, field, shape, consumer, axis=0, input_axis=1):
    return (id_, "const", field, shape, "fp32", axis, input_axis, "float32", consumer, ("main",))


EXPECTED = {name: mlp_rows(name) for name in MLP_SUFFIX} | {
    "conv_ios16": _conv_rows(False),
    "conv_ios16_affine": _conv_rows(True),
    "control_flow_ios17": [
        _fp32("branch.blocks[0]/fc_true_weight_0", "weight", (32, 64), lin("fc_true", "weight")),
        _fp32("branch.blocks[0]/fc_true_bias_0", "bias", (32,), lin("fc_true", "bias"), input_axis=None),
        _fp32("branch.blocks[1]/fc_false_weight_0", "weight", (32, 64), lin("fc_false", "weight")),
        _fp32("branch.blocks[1]/fc_false_bias_0", "bias", (32,), lin("fc_false", "bias"), input_axis=None),
        _fp32("loop.blocks[1]/fc_body_weight_1", "weight", (32, 32), lin("fc_body", "weight")),
        _fp32("loop.blocks[1]/fc_body_bias_1", "bias", (32,), lin("fc_body", "bias"), input_axis=None),
    ],
    "shared_const_ios16": [
        _fp32("w_shared", "weight", (32, 32), lin("fc_a", "weight") + lin("fc_b", "weight")),
        _fp32("fc_a_bias_0", "bias", (32,), lin("fc_a", "bias"), input_axis=None),
        _fp32("fc_b_bias_0", "bias", (32,), lin("fc_b", "bias"), input_axis=None),
    ],
    "multifunction_ios18": [  # fc1's weight and bias are one blob each, shared by both functions
        _fp32("fc1_weight_0", "weight", (128, 64), lin("fc1", "weight"))[:-1] + (("main_a", "main_b"),),
        _fp32("fc1_bias_0", "bias", (128,), lin("fc1", "bias"), input_axis=None)[:-1] + (("main_a", "main_b"),),
        _fp32("fc2_weight_0", "weight", (8, 128), lin("fc2", "weight"))[:-1] + (("main_a",),),
        _fp32("main_b/fc2_weight_0", "weight", (8, 128), lin("fc2", "weight"))[:-1] + (("main_b",),),
    ],
    "no_weights_ios16": [],
}
CATALOG_PACKAGES = sorted(set(CATALOG) - NEEDS_TORCH)


def test_every_catalog_package_has_expectations():
    assert set(EXPECTED) == set(CATALOG_PACKAGES)


@pytest.mark.parametrize("name", CATALOG_PACKAGES)
def test_records_of_catalog_packages(mlpackage, name):
    records = inventory(load_package(mlpackage(name)))
    assert [row(r) for r in records] == EXPECTED[name]
    assert all(isinstance(r, MLWeightRecord) and isinstance(r, WeightRecord) for r in records)
    assert len({r.id for r in records}) == len(records)
    for r in records:
        assert r.count == int(np.prod(r.shape)) and r.feeds_only_outputs is False
        assert r.storage.is_quantized == (r.layer_type != "const")
        assert r.CONDITIONS == {"function", "in_channels", "out_channels", "position"}  # beyond the neutral ones


def test_nested_blocks_are_networks(mlpackage):
    r = inventory(load_package(mlpackage("control_flow_ios17")))[4]
    assert (r.network, r.layer, r.handle.site.block) == ("loop.blocks[1]/", "fc_body_weight_1", "main/loop.blocks[1]")
    assert r.where == "op 'fc_body_weight_1' (const) (fc_body.weight) in loop.blocks[1]"


def test_shared_weight_across_functions_is_one_record_with_every_site(mlpackage):
    model = load_package(mlpackage("multifunction_ios18"))
    fc1 = inventory(model)[0]
    assert sorted(s.function for s in fc1.handle.sites) == ["main_a", "main_b"]
    assert fc1.handle.site.function == "main_a"  # the default function names it
    assert fc1.nbytes == 128 * 64 * 4  # stored once
    assert fc1.network == "" and inventory(model)[3].network == "main_b/"


def test_stored_bytes(mlpackage):
    sizes = {r.id: r.nbytes for r in inventory(load_package(mlpackage("ios16_lut")))}
    assert sizes["fc1_weight_0_palettized"] == 4096 + 16 * 4 + 2 * 4  # packed 4-bit indices + lut + shape (uint32[2])
    assert sizes["fc1_bias_0"] == 512
    sizes = {r.id: r.nbytes for r in inventory(load_package(mlpackage("ios18_int4_block")))}
    assert sizes["fc1_weight_0_quantized"] == 128 * 64 // 2 + 128 * 2 * 4  # int4 data + fp32 scales


@pytest.mark.parametrize("name", CATALOG_PACKAGES)
def test_values_equal_what_coremltools_reads_or_decodes(ct, mlpackage, name):
    path = mlpackage(name)
    records = inventory(load_package(path))
    compressed = any(r.layer_type != "const" for r in records)
    reference = coremltools_dense(ct, path) if compressed else _coremltools_consts(ct, path)
    for r in records:
        got = r.values()
        assert got.dtype == np.float32 and got.shape == r.shape and got.flags.writeable
        for site in r.handle.sites:
            want = np.asarray(reference[(site.function, site.op.outputs[r.handle.output].name)])
            assert np.array_equal(got, want.astype(np.float32)), r.id


def _coremltools_consts(ct, path) -> dict:
    from .test_constexpr import _program_consts, _pymil

    return _program_consts(_pymil(ct, ct.models.MLModel(str(path), skip_model_load=True)))


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def tiny(ct, tmp_path_factory):
    """A program made here: consts of 9 and 10 elements, fp16 and int32 consts, matmul operands with either
    transpose flag, a const shared by a linear and a matmul (axes disagree), a const that is only an output."""
    from coremltools.converters.mil.mil import Builder as mb

    rng = np.random.default_rng(7)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8))], opset_version=ct.target.iOS17)
    def prog(x):
        s = mb.reduce_sum(x=x, axes=[1], keep_dims=False, name="s")
        a9 = mb.mul(x=f32(9), y=s, name="a9")
        b10 = mb.mul(x=f32(10), y=s, name="b10")
        h10 = mb.mul(x=mb.cast(x=s, dtype="fp16", name="s16"), y=f32(10).astype(np.float16), name="h10")
        i10 = mb.add(x=mb.cast(x=s, dtype="int32", name="si"), y=np.arange(10, dtype=np.int32), name="i10")
        q12 = mb.cast(x=np.arange(-6, 6, dtype=np.int8).reshape(3, 4), dtype="fp32", name="q12")
        m1 = mb.matmul(x=x, y=f32(8, 12), name="m1")
        m2 = mb.matmul(x=x, y=f32(12, 8), transpose_y=True, name="m2")
        xt = mb.transpose(x=x, perm=[1, 0], name="xt")
        m3 = mb.matmul(x=f32(12, 8), y=xt, name="m3")
        m4 = mb.matmul(x=f32(8, 12), y=xt, transpose_x=True, name="m4")
        z = mb.const(val=f32(8, 8), name="z")
        both = (mb.linear(x=x, weight=z, name="lin"), mb.matmul(x=x, y=z, name="m5"))
        table = mb.const(val=f32(3, 4), name="table")
        return a9, b10, h10, i10, q12, m1, m2, m3, m4, *both, table

    mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                         compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                         skip_model_load=True)
    path = tmp_path_factory.mktemp("tiny") / "tiny.mlpackage"
    mlmodel.save(str(path))
    return path


def test_weights_and_parameters_of_a_tiny_program(ct, tiny):
    model = load_package(tiny)
    rows = {r.id: (r.field, r.shape, r.dtype, r.axis, r.input_axis, str(r.storage), r.consumers) for r in inventory(model)}
    assert rows == {
        "b10_x_0": ("x", (10,), "fp32", 0, None, "float32", (Consumer("b10", "mul", "x"),)),  # 10 elements: a weight
        "h10_y_0": ("y", (10,), "fp16", 0, None, "float16", (Consumer("h10", "mul", "y"),)),
        "q12_x_0": ("x", (3, 4), "int8", 0, 1, "int8", (Consumer("q12", "cast", "x"),)),
        "m1_y_0": ("y", (8, 12), "fp32", 1, 0, "float32", (Consumer("m1", "matmul", "y"),)),
        "m2_y_0": ("y", (12, 8), "fp32", 0, 1, "float32", (Consumer("m2", "matmul", "y"),)),  # transpose_y
        "m3_x_0": ("x", (12, 8), "fp32", 0, 1, "float32", (Consumer("m3", "matmul", "x"),)),
        "m4_x_0": ("x", (8, 12), "fp32", 1, 0, "float32", (Consumer("m4", "matmul", "x"),)),  # transpose_x
        "z": ("weight", (8, 8), "fp32", None, None, "float32",
              (Consumer("lin", "linear", "weight"), Consumer("m5", "matmul", "y"))),  # consumers disagree
        "table": ("output", (3, 4), "fp32", 0, 1, "float32", ()),
    }
    assert [r.feeds_only_outputs for r in inventory(model)][-1] is True
    params = {p.name: (p.dtype, p.shape, p.value) for p in parameters(model)}
    assert params["a9_x_0"][:2] == ("fp32", (9,))  # 9 elements: a parameter
    assert params["i10_y_0"] == ("int32", (10,), "[0, 1, 2, 3, 4, 5, 6, 7, ...]")  # not a weight dtype
    assert params["s16_dtype_0"] == ("string", (), "fp16")
    assert params["m2_transpose_y_0"] == ("bool", (), "True")
    assert params["xt_perm_0"] == ("int32", (2,), "[1, 0]")
    assert not set(params) & set(rows)
    reference = _coremltools_consts(ct, tiny)
    for r in inventory(model):
        assert np.array_equal(r.values(), np.asarray(reference[("main", r.layer)]).astype(np.float32))


def test_parameters_leave_out_chain_parts_and_weights(mlpackage):
    model = load_package(mlpackage("conv_ios16_affine"))
    names = [p.name for p in parameters(model)]
    assert "conv_pad_type_0" in names and "deconv_has_output_shape_output_shape_0" in names
    assert not {r.layer for r in inventory(model)} & set(names)
    pad = next(p for p in parameters(model) if p.name == "conv_pad_0")
    assert (pad.network, pad.function, pad.dtype, pad.shape, pad.value, pad.consumers) == (
        "", "main", "int32", (4,), "[0, 0, 0, 0]", (Consumer("conv", "conv", "pad"),))


def test_values_read_through_the_mapping(mlpackage):
    """A small weight's values cost its own bytes, not a read of weight.bin (~70 kB here)."""
    path = mlpackage("mlp_ios16_fp32")
    size = (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    fc3 = next(r for r in inventory(load_package(path)) if r.layer == "fc3_weight_0")
    tracemalloc.start()
    try:
        values = fc3.values()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert values.shape == (4, 64) and size > 60_000
    assert peak < values.nbytes + 8192 < size // 4  # the float32 copy plus opening the mapping
