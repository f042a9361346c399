"""Mutated example recipes and hostile YAML: always a Recipe or a RecipeError whose problems are located;
never another exception, never a hang, never a write."""

import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from mlqpipe.errors import RecipeError
from mlqpipe.plan import plan_recipe
from mlqpipe.recipe import load_recipe
from tests.conftest import REPO

EXAMPLES = sorted(p.relative_to(REPO / "pipelines") for p in (REPO / "pipelines").rglob("*.yaml"))
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True),
    st.text(max_size=12), st.just("ünïcødé ✓ 模型"), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), st.just({"a": {"b": {"c": {"d": [[[[1]]]]}}}}),
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, path, action, value):
    if not path:
        return value if action == "replace" else doc
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "replace":
        parent[key] = value
    else:  # wrap: nest the value one level deeper
        parent[key] = {"nested": parent[key]} if isinstance(key, str) else [parent[key]]
    return doc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzproject")
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    return root


def _check(root: Path, target: Path, text: str):
    target.write_text(text, encoding="utf-8")
    before = sorted(p for p in root.rglob("*") if p.is_file())
    try:
        recipe = load_recipe(target, project_root=root)
        plan_recipe(recipe)
    except RecipeError as e:
        assert e.problems, str(e)
        for p in e.problems:
            assert p.message and (p.line >= 1 or "not found" in p.message or p.file != str(target)), str(p)
    assert sorted(p for p in root.rglob("*") if p.is_file()) == before  # nothing written


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(EXAMPLES), st.data())
def test_mutated_examples(project, example, data):
    source = REPO / "pipelines" / example
    doc = yaml.safe_load(source.read_text())
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["delete", "replace", "wrap"]))
    doc = _mutate(doc, path, action, data.draw(ODD_VALUES))
    try:
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:
        return
    _check(project, project / "pipelines" / example, text)
    shutil.copy(source, project / "pipelines" / example)


@pytest.mark.parametrize("text", [
    "version: 1\nversion: 1\n",  # duplicate key
    "a: &a [1, 2]\n" + "".join(f"b{i}: &b{i} [*{'a' if i == 0 else 'b' + str(i - 1)}, *{'a' if i == 0 else 'b' + str(i - 1)}]\n" for i in range(40)),
    "[" * 5000 + "]" * 5000,  # deep nesting
    "version: 1\nmodels:\n\t- input: x\n",  # tabs
    "\x00\x01\x02 binary",
    "version: 1\n" + "x" * (2 << 20),  # over the size limit
    "version: !!binary aGVsbG8=\n",
    "? [complex, key]\n: 1\n",
    "version: 1\nrules:\n  " + "a" * 300 + ": {}\n",
])
def test_hostile_yaml(project, text):
    _check(project, project / "hostile.yaml", text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_random_text(project, text):
    _check(project, project / "random.yaml", text)
