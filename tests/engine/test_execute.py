"""engine/execute.py: run_stage on a small model — the storage of every weight after each stage, the values
it writes (against numpy), the versions, and that it does what the plan said."""

import numpy as np
import pytest

import mlqpipe
from mlqpipe.engine.execute import run_job, run_stage
from mlqpipe.engine.plan import plan_recipe
from mlqpipe.errors import RecipeError
from mlqpipe.recipe import load_recipe
from tests.builders import conv_batchnorm_model, small_model


def _recipe(tmp_path, monkeypatch, rules: str, stages: str, spec=None):
    (tmp_path / "m.mlmodel").write_bytes((spec or small_model()).SerializeToString())
    (tmp_path / "r.yaml").write_text(
        f"version: 1\nmodels:\n  - {{input: m.mlmodel, output: out/m.mlmodel}}\nrules:\n{rules}\nstages:\n{stages}\n"
    )
    monkeypatch.chdir(tmp_path)
    return load_recipe("r.yaml")


def _storage(model) -> dict:
    return {r.id: str(r.storage) for r in mlqpipe.inventory(model.spec)}


RULES = "  convs: {layer_type: convolution}\n  dense_w: {layer: dense, field: weights}\n  no_bias: {field: bias, exclude: true}\n  rest: {storage: float32}"
STAGES = ("  - {name: big, mode: linear, nbits: 8, rules: [no_bias, convs]}\n  - {name: lut, mode: kmeans_lut, nbits: 4, rules: [dense_w]}\n"
          "  - {name: rest, mode: fp16, rules: [rest]}")


def test_storage_after_each_stage(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, monkeypatch, RULES, STAGES)
    model = mlqpipe.load_model(tmp_path / "m.mlmodel")
    floats = {r.id: r.values().astype(np.float64) for r in mlqpipe.inventory(model.spec)}
    seen = []
    for stage in recipe.stages:
        run_stage(model, stage, recipe)
        seen.append((_storage(model), model.spec.specificationVersion))
    assert seen == [
        ({"conv1:weights": "linear8", "conv1:bias": "float32", "dense:weights": "float32", "dense:bias": "float32"}, 3),
        ({"conv1:weights": "linear8", "conv1:bias": "float32", "dense:weights": "lut4", "dense:bias": "float32"}, 3),
        ({"conv1:weights": "linear8", "conv1:bias": "float16", "dense:weights": "lut4", "dense:bias": "float16"}, 3),
    ]
    got = {r.id: r.values().astype(np.float64) for r in mlqpipe.inventory(model.spec)}
    rows = floats["conv1:weights"].reshape(8, -1)
    step = (rows.max(1) - rows.min(1)) / 255
    assert np.all(np.abs(got["conv1:weights"].reshape(8, -1) - rows).max(1) <= step / 2 * (1 + 1e-5) + 1e-7)
    assert len(np.unique(got["dense:weights"])) <= 16
    for rid in ("conv1:bias", "dense:bias"):
        np.testing.assert_array_equal(got[rid], floats[rid].astype(np.float16).astype(np.float64))


def test_run_stage_returns_the_plans_decisions(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, monkeypatch, RULES, STAGES)
    (planned,), _ = plan_recipe(recipe)
    model = mlqpipe.load_model(tmp_path / "m.mlmodel")
    for stage, sp in zip(recipe.stages, planned.stages):
        done = run_stage(model, stage, recipe)
        assert done.decisions == sp.decisions
        after = _storage(model)
        assert {d.id: d.storage_after for d in done.decisions} == after


def test_fold_stage_then_quantize(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, monkeypatch, "  all: {}", "  - {name: f, mode: fold}\n  - {name: q, mode: linear, nbits: 8, rules: [all]}",
                     spec=conv_batchnorm_model(scale_after=True))
    model = mlqpipe.load_model(tmp_path / "m.mlmodel")
    assert [l.name for l in model.spec.neuralNetwork.layers] == ["conv", "bn", "sc"]
    sp = run_stage(model, recipe.stages[0], recipe)
    assert [(f.into, f.removed) for f in sp.folds] == [("conv", "bn"), ("conv", "sc")] and sp.decisions == []
    assert [l.name for l in model.spec.neuralNetwork.layers] == ["conv"]
    assert _storage(model) == {"conv:weights": "float32", "conv:bias": "float32"}
    assert model.spec.specificationVersion == 1  # a fold needs no newer Core ML
    run_stage(model, recipe.stages[1], recipe)
    assert _storage(model) == {"conv:weights": "linear8", "conv:bias": "linear8"}
    assert model.spec.specificationVersion == 3


def test_a_stage_that_changes_nothing_keeps_the_version(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, monkeypatch, "  none: {layer: conv1, exclude: true}", "  - {name: q, mode: linear, nbits: 8, rules: [none]}")
    model = mlqpipe.load_model(tmp_path / "m.mlmodel")
    before = model.spec.SerializeToString()
    sp = run_stage(model, recipe.stages[0], recipe)
    assert {d.action for d in sp.decisions} == {"keep"}
    assert model.spec.SerializeToString() == before


def test_requantizing_raises_the_plans_problem_and_leaves_the_model(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, monkeypatch, "  convs: {layer_type: convolution}",
                     "  - {name: a, mode: linear, nbits: 8, rules: [convs]}\n  - {name: b, mode: linear_lut, nbits: 4, rules: [convs]}")
    model = mlqpipe.load_model(tmp_path / "m.mlmodel")
    run_stage(model, recipe.stages[0], recipe)
    after_a = model.spec.SerializeToString()
    with pytest.raises(RecipeError, match=r"stage 'b' would quantize conv1:weights, which is already quantized \(linear8\)"):
        run_stage(model, recipe.stages[1], recipe)
    assert model.spec.SerializeToString() == after_a


def test_python_rule_runs_in_the_build(tmp_path, monkeypatch):
    (tmp_path / "team_pick.py").write_text("def pick(rec):\n    return rec.field == 'weights'\n")
    recipe = _recipe(tmp_path, monkeypatch, "  team: {python: 'team_pick:pick'}", "  - {name: q, mode: linear, nbits: 4, rules: [team]}")
    model = mlqpipe.load_model(tmp_path / "m.mlmodel")
    run_stage(model, recipe.stages[0], recipe)
    assert _storage(model) == {"conv1:weights": "linear4", "conv1:bias": "float32", "dense:weights": "linear4", "dense:bias": "float32"}
    with pytest.raises(RecipeError):  # --no-custom-code
        run_stage(mlqpipe.load_model(tmp_path / "m.mlmodel"), recipe.stages[0], recipe, allow_custom=False)


def test_run_job_works_on_a_copy_and_keeps_snapshots(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, monkeypatch, RULES, STAGES)
    data = (tmp_path / "m.mlmodel").read_bytes()
    snapshots = []
    model, plans = run_job(recipe.models[0], recipe, snapshots=snapshots)
    assert (tmp_path / "m.mlmodel").read_bytes() == data and not (tmp_path / "out").exists()
    assert len(plans) == 3 and len(snapshots) == 4
    kinds = [sorted({str(r.storage) for r in mlqpipe.inventory(s)}) for s in snapshots]
    assert kinds == [["float32"], ["float32", "linear8"], ["float32", "linear8", "lut4"], ["float16", "linear8", "lut4"]]
    assert snapshots[-1].SerializeToString() == model.spec.SerializeToString()
