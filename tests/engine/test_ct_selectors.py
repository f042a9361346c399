"""coremltools' selector semantics have one owner (mlqpipe.engine.ct_selectors): quantize_weights, recipe
`coremltools_selector:` rules and `python:` rules naming a QuantizedLayerSelector pick the same blobs."""

import subprocess
import sys

import numpy as np
import pytest

import mlqpipe
from mlqpipe.engine.execute import quantize_recipe
from mlqpipe.recipe import load_recipe
from tests.builders import describe, model, network, set_float, weights
from tests.conftest import REPO, real_model_paths

SELECTOR_MODULE = """
from mlqpipe import QuantizedLayerSelector, AdvancedQuantizedLayerSelector

class Default(QuantizedLayerSelector):
    pass

class NoBiases(AdvancedQuantizedLayerSelector):
    def __init__(self):
        super().__init__(skip_layer_types=["bias"], minimum_conv_weight_count=1)
"""


def unused_bias_model() -> bytes:
    """An innerProduct with hasBias false whose bias blob still holds numbers (coremltools leaves it)."""
    m = model()
    ip = network(m).layers.add(name="ip", input=["x"], output=["y"]).innerProduct
    ip.inputChannels, ip.outputChannels, ip.hasBias = 16, 8, False
    set_float(ip.weights, weights(8, 16, seed=3))
    set_float(ip.bias, weights(8, seed=4))
    return describe(m, [("x", [16])], [("y", [8])]).SerializeToString()


def _storage(spec) -> dict:
    return {r.id: str(r.storage) for r in mlqpipe.inventory(spec)}


def _recipe_output(tmp_path, monkeypatch, model_bytes: bytes, rule: str) -> dict:
    (tmp_path / "m.mlmodel").write_bytes(model_bytes)
    (tmp_path / "team_sel.py").write_text(SELECTOR_MODULE)
    (tmp_path / "r.yaml").write_text(
        f"version: 1\nmodels:\n  - {{input: m.mlmodel, output: out/m.mlmodel}}\nrules:\n  sel: {rule}\n"
        "stages:\n  - {mode: linear, nbits: 8, rules: [sel]}\n"
    )
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("team_sel", None)
    try:
        (job, _), = quantize_recipe(load_recipe(tmp_path / "r.yaml"))
    finally:
        sys.modules.pop("team_sel", None)
    return _storage(mlqpipe.load_model(job.output).spec)


@pytest.mark.parametrize("rule", ["{python: 'team_sel:Default'}", "{coremltools_selector: {type: default}}"])
def test_unused_bias_left_float_by_every_route(tmp_path, monkeypatch, rule):
    data = unused_bias_model()
    api = _storage(mlqpipe.quantize_weights(data, 8, "linear").spec)
    assert api == {"ip:weights": "linear8", "ip:bias": "float32"}
    assert _recipe_output(tmp_path, monkeypatch, data, rule) == api


def test_unused_bias_as_coremltools_leaves_it():
    pytest.importorskip("coremltools")
    from tests.oracle import oracle_models

    spec = oracle_models.ct_quantize(unused_bias_model(), 8, "linear")
    assert spec.neuralNetwork.layers[0].innerProduct.bias.floatValue  # still float32
    assert not spec.neuralNetwork.layers[0].innerProduct.weights.floatValue  # quantized


def _models():
    paths = [REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", REPO / "pipelines" / "demo" / "digits_cnn.mlmodel"]
    return [p.read_bytes() for p in paths + real_model_paths()] + [unused_bias_model()]


@pytest.mark.parametrize("selector, rule", [
    ("Default", "{python: 'team_sel:Default'}"),
    ("NoBiases", "{python: 'team_sel:NoBiases'}"),
    ("NoBiases", "{coremltools_selector: {type: advanced, skip_layer_types: [bias], minimum_conv_weight_count: 1}}"),
])
def test_recipe_rules_and_quantize_weights_agree(tmp_path, monkeypatch, selector, rule):
    ns: dict = {}
    exec(SELECTOR_MODULE, ns)
    for i, data in enumerate(_models()):
        work = tmp_path / str(i)
        work.mkdir()
        api = _storage(mlqpipe.quantize_weights(data, 8, "linear", selector=ns[selector]()).spec)
        # quantize_weights folds below 16 bits; the recipe does not (no fold stage): compare shared blobs
        via_recipe = _recipe_output(work, monkeypatch, data, rule)
        shared = set(api) & set(via_recipe)
        assert shared and {k: api[k] for k in shared} == {k: via_recipe[k] for k in shared}


def test_select_does_not_import_the_compat_facade():
    code = "import sys, mlqpipe.engine.select; print('mlqpipe.engine.compat' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"


def test_storage_compares_with_its_printed_form():
    recs = mlqpipe.inventory(mlqpipe.quantize_weights(unused_bias_model(), 4, "linear").spec)
    by_id = {r.id: r for r in recs}
    assert by_id["ip:weights"].storage == "linear4"
    assert by_id["ip:bias"].storage == "float32"
    assert by_id["ip:bias"].storage != "float16"
    chosen = [r.id for r in mlqpipe.inventory(mlqpipe.load_model(unused_bias_model()).spec) if r.storage == "float32"]
    assert chosen == ["ip:weights", "ip:bias"]
    q = mlqpipe.quantize_weights(unused_bias_model(), 8, "linear", selector=lambda w: w.storage == "float32")
    assert {str(r.storage) for r in mlqpipe.inventory(q.spec)} == {"linear8"}
    assert np.isfinite(by_id["ip:weights"].values()).all()
