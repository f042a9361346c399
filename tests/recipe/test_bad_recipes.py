"""Bad recipes: each gives located, readable problems (file:line:col, path, message, hint)."""

import shutil

import pytest

from mlqpipe.cli import main
from mlqpipe.errors import RecipeError
from mlqpipe.recipe import load_recipe
from mlqpipe.engine.plan import plan_recipe
from tests.conftest import REPO

GOOD_HEAD = """\
version: 1
models:
  - input: m.mlmodel
    output: out/{stem}.q.mlmodel
rules:
  everything: {}
"""


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the project root: outputs must stay inside it
    shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    (tmp_path / "my_luts.py").write_text("def quantile_lut(nbits, w):\n    raise RuntimeError('not imported by validate')\n")
    return tmp_path


# (id, recipe text, message substring, line of the (first) problem)
CASES = [
    ("unknown top key", GOOD_HEAD + "stages: [{mode: fp16, rules: [everything]}]\nstagse: []\n", "unknown key 'stagse' in the recipe (hint: did you mean 'stages'?)", 8),
    ("misspelled stage key", GOOD_HEAD + "stages:\n  - mode: linear\n    nbit: 8\n    rules: [everything]\n", "unknown key 'nbit'", 9),
    ("misspelled rule key", GOOD_HEAD.replace("everything: {}", "everything: {layer_typ: convolution}") + "stages: [{mode: fp16, rules: [everything]}]\n", "did you mean 'layer_type'?", 6),
    ("misspelled model key", GOOD_HEAD.replace("    output:", "    outptu:") + "stages: [{mode: fp16, rules: [everything]}]\n", "unknown key 'outptu'", 4),
    ("misspelled range key", GOOD_HEAD.replace("everything: {}", "everything: {count: {minimum: 3}}") + "stages: [{mode: fp16, rules: [everything]}]\n", "unknown key 'minimum'", 6),
    ("unknown mode", GOOD_HEAD + "stages:\n  - mode: kmeans\n    nbits: 4\n    rules: [everything]\n", "\"kmeans\" is not one of", 8),
    ("mode did you mean", GOOD_HEAD + "stages:\n  - mode: lineer\n    nbits: 4\n    rules: [everything]\n", "did you mean 'linear'?", 8),
    ("nbits too big", GOOD_HEAD + "stages:\n  - mode: linear\n    nbits: 16\n    rules: [everything]\n", "16 is too large; must be at most 8", 9),
    ("nbits wrong type", GOOD_HEAD + "stages:\n  - mode: linear\n    nbits: four\n    rules: [everything]\n", "expected an integer, got str \"four\"", 9),
    ("symmetric 1 bit", GOOD_HEAD + "stages:\n  - mode: linear_symmetric\n    nbits: 1\n    rules: [everything]\n", "1 is too small; must be at least 2", 9),
    ("nbits missing", GOOD_HEAD + "stages:\n  - mode: kmeans_lut\n    rules: [everything]\n", "missing required key 'nbits'", 8),
    ("nbits on fp16", GOOD_HEAD + "stages:\n  - mode: fp16\n    nbits: 8\n    rules: [everything]\n", "'nbits' is not allowed for mode 'fp16'", 9),
    ("function on linear", GOOD_HEAD + "stages:\n  - mode: linear\n    nbits: 8\n    function: my_luts:quantile_lut\n    rules: [everything]\n", "'function' is not allowed for mode 'linear'", 10),
    ("custom without function", GOOD_HEAD + "stages:\n  - mode: custom_lut\n    nbits: 4\n    rules: [everything]\n", "missing required key 'function'", 8),
    ("rules missing", GOOD_HEAD + "stages:\n  - mode: linear\n    nbits: 8\n", "missing required key 'rules'", 8),
    ("unknown rule name", GOOD_HEAD + "stages:\n  - mode: linear\n    nbits: 8\n    rules: [everythin]\n", "no rule named 'everythin' (hint: did you mean 'everything'?)", 10),
    ("version wrong", GOOD_HEAD.replace("version: 1", "version: 2") + "stages: [{mode: fp16, rules: [everything]}]\n", "must be 1, got 2", 1),
    ("version missing", GOOD_HEAD.replace("version: 1\n", "") + "stages: [{mode: fp16, rules: [everything]}]\n", "missing required key 'version'", 1),
    ("models not a list", "version: 1\nmodels: m.mlmodel\nrules: {everything: {}}\nstages: [{mode: fp16, rules: [everything]}]\n", "expected a list, got str", 2),
    ("duplicate key", GOOD_HEAD + "stages: [{mode: fp16, rules: [everything]}]\nrules: {}\n", "duplicate key 'rules' (first defined at line 5)", 8),
    ("tab indentation", "version: 1\nmodels:\n\t- input: m.mlmodel\n", "YAML does not allow tabs", 3),
    ("syntax error", "version: 1\nmodels: [\n", "YAML syntax error", 3),
    ("alias bomb", "version: 1\na: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", "expands to more than", 1),
    ("python tag", "version: !!python/object/apply:os.system ['true']\n", "unsupported YAML value with tag tag:yaml.org,2002:python/object/apply:os.system", 1),
    ("bad regex", GOOD_HEAD.replace("everything: {}", "everything: {layer_regex: 'conv[0-9'}") + "stages: [{mode: fp16, rules: [everything]}]\n", "invalid regular expression 'conv[0-9'", 6),
    ("missing model file", GOOD_HEAD.replace("m.mlmodel", "nope.mlmodel") + "stages: [{mode: fp16, rules: [everything]}]\n", "no model file matches 'nope.mlmodel'", 3),
    ("glob matches nothing", GOOD_HEAD.replace("m.mlmodel", "models/*.mlmodel") + "stages: [{mode: fp16, rules: [everything]}]\n", "no model file matches 'models/*.mlmodel'", 3),
    ("output collision", "version: 1\nmodels:\n  - {input: m.mlmodel, output: out/x.mlmodel}\n  - {input: m.mlmodel, output: out/x.mlmodel}\nrules: {everything: {}}\nstages: [{mode: fp16, rules: [everything]}]\n", "is written twice", 4),
    ("output is input", GOOD_HEAD.replace("out/{stem}.q.mlmodel", "'{name}'") + "stages: [{mode: fp16, rules: [everything]}]\n", "is the input itself", 4),
    ("bad placeholder", GOOD_HEAD.replace("{stem}", "{stme}") + "stages: [{mode: fp16, rules: [everything]}]\n", "unknown placeholder {stme}", 4),
    ("unmatched brace in output", GOOD_HEAD.replace("{stem}", "{stem") + "stages: [{mode: fp16, rules: [everything]}]\n", "output 'out/{stem.q.mlmodel' is not a valid path template", 4),
    ("no output", "version: 1\nmodels:\n  - input: m.mlmodel\nrules: {everything: {}}\nstages: [{mode: fp16, rules: [everything]}]\n", "no output path", 3),
    ("unmatched rule", GOOD_HEAD.replace("everything: {}", "everything: {}\n  convs: {layer_type: convolution}") + "stages: [{mode: fp16, rules: [convs, everything]}]\n", "rule 'convs' matches no weight", 7),
    ("unused rule", GOOD_HEAD.replace("everything: {}", "everything: {}\n  spare: {layer: x}") + "stages: [{mode: fp16, rules: [everything]}]\n", "rule 'spare' is not used by any stage", 7),
    ("custom module missing", GOOD_HEAD + "stages:\n  - {mode: custom_lut, nbits: 4, function: 'no_such_mod:f', rules: [everything]}\n", "module 'no_such_mod' not found", 8),
    ("custom attr missing", GOOD_HEAD + "stages:\n  - {mode: custom_lut, nbits: 4, function: 'my_luts:nope', rules: [everything]}\n", "'nope' is not defined in", 8),
    ("bad function form", GOOD_HEAD + "stages:\n  - {mode: custom_lut, nbits: 4, function: 'my_luts.quantile_lut', rules: [everything]}\n", "does not have the expected form (hint: write module:attr", 8),
    ("already quantized", GOOD_HEAD + "stages:\n  - {name: a, mode: linear, nbits: 8, rules: [everything]}\n  - {name: b, mode: kmeans_lut, nbits: 4, rules: [everything]}\n", "stage 'b' would quantize dense_1:weights, which is already quantized (linear8)", 9),
    ("half a layer in fp16", GOOD_HEAD.replace("everything: {}", "weights_only: {field: weights}") + "stages: [{mode: fp16, rules: [weights_only]}]\n", "would leave layer dense_1 mixing float16 and float32", 7),
    ("override unknown stage", GOOD_HEAD.replace("    output: out/{stem}.q.mlmodel", "    output: out/{stem}.q.mlmodel\n    stages: {lin: {nbits: 4}}") + "stages: [{name: linear8, mode: linear, nbits: 8, rules: [everything]}]\n", "no stage named 'lin' to override", 5),
    ("selector bad setting", GOOD_HEAD.replace("everything: {}", "everything: {coremltools_selector: {type: advanced, minimum_weight_count: 3}}") + "stages: [{mode: fp16, rules: [everything]}]\n", "'minimum_weight_count' is not a setting of the advanced selector", 6),
    ("selector bad skip type", GOOD_HEAD.replace("everything: {}", "everything: {coremltools_selector: {type: advanced, skip_layer_types: [batchnrom]}}") + "stages: [{mode: fp16, rules: [everything]}]\n", "did you mean 'batchnorm'?", 6),
    ("range inverted", GOOD_HEAD.replace("everything: {}", "everything: {count: {min: 10, max: 2}}") + "stages: [{mode: fp16, rules: [everything]}]\n", "min 10 is larger than max 2", 6),
    ("empty file", "", "the recipe is empty", 1),
    ("not a mapping", "- version: 1\n", "a recipe is a mapping", 1),
]


@pytest.mark.parametrize("text, message, line", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_recipe_is_located(workdir, text, message, line):
    recipe = workdir / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as info:
        plan_recipe(load_recipe(recipe))[1] and _raise_plan(recipe)
    problems = info.value.problems
    hit = [p for p in problems if message in str(p)]
    assert hit, f"no problem says {message!r}; got:\n" + "\n".join(map(str, problems))
    assert hit[0].line == line, str(hit[0])
    assert str(hit[0]).startswith("r.yaml:") or "r.yaml:" in str(hit[0])
    assert not (workdir / "out").exists()  # nothing written


def _raise_plan(recipe):
    from mlqpipe.recipe.problems import raise_problems

    raise_problems(plan_recipe(load_recipe(recipe))[1])


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_all_problems_reported_at_once(workdir, capsys, monkeypatch):
    recipe = workdir / "r.yaml"
    recipe.write_text(GOOD_HEAD + "stagse: []\nstages:\n  - mode: lineer\n    nbit: 4\n")
    monkeypatch.chdir(workdir)
    assert main(["validate", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err or "3 problems" in err
    for part in ("r.yaml:7:1: stagse: unknown key 'stagse'", "did you mean 'linear'?", "r.yaml:10:5: stages[0].nbit: unknown key 'nbit'"):
        assert part in err
    assert "Traceback" not in err


def test_error_inside_extended_file_points_there(workdir, monkeypatch):
    (workdir / "base.yaml").write_text("version: 1\nrules:\n  everything: {}\nstages:\n  - mode: linear\n    nbits: 9\n    rules: [everything]\n")
    (workdir / "leaf.yaml").write_text("extends: base.yaml\nmodels:\n  - {input: m.mlmodel, output: 'out/{stem}.mlmodel'}\n")
    monkeypatch.chdir(workdir)
    with pytest.raises(RecipeError) as info:
        load_recipe("leaf.yaml")
    (p,) = info.value.problems
    assert (p.file, p.line, p.path) == ("base.yaml", 6, "stages[0].nbits")


def test_extends_merges_and_leaf_wins(workdir, monkeypatch):
    (workdir / "base.yaml").write_text("version: 1\nrules:\n  everything: {}\n  convs: {layer_type: convolution, optional: true}\nstages:\n  - {name: q, mode: linear, nbits: 8, rules: [convs, everything]}\n")
    (workdir / "leaf.yaml").write_text("extends: base.yaml\nmodels:\n  - {input: m.mlmodel, output: 'out/{stem}.mlmodel', stages: {q: {nbits: 4}}}\n")
    monkeypatch.chdir(workdir)
    r = load_recipe("leaf.yaml")
    assert [s.nbits for s in r.models[0].stages] == [4] and [x.name for x in r.rules] == ["everything", "convs"]
    assert plan_recipe(r)[1] == []  # convs matches nothing but is optional


def test_validate_does_not_import_custom_code(workdir, monkeypatch, capsys):
    (workdir / "r.yaml").write_text(GOOD_HEAD + "stages:\n  - {mode: custom_lut, nbits: 4, function: 'my_luts:quantile_lut', rules: [everything]}\n")
    monkeypatch.chdir(workdir)
    assert main(["validate", "r.yaml"]) == 0  # my_luts raises if imported and called; validate never imports
    assert main(["quantize", "--no-custom-code", "r.yaml"]) == 2
    assert "disabled (--no-custom-code)" in capsys.readouterr().err
    assert not (workdir / "out").exists()


def test_two_recipes_writing_one_output(workdir, monkeypatch, capsys):
    body = "version: 1\nmodels:\n  - {input: m.mlmodel, output: out/same.mlmodel}\nrules: {everything: {}}\nstages: [{mode: fp16, rules: [everything]}]\n"
    (workdir / "a.yaml").write_text(body)
    (workdir / "b.yaml").write_text("# another recipe\n" + body)
    monkeypatch.chdir(workdir)
    assert main(["validate", "a.yaml", "b.yaml"]) == 2
    err = capsys.readouterr().err
    assert "b.yaml:4:5: models[0].output: output 'out/same.mlmodel' is also written by a.yaml (models[0])" in err
