"""Custom code in recipes: custom_lut functions and python rules, imported only when building."""

import shutil
import sys

import pytest

import mlqpipe
from mlqpipe.errors import RecipeError
from mlqpipe.engine.execute import quantize_recipe
from mlqpipe.engine.plan import plan_recipe
from mlqpipe.recipe import load_recipe
from tests.conftest import REPO

LUTS = '''
import numpy as np
CALLS = []

def quantile_lut(nbits, w):
    CALLS.append(w.shape)
    table = np.quantile(w, np.linspace(0, 1, 2 ** nbits))
    return table, np.abs(w.reshape(-1, 1) - table[None, :]).argmin(axis=1)

def only_dense_1(rec):
    return rec.layer == "dense_1"

class SkipBiases:
    def do_quantize(self, layer, weight_param=None):
        return weight_param != "bias" and layer.WhichOneof("layer") == "innerProduct"
'''


@pytest.fixture()
def work(tmp_path, monkeypatch):
    shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "team_luts.py").write_text(LUTS)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("team_luts", None)


def _recipe(work, stage, rules="everything: {}"):
    text = f"version: 1\npython_path: [lib]\nmodels:\n  - {{input: m.mlmodel, output: 'out/{{stem}}.mlmodel'}}\nrules:\n  {rules}\nstages:\n  - {stage}\n"
    (work / "r.yaml").write_text(text)
    return load_recipe(work / "r.yaml")


def test_custom_lut_from_recipe(work):
    r = _recipe(work, "{mode: custom_lut, nbits: 3, function: 'team_luts:quantile_lut', rules: [everything]}")
    plan_recipe(r)
    assert "team_luts" not in sys.modules  # planning did not import it
    (job, _), = quantize_recipe(r)
    assert "team_luts" in sys.modules and sys.modules["team_luts"].CALLS
    stored = {str(x.storage) for x in mlqpipe.inventory(mlqpipe.load_model(job.output).spec)}
    assert stored == {"lut3"}


def test_python_rule_callable_and_selector_class(work):
    r = _recipe(work, "{mode: linear, nbits: 8, rules: [mine]}", "mine: {python: 'team_luts:only_dense_1'}")
    plans, problems = plan_recipe(r)
    assert problems == []
    actions = {d.id: d.action for d in plans[0].stages[0].decisions}
    assert actions["dense_1:weights"] == "custom"  # decided at build time
    (job, _), = quantize_recipe(r)
    stored = {x.id: str(x.storage) for x in mlqpipe.inventory(mlqpipe.load_model(job.output).spec)}
    assert stored["dense_1:weights"] == "linear8" and stored["dense_2:weights"] == "float32"

    sys.modules.pop("team_luts", None)
    r = _recipe(work, "{mode: linear, nbits: 8, rules: [mine]}", "mine: {python: 'team_luts:SkipBiases'}")
    (job, _), = quantize_recipe(r)
    stored = {x.id: str(x.storage) for x in mlqpipe.inventory(mlqpipe.load_model(job.output).spec)}
    assert stored["dense_1:weights"] == "linear8" and stored["dense_1:bias"] == "float32" and stored["input_scale:scale"] == "float32"


def test_no_custom_code_refuses_cleanly(work):
    r = _recipe(work, "{mode: custom_lut, nbits: 3, function: 'team_luts:quantile_lut', rules: [everything]}")
    with pytest.raises(RecipeError, match="disabled"):
        quantize_recipe(r, allow_custom=False)
    assert not (work / "out").exists()


def test_rules_after_a_custom_rule_are_not_reported_unmatched(work):
    r = _recipe(work, "{mode: linear, nbits: 8, rules: [mine, everything]}", "mine: {python: 'team_luts:only_dense_1'}\n  everything: {}")
    assert plan_recipe(r)[1] == []


def test_two_recipes_with_modules_of_the_same_name(tmp_path, monkeypatch):
    """Each recipe gets the module from its own python_path, even when one of the same name is loaded."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    for team, bits in (("a", 2), ("b", 3)):
        (tmp_path / team).mkdir()
        (tmp_path / team / "shared_luts.py").write_text(
            "import numpy as np\n"
            f"def lut(nbits, w):\n    t = np.linspace(w.min(), w.max(), 2 ** nbits)\n    t[-1] = {bits}.0\n"
            "    return t, np.abs(w.reshape(-1, 1) - t[None, :]).argmin(axis=1)\n")
        (tmp_path / f"{team}.yaml").write_text(
            f"version: 1\npython_path: [{team}]\nmodels:\n  - {{input: m.mlmodel, output: 'out/{team}.mlmodel'}}\n"
            "rules:\n  w: {layer: dense_3, field: weights}\nstages:\n  - {mode: custom_lut, nbits: 2, function: 'shared_luts:lut', rules: [w]}\n")
    try:
        tables = []
        for team in ("a", "b"):
            (job, _), = quantize_recipe(load_recipe(tmp_path / f"{team}.yaml"))
            rec = next(r for r in mlqpipe.inventory(mlqpipe.load_model(job.output).spec) if r.id == "dense_3:weights")
            tables.append(float(rec.wp.quantization.lookupTableQuantization.floatValue[-1]))
        assert tables == [2.0, 3.0]
    finally:
        sys.modules.pop("shared_luts", None)
