"""Generated recipes: whatever the document, loading gives a Recipe or a RecipeError whose every problem is
located; never another exception, never a write."""

import shutil

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from mlqpipe.errors import RecipeError
from mlqpipe.engine.plan import plan_recipe
from mlqpipe.recipe import load_recipe
from tests.conftest import REPO

MODES = ["fold", "fp16", "linear", "linear_symmetric", "linear_lut", "kmeans_lut", "custom_lut", "dequantize", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.text(max_size=8), st.sampled_from(["m.mlmodel", "out/{stem}.mlmodel", "*", "dense_*"]))
rule = st.dictionaries(
    st.sampled_from(["layer", "layer_type", "field", "count", "exclude", "optional", "storage", "depthwise", "layer_regex", "typo"]),
    st.one_of(scalars, st.lists(scalars, max_size=3), st.fixed_dictionaries({}, optional={"min": st.integers(-1, 5000), "max": st.integers(-1, 5000)})),
    max_size=4,
)
stage = st.fixed_dictionaries(
    {"mode": st.sampled_from(MODES)},
    optional={"nbits": st.integers(0, 17), "rules": st.lists(st.sampled_from(["a", "b", "zz"]), max_size=3), "name": st.sampled_from(["s1", "s2"]),
              "function": st.sampled_from(["mod:f", "x"]), "fold": st.lists(st.sampled_from(["batchnorm", "scale", "conv"]), max_size=2)},
)
recipe = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1"])},
    optional={
        "models": st.lists(st.fixed_dictionaries({"input": st.sampled_from(["m.mlmodel", "*.mlmodel", "missing.mlmodel"])},
                                                 optional={"output": st.sampled_from(["out/{stem}.q.mlmodel", "out/x.mlmodel", "{nope}", "m.mlmodel"])}), max_size=3),
        "rules": st.dictionaries(st.sampled_from(["a", "b", "c"]), rule, max_size=3),
        "stages": st.lists(stage, max_size=3),
        "defaults": st.fixed_dictionaries({}, optional={"output": st.sampled_from(["out/{stem}.d.mlmodel"])}),
        "extra": scalars,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe)
def test_generated_recipes_load_or_fail_located(tmp_path_factory, doc):
    d = tmp_path_factory.mktemp("fuzz")
    shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", d / "m.mlmodel")
    path = d / "r.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        r = load_recipe(path, project_root=d)
        plan_recipe(r)
    except RecipeError as e:
        assert e.problems
        for p in e.problems:
            assert p.file.endswith("r.yaml") and p.message
            assert p.line >= 1 or "not found" in p.message, str(p)
    assert sorted(x.name for x in d.iterdir()) == ["m.mlmodel", "r.yaml"]
