"""mlqpipe.optimize against coremltools 9.0, weight by weight, on a matrix of configs × models (issue #17).

For every deterministic config where coremltools is right, each weight of our output holds exactly
coremltools' values: the constexpr chain (op types) and every parameter — quantized data, scales, offsets /
zero points, LUTs, indices, masks, nonzero data — with its dtype and shape, compared per weight (matrix.py
keys weights by the input const they came from; coremltools renames and fuses ops). Both sides compress the
same weights. float32 and vector k-means are not deterministic across implementations (scikit-learn's
k-means++ seeding): there our MSE per group must be at most coremltools' (a relative slack of 1e-6 for float
rounding of equal LUTs) and, for scalar LUTs, at most 1.005 × the exact 1-D optimum (coremltools' vendored
kmeans1d, test-only). Our outputs must also leave every other op of the program byte-identical, in order,
pass `check_program` and be accepted by Core ML's validator (coreml-validate, when it runs here).

How the matrix was chosen (the full product is ~2,000 pairs; CI has 2 cores and 90 s): each config runs on
the models whose ops exercise it differently — every opset it is legal on for the cheap linear configs, the
iOS18 models for iOS18-only features, the conv model (depthwise / grouped / transposed channel axes) and the
dense model (matmul x / y with both transpose flags) for every granularity, the misc model (gather, lstm,
shared and conflicting consts) for per-channel and per-tensor ones, fp16 models for fp16 scales / LUTs, the
torch model for names coming from a real converter; per-op config entries (op_type / op_name, None =
skip, a per-axis block size resolving a conflict) on two models; joint compression (iOS18) of coremltools'
own pruned / palettized outputs on the models where coremltools 9.0 does not fail; decompression of
coremltools' outputs of every chain kind. Left out on purpose (MLPROGRAM.md §9): magnitude pruning of fp16
weights (ties at the threshold: coremltools over-prunes), inf weights, 3-bit LUTs below iOS18, joint
compression of models with a shared const or int4 weights (coremltools raises).

coremltools' outputs are made once per session (cached per model + config, outside pytest's base temp:
they are inputs here, like the catalog's packages).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram.check import check_program
from mlqpipe.formats.mlprogram.model import load_package
from tests.conftest import _validator, validate_models
from tests.formats.mlprogram.conftest import mlpackage  # noqa: F401  (the catalog fixture)
from tests.formats.mlprogram.packages import MATRIX_NEEDS_TORCH, build_matrix
from tests.optimize import matrix

ct = pytest.importorskip("coremltools")
cto = pytest.importorskip("coremltools.optimize.coreml")
api = pytest.importorskip("mlqpipe.optimize.api")
ours_cfg = pytest.importorskip("mlqpipe.optimize.config")


def linspace_lut(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic custom LUT: 16 evenly spaced values over the group's range, nearest index."""
    flat = np.asarray(weight).reshape(-1)
    lut = np.linspace(float(flat.min()), float(flat.max()), 16).astype(flat.dtype)
    return lut, np.abs(flat[:, None].astype(np.float64) - lut[None, :]).argmin(axis=1).astype(np.uint8)


# -- the matrix -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One config: the function, the config class (same name in both libraries), the global config's
    arguments, and optional per-op entries: ("op_type" | "op_name", key, arguments or None = skip)."""

    name: str
    function: str
    config: str
    kwargs: tuple
    models: tuple[str, ...]
    entries: tuple = ()

    def _build(self, lib):
        op = getattr(lib, self.config)
        types = {k: None if a is None else op(**a) for scope, k, a in self.entries if scope == "op_type"}
        names = {k: None if a is None else op(**a) for scope, k, a in self.entries if scope == "op_name"}
        return lib.OptimizationConfig(global_config=op(**dict(self.kwargs)), op_type_configs=types, op_name_configs=names)

    def coremltools(self):
        return self._build(cto)

    def mlqpipe(self):
        return self._build(ours_cfg)


def _case(name, function, config, models, entries=(), **kwargs) -> Case:
    return Case(name, function, config, tuple(sorted(kwargs.items())), tuple(models.split()), tuple(entries))


LIN, PAL, PRUNE = "linear_quantize_weights", "palettize_weights", "prune_weights"
LQ, PC, MAG, THR = "OpLinearQuantizerConfig", "OpPalettizerConfig", "OpMagnitudePrunerConfig", "OpThresholdPrunerConfig"
ALL = "mx_dense_ios16 mx_dense_ios17 mx_dense_ios18 mx_conv_ios16 mx_conv_ios18 mx_misc_ios17 mx_misc_ios18 mx_fp16_ios16 mx_fp16_ios18 mx_torch_ios18"

EQUAL = [
    _case("lin_sym_int8_per_channel", LIN, LQ, ALL),
    _case("lin_uint8_per_tensor", LIN, LQ, "mx_dense_ios16 mx_conv_ios16 mx_misc_ios17 mx_fp16_ios16",
          mode="linear", dtype="uint8", granularity="per_tensor"),
    _case("lin_sym_uint8_per_channel", LIN, LQ, "mx_dense_ios16 mx_conv_ios16 mx_fp16_ios16 mx_dense_ios18", dtype="uint8"),
    _case("lin_int8_per_channel", LIN, LQ, "mx_dense_ios17 mx_conv_ios18 mx_torch_ios18", mode="linear"),
    _case("lin_sym_int4_per_block8", LIN, LQ, "mx_dense_ios18 mx_conv_ios18 mx_misc_ios18 mx_fp16_ios18 mx_torch_ios18",
          dtype="int4", granularity="per_block", block_size=8),
    _case("lin_uint4_per_channel", LIN, LQ, "mx_conv_ios18 mx_fp16_ios18", mode="linear", dtype="uint4"),
    _case("lin_int8_per_block_axes", LIN, LQ, "mx_dense_ios18 mx_misc_ios18", mode="linear", granularity="per_block",
          block_size=(4, 8)),
    _case("lin_sym_int4_per_tensor", LIN, LQ, "mx_misc_ios18", dtype="int4", granularity="per_tensor"),
    _case("lin_uint8_per_block16", LIN, LQ, "mx_conv_ios18 mx_fp16_ios18", mode="linear", dtype="uint8",
          granularity="per_block", block_size=16),
    _case("uniform4_per_tensor", PAL, PC, "mx_dense_ios16 mx_conv_ios16 mx_misc_ios17 mx_fp16_ios16 mx_torch_ios18",
          mode="uniform", nbits=4),
    _case("uniform3_grouped8", PAL, PC, "mx_dense_ios18 mx_conv_ios18 mx_misc_ios18", mode="uniform", nbits=3,
          granularity="per_grouped_channel", group_size=8),
    _case("uniform2_grouped8_axis1", PAL, PC, "mx_dense_ios18 mx_conv_ios18", mode="uniform", nbits=2,
          granularity="per_grouped_channel", group_size=8, channel_axis=1),
    _case("uniform8_per_tensor", PAL, PC, "mx_dense_ios17 mx_fp16_ios18", mode="uniform", nbits=8),
    _case("unique_per_tensor", PAL, PC, "mx_unique_ios16 mx_unique_ios18", mode="unique"),
    _case("unique_grouped16", PAL, PC, "mx_unique_ios18", mode="unique", granularity="per_grouped_channel", group_size=16),
    _case("custom_per_tensor", PAL, PC, "mx_dense_ios16 mx_torch_ios18", mode="custom", lut_function=linspace_lut),
    _case("custom_grouped16", PAL, PC, "mx_conv_ios18", mode="custom", lut_function=linspace_lut,
          granularity="per_grouped_channel", group_size=16),
    _case("kmeans4_fp16", PAL, PC, "mx_fp16_ios16 mx_fp16_ios18", mode="kmeans", nbits=4),
    _case("kmeans6_fp16", PAL, PC, "mx_fp16_ios18", mode="kmeans", nbits=6),
    _case("uniform4_per_channel_scale", PAL, PC, "mx_dense_ios18 mx_conv_ios18", mode="uniform", nbits=4,
          enable_per_channel_scale=True),
    _case("uniform4_per_channel_scale_fp16", PAL, PC, "mx_fp16_ios18", mode="uniform", nbits=4, enable_per_channel_scale=True),
    _case("uniform6_grouped4", PAL, PC, "mx_conv_ios18", mode="uniform", nbits=6, granularity="per_grouped_channel", group_size=4),
    _case("uniform1_fp16", PAL, PC, "mx_fp16_ios16", mode="uniform", nbits=1),
    _case("unique_vector2", PAL, PC, "mx_unique_ios18", mode="unique", cluster_dim=2),
    _case("lin_sym_int8_threshold4000", LIN, LQ, "mx_dense_ios16", weight_threshold=4000),
    _case("lin_entries_dense", LIN, LQ, "mx_dense_ios18", dtype="uint4",
          entries=[("op_type", "matmul", dict(mode="linear", granularity="per_tensor")), ("op_name", "fc", None),
                   ("op_name", "mm_x", dict(dtype="int4", granularity="per_block", block_size=10))]),
    _case("lin_entries_misc", LIN, LQ, "mx_misc_ios18", dtype="uint4",
          entries=[("op_type", "gather", None), ("op_type", "lstm", dict(mode="linear")),
                   ("op_name", "w_shared", dict(dtype="uint8", granularity="per_tensor")),
                   ("op_name", "w_conflict", dict(granularity="per_block", block_size=(1, 8)))]),
    _case("magnitude50", PRUNE, MAG, "mx_dense_ios16 mx_conv_ios18 mx_misc_ios17 mx_misc_ios18", target_sparsity=0.5),
    _case("magnitude_block4", PRUNE, MAG, "mx_dense_ios18 mx_conv_ios16", target_sparsity=0.5, block_size=4),
    _case("magnitude_n_m_2_4", PRUNE, MAG, "mx_dense_ios16 mx_conv_ios18", n_m_ratio=(2, 4)),
    _case("magnitude_n_m_3_8_dim0", PRUNE, MAG, "mx_dense_ios18", n_m_ratio=(3, 8), dim=0),
    _case("magnitude_n_m_named_deconv", PRUNE, MAG, "mx_conv_ios18", n_m_ratio=(1, 4),  # op_name lifts the conv/linear-only rule
          entries=[("op_name", "deconv_weight_0", dict(n_m_ratio=(1, 4)))]),
    _case("magnitude_block2_dim1_75", PRUNE, MAG, "mx_dense_ios18", target_sparsity=0.75, block_size=2, dim=1),
    _case("threshold_sparse", PRUNE, THR, "mx_dense_ios16 mx_conv_ios18 mx_fp16_ios18", threshold=0.05,
          minimum_sparsity_percentile=0.3),
    _case("threshold_too_few", PRUNE, THR, "mx_dense_ios18", threshold=0.01),
]

MSE = [
    _case("kmeans4_fp32", PAL, PC, "mx_dense_ios16 mx_misc_ios18", mode="kmeans", nbits=4),
    _case("kmeans3_fp32_grouped16", PAL, PC, "mx_conv_ios18", mode="kmeans", nbits=3,
          granularity="per_grouped_channel", group_size=16),
    _case("kmeans4_vector2", PAL, PC, "mx_dense_ios18 mx_conv_ios18", mode="kmeans", nbits=4, cluster_dim=2),
    _case("kmeans4_vector2_grouped16", PAL, PC, "mx_dense_ios18", mode="kmeans", nbits=4, cluster_dim=2,
          granularity="per_grouped_channel", group_size=16),
    _case("kmeans4_fp16_grouped32", PAL, PC, "mx_fp16_ios18", mode="kmeans", nbits=4,  # groups < 10,000: scikit-learn
          granularity="per_grouped_channel", group_size=32),
]

# joint compression (iOS18) of coremltools' compressed output, by both sides: (first case, model, second case)
JOINT = [("magnitude50", "mx_conv_ios18", _case("joint_int8_per_channel", LIN, LQ, "")),
         ("magnitude50", "mx_conv_ios18", _case("joint_uniform4", PAL, PC, "", mode="uniform", nbits=4)),
         ("uniform4_per_tensor", "mx_torch_ios18", _case("joint_int8_per_tensor", LIN, LQ, "", granularity="per_tensor"))]

# coremltools outputs decompressed by both sides: (model, case) of EQUAL / MSE, or catalog packages
DECOMPRESS = [("mx_dense_ios16", "lin_sym_int8_per_channel"), ("mx_conv_ios16", "uniform4_per_tensor"),
              ("mx_misc_ios17", "magnitude50"), ("mx_conv_ios18", "lin_sym_int4_per_block8"),
              ("mx_dense_ios18", "uniform3_grouped8"), ("mx_fp16_ios18", "kmeans4_fp16"), ("mx_dense_ios18", "kmeans4_vector2"),
              ("mx_conv_ios18", "magnitude_n_m_2_4")]
DECOMPRESS_CATALOG = ["ios18_lut_channel_scale", "ios18_joint_sparse_lut", "ios18_joint_sparse_int8"]

CASES = {c.name: c for c in EQUAL + MSE}


def _pairs(cases):
    return [pytest.param(c, m, id=f"{c.name}-{m}") for c in cases for m in c.models]


# -- outputs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def matrix_package():
    """`get(name) -> Path` of a matrix model (packages.MATRIX), built on first use, once per session,
    outside pytest's base temp (coremltools' output: an input here). Read-only."""
    directory = Path(tempfile.mkdtemp(prefix="mlqpipe-matrix-models-"))
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in MATRIX_NEEDS_TORCH and importlib.util.find_spec("torch") is None:
            pytest.skip(f"{name} needs torch, which is not installed")
        if name not in built:
            built[name] = build_matrix(name, directory)
        return built[name]

    yield get
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def coremltools_output(matrix_package):
    """`get(case, model) -> Path` of coremltools' output, made once per session."""
    directory = Path(tempfile.mkdtemp(prefix="mlqpipe-matrix-coremltools-"))
    made: dict[tuple[str, str], Path] = {}

    def get(case: Case, model: str) -> Path:
        key = (case.name, model)
        if key not in made:
            mlmodel = ct.models.MLModel(str(matrix_package(model)), skip_model_load=True)
            out = directory / f"{model}-{case.name}.mlpackage"
            getattr(cto, case.function)(mlmodel, case.coremltools()).save(str(out))
            made[key] = out
        return made[key]

    yield get
    shutil.rmtree(directory, ignore_errors=True)


def _ours(function: str, source: Path, out: Path, config=None, **options) -> Path:
    result = getattr(api, function)(str(source), config, **options) if config is not None else getattr(api, function)(str(source))
    result.save(out)
    return out


def _assert_sound(out: Path) -> None:
    errors = [str(f) for f in check_program(load_package(out)) if f.severity == "error"]
    assert not errors, errors
    if _validator() is not None:
        verdict = validate_models([out])[out]
        assert verdict is None, verdict


def _assert_nothing_else_changed(source: Path, out: Path, before_skip: set[str], after_skip: set[str]) -> None:
    """Every op but the changed weights' (`*_skip`: their op names in the input and in the output) is
    byte-identical and in the same order; so is everything outside the operations (description,
    functions, opsets, spec version)."""
    before = matrix.other_ops(source, before_skip)
    after = matrix.other_ops(out, after_skip)
    assert [(b, n) for b, n, _ in after] == [(b, n) for b, n, _ in before]
    changed = [n for (_, n, x), (_, _, y) in zip(before, after) if x != y]
    assert not changed, f"ops changed besides the compressed weights: {changed}"
    assert matrix.outside_program(out) == matrix.outside_program(source)


def _report(theirs: dict, ours: dict) -> list[str]:
    problems = []
    chosen_t = {k for k, w in theirs.items() if w.compressed}
    chosen_o = {k for k, w in ours.items() if w.compressed}
    if chosen_t != chosen_o:
        problems.append(f"compressed by coremltools only: {sorted(chosen_t - chosen_o)}; by mlqpipe only: {sorted(chosen_o - chosen_t)}")
    for key in sorted(chosen_t & chosen_o):
        readers = [sorted((t, p) for _, t, p in w.consumers) for w in (ours[key], theirs[key])]
        if readers[0] != readers[1]:
            problems.append(f"{key}: read by {readers[0]} vs {readers[1]}")
        problems += [f"{key}: {d}" for d in matrix.differences(ours[key], theirs[key])]
    return problems


# -- equality ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, model", _pairs(EQUAL))
def test_every_weight_holds_coremltools_values(matrix_package, coremltools_output, tmp_path, case, model):
    source = matrix_package(model)
    theirs = matrix.weights(coremltools_output(case, model), source)
    out = _ours(case.function, source, tmp_path / "ours.mlpackage", case.mlqpipe())
    ours = matrix.weights(out, source)
    assert _report(theirs, ours) == []
    assert any(w.compressed for w in ours.values()) or case.name == "threshold_too_few"
    _assert_nothing_else_changed(source, out, {k for k, w in ours.items() if w.compressed}, matrix.chain_op_names(out))
    _assert_sound(out)


@pytest.mark.parametrize("first, model, case", JOINT, ids=[f"{c.name}-{f}-{m}" for f, m, c in JOINT])
def test_joint_compression_holds_coremltools_values(coremltools_output, tmp_path, first, model, case):
    source = coremltools_output(CASES[first], model)
    theirs_path = tmp_path / "theirs.mlpackage"
    getattr(cto, case.function)(ct.models.MLModel(str(source), skip_model_load=True), case.coremltools(),
                                joint_compression=True).save(str(theirs_path))
    out = _ours(case.function, source, tmp_path / "ours.mlpackage", case.mlqpipe(), joint_compression=True)
    theirs, ours = matrix.weights(theirs_path, source), matrix.weights(out, source)
    assert _report(theirs, ours) == []
    assert any(len(w.chain) > 1 for w in ours.values())
    inputs = matrix.weights(source)
    changed = {k for k, w in ours.items() if w.kinds() != inputs[k].kinds()}
    _assert_nothing_else_changed(source, out, {n for k in changed for n in inputs[k].op_names},
                                 {n for k in changed for n in ours[k].op_names})
    _assert_sound(out)


# -- k-means: MSE bounds ----------------------------------------------------------------------------------


def _groups(w: np.ndarray, dense: np.ndarray, rec, case: Case) -> list[tuple[np.ndarray, np.ndarray]]:
    """(original, decoded) per palettization group: the whole weight, or group_size channels on the axis."""
    kw = dict(case.kwargs)
    if kw.get("granularity") != "per_grouped_channel":
        return [(w.reshape(-1), dense.reshape(-1))]
    axis = kw.get("channel_axis", rec.axis)
    size = kw["group_size"]
    a, b = np.moveaxis(w, axis, 0), np.moveaxis(dense, axis, 0)
    return [(a[i:i + size].reshape(-1), b[i:i + size].reshape(-1)) for i in range(0, a.shape[0], size)]


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def _optimal_mse(values: np.ndarray, nbits: int) -> float:
    """The exact 1-D k-means optimum (coremltools' vendored kmeans1d, used here as an oracle)."""
    from coremltools._deps import kmeans1d

    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    k = min(len(unique), 2**nbits)
    clusters, centroids = kmeans1d.cluster(unique, k, weights=counts)
    fit = np.asarray(centroids, np.float64)[np.asarray(clusters)][inverse.reshape(-1)]
    return _mse(values, fit)


@pytest.mark.parametrize("case, model", _pairs(MSE))
def test_kmeans_mse_is_at_most_coremltools_and_near_optimal(matrix_package, coremltools_output, tmp_path, case, model):
    source = matrix_package(model)
    original = matrix.weights(source)
    theirs = matrix.weights(coremltools_output(case, model), source)
    out = _ours(case.function, source, tmp_path / "ours.mlpackage", case.mlqpipe())
    ours = matrix.weights(out, source)
    chosen_o, chosen_t = ({k for k, w in side.items() if w.compressed} for side in (ours, theirs))
    worse = [f"compressed by coremltools only: {sorted(chosen_t - chosen_o)}; by mlqpipe only: {sorted(chosen_o - chosen_t)}"
             ] if chosen_o != chosen_t else []
    vector = dict(case.kwargs).get("cluster_dim", 1) > 1
    for key in sorted(chosen_o & chosen_t):
        w = original[key].dense()
        assert ours[key].kinds() == theirs[key].kinds(), key
        mine = _groups(w, ours[key].dense(), original[key].record, case)
        ref = _groups(w, theirs[key].dense(), original[key].record, case)
        for g, ((x, o), (_, t)) in enumerate(zip(mine, ref)):
            m_ours, m_theirs = _mse(x, o), _mse(x, t)
            if m_ours > m_theirs * (1 + 1e-6):
                worse.append(f"{key} group {g}: MSE {m_ours:.6g} > coremltools' {m_theirs:.6g}")
            if not vector:
                best = _optimal_mse(x, dict(case.kwargs)["nbits"])
                if m_ours > 1.005 * best:
                    worse.append(f"{key} group {g}: MSE {m_ours:.6g} > 1.005 × optimum {best:.6g}")
    assert worse == []
    _assert_nothing_else_changed(source, out, {k for k, w in ours.items() if w.compressed}, matrix.chain_op_names(out))
    _assert_sound(out)


# -- decompression ----------------------------------------------------------------------------------------


def _assert_same_decompression(compressed: Path, tmp_path: Path) -> None:
    theirs_path = tmp_path / "theirs_dense.mlpackage"
    cto.decompress_weights(ct.models.MLModel(str(compressed), skip_model_load=True)).save(str(theirs_path))
    out = _ours("decompress_weights", compressed, tmp_path / "ours_dense.mlpackage")
    theirs = matrix.weights(theirs_path, compressed)
    ours = matrix.weights(out, compressed)
    assert not any(w.compressed for w in ours.values())
    assert set(ours) == set(theirs)
    problems = [f"{k}: {d}" for k in sorted(ours) for d in matrix.differences(ours[k], theirs[k])]
    assert problems == []
    was = {k for k, w in matrix.weights(compressed).items() if w.compressed}
    _assert_nothing_else_changed(compressed, out, matrix.chain_op_names(compressed), {ours[k].layer for k in was})
    _assert_sound(out)


@pytest.mark.parametrize("model, case", DECOMPRESS, ids=[f"{c}-{m}" for m, c in DECOMPRESS])
def test_decompression_equals_coremltools(coremltools_output, tmp_path, model, case):
    _assert_same_decompression(coremltools_output(CASES[case], model), tmp_path)


@pytest.mark.parametrize("name", DECOMPRESS_CATALOG)
def test_decompression_of_catalog_packages_equals_coremltools(mlpackage, tmp_path, name):  # noqa: F811
    _assert_same_decompression(mlpackage(name), tmp_path)


def test_a_per_axis_block_size_of_the_wrong_rank_raises_like_coremltools(matrix_package):
    source = matrix_package("mx_conv_ios18")
    kwargs = dict(granularity="per_block", block_size=(4, 8))
    with pytest.raises(ValueError, match="block_size"):
        cto.linear_quantize_weights(ct.models.MLModel(str(source), skip_model_load=True),
                                    cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(**kwargs)))
    config = ours_cfg.OptimizationConfig(global_config=ours_cfg.OpLinearQuantizerConfig(**kwargs))
    with pytest.raises(ModelError, match=r"conv_weight_0.*block_size \[4, 8\] has 2 entries, but the weight \[32, 16, 3, 3\] has 4 axes"):
        api.linear_quantize_weights(str(source), config)
