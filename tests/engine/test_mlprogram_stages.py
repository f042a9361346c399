"""Recipe stages on ML programs: every mode's settings reach the kernels as the recipe says, the graph is
left alone, and settings that do not fit the model are located problems (the plan says where and what to
do; nothing is written)."""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest

import mlqpipe
from mlqpipe.cli import main
from mlqpipe.formats.mlprogram.check import check_program
from mlqpipe.formats.mlprogram.program import walk
from mlqpipe.quant.affine import AffineSettings, dequantize, linear_quantize
from mlqpipe.quant.palette import PaletteSettings, depalettize, palettize
from mlqpipe.quant.prune import PruneSettings, densify, prune
from tests.formats.mlprogram.conftest import mlpackage  # noqa: F401  (the catalog fixture)


def _recipe(tmp_path, stages: str, model_lines: str = "", rules: str = "big: {count: {min: 2049}}") -> None:
    text = textwrap.dedent("""\
        version: 1
        models:
          - input: m.mlpackage
            output: out/{{stem}}.q.mlpackage
        {model_lines}rules:
          {rules}
        stages:
        {stages}""").format(model_lines=model_lines, rules=rules, stages=textwrap.indent(textwrap.dedent(stages), "  "))
    (tmp_path / "r.yaml").write_text(text)


@pytest.fixture
def project(mlpackage, tmp_path, monkeypatch):  # noqa: F811  (the fixture imported above)
    def make(name: str = "mlp_ios18_fp32"):
        shutil.copytree(mlpackage(name), tmp_path / "m.mlpackage")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
        return tmp_path

    return make


def _by_id(path):
    return {r.id: r for r in mlqpipe.inventory(path)}


def _other_ops(path, ids) -> list[bytes]:
    """Every op but the compressed consts, serialized, with each weight-file reference replaced by the
    bytes it points at (saving compacts weight.bin, so offsets of untouched blobs move)."""
    import hashlib

    m = mlqpipe.load_model(path)
    out = []
    for site in walk(m.spec.mlProgram, m.source):
        if site.name in ids:
            continue
        op = type(site.op)()
        op.CopyFrom(site.op)
        values = [e.value for e in op.attributes] + [b.value for e in op.inputs for b in e.value.arguments if b.HasField("value")]
        for value in values:
            if value.HasField("blobFileValue"):
                ref = value.blobFileValue
                ref.fileName = hashlib.sha256(m.blob_file(ref.fileName).raw(ref.offset)).hexdigest()
                ref.offset = 0
        out.append(op.SerializeToString(deterministic=True))
    return out


# what each stage must decode to, computed with the kernels' own settings as coremltools names them
def _affine(**kw):
    return lambda w, rec: dequantize(linear_quantize(w, AffineSettings(axis=rec.axis, input_axis=rec.input_axis, **kw)))


def _palette(**kw):
    return lambda w, rec: depalettize(palettize(w, PaletteSettings(channel_axis=rec.axis, **kw)))


def _prune(**kw):
    return lambda w, rec: densify(prune(w, PruneSettings(**kw)))


CASES = {
    "linear int8 per channel (coremltools' default mode)": ("{mode: linear_symmetric, dtype: int8, rules: [big]}",
                                                           _affine(mode="linear_symmetric", dtype="int8")),
    "linear nbits 8 means int8": ("{mode: linear, nbits: 8, rules: [big]}", _affine(mode="linear", dtype="int8")),
    "uint8 per tensor": ("{mode: linear, dtype: uint8, granularity: per_tensor, rules: [big]}",
                         _affine(mode="linear", dtype="uint8", granularity="per_tensor")),
    "int4 per block 16": ("{mode: linear, dtype: int4, granularity: per_block, block_size: 16, rules: [big]}",
                          _affine(mode="linear", dtype="int4", granularity="per_block", block_size=16)),
    "uint4 blocks per axis": ("{mode: linear_symmetric, dtype: uint4, granularity: per_block, block_size: [1, 32], rules: [big]}",
                              _affine(mode="linear_symmetric", dtype="uint4", granularity="per_block", block_size=(1, 32))),
    "uniform 3-bit LUT": ("{mode: linear_lut, nbits: 3, rules: [big]}", _palette(mode="uniform", nbits=3)),
    "k-means 4-bit groups of 16": ("{mode: kmeans_lut, nbits: 4, granularity: per_grouped_channel, group_size: 16, rules: [big]}",
                                   _palette(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16)),
    "vector LUT": ("{mode: kmeans_lut, nbits: 2, cluster_dim: 2, rules: [big]}", _palette(mode="kmeans", nbits=2, cluster_dim=2)),
    "prune 50 %": ("{mode: prune, target_sparsity: 0.5, rules: [big]}", _prune(target_sparsity=0.5)),
    "prune 2:4 on dim 1": ("{mode: prune, n_m: [2, 4], rules: [big]}", _prune(n_m=(2, 4))),
    "prune blocks of 2": ("{mode: prune, target_sparsity: 0.25, block_size: 2, rules: [big]}", _prune(target_sparsity=0.25, block_size=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stage_decodes_to_what_its_settings_say_and_leaves_every_other_op_alone(project, capsys, case):
    stage, expected = CASES[case]
    root = project()
    _recipe(root, f"- {stage}\n")
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    out = root / "out" / "m.q.mlpackage"
    before, after = _by_id(root / "m.mlpackage"), _by_id(out)
    chosen = {i for i, r in before.items() if r.count > 2049}
    assert chosen and {i for i, r in after.items() if r.compressed} == chosen
    for i in chosen:
        w = before[i].native_values()
        assert np.array_equal(after[i].values(), np.asarray(expected(w, before[i]), np.float32)), i
    assert _other_ops(out, chosen) == _other_ops(root / "m.mlpackage", chosen)
    assert [f for f in check_program(mlqpipe.load_model(out)) if f.severity == "error"] == []


def test_fp16_weights_are_compressed_in_fp16_arithmetic(project, capsys):
    root = project("mlp_ios17_fp16")
    _recipe(root, "- {mode: linear, dtype: int8, granularity: per_tensor, rules: [big]}\n")
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    before, after = _by_id(root / "m.mlpackage"), _by_id(root / "out" / "m.q.mlpackage")
    for i, rec in after.items():
        if rec.compressed:
            w = before[i].native_values()
            assert w.dtype == np.float16
            want = dequantize(linear_quantize(w, AffineSettings(mode="linear", granularity="per_tensor")))
            assert want.dtype == np.float16 and np.array_equal(rec.values(), want.astype(np.float32))


def _problems(capsys) -> str:
    assert main(["validate", "r.yaml"]) == 2
    return capsys.readouterr().err


PROBLEMS = {
    "an ML-program setting on a neural network": (
        "digits", "- {mode: linear, nbits: 8, dtype: int8, rules: [big]}\n",
        "r.yaml:8:37: stages[0].dtype: {model}: stage '1-linear': dtype is not a setting of linear on neuralnetwork "
        "models (hint: it takes nbits, coremltools_rounding (see schemas/recipe.schema.json))"),
    "a LUT size ML programs cannot store": (
        "mlp_ios18_fp32", "- {mode: kmeans_lut, nbits: 5, rules: [big]}\n",
        "r.yaml:8:31: stages[0].nbits: m.mlpackage: stage '1-kmeans_lut': mlprogram models store kmeans_lut with nbits "
        "1, 2, 3, 4, 6, 8, not 5 (hint: choose one of 1, 2, 3, 4, 6, 8)"),
    "nbits and dtype disagree": (
        "mlp_ios18_fp32", "- {mode: linear, nbits: 8, dtype: int4, rules: [big]}\n",
        "r.yaml:8:27: stages[0].nbits: stage '1-linear': nbits 8 disagrees with dtype int4 (hint: give one of them "
        "(dtype is the ML-program setting; nbits the neural-network one))"),
    "a neural network without nbits": (
        "digits", "- {mode: linear, dtype: int8, rules: [big]}\n",
        "r.yaml:8:12: stages[0].mode: {model}: stage '1-linear': linear on neuralnetwork models needs nbits (hint: add nbits: 1..8)"),
    "prune on a neural network": (
        "digits", "- {mode: prune, target_sparsity: 0.5, rules: [big]}\n",
        "r.yaml:8:12: stages[0].mode: {model}: stage '1-prune': mode prune is not available for neuralnetwork models"),
    "block pruning without a target": (
        "mlp_ios18_fp32", "- {mode: prune, n_m: [2, 4], block_size: 2, rules: [big]}\n",
        "r.yaml:8:32: stages[0].block_size: 'block_size' without 'target_sparsity' (hint: block pruning needs target_sparsity)"),
    "an iOS18 setting on an iOS16 model": (
        "mlp_ios16_fp32", "- {mode: kmeans_lut, nbits: 4, granularity: per_grouped_channel, group_size: 16, rules: [big]}\n",
        "r.yaml:8:5: stages[0]: m.mlpackage: stage '1-kmeans_lut': granularity per_grouped_channel needs iOS 18 "
        "(specificationVersion 9); this model targets iOS 16 (hint: set deployment_target: iOS18 for this model (in its "
        "models entry or in defaults) to raise it, or choose a setting its target supports)"),
    "any compression on an iOS15 model": (
        "mlp_ios15_fp32", "- {mode: fp16, rules: [big]}\n",
        "r.yaml:8:5: stages[0]: m.mlpackage: stage '1-fp16': compressed weights (constexpr ops) needs iOS 16 "
        "(specificationVersion 7); this model targets iOS 15 (hint: set deployment_target: iOS16 for this model"),
}


@pytest.mark.parametrize("case", list(PROBLEMS))
def test_settings_that_do_not_fit_the_model_are_located(project, tmp_path, monkeypatch, capsys, case):
    name, stage, message = PROBLEMS[case]
    if name == "digits":
        from tests.conftest import REPO

        shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
        monkeypatch.chdir(tmp_path)
        _recipe(tmp_path, stage, rules="big: {layer: dense_1}")
        (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("m.mlpackage", "m.mlmodel"))
    else:
        _recipe(project(name), stage)
    err = _problems(capsys)
    assert message.format(model="m.mlmodel") in err, err
    assert not (tmp_path / "out").exists()


def test_deployment_target_raises_the_model_explicitly_and_the_plan_says_so(project, capsys):
    root = project("mlp_ios16_fp32")
    _recipe(root, "- {mode: linear, dtype: int4, granularity: per_block, block_size: 32, rules: [big]}\n",
            model_lines="    deployment_target: iOS18\n")
    assert main(["plan", "--json", "r.yaml"]) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert model["specification_version"] == {"before": 7, "after": 9}
    assert model["deployment_target_changes"] == ["function 'main': opset CoreML6 (iOS16) -> CoreML8 (iOS18)",
                                                  "specificationVersion 7 -> 9"]
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    out = mlqpipe.load_model(root / "out" / "m.q.mlpackage")
    assert out.spec.specificationVersion == 9
    assert [e.value.opset for e in out.spec.mlProgram.functions] == ["CoreML8"]
    report = json.loads((root / "out" / "m.q.report.json").read_text())
    assert report["specification_version"]["before"] == 7 and report["specification_version"]["after"] == 9


def test_deployment_target_is_refused_over_ios16_constexprs_it_would_reinterpret(project, capsys):
    root = project("ios16_lut")
    _recipe(root, "- {mode: linear, dtype: int4, granularity: per_block, rules: [big]}\n",
            model_lines="    deployment_target: iOS18\n", rules="big: {count: {min: 2049}, storage: float32, optional: true}")
    err = _problems(capsys)
    assert "r.yaml:5:24: models[0].deployment_target: m.mlpackage: function 'main' holds op" in err, err
    assert "(constexpr_lut_to_dense) in its CoreML6 form, which iOS18 defines differently; decompress it first" in err


def test_deployment_target_is_for_ml_programs(tmp_path, monkeypatch, capsys):
    from tests.conftest import REPO

    shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    monkeypatch.chdir(tmp_path)
    _recipe(tmp_path, "- {mode: fp16, rules: [big]}\n", model_lines="    deployment_target: iOS18\n", rules="big: {layer: dense_1}")
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("m.mlpackage", "m.mlmodel"))
    err = _problems(capsys)
    assert "r.yaml:5:24: models[0].deployment_target: m.mlmodel: deployment_target applies to ML programs; neuralnetwork " \
           "models get the version their modes need" in err, err


@pytest.mark.parametrize("stage, misfit", [
    ("{mode: linear, dtype: int8, granularity: per_block, block_size: 48, rules: [big]}",
     "op 'fc1_weight_0' (const) (fc1.weight): axis 1 has 64 elements, not a multiple of the block size 48"),
    ("{mode: kmeans_lut, nbits: 4, granularity: per_grouped_channel, group_size: 48, rules: [big]}",
     "op 'fc1_weight_0' (const) (fc1.weight): the 128 channels on axis 0 are not a multiple of group_size 48"),
    ("{mode: prune, n_m: [3, 40], rules: [big]}",
     "op 'fc1_weight_0' (const) (fc1.weight): m 40 is more than half of the 64 channels on axis 1"),
])
def test_settings_that_do_not_fit_a_selected_weight_are_found_by_the_plan(project, capsys, stage, misfit):
    root = project()
    _recipe(root, f"- {stage}\n")
    err = _problems(capsys)
    assert f"r.yaml:8:5: stages[0]: m.mlpackage: stage '1-{stage.split()[1][:-1]}': {misfit} — selected by rule 'big' " \
           "(hint: change the stage's settings, or exclude this weight from its rules)" in err, err
    assert main(["build", "r.yaml"]) == 1 and misfit in capsys.readouterr().err
    assert not (root / "out" / "m.q.mlpackage").exists()


def test_compressing_a_compressed_weight_needs_joint(project, capsys):
    root = project()
    _recipe(root, "- {mode: prune, target_sparsity: 0.5, rules: [big]}\n- {mode: kmeans_lut, nbits: 4, rules: [big]}\n")
    err = _problems(capsys)
    assert "stage '2-kmeans_lut' would quantize fc1_weight_0, which is already quantized (sparse)" in err
    assert "or say joint: true (ML programs) to compress on top" in err


def _chosen(root) -> set[str]:
    from mlqpipe.engine.plan import plan_recipe
    from mlqpipe.recipe import load_recipe

    (plan,), problems = plan_recipe(load_recipe(root / "r.yaml"))
    assert problems == []
    return {d.id for d in plan.stages[0].decisions if d.action == "quantize"}


@pytest.mark.parametrize("rule, chosen", [
    ("{layer: fc2, field: weight}", {"fc2_weight_0"}),  # a reader's name selects its weights
    ("{layer: fc1_weight_0}", {"fc1_weight_0"}),  # and so does the const's own
    ("{layer_regex: 'fc[12]', field: weight}", {"fc1_weight_0", "fc2_weight_0"}),
    ("{layer_type: linear, field: weight}", {"fc1_weight_0", "fc2_weight_0", "fc3_weight_0"}),
    ("{layer_type: const, field: weight, out_channels: {min: 100}}", {"fc1_weight_0"}),
    ("{field: weight, in_channels: {max: 64}}", {"fc1_weight_0", "fc3_weight_0"}),
    ("{function: main, field: weight, count: {min: 1000}}", {"fc1_weight_0", "fc2_weight_0"}),
])
def test_rules_select_ml_program_weights_by_reader_function_and_channels(project, rule, chosen):
    root = project()
    _recipe(root, "- {mode: linear_symmetric, rules: [r]}\n", rules=f"r: {rule}")
    assert _chosen(root) == chosen


def test_position_is_the_first_and_last_weight_of_each_function(project):
    root = project()
    _recipe(root, "- {mode: linear_symmetric, rules: [edges, w]}\n",
            rules="edges: {position: [first, last], exclude: true}\n  w: {field: weight}")
    assert _chosen(root) == {"fc2_weight_0"}


def test_an_ml_program_condition_on_a_neural_network_is_located(tmp_path, monkeypatch, capsys):
    from tests.conftest import REPO

    shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    monkeypatch.chdir(tmp_path)
    _recipe(tmp_path, "- {mode: fp16, rules: [r]}\n", rules="r: {function: main}")
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("m.mlpackage", "m.mlmodel"))
    err = _problems(capsys)
    assert "r.yaml:6:17: rules.r.function: m.mlmodel: rule 'r' (stage '1-fp16'): condition function cannot be answered " \
           "for neuralnetwork models (hint: drop the condition, or give this model its own rule)" in err, err


def test_a_float_lut_dtype_must_be_the_weights_own(project, capsys):
    root = project()
    _recipe(root, "- {mode: kmeans_lut, nbits: 4, lut_dtype: fp16, rules: [big]}\n")
    err = _problems(capsys)
    assert "op 'fc1_weight_0' (const) (fc1.weight): lut_dtype fp16 on a fp32 weight: a LUT has the weight's own float type" in err, err
    _recipe(root, "- {mode: kmeans_lut, nbits: 4, lut_dtype: fp32, rules: [big]}\n")
    assert main(["validate", "r.yaml"]) == 0


def test_a_weight_shared_by_functions_is_compressed_once_and_the_plan_says_which(project, capsys):
    root = project("multifunction_ios18")
    _recipe(root, "- {mode: kmeans_lut, nbits: 4, rules: [w]}\n", rules="w: {field: weight}")
    assert main(["plan", "r.yaml"]) == 0
    assert "fc1_weight_0 const 128x64 float32 -> lut4 32768 -> 4160 rule 'w'; one weight shared by functions main_a, " \
           "main_b" in " ".join(capsys.readouterr().out.split())
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    out = mlqpipe.load_model(root / "out" / "m.q.mlpackage")
    sites = [s for s in walk(out.spec.mlProgram, out.source) if s.name == "fc1_weight_0"]
    assert len(sites) == 2 and {s.op.type for s in sites} == {"constexpr_lut_to_dense"}
    refs = {(e.key, b.value.blobFileValue.offset) for s in sites for e in s.op.inputs for b in e.value.arguments
            if b.HasField("value") and b.value.HasField("blobFileValue")}
    assert len(refs) == 2  # indices and LUT, stored once for both functions
    assert {r.id for r in mlqpipe.inventory(out) if r.compressed} == {"fc1_weight_0", "fc2_weight_0", "main_b/fc2_weight_0"}


def test_a_joint_stage_compresses_on_top_and_the_report_shows_both_stages(project, capsys):
    from mlqpipe.quant.joint import dense, palettize_nonzero

    root = project()
    _recipe(root, "- {name: prune, mode: prune, target_sparsity: 0.5, rules: [big]}\n"
                  "- {name: lut, mode: kmeans_lut, nbits: 4, joint: true, rules: [big]}\n")
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    before, after = _by_id(root / "m.mlpackage"), _by_id(root / "out" / "m.q.mlpackage")
    for i in ("fc1_weight_0", "fc2_weight_0"):
        assert after[i].layer_type == "constexpr_lut_to_sparse+constexpr_sparse_to_dense"
        pruned = prune(before[i].native_values(), PruneSettings(target_sparsity=0.5))
        want = dense(palettize_nonzero(pruned, PaletteSettings(mode="kmeans", nbits=4, channel_axis=before[i].axis)))
        assert np.array_equal(after[i].values(), want.astype(np.float32))
    report = json.loads((root / "out" / "m.q.report.json").read_text())
    assert [(w["id"], w["stage"], w["nbits"]) for w in report["weights"]] == [
        ("fc1_weight_0", "prune", None), ("fc2_weight_0", "prune", None), ("fc1_weight_0", "lut", 4), ("fc2_weight_0", "lut", 4)]


def test_report_rows_of_a_dtype_stage_give_its_bits(project, capsys):
    root = project()
    _recipe(root, "- {mode: linear, dtype: int4, granularity: per_block, rules: [big]}\n")
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    report = json.loads((root / "out" / "m.q.report.json").read_text())
    assert {w["nbits"] for w in report["weights"]} == {4}


# a recipe stage and the coremltools-style API call it corresponds to give the same weights
SAME_AS_API = [
    ("{mode: linear_symmetric, rules: [big]}", "linear_quantize_weights", "OpLinearQuantizerConfig", {}),
    ("{mode: linear, dtype: uint4, granularity: per_block, block_size: 16, rules: [big]}", "linear_quantize_weights",
     "OpLinearQuantizerConfig", dict(mode="linear", dtype="uint4", granularity="per_block", block_size=16)),
    ("{mode: linear_lut, nbits: 6, granularity: per_grouped_channel, group_size: 8, rules: [big]}", "palettize_weights",
     "OpPalettizerConfig", dict(mode="uniform", nbits=6, granularity="per_grouped_channel", group_size=8)),
    ("{mode: kmeans_lut, nbits: 2, cluster_dim: 4, rules: [big]}", "palettize_weights", "OpPalettizerConfig",
     dict(mode="kmeans", nbits=2, cluster_dim=4)),
    ("{mode: prune, n_m: [1, 4], dim: 0, rules: [big]}", "prune_weights", "OpMagnitudePrunerConfig", dict(n_m_ratio=(1, 4), dim=0)),
    ("{mode: prune, threshold: 0.05, minimum_sparsity: 0.3, rules: [big]}", "prune_weights", "OpThresholdPrunerConfig",
     dict(threshold=0.05, minimum_sparsity_percentile=0.3)),
]


@pytest.mark.parametrize("stage, function, config, kwargs", SAME_AS_API)
def test_a_recipe_stage_gives_the_weights_of_the_matching_api_call(project, capsys, stage, function, config, kwargs):
    import mlqpipe.optimize as opt

    root = project()
    _recipe(root, f"- {stage}\n")
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    cfg = opt.OptimizationConfig(global_config=getattr(opt, config)(weight_threshold=2048, **kwargs))
    api = getattr(mlqpipe, function)(root / "m.mlpackage", cfg)
    ours, theirs = _by_id(root / "out" / "m.q.mlpackage"), {r.id: r for r in mlqpipe.inventory(api)}
    compressed = {i for i, r in ours.items() if r.compressed}
    assert compressed and compressed == {i for i, r in theirs.items() if r.compressed}
    for i in compressed:
        assert ours[i].layer_type == theirs[i].layer_type and ours[i].storage.describe() == theirs[i].storage.describe()
        assert np.array_equal(ours[i].values(), theirs[i].values()), i


def test_ml_programs_are_evaluated_and_accuracy_needs_class_labels(project, capsys):
    root = project()
    stage = "- {mode: linear_symmetric, rules: [big]}\n"
    _recipe(root, stage, model_lines="    gates: {max_accuracy_drop: 0.01, min_compression: 2}\n")
    err = _problems(capsys)
    assert "r.yaml:5:32: models[0].gates.max_accuracy_drop: m.mlpackage: accuracy needs a classifier; this ML program has " \
           "no class labels (a converter's classifier_config adds them) (hint: use max_output_error)" in err, err
    _recipe(root, stage, model_lines="    gates: {max_output_error: 0.01, min_compression: 2}\n"
                                     "    evaluation: {random_inputs: 8}\n")
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    report = json.loads((root / "out" / "m.q.report.json").read_text())
    gates = {g["gate"]: g for g in report["gates"]}
    assert gates["max_output_error"]["applied"] and 0 < gates["max_output_error"]["value"] <= 0.01
    assert report["evaluation"]["samples"] == 8 and report["evaluation"]["random_inputs"]
    assert gates["min_compression"]["passed"] and gates["min_compression"]["value"] > 2
