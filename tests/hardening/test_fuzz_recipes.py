"""Mutated example recipes and hostile YAML: always a Recipe or a RecipeError whose problems are located;
never another exception, never a hang, never a write."""

import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from mlqpipe.errors import RecipeError
from mlqpipe.engine.plan import plan_recipe
from mlqpipe.recipe import load_recipe
from mlqpipe.recipe.source import MAX_DEPTH, read_source
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


# Nesting depth: PyYAML's composers and our reader recurse once per level (a RecursionError with PyYAML
# 6.0.3 at 5,000 levels, a segfault at 200,000), so the reader refuses past MAX_DEPTH itself.
def _nest(kind: str, n: int) -> str:
    """`n` nested collections of one kind, as the value of a top-level key (the `description:` line)."""
    if kind == "flow sequence":
        return " " + "[" * n + "]" * n + "\n"
    if kind == "flow mapping":
        return " " + "{a: " * n + "1" + "}" * n + "\n"
    if kind == "block sequence":
        return "\n  " + "- " * n + "x\n"
    return "\n" + "".join("  " * (i + 1) + "k:\n" for i in range(n - 1)) + "  " * n + "k: 1\n"  # block mapping


KINDS = ["flow sequence", "flow mapping", "block sequence", "block mapping"]


def _recipe_with_nesting(project: Path, kind: str, depth: int) -> Path:
    """A valid recipe plus `description:` nested so that the document is `depth` levels deep (the top-level
    mapping is the first)."""
    target = project / "pipelines" / "deep.yaml"
    target.write_text((REPO / "pipelines" / "skip_dense_2.yaml").read_text() + "description:" + _nest(kind, depth - 1))
    return target


@pytest.mark.parametrize("kind", KINDS)
def test_nesting_at_the_limit_is_read(project, kind):
    target = _recipe_with_nesting(project, kind, MAX_DEPTH)
    src, problems = read_source(target, "deep.yaml")
    assert problems == [] and isinstance(src.data["description"], (list, dict))
    with pytest.raises(RecipeError) as e:  # the schema's one complaint: a description is text
        load_recipe(target, project_root=project)
    (p,) = e.value.problems
    assert p.path == "description" and p.line >= 1 and "nested" not in p.message
    target.unlink()


# 200,000 levels stay under MAX_BYTES except in block mappings, whose indentation grows with the depth
PAST_LIMIT = [(k, d) for k in KINDS for d in (MAX_DEPTH + 1, 5000, 200_000) if k != "block mapping" or d < 900]


@pytest.mark.parametrize("kind, depth", PAST_LIMIT)
def test_nesting_past_the_limit_is_one_located_problem(project, kind, depth):
    target = _recipe_with_nesting(project, kind, depth)
    with pytest.raises(RecipeError) as e:
        load_recipe(target, project_root=project)
    (p,) = e.value.problems
    assert p.message == f"nested more than {MAX_DEPTH} levels" and p.hint
    lines = target.read_text().splitlines()
    assert lines[p.line - 1].lstrip().startswith(("description", "[", "{", "-", "k:")) and p.col >= 1, str(p)
    if depth == MAX_DEPTH + 1:  # located at the collection that is one too deep
        assert lines[p.line - 1][p.col - 1] in "[{-k"
    target.unlink()


def test_nesting_through_aliases_is_refused(tmp_path):
    """Within the limit as written, past it once an alias is expanded inside a deep value."""
    half = MAX_DEPTH // 2 + 10
    text = "a: &a " + "[" * half + "1" + "]" * half + "\nb: " + "[" * half + "*a" + "]" * half + "\n"
    (tmp_path / "alias.yaml").write_text(text)
    _, problems = read_source(tmp_path / "alias.yaml", "alias.yaml")
    assert [p.message for p in problems] == [f"nested more than {MAX_DEPTH} levels"] and problems[0].line == 1


def _depth(text: str) -> int:
    deepest = depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        depth += isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        depth -= isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent))
        deepest = max(deepest, depth)
    return deepest


NESTED = st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                      max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(NESTED, st.sampled_from([None, True, False]), st.integers(2, 6))
def test_every_collection_starts_at_its_own_indicator(data, flow, indent):
    """The reader skips its depth pass when a text has at most MAX_DEPTH of `[{-?:`: that is sound only if
    no document nests deeper than it has such characters."""
    text = yaml.safe_dump(data, default_flow_style=flow, indent=indent)
    assert _depth(text) <= sum(map(text.count, "[{-?:"))


@pytest.mark.parametrize("text", ["- - - x", "[a: [b: [c: 1]]]", "? - a\n: - b\n", "a:\n- b\n- - c\n", "{? a: b}", "- ? - x\n  : y\n"])
def test_compact_nestings_have_an_indicator_per_level(text):
    assert _depth(text) <= sum(map(text.count, "[{-?:"))
