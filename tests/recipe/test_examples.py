"""Every recipe in pipelines/ validates, plans and builds; the coremltools-equivalent ones give the same
bytes as the coremltools call they express."""

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlqpipe
from mlqpipe.artifacts import digest
from mlqpipe.formats.nn.check import check_spec
from mlqpipe.formats.registry import format_of
from mlqpipe.engine.execute import quantize_recipe
from mlqpipe.engine.plan import plan_recipe
from mlqpipe.recipe import load_recipe
from tests.conftest import REPO

EXAMPLES = sorted(p.relative_to(REPO / "pipelines") for p in (REPO / "pipelines").rglob("*.yaml"))


@pytest.fixture()
def copy(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the project root: outputs must stay inside it
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    return tmp_path / "pipelines"


@pytest.mark.parametrize("name", [str(p) for p in EXAMPLES])
def test_example_validates_plans_and_builds(copy, name):
    recipe = load_recipe(copy / name)
    plans, problems = plan_recipe(recipe)
    assert problems == []
    if recipe.search is not None:  # a search recipe is built as its resolved recipe (checked in beside it)
        recipe = load_recipe(recipe.resolved_path)
        plans, problems = plan_recipe(recipe)
        assert problems == [] and recipe.search is None
    inputs = {job.input: digest(job.input) for job in recipe.models}
    for job, stage_plans in quantize_recipe(recipe):
        out = mlqpipe.load_model(job.output)
        assert [f for f in format_of(out).check(out) if f.severity == "error"] == []
        planned = {d.id: d.storage_after for sp in stage_plans for d in sp.decisions if d.action == "quantize"}
        actual = {r.id: str(r.storage) for r in mlqpipe.inventory(out)}
        assert planned and all(actual[i] == s for i, s in planned.items() if i in actual)
    assert all(digest(p) == d for p, d in inputs.items())  # inputs untouched


def test_build_is_deterministic(copy):
    recipe = load_recipe(copy / "demo" / "demo.yaml")
    first = [(j.output, j.output.read_bytes()) for j, _ in quantize_recipe(recipe)]
    second = [(j.output, j.output.read_bytes()) for j, _ in quantize_recipe(recipe)]
    assert first == second


def _ct(path, nbits, mode, **kw):
    ct = pytest.importorskip("coremltools")
    from coremltools.models.neural_network import quantization_utils as qu
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model.FromString(Path(path).read_bytes())
    with contextlib.redirect_stdout(io.StringIO()):
        return qu, qu.quantize_weights(ct.models.MLModel(spec), nbits, mode, **kw).get_spec()


def _canonical(data: bytes) -> bytes:
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(data).SerializeToString(deterministic=True)


@pytest.mark.parametrize("recipe_name, selector", [("coremltools_linear8.yaml", None), ("coremltools_advanced_selector.yaml", "advanced")])
def test_coremltools_equivalent_recipes_same_bytes(copy, recipe_name, selector):
    pytest.importorskip("coremltools")
    from coremltools.models.neural_network import quantization_utils as qu

    recipe = load_recipe(copy / recipe_name)
    built = {job.input.name: job.output for job, _ in quantize_recipe(recipe)}
    kw = {}
    if selector:
        kw["selector"] = qu.AdvancedQuantizedLayerSelector(skip_layer_types=["batchnorm", "bias", "depthwiseConv"], minimum_conv_kernel_channels=4, minimum_conv_weight_count=4096)
    _, theirs = _ct(copy / "demo" / "digits_mlp.mlmodel", 8, "linear", **kw)
    assert _canonical(built["digits_mlp.mlmodel"].read_bytes()) == theirs.SerializeToString(deterministic=True)
    # the convnet has convolution -> batchnorm: coremltools cannot quantize it at all; ours is valid
    with pytest.raises(Exception):
        _ct(copy / "demo" / "digits_cnn.mlmodel", 8, "linear", **kw)
    assert check_spec(mlqpipe.load_model(built["digits_cnn.mlmodel"]).spec) == []


def test_skip_dense_2_recipe_does_what_the_docs_meant(copy):
    recipe = load_recipe(copy / "skip_dense_2.yaml")
    (job, _), = quantize_recipe(recipe)
    stored = {r.id: str(r.storage) for r in mlqpipe.inventory(mlqpipe.load_model(job.output).spec)}
    assert stored["dense_2:weights"] == "float32" and stored["dense_2:bias"] == "float32"
    assert stored["dense_1:weights"] == "linear8" and stored["dense_3:weights"] == "linear8"


def test_without_coremltools_rounding_tiny_channels_keep_precision(copy):
    """The MLP has hidden units whose weights span < 2.6e-4: coremltools collapses them; by default we don't."""
    text = (copy / "coremltools_linear8.yaml").read_text().replace("coremltools_rounding: true, ", "")
    (copy / "exact.yaml").write_text(text.replace("linear8.mlmodel", "exact8.mlmodel"))
    exact = {j.input.name: j.output for j, _ in quantize_recipe(load_recipe(copy / "exact.yaml"))}
    compat = {j.input.name: j.output for j, _ in quantize_recipe(load_recipe(copy / "coremltools_linear8.yaml"))}
    ref = {r.id: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(copy / "demo" / "digits_mlp.mlmodel").spec)}
    a = {r.id: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(exact["digits_mlp.mlmodel"]).spec)}
    b = {r.id: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(compat["digits_mlp.mlmodel"]).spec)}
    w = ref["dense_1:weights"]
    tiny = (w.max(1) - w.min(1)) / 255 < 1e-6
    assert tiny.sum() == 5
    err_exact = np.abs(a["dense_1:weights"] - w)[tiny].max()
    err_ct = np.abs(b["dense_1:weights"] - w)[tiny].max()
    assert err_exact < err_ct / 50
    assert np.array_equal(a["dense_1:weights"][~tiny], b["dense_1:weights"][~tiny])
