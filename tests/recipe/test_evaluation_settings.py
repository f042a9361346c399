"""Evaluation settings that do not fit the model or the data are located errors of `mlqpipe validate`."""

import shutil

import numpy as np
import pytest

from mlqpipe.cli import main
from tests.builders import deconvolution_model
from tests.conftest import REPO

DEMO = REPO / "pipelines" / "demo"

HEAD = """version: 1
defaults:
  evaluation: {evaluation}
models:
  - {{input: {model}, output: 'out/{{stem}}.mlmodel'{entry}}}
rules:
  all: {{}}
stages:
  - {{mode: linear, nbits: 8, rules: [all]}}
gates: {gates}
"""


@pytest.fixture()
def work(tmp_path, monkeypatch):
    for name in ("digits_mlp.mlmodel", "digits_test.npz"):
        shutil.copy(DEMO / name, tmp_path / name)
    (tmp_path / "deconv.mlmodel").write_bytes(deconvolution_model().SerializeToString())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems(work, capsys, evaluation="{data: digits_test.npz, inputs: {image: X}, labels: y}", gates="{min_accuracy: 0.5}",
             model="digits_mlp.mlmodel", entry="") -> list[str]:
    (work / "r.yaml").write_text(HEAD.format(evaluation=evaluation, gates=gates, model=model, entry=entry))
    status = main(["validate", "r.yaml"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line.strip() for line in err.splitlines()[1:]]
    assert (status == 2) == bool(lines), err
    return lines


NPZ_ARRAYS = "(it has: X, input_name, sklearn_cnn_pred, sklearn_pred, y)"


@pytest.mark.parametrize("evaluation, gates, expected", [
    ("{data: digits_test.npz, inputs: {image: X}, labels: labels}", "{min_accuracy: 0.5}",
     f"r.yaml:3:67: defaults.evaluation.labels: digits_mlp.mlmodel: array 'labels' is not in digits_test.npz {NPZ_ARRAYS}"),
    ("{data: digits_test.npz, inputs: {image: pixels}, labels: y}", "{min_accuracy: 0.5}",
     f"r.yaml:3:55: defaults.evaluation.inputs.image: digits_mlp.mlmodel: array 'pixels' is not in digits_test.npz {NPZ_ARRAYS}"),
    ("{data: digits_test.npz, inputs: {image: X, picture: X}, labels: y}", "{min_accuracy: 0.5}",
     "r.yaml:3:67: defaults.evaluation.inputs.picture: digits_mlp.mlmodel: 'picture' is not an input of this model (its inputs: image)"),
    ("{data: digits_test.npz, inputs: {image: y}, labels: y}", "{min_accuracy: 0.5}",
     "r.yaml:3:55: defaults.evaluation.inputs.image: digits_mlp.mlmodel: array 'y' holds 1 values per sample (shape (397,)); model input 'image' takes shape 64 (64 values)"),
    ("{data: digits_test.npz, inputs: {image: X}}", "{min_accuracy: 0.5}",
     "r.yaml:10:23: gates.min_accuracy: digits_mlp.mlmodel: accuracy needs true labels: evaluation.data (an .npz) and evaluation.labels (its array of labels)"),
    ("{random_inputs: 8}", "{max_accuracy_drop: 0.01}",
     "r.yaml:10:28: gates.max_accuracy_drop: digits_mlp.mlmodel: accuracy needs true labels"),
])
def test_evaluation_mistakes_are_located(work, capsys, evaluation, gates, expected):
    found = problems(work, capsys, evaluation, gates)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_no_array_for_a_model_input(work, capsys):
    np.savez(work / "other.npz", pixels=np.zeros((5, 64), np.float32), y=np.zeros(5))
    (found,) = problems(work, capsys, "{data: other.npz, labels: y}")
    assert found.startswith("r.yaml:3:15: defaults.evaluation: digits_mlp.mlmodel: model input 'image' has no array in other.npz "
                            "(it has: pixels, y) (hint: name one: inputs: {image: ARRAY})"), found


def test_sample_counts_must_agree(work, capsys):
    np.savez(work / "short.npz", X=np.zeros((5, 64), np.float32), y=np.zeros(4))
    (found,) = problems(work, capsys, "{data: short.npz, labels: y}")
    assert "arrays of short.npz disagree on the number of samples ('X' 5, 'y' 4)" in found


def test_not_an_npz(work, capsys):
    (work / "bad.npz").write_bytes(b"not a zip")
    (found,) = problems(work, capsys, "{data: bad.npz, labels: y}")
    assert "evaluation data bad.npz is not a readable .npz" in found


@pytest.mark.parametrize("gate, col", [("min_top1_agreement", 87), ("min_accuracy", 81)])
def test_classifier_gates_on_a_regression_model(work, capsys, gate, col):
    (found,) = problems(work, capsys, "{random_inputs: 4}", "{max_output_error: 0.5}", model="deconv.mlmodel",
                        entry=f", gates: {{{gate}: 0.9}}")
    assert found.startswith(f"r.yaml:5:{col}: models[0].gates.{gate}: deconv.mlmodel: ") and "this model is a neuralNetwork" in found, found


def test_good_settings_pass(work, capsys):
    assert problems(work, capsys, gates="{min_accuracy: 0.5, max_accuracy_drop: 0.01, min_top1_agreement: 0.9}") == []
    assert problems(work, capsys, "{data: digits_test.npz, labels: y}") == []  # a lone input may be called X


def test_the_build_reports_them_located_too(work, capsys, monkeypatch):
    monkeypatch.setenv("MLQPIPE_CACHE", str(work / "cache"))
    (work / "r.yaml").write_text(HEAD.format(evaluation="{data: digits_test.npz, inputs: {image: X}, labels: labels}",
                                             gates="{min_accuracy: 0.5}", model="digits_mlp.mlmodel", entry=""))
    assert main(["build", "r.yaml"]) != 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "r.yaml:3:67: defaults.evaluation.labels: digits_mlp.mlmodel: array 'labels' is not in digits_test.npz" in text
    assert "Traceback" not in text and not (work / "out").exists()


def test_real_model_settings(tmp_path, monkeypatch, capsys):
    from tests.conftest import SHARED_MODELS

    if not SHARED_MODELS.is_dir():
        pytest.skip("../shared/models is absent")
    for name in ("keras_mnist_cnn.mlmodel", "keras_mnist_cnn.digits28.npz"):
        shutil.copy(SHARED_MODELS / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    found = problems(tmp_path, capsys, "{data: keras_mnist_cnn.digits28.npz, inputs: {img: X}, labels: label}",
                     "{max_accuracy_drop: 0.01}", model="keras_mnist_cnn.mlmodel")
    assert any("'img' is not an input of this model (its inputs: image)" in p for p in found)
    assert any("array 'label' is not in keras_mnist_cnn.digits28.npz" in p for p in found)
    assert problems(tmp_path, capsys, "{data: keras_mnist_cnn.digits28.npz, labels: y}", "{max_accuracy_drop: 0.01}",
                    model="keras_mnist_cnn.mlmodel") == []
