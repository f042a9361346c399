"""Folding: recipe `fold:` subsets are honoured, and layers Core ML would reject are refused by name."""

import pytest

import mlqpipe
from mlqpipe.cli import main
from mlqpipe.formats.nn.fold import fold_model
from tests.builders import conv_batchnorm_model, layer_types


def test_kinds_limit_what_is_folded():
    m = conv_batchnorm_model(scale_after=True)
    folds = fold_model(m, kinds=("scale",))
    assert [(f.into, f.removed) for f in folds] == [("bn", "sc")]  # the scale goes into the batchnorm only
    assert layer_types(m) == ["convolution", "batchnorm"]
    folds = fold_model(m, kinds=("batchnorm",))
    assert [(f.into, f.removed) for f in folds] == [("conv", "bn")]
    assert layer_types(m) == ["convolution"]


def test_kinds_bias_only_leaves_batchnorm():
    m = conv_batchnorm_model()
    assert fold_model(m, kinds=("bias", "scale")) == []
    assert layer_types(m) == ["convolution", "batchnorm"]


@pytest.mark.parametrize("empty", ["mean", "variance", "gamma", "beta"])
def test_empty_batchnorm_parameter_is_a_model_error(empty):
    # Core ML's validator rejects it ("Batchnorm layer 'bn' is missing mean and variance", "... has empty
    # gamma"): a fold cannot compute anything from it, so the error names the layer and the field
    with pytest.raises(mlqpipe.ModelError, match=rf"^bn:{empty}: empty, but the layer's parameters need 4 values"):
        mlqpipe.quantize_weights(conv_batchnorm_model(empty).SerializeToString(), 8, "linear")


@pytest.mark.invalid_models("m.mlmodel", reason="a batchnorm without its mean: the input the recipe must refuse")
def test_empty_batchnorm_parameter_in_a_recipe_is_located(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.mlmodel").write_bytes(conv_batchnorm_model("mean").SerializeToString())
    (tmp_path / "r.yaml").write_text(
        "version: 1\nmodels:\n  - {input: m.mlmodel, output: out/m.mlmodel}\nrules:\n  all: {}\n"
        "stages:\n  - {mode: fold}\n  - {mode: linear, nbits: 8, rules: [all]}\n"
    )
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "plan", "quantize"):
        assert main([command, "r.yaml"]) == 2
        err = capsys.readouterr().err
        assert "r.yaml:3:" in err and "m.mlmodel: stage '1-fold': bn:mean: empty, but the layer's parameters need 4 values" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_real_models_fold_subsets(real_model):
    full = mlqpipe.load_model(real_model).spec
    folds = fold_model(full)
    for kind in ("batchnorm", "scale", "bias"):
        spec = mlqpipe.load_model(real_model).spec
        assert [f for f in fold_model(spec, kinds=(kind,)) if f.kind != kind] == []
    assert all(f.kind in ("batchnorm", "scale", "bias") for f in folds)
