"""Gates in recipes: a passing build, a failing one (no output, failed report, non-zero exit), a model the
evaluator cannot run, per-rule SNR gates, and deterministic reports."""

import json
import shutil

import pytest

from mlqpipe.cli import main
from tests.builders import unevaluable_model
from tests.conftest import REPO

DEMO = REPO / "pipelines" / "demo"


@pytest.fixture()
def work(tmp_path, monkeypatch):
    for name in ("digits_mlp.mlmodel", "digits_cnn.mlmodel", "digits_test.npz"):
        shutil.copy(DEMO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def recipe(work, gates: str, mode="kmeans_lut", nbits=2, evaluation="evaluation: {data: digits_test.npz, inputs: {image: X}, labels: y}", rule_gate=""):
    (work / "r.yaml").write_text(f"""version: 1
defaults:
  {evaluation}
models:
  - {{input: digits_mlp.mlmodel, output: 'out/{{stem}}.mlmodel'}}
rules:
  big: {{layer_type: innerProduct, field: weights, count: {{min: 4096}}{rule_gate}}}
stages:
  - {{name: q, mode: {mode}, nbits: {nbits}, rules: [big]}}
gates:
{gates}
""")


def test_passing_gates_write_output_and_report(work, capsys):
    recipe(work, "  min_accuracy: 0.5\n  min_top1_agreement: 0.5\n  min_snr_db: 5\n  min_compression: 1.5", nbits=8)
    assert main(["build", "r.yaml"]) == 0
    assert (work / "out/digits_mlp.mlmodel").exists()
    report = json.loads((work / "out/digits_mlp.report.json").read_text())
    assert report["status"] == "passed" and {g["gate"] for g in report["gates"]} == {"min_accuracy", "min_top1_agreement", "min_snr_db", "min_compression"}
    assert report["evaluation"]["accuracy_float"] == pytest.approx(0.987, abs=0.001)
    capsys.readouterr()
    assert main(["report", "out/digits_mlp.mlmodel"]) == 0
    assert "Status: **PASSED**" in capsys.readouterr().out


def test_failing_gate_blocks_the_output(work, capsys):
    recipe(work, "  min_accuracy: 0.99\n  min_snr_db: 30", nbits=1, mode="kmeans_lut")
    assert main(["build", "r.yaml"]) == 1
    captured = capsys.readouterr()
    err = captured.out + captured.err  # doit shows a failed task's output in its failure report
    assert "quality gate failed" in err and "min_snr_db (threshold 30" in err and "dense_1:weights" in err and "min_accuracy" in err
    assert not (work / "out/digits_mlp.mlmodel").exists()
    report = json.loads((work / "out/digits_mlp.report.json").read_text())
    assert report["status"] == "failed"
    assert "Status: **FAILED**" in (work / "out/digits_mlp.report.md").read_text()
    # the same through mlqpipe quantize: exit 1, nothing written
    shutil.rmtree(work / "out")
    assert main(["quantize", "r.yaml"]) == 1
    assert not (work / "out/digits_mlp.mlmodel").exists() and (work / "out/digits_mlp.report.json").exists()


def test_rule_snr_gate(work, capsys):
    recipe(work, "  min_compression: 1", nbits=1, rule_gate=", gates: {min_snr_db: 40}")
    assert main(["quantize", "r.yaml"]) == 1
    assert "rules.big.min_snr_db (threshold 40" in capsys.readouterr().err


def test_unevaluable_model_fails_unless_allowed(work, capsys):
    m = unevaluable_model()
    (work / "custom.mlmodel").write_bytes(m.SerializeToString())
    text = """version: 1
models: [{{input: custom.mlmodel, output: 'out/{{stem}}.mlmodel', evaluation: {{random_inputs: 4{allow}}}}}]
rules: {{all: {{}}}}
stages: [{{name: q, mode: linear, nbits: 8, rules: [all]}}]
gates: {{max_output_error: 0.1}}
"""
    (work / "r.yaml").write_text(text.format(allow=""))
    assert main(["quantize", "r.yaml"]) == 1
    err = capsys.readouterr().err
    assert "max_output_error (threshold 0.1, got not evaluated): not applied: not evaluated" in err
    assert "layer 'custom'" in err and "allow_unevaluated" in err
    (work / "r.yaml").write_text(text.format(allow=", allow_unevaluated: true"))
    assert main(["quantize", "r.yaml"]) == 0
    assert "max_output_error - <= 0.1 not applied" in capsys.readouterr().out  # in the summary table too
    report = json.loads((work / "out/custom.report.json").read_text())
    assert report["evaluation"]["evaluated"] is False and report["status"] == "passed"
    # the gate that could not be applied stays in the table, marked as such
    assert [(g["gate"], g["applied"], g["passed"]) for g in report["gates"]] == [("max_output_error", False, True)]
    assert "| max_output_error | 0.1 | not evaluated | not applied:" in (work / "out/custom.report.md").read_text()


def test_random_inputs_are_marked(work, capsys):
    recipe(work, "  min_top1_agreement: 0.5", nbits=8, evaluation="evaluation: {random_inputs: 16}")
    assert main(["quantize", "r.yaml"]) == 0
    report = json.loads((work / "out/digits_mlp.report.json").read_text())
    assert report["evaluation"]["random_inputs"] is True and report["evaluation"]["samples"] == 16
    assert "random inputs: no evaluation data given" in (work / "out/digits_mlp.report.md").read_text()


def test_reports_are_deterministic(work, capsys):
    recipe(work, "  min_accuracy: 0.5", nbits=4)
    assert main(["quantize", "r.yaml"]) == 0
    first = (work / "out/digits_mlp.report.json").read_bytes(), (work / "out/digits_mlp.report.md").read_bytes()
    shutil.rmtree(work / "out")
    assert main(["build", "r.yaml"]) == 0
    assert ((work / "out/digits_mlp.report.json").read_bytes(), (work / "out/digits_mlp.report.md").read_bytes()) == first


def test_png_report_when_matplotlib_is_installed(work, capsys):
    pytest.importorskip("matplotlib")
    recipe(work, "  min_accuracy: 0.5", nbits=4)
    text = (work / "r.yaml").read_text().replace("version: 1\n", "version: 1\nreport: {formats: [json, markdown, png]}\n")
    (work / "r.yaml").write_text(text)
    assert main(["quantize", "r.yaml"]) == 0
    assert (work / "out/digits_mlp.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_accuracy_drop_against_the_float_model(work, capsys):
    # 1-bit k-means on the large layers costs the MLP accuracy; the drop is float minus quantized accuracy
    recipe(work, "  max_accuracy_drop: 0.5", nbits=1)
    assert main(["quantize", "r.yaml"]) == 0
    report = json.loads((work / "out/digits_mlp.report.json").read_text())
    ev = report["evaluation"]
    drop = ev["accuracy_float"] - ev["accuracy_quantized"]
    assert drop > 0.005
    (gate,) = report["gates"]
    assert gate["gate"] == "max_accuracy_drop" and gate["value"] == pytest.approx(drop, abs=1e-6) and gate["passed"]
    recipe(work, f"  max_accuracy_drop: {drop / 2:.6f}", nbits=1)
    assert main(["quantize", "r.yaml"]) == 1
    assert f"max_accuracy_drop (threshold {drop / 2:.6f}, got {round(drop, 4)})" in capsys.readouterr().err
    assert not (work / "out/digits_mlp.mlmodel").exists()


def test_max_accuracy_drop_per_model_overrides_the_recipe(work, capsys):
    recipe(work, "  max_accuracy_drop: 0.0", nbits=1)
    text = (work / "r.yaml").read_text().replace("output: 'out/{stem}.mlmodel'}", "output: 'out/{stem}.mlmodel', gates: {max_accuracy_drop: 0.5}}")
    (work / "r.yaml").write_text(text)
    assert main(["quantize", "r.yaml"]) == 0


def test_exact_threshold_passes(work):
    """A drop equal to the threshold passes (accuracies are k/n fractions; no float rounding surprises)."""
    recipe(work, "  max_accuracy_drop: 0.5", nbits=1)
    assert main(["quantize", "r.yaml"]) == 0
    ev = json.loads((work / "out/digits_mlp.report.json").read_text())["evaluation"]
    recipe(work, f"  max_accuracy_drop: {ev['accuracy_float'] - ev['accuracy_quantized']!r}", nbits=1)
    assert main(["quantize", "r.yaml"]) == 0
