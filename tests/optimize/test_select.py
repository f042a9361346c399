"""Which weights get which config (mlqpipe.optimize.select) — against coremltools 9.0 itself.

Each case runs coremltools.optimize.coreml's linear_quantize_weights / palettize_weights / prune_weights with
a config on a package (catalog packages and small MIL-builder programs made here), reads coremltools'
output with our own reader, and compares which consts it compressed, and how (kind, bits, dtype,
granularity), with what `select` chose for the same config on the input. coremltools names each compressed
weight `<const>_quantized` / `_palettized` / `_sparsified` and may rename other ops (e.g. conv_transpose),
so weights are matched by const name. Packages are written outside pytest's base temp (coremltools'
output is input here, as in tests/formats/mlprogram/conftest.py).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram.inventory import inventory
from mlqpipe.formats.mlprogram.model import load_package
from mlqpipe.optimize import (
    OpLinearQuantizerConfig,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OpThresholdPrunerConfig,
    OptimizationConfig,
    decide,
    select,
)
from tests.formats.mlprogram.conftest import mlpackage  # noqa: F401  (the catalog fixture)

ct = pytest.importorskip("coremltools")
cto = pytest.importorskip("coremltools.optimize.coreml")

_SUFFIX = re.compile(r"_(quantized|palettized|sparsified)(_pcs)?$")


# -- building probe programs --------------------------------------------------------------------------------


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def _probe_program(ios: int):
    """Every selection case in one program (inputs x [1, 64], y [1, 3], z [4096]):
    fc_a / fc_b linear [128, 64] (fc_b's const is named "w_b"); fc_2048 linear [32, 64] (exactly 2048
    elements); fc_2049 linear [683, 3] (2049); "w_s" [64, 64] shared by linear fc_s and matmul mm_s (y:
    axes 1/0, disagreeing with linear's 0/1); mm_xt: matmul with const x [64, 48] and transpose_x; add_1d:
    a rank-1 const of 4096 elements; "w_ab" [96, 64] shared by two linears fc_p and fc_q (axes agree)."""
    from coremltools.converters.mil.mil import Builder as mb

    rng = np.random.default_rng(7)
    w_a, w_b, w_c, w_d, w_s, w_xt, w_ab = (_w(rng, *s) for s in ((128, 64), (128, 64), (32, 64), (683, 3), (64, 64), (64, 48), (96, 64)))
    v1d = _w(rng, 4096)
    target = {16: ct.target.iOS16, 18: ct.target.iOS18}[ios]

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64)), mb.TensorSpec(shape=(1, 3)), mb.TensorSpec(shape=(4096,))],
                opset_version=target)
    def prog(x, y, z):
        a = mb.linear(x=x, weight=w_a, name="fc_a")
        b = mb.linear(x=x, weight=mb.const(val=w_b, name="w_b"), name="fc_b")
        c = mb.linear(x=x, weight=w_c, name="fc_2048")
        d = mb.linear(x=y, weight=w_d, name="fc_2049")
        shared = mb.const(val=w_s, name="w_s")
        s1 = mb.linear(x=x, weight=shared, name="fc_s")
        s2 = mb.matmul(x=x, y=shared, name="mm_s")
        xt = mb.matmul(x=w_xt, y=mb.reshape(x=x, shape=[64, 1], name="col"), transpose_x=True, name="mm_xt")
        e = mb.add(x=z, y=v1d, name="add_1d")
        both = mb.const(val=w_ab, name="w_ab")
        p = mb.linear(x=x, weight=both, name="fc_p")
        q = mb.linear(x=x, weight=both, name="fc_q")
        return a, b, c, d, s1, s2, xt, e, p, q

    return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                      compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="mlqpipe-optimize-select-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def probe(workdir):
    made: dict[int, Path] = {}

    def get(ios: int) -> Path:
        if ios not in made:
            made[ios] = workdir / f"probe_ios{ios}.mlpackage"
            _probe_program(ios).save(str(made[ios]))
        return made[ios]

    return get


# -- comparing with coremltools -----------------------------------------------------------------------------

_APIS = {"linear": "linear_quantize_weights", "palettize": "palettize_weights", "prune": "prune_weights"}


def _ct_config(config: OptimizationConfig):
    """The same config as coremltools objects (through its own from_dict, which also checks our to_dict)."""
    return cto.OptimizationConfig.from_dict(config.to_dict())


def _label(config) -> str:
    """How a weight compressed with `config` reads back (Storage.describe of our reader), up to data."""
    if isinstance(config, OpLinearQuantizerConfig):
        gran = f"per_block({config.block_size})" if config.granularity == "per_block" else config.granularity
        return f"linear{config.nbits} {config.dtype} {gran}"
    if isinstance(config, OpPalettizerConfig):
        gran = f"per_grouped_channel({config.group_size})" if config.granularity == "per_grouped_channel" else "per_tensor"
        return f"lut{config.nbits} {gran}"
    return "sparse"


def _observed(storage) -> str:
    text = storage.describe()
    return "sparse" if text.startswith("sparse") else text


def coremltools_choice(package: Path, api: str, config: OptimizationConfig, out: Path) -> dict[str, str]:
    """const id -> how coremltools compressed it, for every weight it compressed."""
    model = ct.models.MLModel(str(package), skip_model_load=True)
    getattr(cto, _APIS[api])(model, _ct_config(config)).save(str(out))
    got = {}
    for rec in inventory(load_package(out)):
        if rec.compressed:
            got[_SUFFIX.sub("", rec.id)] = _observed(rec.storage)
    return got


def our_choice(package: Path, config: OptimizationConfig) -> dict[str, str]:
    return {rid: _label(cfg) for rid, cfg in select(inventory(load_package(package)), config).items()}


def assert_same_as_coremltools(package, api, config, workdir, expected=None):
    ours = our_choice(package, config)
    theirs = coremltools_choice(package, api, config, workdir / f"out_{api}_{len(list(workdir.iterdir()))}.mlpackage")
    assert ours == theirs
    if expected is not None:
        assert ours == expected
    return ours


LIN8 = OpLinearQuantizerConfig()
Q = {"fc_a_weight_0", "w_b", "fc_2049_weight_0", "w_ab"}  # what the default int8 per_channel config compresses


# -- the probe program --------------------------------------------------------------------------------------


def test_default_config_thresholds_rank_and_shared_axes(probe, workdir):
    """2048 elements stay, 2049 are compressed; rank 1 never; the const shared by linear and matmul.y is
    skipped (different channel axes); mm_xt's x (64*48 = 3072) is compressed along its transposed axes."""
    cfg = OptimizationConfig(global_config=LIN8)
    expected = {k: "linear8 int8 per_channel" for k in Q | {"mm_xt_x_0"}}
    assert_same_as_coremltools(probe(16), "linear", cfg, workdir, expected)


def test_per_tensor_with_disagreeing_axes_is_skipped_like_coremltools(probe, workdir):
    cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(granularity="per_tensor", weight_threshold=0))
    ours = assert_same_as_coremltools(probe(16), "linear", cfg, workdir)
    assert "w_s" not in ours and "fc_2048_weight_0" in ours and "add_1d_y_0" not in ours
    decisions = {d.id: d for d in decide(inventory(load_package(probe(16))), cfg)}
    assert decisions["w_s"].skipped == "its consumers need different channel axes"
    assert decisions["add_1d_y_0"].skipped == "rank 1: coremltools never compresses rank <= 1 consts"


def test_pruning_ignores_channel_axes(probe, workdir):
    cfg = OptimizationConfig(global_config=OpMagnitudePrunerConfig(target_sparsity=0.5))
    ours = assert_same_as_coremltools(probe(16), "prune", cfg, workdir)
    assert "w_s" in ours


def test_precedence_op_name_of_const_over_op_name_over_op_type_over_global(probe, workdir):
    cfg = OptimizationConfig(
        global_config=OpPalettizerConfig(nbits=8, weight_threshold=100),
        op_type_configs={"linear": OpPalettizerConfig(nbits=4, weight_threshold=100), "matmul": None},
        op_name_configs={"fc_b": OpPalettizerConfig(nbits=2), "w_ab": OpPalettizerConfig(nbits=1),
                         "fc_a": None, "fc_2048": OpPalettizerConfig(nbits=2, weight_threshold=2047), "w_s": None},
    )
    expected = {"w_b": "lut2 per_tensor", "w_ab": "lut1 per_tensor", "fc_2048_weight_0": "lut2 per_tensor",
                "fc_2049_weight_0": "lut4 per_tensor"}
    assert_same_as_coremltools(probe(16), "palettize", cfg, workdir, expected)


def test_const_name_entry_resolves_a_conflict(probe, workdir):
    """fc_p and fc_q disagree (op_name entries), the const's own entry wins; w_s's consumers disagree
    on axes, but pruning needs none."""
    cfg = OptimizationConfig(
        op_name_configs={"fc_p": OpThresholdPrunerConfig(threshold=0.05), "fc_q": None,
                         "w_ab": OpMagnitudePrunerConfig(target_sparsity=0.3),
                         "w_s": OpMagnitudePrunerConfig(target_sparsity=0.3)},
    )
    assert_same_as_coremltools(probe(16), "prune", cfg, workdir, {"w_ab": "sparse", "w_s": "sparse"})


def test_conflicting_consumers_raise_naming_both(probe):
    cfg = OptimizationConfig(global_config=LIN8, op_type_configs={"matmul": OpLinearQuantizerConfig(mode="linear")})
    model = ct.models.MLModel(str(probe(16)), skip_model_load=True)
    with pytest.raises(ValueError, match="compression config conflict"):
        cto.linear_quantize_weights(model, _ct_config(cfg))
    with pytest.raises(ModelError, match="compression config conflict") as info:
        select(inventory(load_package(probe(16))), cfg)
    message = str(info.value)
    assert "'fc_s' (linear.weight), which gets global_config" in message
    assert "'mm_s' (matmul.y), which gets op_type_configs['matmul']" in message
    assert "op_name_configs['w_s']" in message and str(probe(16)) in message


def test_conflict_is_raised_even_for_a_small_weight():
    """coremltools resolves the config before the size checks, so a conflict on a tiny shared const raises."""
    records = [_fake("w", (4, 4), ("fc1", "linear", "weight"), ("mm", "matmul", "y"))]
    cfg = OptimizationConfig(op_type_configs={"linear": LIN8})
    with pytest.raises(ModelError, match="conflict"):
        select(records, cfg)
    assert select(records, OptimizationConfig(global_config=LIN8, op_name_configs={"w": LIN8})) == {}


def test_op_name_key_matching_nothing_is_an_error(probe, workdir):
    cfg = OptimizationConfig(global_config=LIN8, op_name_configs={"fc_aa": None})
    # coremltools ignores the key: the same weights as without it
    assert coremltools_choice(probe(16), "linear", cfg, workdir / "typo.mlpackage") == {k: "linear8 int8 per_channel" for k in Q | {"mm_xt_x_0"}}
    with pytest.raises(ModelError) as info:
        select(inventory(load_package(probe(16))), cfg)
    message = str(info.value)
    assert message.startswith(f"{probe(16)}: op_name_configs key 'fc_aa' matches no op that holds or reads a weight; closest: 'fc_a'")
    assert "names in this model: fc_a_weight_0, fc_a, fc_a_bias_0, w_b, fc_b," in message


def test_ios18_block_and_group_divisibility(probe, workdir):
    """per_block 32 on the input axis: fc_2049's 3 columns are not divisible (skipped, as coremltools);
    grouped palettization by 16 on the output axis: 683 rows are not divisible."""
    lin = OptimizationConfig(global_config=OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=32))
    ours = assert_same_as_coremltools(probe(18), "linear", lin, workdir)
    assert "fc_2049_weight_0" not in ours and "fc_a_weight_0" in ours
    pal = OptimizationConfig(global_config=OpPalettizerConfig(nbits=4, granularity="per_grouped_channel", group_size=16))
    ours = assert_same_as_coremltools(probe(18), "palettize", pal, workdir)
    assert "fc_2049_weight_0" not in ours and "w_ab" in ours


def test_ios18_per_block_tuple_is_used_even_with_disagreeing_axes(probe, workdir):
    cfg = OptimizationConfig(
        global_config=OpLinearQuantizerConfig(granularity="per_tensor", weight_threshold=100000),
        op_name_configs={"w_s": OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=(1, 16))},
    )
    ours = our_choice(probe(18), cfg)
    theirs = coremltools_choice(probe(18), "linear", cfg, workdir / "tuple.mlpackage")
    assert set(ours) == set(theirs) == {"w_s"}
    assert theirs["w_s"].startswith("linear4 int4 per_block")
    bad = OptimizationConfig(op_name_configs={"w_s": OpLinearQuantizerConfig(granularity="per_block", block_size=(1, 16, 1))})
    with pytest.raises(ModelError, match=r"block_size \[1, 16, 1\] has 3 entries, but the weight \[64, 64\] has 2 axes"):
        select(inventory(load_package(probe(18))), bad)


def test_structured_pruning_only_conv_and_linear_weights(probe, workdir):
    cfg = OptimizationConfig(global_config=OpMagnitudePrunerConfig(n_m_ratio=(2, 4)))
    ours = assert_same_as_coremltools(probe(16), "prune", cfg, workdir)
    assert "mm_xt_x_0" not in ours and "w_s" not in ours and "w_ab" in ours
    assert "fc_2049_weight_0" not in ours  # [683, 3]: m = 4 is more than half of the 3 input channels
    named = OptimizationConfig(global_config=OpMagnitudePrunerConfig(n_m_ratio=(2, 4)),
                               op_name_configs={"w_s": OpMagnitudePrunerConfig(n_m_ratio=(2, 4))})
    assert "w_s" in assert_same_as_coremltools(probe(16), "prune", named, workdir)


# -- catalog packages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, api, config", [
    ("conv_ios16", "linear", OptimizationConfig(global_config=OpLinearQuantizerConfig(weight_threshold=100))),
    ("conv_ios16", "palettize", OptimizationConfig(global_config=OpPalettizerConfig(nbits=2, weight_threshold=100),
                                                    op_type_configs={"conv_transpose": OpPalettizerConfig(nbits=4, weight_threshold=100)})),
    ("shared_const_ios16", "linear", OptimizationConfig(global_config=OpLinearQuantizerConfig(weight_threshold=1000))),
    ("control_flow_ios17", "palettize", OptimizationConfig(global_config=OpPalettizerConfig(nbits=4, weight_threshold=100),
                                                            op_name_configs={"fc_false": None})),
    ("mlp_ios18_fp32", "prune", OptimizationConfig(global_config=OpThresholdPrunerConfig(threshold=0.1))),
    ("mlp_ios17_fp16", "linear", OptimizationConfig(global_config=OpLinearQuantizerConfig(dtype="uint8", mode="linear"),
                                                     op_name_configs={"fc2": None})),
])  # fmt: skip
def test_catalog_packages_like_coremltools(mlpackage, workdir, name, api, config):  # noqa: F811
    chosen = assert_same_as_coremltools(mlpackage(name), api, config, workdir)
    assert chosen


def test_already_compressed_weights_are_left_alone(mlpackage):  # noqa: F811
    records = inventory(load_package(mlpackage("ios16_affine")))
    decisions = decide(records, OptimizationConfig(global_config=OpPalettizerConfig(nbits=4)))
    assert [d.skipped for d in decisions if d.id.startswith("fc1")] == ["already compressed (constexpr_affine_dequantize)", 
                                                                         "rank 1: coremltools never compresses rank <= 1 consts"]


def test_multifunction_weights_are_selected_once_across_functions(mlpackage):  # noqa: F811
    records = inventory(load_package(mlpackage("multifunction_ios18")))
    chosen = select(records, OptimizationConfig(global_config=LIN8, op_name_configs={"fc2": None}))
    assert chosen == {"fc1_weight_0": LIN8}  # shared by main_a and main_b: one record, both functions
    assert next(r for r in records if r.id == "fc1_weight_0").functions == ("main_a", "main_b")


# -- fake records: rules without coremltools ------------------------------------------------------------------


def _fake(layer, shape, *consumers, compressed=False, axis=0, input_axis=1):
    from mlqpipe.formats.mlprogram.inventory import Consumer

    class Rec:
        pass

    rec = Rec()
    rec.layer, rec.id, rec.shape, rec.count = layer, layer, tuple(shape), int(np.prod(shape))
    rec.consumers = tuple(Consumer(*c) for c in consumers)
    rec.compressed, rec.layer_type = compressed, "constexpr_lut_to_dense" if compressed else "const"
    rec.feeds_only_outputs = not consumers
    rec.axis, rec.input_axis = axis, input_axis
    rec.where = f"op '{layer}' (const)"
    return rec


def test_threshold_is_strictly_greater_and_none_skips():
    records = [_fake("w2048", (32, 64), ("fc", "linear", "weight")), _fake("w2049", (2049, 1), ("fc2", "linear", "weight")),
               _fake("out", (64, 64))]
    decisions = decide(records, OptimizationConfig(global_config=LIN8))
    assert [d.chosen for d in decisions] == [False, True, False]
    assert decisions[0].skipped == "2048 elements, not more than weight_threshold 2048"
    assert decisions[2].skipped == "no op reads it (only block outputs)"
    assert select(records, OptimizationConfig(global_config=None)) == {}
    named = decide(records, OptimizationConfig(op_name_configs={"out": LIN8}))  # coremltools: IndexError
    assert named[2].skipped == "no op reads it (only block outputs)" and named[2].source == "op_name_configs['out']"
    skipped = decide(records, OptimizationConfig(global_config=LIN8, op_type_configs={"linear": None}))
    assert [d.skipped for d in skipped[:2]] == ["op_type_configs['linear'] is None"] * 2


def _axes_against_coremltools(package, out):
    from mlqpipe.optimize import block_sizes

    cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(weight_threshold=0))
    records = {r.id: r for r in inventory(load_package(package))}
    ours = {rid: block_sizes(records[rid], c).index(1) for rid, c in select(list(records.values()), cfg).items()}
    coremltools_choice(package, "linear", cfg, out)
    model = load_package(out)
    theirs = {_SUFFIX.sub("", r.id): int(model.op_parameters(r.handle.site.op, r.id)["axis"])
              for r in inventory(model) if r.compressed}
    assert ours == theirs
    return ours


def test_channel_axes_are_coremltools_axes(probe, mlpackage, workdir):  # noqa: F811
    """per_channel on iOS16 writes constexpr_affine_dequantize with an `axis` attribute: the axis our
    block sizes put the per-channel 1 on is it (conv_transpose 1, matmul y 1, matmul x with transpose_x
    1, conv and linear 0)."""
    ours = _axes_against_coremltools(probe(16), workdir / "axes_probe.mlpackage")
    assert ours["mm_xt_x_0"] == 1 and ours["fc_a_weight_0"] == 0
    ours = _axes_against_coremltools(mlpackage("conv_ios16"), workdir / "axes_conv.mlpackage")
    assert ours == {"conv_weight_0": 0, "deconv_weight_0": 1, "mm_y_0": 1}
