"""Rule conditions: every entry of a name list must match something; `position: first | last`."""

import shutil

import pytest

import mlqpipe
from mlqpipe.cli import main
from mlqpipe.formats.nn.inventory import edge_layers, topological_layers
from mlqpipe.engine.plan import plan_recipe
from mlqpipe.recipe import load_recipe
from tests.builders import add_inner_product, describe, model, network
from tests.conftest import REPO

DEMO = REPO / "pipelines" / "demo"


@pytest.fixture()
def work(tmp_path, monkeypatch):
    shutil.copy(DEMO / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _recipe(work, rules: str, stage_rules="[sel]") -> str:
    (work / "r.yaml").write_text(
        f"version: 1\nmodels:\n  - {{input: m.mlmodel, output: out/m.mlmodel}}\nrules:\n{rules}\n"
        f"stages:\n  - {{mode: linear, nbits: 8, rules: {stage_rules}}}\n"
    )
    return "r.yaml"


@pytest.mark.parametrize("rule, expected", [
    ("  sel: {layer: [dense_1, dense_4, 'dense_*']}", "r.yaml:5:26: rules.sel.layer[1]: layer 'dense_4' of rule 'sel' matches no weight"),
    ("  sel: {layer: [dense_1, 'conv*']}", "r.yaml:5:26: rules.sel.layer[1]: layer 'conv*' of rule 'sel' matches no weight"),
    ("  sel: {field: [weights, bais]}", "r.yaml:5:26: rules.sel.field[1]: field 'bais' of rule 'sel' matches no weight"),
    ("  sel: {layer_type: [innerProduct, innerproduct]}", "r.yaml:5:36: rules.sel.layer_type[1]: layer_type 'innerproduct' of rule 'sel'"),
    ("  sel: {layer_regex: ['dense_[12]', 'dense_9']}", "r.yaml:5:37: rules.sel.layer_regex[1]: layer_regex 'dense_9' of rule 'sel'"),
])
def test_a_typo_in_a_name_list_is_located(work, capsys, rule, expected):
    assert main(["validate", _recipe(work, rule)]) == 2
    err = capsys.readouterr().err
    assert "1 problem in recipe" in err and expected in err, err


def test_optional_rules_may_list_absent_names(work, capsys):
    assert main(["validate", _recipe(work, "  sel: {layer: [dense_1, dense_4], optional: true}")]) == 0


def test_every_entry_matching_passes(work, capsys):
    assert main(["validate", _recipe(work, "  sel: {layer: [dense_1, 'dense_*'], field: [weights, bias]}")]) == 0


def test_names_are_checked_across_the_recipes_models(work, capsys):
    """An entry only needs to match in one of the recipe's models."""
    m = model()
    add_inner_product(network(m), "fc", "x", "y", ic=4, oc=2, seed=1)
    (work / "other.mlmodel").write_bytes(describe(m, [("x", [4])], [("y", [2])]).SerializeToString())
    (work / "r.yaml").write_text(
        "version: 1\nmodels:\n  - {input: m.mlmodel, output: out/m.mlmodel}\n  - {input: other.mlmodel, output: out/o.mlmodel}\n"
        "rules:\n  sel: {layer: [dense_1, fc]}\nstages:\n  - {mode: linear, nbits: 8, rules: [sel]}\n")
    assert main(["validate", "r.yaml"]) == 0


def _ids(path, rule):
    recipe = load_recipe(path)
    plans, problems = plan_recipe(recipe)
    assert problems == []
    return sorted(d.id for d in plans[0].stages[0].decisions if d.action == "quantize"), recipe


def test_position_keeps_first_and_last_layers_float(work, capsys):
    quantized, _ = _ids(_recipe(work, "  edges: {position: [first, last], exclude: true}\n  rest: {}", "[edges, rest]"), None)
    assert quantized == ["dense_1:bias", "dense_1:weights", "dense_2:bias", "dense_2:weights"]  # not input_scale, not dense_3
    assert main(["quantize", "r.yaml"]) == 0
    stored = {r.id: str(r.storage) for r in mlqpipe.inventory(mlqpipe.load_model(work / "out/m.mlmodel").spec)}
    assert stored["input_scale:scale"] == "float32" and stored["dense_3:weights"] == "float32" and stored["dense_2:weights"] == "linear8"


def test_position_first_only(work):
    quantized, _ = _ids(_recipe(work, "  sel: {position: first}"), None)
    assert quantized == ["input_scale:scale"]


def test_position_follows_the_graph_not_the_stored_order():
    m = model()
    nn = network(m)
    add_inner_product(nn, "late", "h", "y", ic=4, oc=2, seed=1)   # stored first, runs second
    add_inner_product(nn, "early", "x", "h", ic=4, oc=4, seed=2)
    assert [layer.name for layer in topological_layers(nn)] == ["early", "late"]
    assert edge_layers(m) == {("", "early"): {"first"}, ("", "late"): {"last"}}


def test_position_counts_each_pipeline_model_and_not_loop_bodies():
    from mlqpipe.formats.nn import proto

    pipe = proto.Model(specificationVersion=4)
    for i in range(2):
        sub = model()
        add_inner_product(network(sub), f"a{i}", "x", "h", ic=4, oc=4, seed=i)
        loop = network(sub).layers.add(name=f"loop{i}", input=["h"], output=["l"]).loop
        add_inner_product(loop.bodyNetwork, f"inner{i}", "h", "l", ic=4, oc=4, seed=5)
        add_inner_product(network(sub), f"b{i}", "l", "y", ic=4, oc=2, seed=i + 10)
        pipe.pipeline.models.append(sub)
    edges = edge_layers(pipe)
    firsts = sorted(name for (path, name), pos in edges.items() if "first" in pos)
    lasts = sorted(name for (path, name), pos in edges.items() if "last" in pos)
    assert firsts == ["a0", "a1"] and lasts == ["b0", "b1"]


def test_real_models_have_a_first_and_last_layer(real_model):
    edges = edge_layers(mlqpipe.load_model(real_model).spec)
    kinds = sorted(p for pos in edges.values() for p in pos)
    assert kinds == ["first", "last"]
