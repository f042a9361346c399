"""Accuracy gates on ML programs, end to end: `mlqpipe quantize`, `mlqpipe build` and a user's dodo.py under
plain doit evaluate the float and the compressed program on the recipe's data, report accuracy before and
after, pass or fail the release, and keep the float outputs cached between builds.

The model is a linear digits classifier (tests/quality/digits_linear.py, written by coremltools 9.0's MIL
builder; skipped without it); the expected accuracies are numpy's on the weights the builds store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mlqpipe
from mlqpipe.cli import main
from tests.quality.digits_linear import DATA, digits, fit, softmax_probs, write_classifier

pytest.importorskip("coremltools")

RECIPE = """\
version: 1
models:
  - input: digits.mlpackage
    output: out/{{stem}}.q.mlpackage
    evaluation: {{data: digits_test.npz, inputs: {{x: X}}, labels: y}}
    gates: {{{gates}}}
rules:
  matrix: {{field: weight, count: {{min: 600}}}}
stages:
  - {{name: lut, mode: kmeans_lut, nbits: {nbits}, rules: [matrix]}}
"""

DODO = """\
from mlqpipe.build import DOIT_CONFIG, tasks_from_recipes


def task_quantize():
    yield from tasks_from_recipes("r.yaml")
"""


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    x, y = digits()
    weight, bias = fit(x, y)
    path = tmp_path_factory.mktemp("mlprogram-gates") / "digits.mlpackage"
    write_classifier(path, weight, bias, list(range(10)))
    return path, weight, bias


@pytest.fixture()
def project(classifier, tmp_path, monkeypatch):
    shutil.copytree(classifier[0], tmp_path / "digits.mlpackage")
    shutil.copy(DATA, tmp_path / "digits_test.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def write(project, nbits: int, gates: str) -> None:
    (project / "r.yaml").write_text(RECIPE.format(nbits=nbits, gates=gates))


def expected_accuracies(project, classifier) -> tuple[float, float, float]:
    """(float accuracy, accuracy of the built package's decoded weights, their top-1 agreement), by numpy."""
    _, weight, bias = classifier
    x, y = digits()
    decoded = next(r for r in mlqpipe.inventory(project / "out" / "digits.q.mlpackage") if r.compressed).values()
    before, after = softmax_probs(x, weight, bias).argmax(1), softmax_probs(x, decoded.astype(np.float32), bias).argmax(1)
    return float(np.mean(before == y)), float(np.mean(after == y)), float(np.mean(before == after))


def report(project) -> dict:
    return json.loads((project / "out" / "digits.q.report.json").read_text())


@pytest.mark.parametrize("command", ["quantize", "build"])
def test_accuracy_gates_pass_and_the_report_shows_accuracy_before_and_after(project, classifier, capsys, command):
    write(project, 4, "max_accuracy_drop: 0.05, min_top1_agreement: 0.8")
    assert main([command, "r.yaml"]) == 0, capsys.readouterr().err
    r = report(project)
    ev, gates = r["evaluation"], {g["gate"]: g for g in r["gates"]}
    acc_float, acc_after, agreement = expected_accuracies(project, classifier)
    assert acc_float > 0.85
    assert ev["samples"] == len(digits()[1]) and not ev["random_inputs"]
    assert ev["accuracy_float"] == pytest.approx(acc_float, abs=1e-6)  # reports keep 6 digits
    assert ev["accuracy_quantized"] == pytest.approx(acc_after, abs=1.5 / ev["samples"])  # a near-tie may flip one
    assert ev["top1_agreement"] == pytest.approx(agreement, abs=1.5 / ev["samples"])
    assert gates["max_accuracy_drop"]["applied"] and gates["max_accuracy_drop"]["passed"]
    assert gates["max_accuracy_drop"]["value"] == pytest.approx(ev["accuracy_float"] - ev["accuracy_quantized"])
    assert gates["min_top1_agreement"]["value"] == ev["top1_agreement"]
    markdown = (project / "out" / "digits.q.report.md").read_text()
    assert f"- accuracy: {100 * ev['accuracy_float']:.1f} % float → {100 * ev['accuracy_quantized']:.1f} % quantized" in markdown
    assert set(ev["outputs"]) == {"classLabel_probs"}  # the class label is compared by top-1 agreement, not as a number


@pytest.mark.parametrize("command", ["quantize", "build"])
def test_a_failed_accuracy_gate_writes_no_package(project, capsys, command):
    write(project, 4, "max_accuracy_drop: 0.05")
    assert main([command, "r.yaml"]) == 0
    assert (project / "out" / "digits.q.mlpackage").is_dir()
    write(project, 1, "max_accuracy_drop: 0.0")
    assert main([command, "r.yaml"]) == 1
    err = capsys.readouterr().err
    assert "out/digits.q.mlpackage: quality gate failed — max_accuracy_drop (threshold 0.0, got " in err, err
    assert not (project / "out" / "digits.q.mlpackage").exists()  # the old package is gone too: nothing shippable
    r = report(project)
    assert r["status"] == "failed" and r["evaluation"]["accuracy_quantized"] < r["evaluation"]["accuracy_float"]
    assert not list(project.glob("out/.*"))  # no temporary leftovers


def test_under_doit_the_float_outputs_are_cached_and_a_gate_edit_reruns_only_the_output(project):
    write(project, 4, "max_accuracy_drop: 0.05")
    (project / "dodo.py").write_text(DODO)
    env = {**os.environ, "MLQPIPE_CACHE": str(project / "cache")}

    def doit():
        proc = subprocess.run([sys.executable, "-m", "doit"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [line[3:] for line in proc.stdout.splitlines() if line.startswith(".  ")]

    prefix = "mlqpipe/r/digits.mlpackage"
    assert doit() == [f"{prefix}/1-lut", f"{prefix}/output", "mlqpipe-lock"]
    cached = sorted((project / "cache" / "evaluations").rglob("*.npz"))
    assert len(cached) == 1  # the float program's outputs on the data
    first = report(project)["evaluation"]
    assert doit() == []
    write(project, 4, "max_accuracy_drop: 0.04")
    assert doit() == [f"{prefix}/output", "mlqpipe-lock"]  # the stage result is cached; only the gate is re-checked
    assert sorted((project / "cache" / "evaluations").rglob("*.npz")) == cached
    assert report(project)["evaluation"] == first
