"""mlqpipe.optimize's compression functions (api.py): inputs, which weights change, warnings, errors.

Behaviour only: what each call accepts and refuses, that inputs stay as they were, which records are
compressed and in which form, that every warning is given once, that outputs pass our checker and Core
ML's validator, and that decompression equals coremltools' `decompress_weights` value for value. The
weight-by-weight equality with coremltools' compression is tests/optimize/test_matrix.py's business.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlqpipe
from mlqpipe.artifacts import read_tree
from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram.check import check_program
from mlqpipe.formats.mlprogram.model import load_package, to_tree
from mlqpipe.formats.mlprogram.program import const_value, walk
from mlqpipe.formats.registry import format_of
from mlqpipe.optimize import (
    OpLinearQuantizerConfig,
    select,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OpThresholdPrunerConfig,
    OptimizationConfig,
    decompress_weights,
    linear_quantize_weights,
    palettize_weights,
    prune_weights,
)
from tests.conftest import SHARED_MODELS, _validator, validate_models
from tests.formats.mlprogram.conftest import mlpackage  # noqa: F401  (the catalog fixture)

ct = pytest.importorskip("coremltools")

MLP = ("fc1_weight_0", "fc1_bias_0", "fc2_weight_0", "fc2_bias_0", "fc3_weight_0")


# -- helpers ------------------------------------------------------------------------------------------------


def _records(model) -> dict:
    return {r.id: r for r in format_of(model).inventory(model)}


def _forms(model) -> dict[str, tuple[str, str]]:
    """record id -> (layer_type, storage)."""
    return {i: (r.layer_type, str(r.storage)) for i, r in _records(model).items()}


def _config(op_config, **kwargs) -> OptimizationConfig:
    return OptimizationConfig(global_config=op_config, **kwargs)


def _digest(path: Path) -> str:
    return hashlib.sha256(repr(sorted(read_tree(path).items())).encode()).hexdigest()


def _caught(call, *args, **kwargs):
    """(result, our warning messages) of a call; ResourceWarnings (garbage-collected maps) are not ours."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)
    ours = [w for w in seen if not issubclass(w.category, ResourceWarning)]
    assert all(w.filename == __file__ for w in ours), [(w.filename, str(w.message)) for w in ours]  # the caller's line
    return result, [str(w.message) for w in ours]


def _saved(model, tmp_path: Path, name: str = "out.mlpackage") -> Path:
    """Save an output (check=True: our checker runs) and run Core ML's validator on it when it can run."""
    path = tmp_path / name
    model.save(path)
    assert check_program(load_package(path)) == []
    if _validator() is not None:
        assert validate_models([path]) == {path: None}
    return path


def _where(name: str, op: str, parameter: str, kind: str = "const") -> str:
    return f"op '{name}' ({kind}) ({op}.{parameter})"


# -- inputs -------------------------------------------------------------------------------------------------


def test_path_mlprogram_and_mlmodel_inputs_give_the_same_package(mlpackage):
    package = mlpackage("mlp_ios16_fp32")
    config = _config(OpLinearQuantizerConfig())
    program = load_package(package)
    outputs = [linear_quantize_weights(package, config), linear_quantize_weights(str(package), config),
               linear_quantize_weights(program, config),
               linear_quantize_weights(ct.models.MLModel(str(package), skip_model_load=True), config)]
    trees = [to_tree(o) for o in outputs]
    assert all(t == trees[0] for t in trees[1:])
    assert all(isinstance(o, mlqpipe.MLProgram) for o in outputs)


def test_inputs_are_never_modified(mlpackage):
    package = mlpackage("mlp_ios15_fp32")
    before = _digest(package)
    program = load_package(package)
    spec_before = program.spec.SerializeToString()
    config = _config(OpPalettizerConfig(nbits=2))
    out, _ = _caught(palettize_weights, program, config)
    _caught(palettize_weights, package, config)
    assert program.spec.SerializeToString() == spec_before
    assert {i: f[0] for i, f in _forms(program).items()} == dict.fromkeys(MLP, "const")
    assert _digest(package) == before
    assert out is not program and out.spec.specificationVersion == 7 and program.spec.specificationVersion == 6


def test_public_names():
    import mlqpipe.optimize as optimize

    for name in ("linear_quantize_weights", "palettize_weights", "prune_weights", "decompress_weights"):
        assert getattr(mlqpipe, name) is getattr(optimize, name)
        assert name in mlqpipe.__all__ and name in optimize.__all__


# -- which weights, in which form ---------------------------------------------------------------------------


def test_linear_defaults_compress_the_big_weights_only(mlpackage, tmp_path):
    out = linear_quantize_weights(mlpackage("mlp_ios16_fp32"), _config(OpLinearQuantizerConfig()))
    affine = ("constexpr_affine_dequantize", "linear8")
    assert _forms(out) == {"fc1_weight_0": affine, "fc1_bias_0": ("const", "float32"), "fc2_weight_0": affine,
                           "fc2_bias_0": ("const", "float32"), "fc3_weight_0": ("const", "float32")}
    _saved(out, tmp_path)


def test_fp16_weights_keep_fp16(mlpackage, tmp_path):
    out = linear_quantize_weights(mlpackage("mlp_ios17_fp16"), _config(OpLinearQuantizerConfig(mode="linear")))
    records = _records(out)
    assert (records["fc1_weight_0"].layer_type, records["fc1_weight_0"].dtype) == ("constexpr_affine_dequantize", "fp16")
    assert records["fc2_weight_0"].layer_type == "constexpr_affine_dequantize"
    _saved(out, tmp_path)


def test_engine_errors_name_the_package(mlpackage):
    """A custom LUT of 8 entries (3 bits) on an iOS16 program: the writer refuses it, naming package and weight."""
    package = mlpackage("mlp_ios16_fp32")
    eight = lambda w: (np.linspace(-0.3, 0.3, 8).astype(w.dtype), (np.arange(w.size) % 8).astype(np.uint8))  # noqa: E731
    with pytest.raises(ModelError) as caught:
        palettize_weights(package, _config(OpPalettizerConfig(mode="custom", lut_function=eight)))
    assert str(caught.value).startswith(f"{package}: {_where('fc1_weight_0', 'fc1', 'weight')}: a 3-bit LUT needs iOS18")


def test_op_name_and_op_type_configs_choose(mlpackage, tmp_path):
    package = mlpackage("mlp_ios18_fp32")
    int4 = OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=32, weight_threshold=100)
    config = _config(OpLinearQuantizerConfig(weight_threshold=100), op_type_configs={"linear": int4},
                     op_name_configs={"fc2": None})
    out = linear_quantize_weights(package, config)
    forms = _forms(out)
    assert forms["fc1_weight_0"] == forms["fc3_weight_0"] == ("constexpr_blockwise_shift_scale", "linear4")
    assert forms["fc2_weight_0"] == ("const", "float32")
    _saved(out, tmp_path)


@pytest.mark.parametrize("function, op_config, form", [
    (palettize_weights, OpPalettizerConfig(nbits=4), ("constexpr_lut_to_dense", "lut4")),
    (palettize_weights, OpPalettizerConfig(mode="uniform", nbits=3), ("constexpr_lut_to_dense", "lut3")),
    (palettize_weights, OpPalettizerConfig(nbits=2, granularity="per_grouped_channel", group_size=16),
     ("constexpr_lut_to_dense", "lut2")),
    (palettize_weights, OpPalettizerConfig(nbits=4, enable_per_channel_scale=True),
     ("constexpr_blockwise_shift_scale+constexpr_lut_to_dense", "lut4")),
    (palettize_weights, OpPalettizerConfig(mode="custom", lut_function=lambda w: (np.array([-0.1, 0.1], w.dtype),
                                                                                 (w > 0).astype(np.uint8))),
     ("constexpr_lut_to_dense", "lut1")),
    (prune_weights, OpMagnitudePrunerConfig(n_m_ratio=(2, 4)), ("constexpr_sparse_to_dense", "sparse")),
    (prune_weights, OpThresholdPrunerConfig(threshold=0.2, minimum_sparsity_percentile=0.9),
     ("constexpr_sparse_to_dense", "sparse")),
])
def test_ios18_forms(mlpackage, tmp_path, function, op_config, form):
    out = function(mlpackage("mlp_ios18_fp32"), _config(op_config))
    forms = _forms(out)
    assert forms["fc1_weight_0"] == forms["fc2_weight_0"] == form
    assert forms["fc3_weight_0"] == ("const", "float32")
    _saved(out, tmp_path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(threshold=st.integers(0, 9000), skipped=st.sets(st.sampled_from(["fc1", "fc2", "fc3", "fc1_weight_0"])),
       granularity=st.sampled_from(["per_tensor", "per_channel", "per_block"]), block=st.sampled_from([8, 16, 48, 64]))
def test_exactly_the_selected_weights_change(mlpackage, threshold, skipped, granularity, block):
    """Whatever the config: exactly the weights `select` chooses are compressed, a weight skipped with a
    warning is not among them, and the input is untouched."""
    program = load_package(mlpackage("mlp_ios18_fp32"))
    op_config = OpLinearQuantizerConfig(granularity=granularity, block_size=block, weight_threshold=threshold)
    config = _config(op_config, op_name_configs=dict.fromkeys(skipped))
    chosen = select(format_of(program).inventory(program), config)
    out, said = _caught(linear_quantize_weights, program, config)
    changed = {i for i, (kind, _) in _forms(out).items() if kind != "const"}
    warned = {i for i in MLP if any(f"'{i}'" in m for m in said)}
    assert changed == set(chosen) and not changed & warned
    assert set(chosen) <= set(MLP) - {"fc1_bias_0", "fc2_bias_0"}
    assert {f[0] for f in _forms(program).values()} == {"const"}


@pytest.mark.invalid_models("cf.mlpackage", reason="coreml-validate's mil-check refuses coremltools' own while_loop "
                            "encoding (two blocks declaring the same input names), which the input already has")
def test_nested_blocks_and_shared_consts(mlpackage, tmp_path):
    out = prune_weights(mlpackage("control_flow_ios17"), _config(OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=500)))
    sparse = {i for i, (kind, _) in _forms(out).items() if kind == "constexpr_sparse_to_dense"}
    assert sparse == {"branch.blocks[0]/fc_true_weight_0", "branch.blocks[1]/fc_false_weight_0", "loop.blocks[1]/fc_body_weight_1"}
    out.save(tmp_path / "cf.mlpackage")
    shared = linear_quantize_weights(mlpackage("shared_const_ios16"), _config(OpLinearQuantizerConfig(weight_threshold=500)))
    assert _forms(shared)["w_shared"] == ("constexpr_affine_dequantize", "linear8")
    _saved(shared, tmp_path)


def test_multifunction_models_are_compressed_and_stay_shared(mlpackage, tmp_path):
    """coremltools refuses multi-function models; here the weight both functions share is compressed once."""
    out = palettize_weights(mlpackage("multifunction_ios18"), _config(OpPalettizerConfig(nbits=4, weight_threshold=500)))
    records = _records(out)
    assert {i: str(r.storage) for i, r in records.items()} == {
        "fc1_weight_0": "lut4", "fc1_bias_0": "float32", "fc2_weight_0": "lut4", "main_b/fc2_weight_0": "lut4"}
    assert records["fc1_weight_0"].functions == ("main_a", "main_b")
    assert [s.op.type for s in records["fc1_weight_0"].handle.sites] == ["constexpr_lut_to_dense"] * 2
    again = _records(load_package(_saved(out, tmp_path)))
    assert again["fc1_weight_0"].functions == ("main_a", "main_b")  # still one weight, stored once
    np.testing.assert_array_equal(again["fc1_weight_0"].values(), records["fc1_weight_0"].values())


def test_ios15_is_raised_to_ios16_with_one_warning(mlpackage, tmp_path):
    package = mlpackage("mlp_ios15_fp32")
    out, said = _caught(linear_quantize_weights, package, _config(OpLinearQuantizerConfig()))
    assert said == [f"{package}: linear_quantize_weights: compressed weights need iOS16, and the model targets iOS15 "
                    "(specificationVersion 6); raised: function 'main': opset CoreML5 (iOS15) -> CoreML6 (iOS16); "
                    "specificationVersion 6 -> 7"]
    assert out.spec.specificationVersion == 7
    assert [e.value.opset for e in out.spec.mlProgram.functions] == ["CoreML6"]
    assert _forms(out)["fc1_weight_0"] == ("constexpr_affine_dequantize", "linear8")
    _saved(out, tmp_path)


# -- warnings -----------------------------------------------------------------------------------------------


def test_no_warning_on_an_ordinary_call(mlpackage):
    _, said = _caught(prune_weights, mlpackage("mlp_ios16_fp32"), _config(OpMagnitudePrunerConfig(target_sparsity=0.3)))
    assert said == []


def test_too_many_unique_values_warn_once_per_weight(mlpackage):
    package = mlpackage("mlp_ios17_fp16")
    out, said = _caught(palettize_weights, package, _config(OpPalettizerConfig(mode="unique")))
    assert said == [f"{package}: {_where('fc1_weight_0', 'fc1', 'weight')}: not compressed by palettize_weights: 5545 "
                    "distinct values do not fit an 8-bit LUT",
                    f"{package}: {_where('fc2_weight_0', 'fc2', 'weight')}: not compressed by palettize_weights: 5539 "
                    "distinct values do not fit an 8-bit LUT"]
    assert {f[0] for f in _forms(out).values()} == {"const"}


def test_shape_skips_warn_once(mlpackage):
    package = mlpackage("mlp_ios18_fp32")
    config = _config(OpLinearQuantizerConfig(granularity="per_block", block_size=128))
    out, said = _caught(linear_quantize_weights, package, config)
    assert said == [f"{package}: {_where('fc1_weight_0', 'fc1', 'weight')}: not compressed by linear_quantize_weights: "
                    "axis 1 (64) is not divisible by block size 128"]
    forms = _forms(out)
    assert forms["fc1_weight_0"] == ("const", "float32")
    assert forms["fc2_weight_0"] == ("constexpr_blockwise_shift_scale", "linear8")


def _with_inf(package: Path, tmp_path: Path) -> Path:
    """A copy of the package whose fc1 weight holds +inf in its first element (patched in weight.bin)."""
    copy = tmp_path / "inf.mlpackage"
    shutil.copytree(package, copy)
    model = load_package(copy)
    op = next(s.op for s in walk(model.spec.mlProgram, "") if s.name == "fc1_weight_0")
    offset = const_value(op).blobFileValue.offset
    model.close()
    weights = copy / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    (data_offset,) = struct.unpack_from("<Q", data, offset + 16)
    struct.pack_into("<f", data, data_offset, np.inf)
    weights.write_bytes(bytes(data))
    return copy


def test_inf_is_skipped_by_linear_quantization_with_one_warning(mlpackage, tmp_path):
    package = _with_inf(mlpackage("mlp_ios16_fp32"), tmp_path)
    out, said = _caught(linear_quantize_weights, package, _config(OpLinearQuantizerConfig()))
    assert said == [f"{package}: {_where('fc1_weight_0', 'fc1', 'weight')}: not compressed by linear_quantize_weights: "
                    "it holds ±inf, which linear quantization cannot represent"]
    forms = _forms(out)
    assert forms["fc1_weight_0"] == ("const", "float32")
    assert forms["fc2_weight_0"] == ("constexpr_affine_dequantize", "linear8")


def test_pruning_everything_keeps_weights_dense_with_one_warning(mlpackage, tmp_path):
    package = mlpackage("mlp_ios16_fp32")
    out, said = _caught(prune_weights, package, _config(OpMagnitudePrunerConfig(target_sparsity=1.0)))
    assert said == [f"{package}: {_where(w, op, 'weight')}: every value is zero; kept dense (a zero-length sparse "
                    "weight is not written)" for w, op in (("fc1_weight_0", "fc1"), ("fc2_weight_0", "fc2"))]
    assert {f[0] for f in _forms(out).values()} == {"const"}
    _saved(out, tmp_path)


def test_too_little_sparsity_keeps_weights_dense_with_one_warning(mlpackage):
    package = mlpackage("mlp_ios16_fp32")
    out, said = _caught(prune_weights, package, _config(OpThresholdPrunerConfig(threshold=0.01)))
    assert said == [f"{package}: {_where(w, op, 'weight')}: not compressed by prune_weights: fewer than 0.5 of its "
                    "values are at most 0.01 in magnitude (minimum_sparsity_percentile); kept dense"
                    for w, op in (("fc1_weight_0", "fc1"), ("fc2_weight_0", "fc2"))]
    assert {f[0] for f in _forms(out).values()} == {"const"}


# -- errors -------------------------------------------------------------------------------------------------


def _raises(message: str, call, *args, **kwargs) -> None:
    with pytest.raises(ModelError) as caught:
        call(*args, **kwargs)
    assert str(caught.value) == message


def test_configs_of_another_function_are_refused(mlpackage):
    package = mlpackage("mlp_ios16_fp32")
    _raises("linear_quantize_weights accepts only OpLinearQuantizerConfig; global_config is OpPalettizerConfig",
            linear_quantize_weights, package, _config(OpPalettizerConfig(nbits=4)))
    _raises("palettize_weights accepts only OpPalettizerConfig; op_type_configs['linear'] is OpLinearQuantizerConfig",
            palettize_weights, package, _config(None, op_type_configs={"linear": OpLinearQuantizerConfig()}))
    _raises("prune_weights accepts only OpMagnitudePrunerConfig or OpThresholdPrunerConfig; op_name_configs['fc1'] is "
            "OpPalettizerConfig", prune_weights, package, _config(None, op_name_configs={"fc1": OpPalettizerConfig(nbits=2)}))


def test_bad_arguments_are_refused(mlpackage):
    package = mlpackage("mlp_ios16_fp32")
    _raises("linear_quantize_weights: config must be an OptimizationConfig, got a OpLinearQuantizerConfig; wrap it: "
            "OptimizationConfig(global_config=OpLinearQuantizerConfig(...))",
            linear_quantize_weights, package, OpLinearQuantizerConfig())
    _raises("prune_weights: config must be an OptimizationConfig, got dict", prune_weights, package, {})
    _raises("palettize_weights: joint_compression must be True or False, got 1",
            palettize_weights, package, _config(OpPalettizerConfig(nbits=4)), 1)
    _raises(f"{package}-missing: no such model; decompress_weights takes a .mlpackage directory",
            decompress_weights, f"{package}-missing")
    _raises("prune_weights: cannot compress a int; pass a .mlpackage path, an mlqpipe MLProgram or a coremltools "
            "MLModel of an ML program", prune_weights, 3, _config(OpMagnitudePrunerConfig(target_sparsity=0.5)))


def test_neural_networks_are_pointed_at_quantize_weights():
    path = SHARED_MODELS / "keras_mnist_cnn.mlmodel"
    if not path.exists():
        pytest.skip("../shared/models is absent")
    config = _config(OpLinearQuantizerConfig())
    tail = ("a neural network (.mlmodel), not an ML program; linear_quantize_weights compresses ML programs "
            "(.mlpackage): quantize neural networks with mlqpipe.quantize_weights")
    _raises(f"{path}: {tail}", linear_quantize_weights, path, config)
    _raises(f"{path}: {tail}", linear_quantize_weights, mlqpipe.load_model(path), config)
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    with pytest.raises(ModelError, match="quantize neural networks with mlqpipe.quantize_weights"):
        linear_quantize_weights(mlmodel, config)


@pytest.mark.parametrize("function, op_config, setting", [
    (linear_quantize_weights, OpLinearQuantizerConfig(dtype="int4"), "dtype int4 (4-bit quantization)"),
    (linear_quantize_weights, OpLinearQuantizerConfig(dtype="uint4", granularity="per_block"), "granularity per_block"),
    (palettize_weights, OpPalettizerConfig(nbits=4, granularity="per_grouped_channel"), "granularity per_grouped_channel"),
    (palettize_weights, OpPalettizerConfig(nbits=4, cluster_dim=2), "cluster_dim 2 (vector palettization)"),
    (palettize_weights, OpPalettizerConfig(nbits=3), "nbits 3 (iOS16/17 LUTs have 2, 4, 16, 64 or 256 entries)"),
    (palettize_weights, OpPalettizerConfig(nbits=4, enable_per_channel_scale=True), "enable_per_channel_scale"),
])
@pytest.mark.parametrize("name, opset", [("mlp_ios15_fp32", "CoreML5"), ("mlp_ios16_fp32", "CoreML6")])
def test_ios18_settings_are_refused_below_ios18(mlpackage, function, op_config, setting, name, opset):
    package = mlpackage(name)
    _raises(f"{package}: {_where('fc1_weight_0', 'fc1', 'weight')}: {setting} needs iOS18 (opset CoreML8), but function "
            f"'main' has opset {opset}; convert the model for iOS18 (coremltools: "
            "minimum_deployment_target=ct.target.iOS18) or choose a setting iOS16 supports",
            _caught, function, package, _config(op_config))  # no warning before the error either


def test_joint_compression_needs_ios18(mlpackage):
    package = mlpackage("ios16_sparse")
    _raises(f"{package}: palettize_weights: joint_compression needs iOS18 (opset CoreML8), but function 'main' has "
            "opset CoreML6; convert the model for iOS18 (coremltools: minimum_deployment_target=ct.target.iOS18) or "
            "compress without joint_compression",
            palettize_weights, package, _config(OpPalettizerConfig(nbits=4)), joint_compression=True)


def test_compressed_weights_are_left_alone_without_joint(mlpackage):
    package = mlpackage("ios18_sparse")
    out, said = _caught(palettize_weights, package, _config(OpPalettizerConfig(nbits=4)))
    assert said == [] and _forms(out) == _forms(load_package(package))


# -- joint compression --------------------------------------------------------------------------------------


def _zeros_kept(before, after) -> None:
    for i in ("fc1_weight_0_sparsified", "fc2_weight_0_sparsified"):
        was, now = before[i].values(), after[i].values()
        np.testing.assert_array_equal(now == 0, was == 0)


def test_joint_palettization_of_pruned_weights(mlpackage, tmp_path):
    package = mlpackage("ios18_sparse")
    out = palettize_weights(package, _config(OpPalettizerConfig(nbits=2)), joint_compression=True)
    forms = _forms(out)
    assert forms["fc1_weight_0_sparsified"][0] == forms["fc2_weight_0_sparsified"][0] == \
        "constexpr_lut_to_sparse+constexpr_sparse_to_dense"
    assert forms["fc3_weight_0"] == ("const", "float32")  # under weight_threshold, as without joint
    _zeros_kept(_records(load_package(package)), _records(out))
    _saved(out, tmp_path)


def test_joint_quantization_of_pruned_weights(mlpackage, tmp_path):
    package = mlpackage("ios18_sparse")
    out = linear_quantize_weights(package, _config(OpLinearQuantizerConfig(weight_threshold=100)), joint_compression=True)
    forms = _forms(out)
    assert forms["fc1_weight_0_sparsified"][0] == "constexpr_sparse_blockwise_shift_scale+constexpr_sparse_to_dense"
    assert forms["fc3_weight_0"] == ("constexpr_blockwise_shift_scale", "linear8")  # a plain const: compressed as usual
    _zeros_kept(_records(load_package(package)), _records(out))
    _saved(out, tmp_path)


def test_joint_quantization_of_a_lut(mlpackage, tmp_path):
    package = mlpackage("ios18_lut_3bit")
    per_tensor = _config(OpLinearQuantizerConfig(granularity="per_tensor"))
    out = linear_quantize_weights(package, per_tensor, joint_compression=True)
    before, after = _records(load_package(package)), _records(out)
    for i in ("fc1_weight_0_palettized", "fc2_weight_0_palettized"):
        assert (after[i].layer_type, str(after[i].storage)) == ("constexpr_blockwise_shift_scale+constexpr_lut_to_dense", "lut3")
        assert len(np.unique(after[i].values())) <= 8 and before[i].values().shape == after[i].values().shape
    again, said = _caught(linear_quantize_weights, out, per_tensor, joint_compression=True)
    assert said == [] and _forms(again) == _forms(out)  # a quantized LUT is not quantized again
    _saved(out, tmp_path)


# -- decompression ------------------------------------------------------------------------------------------


def _by_use(model) -> dict:
    """(first consumer op, parameter) -> the const's values in their own dtype, for a model of plain consts."""
    out = {}
    for r in format_of(model).inventory(model):
        assert r.layer_type == "const", r.where
        out[(r.consumers[0].op, r.consumers[0].parameter)] = np.array(r.native_values())
    return out


@pytest.mark.parametrize("name", ["ios16_affine", "ios16_lut", "ios16_sparse", "ios18_int4_block", "ios18_lut_grouped",
                                  "ios18_lut_3bit", "ios18_lut_vector", "ios18_lut_channel_scale",
                                  "ios18_joint_sparse_lut", "ios18_joint_sparse_int8", "conv_ios16_affine"])
def test_decompression_equals_coremltools(mlpackage, tmp_path, name):
    cto = pytest.importorskip("coremltools.optimize.coreml")
    package = mlpackage(name)
    ours = decompress_weights(package)
    assert ours.spec.specificationVersion == load_package(package).spec.specificationVersion
    theirs = tmp_path / "theirs.mlpackage"
    cto.decompress_weights(ct.models.MLModel(str(package), skip_model_load=True)).save(str(theirs))
    mine, reference = _by_use(load_package(_saved(ours, tmp_path))), _by_use(load_package(theirs))
    assert mine.keys() == reference.keys()
    for use, values in reference.items():
        assert mine[use].dtype == values.dtype and mine[use].shape == values.shape, use
        np.testing.assert_array_equal(mine[use], values, err_msg=str(use))


@pytest.mark.parametrize("name, function, op_config", [
    ("mlp_ios16_fp32", palettize_weights, OpPalettizerConfig(nbits=2)),
    ("mlp_ios17_fp16", linear_quantize_weights, OpLinearQuantizerConfig(mode="linear", dtype="uint8")),
    ("mlp_ios18_fp32", linear_quantize_weights, OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=16)),
    ("mlp_ios18_fp32", prune_weights, OpMagnitudePrunerConfig(n_m_ratio=(3, 4))),
])
def test_our_outputs_decompress_as_coremltools_decompresses_them(mlpackage, tmp_path, name, function, op_config):
    """The round trip on our own output: coremltools reads it and decodes every weight as we do."""
    cto = pytest.importorskip("coremltools.optimize.coreml")
    compressed = _saved(function(mlpackage(name), _config(op_config)), tmp_path, "compressed.mlpackage")
    theirs = tmp_path / "theirs.mlpackage"
    cto.decompress_weights(ct.models.MLModel(str(compressed), skip_model_load=True)).save(str(theirs))
    mine = _by_use(load_package(_saved(decompress_weights(compressed), tmp_path)))
    reference = _by_use(load_package(theirs))
    assert mine.keys() == reference.keys()
    for use, values in reference.items():
        assert mine[use].dtype == values.dtype, use
        np.testing.assert_array_equal(mine[use], values, err_msg=str(use))


def test_decompressing_a_plain_model_changes_nothing(mlpackage):
    package = mlpackage("mlp_ios15_fp32")
    out, said = _caught(decompress_weights, package)
    assert said == [] and to_tree(out) == read_tree(package)  # nothing to do: the same package, bytes and all
