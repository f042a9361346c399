"""Models mixing float16, quantized and float32 layers (Create ML exports, partly quantized releases)."""

import warnings

import pytest

import mlqpipe
from mlqpipe.cli import main
from tests.builders import add_inner_product, describe, model, network


def mixed_model() -> bytes:
    """dense_a float32, dense_b float16, dense_c already linear 8-bit."""
    m = model()
    nn = network(m)
    add_inner_product(nn, "dense_a", "x", "a", ic=16, oc=16, seed=1)
    add_inner_product(nn, "dense_b", "a", "b", ic=16, oc=16, seed=2, dtype="<f2")
    add_inner_product(nn, "dense_c", "b", "y", ic=16, oc=8, seed=3)
    only_c = mlqpipe.quantize_weights(describe(m, [("x", [16])], [("y", [8])]).SerializeToString(), 8, "linear",
                                      selector=lambda w: w.layer == "dense_c")
    return only_c.SerializeToString()


def _storage(spec) -> dict:
    return {r.id: str(r.storage) for r in mlqpipe.inventory(spec)}


def test_quantize_weights_leaves_quantized_layers_and_warns_once():
    data = mixed_model()
    assert _storage(mlqpipe.load_model(data).spec) == {
        "dense_a:weights": "float32", "dense_a:bias": "float32", "dense_b:weights": "float16", "dense_b:bias": "float16",
        "dense_c:weights": "linear8", "dense_c:bias": "linear8"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = mlqpipe.quantize_weights(data, 4, "linear")
    messages = [str(w.message) for w in caught]
    assert messages == ["<bytes>: 2 weight(s) already quantized, left as they are: layer 'dense_c' (innerProduct) "
                        "field weights, layer 'dense_c' (innerProduct) field bias"], messages
    assert _storage(q.spec) == {
        "dense_a:weights": "linear4", "dense_a:bias": "linear4", "dense_b:weights": "linear4", "dense_b:bias": "linear4",
        "dense_c:weights": "linear8", "dense_c:bias": "linear8"}
    before = {r.id: r for r in mlqpipe.inventory(mlqpipe.load_model(data).spec)}
    after = {r.id: r for r in mlqpipe.inventory(q.spec)}
    assert after["dense_c:weights"].wp.SerializeToString() == before["dense_c:weights"].wp.SerializeToString()


def test_a_recipe_selecting_a_quantized_weight_is_located(tmp_path, monkeypatch, capsys):
    (tmp_path / "mixed.mlmodel").write_bytes(mixed_model())
    recipe = ("version: 1\nmodels:\n  - {input: mixed.mlmodel, output: out/m.mlmodel}\nrules:\n  everything: {}\n"
              "stages:\n  - {name: small, mode: linear, nbits: 4, rules: [everything]}\n")
    (tmp_path / "r.yaml").write_text(recipe)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert "2 problems in recipe" in err
    assert ("r.yaml:7:50: stages[0].rules: mixed.mlmodel: stage 'small' would quantize dense_c:weights, which is already "
            "quantized (linear8) — selected by rule 'everything' (hint: add `storage: float32` (or [float32, float16]) to "
            "rule 'everything' to leave quantized weights as they are") in err, err
    (tmp_path / "r.yaml").write_text(recipe.replace("everything: {}", "everything: {storage: [float32, float16]}"))
    assert main(["quantize", "r.yaml"]) == 0
    assert _storage(mlqpipe.load_model(tmp_path / "out/m.mlmodel").spec)["dense_b:weights"] == "linear4"


def test_dequantize_then_quantize_everything():
    deq = mlqpipe.quantize_weights(mixed_model(), 8, "dequantization")
    assert set(_storage(deq.spec).values()) == {"float32"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left alone: no warning
        q = mlqpipe.quantize_weights(deq, 4, "linear")
    assert set(_storage(q.spec).values()) == {"linear4"}


@pytest.mark.parametrize("nbits, mode", [(16, "linear"), (4, "kmeans_lut"), (8, "linear_symmetric")])
def test_every_mode_leaves_quantized_layers(nbits, mode):
    with pytest.warns(UserWarning, match="already quantized, left as they are"):
        q = mlqpipe.quantize_weights(mixed_model(), nbits, mode)
    assert _storage(q.spec)["dense_c:weights"] == "linear8"
