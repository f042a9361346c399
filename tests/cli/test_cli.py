"""The mlqpipe command: plan, quantize, inspect, schema, help and exit codes."""

import json
import shutil

import pytest

from mlqpipe.cli import main
from tests.conftest import REPO


@pytest.fixture()
def pipelines(tmp_path, monkeypatch):
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "pipelines"


def test_plan_table_and_json(pipelines, capsys):
    assert main(["plan", "pipelines/skip_dense_2.yaml"]) == 0
    out = capsys.readouterr().out
    assert "digits_mlp.mlmodel -> build/examples/digits_mlp.skip_dense_2.mlmodel" in out
    assert "dense_1:weights" in out and "float32 -> linear8" in out
    assert "excluded by rule 'not_dense_2'" in out
    assert main(["plan", "--json", "pipelines/skip_dense_2.yaml"]) == 0
    doc = json.loads(capsys.readouterr().out)
    weights = {w["id"]: w for w in doc["models"][0]["stages"][0]["weights"]}
    assert weights["dense_2:weights"]["action"] == "keep" and weights["dense_2:weights"]["rule"] == "not_dense_2"
    assert weights["dense_3:weights"]["action"] == "quantize" and weights["dense_3:weights"]["storage_after"] == "linear8"
    assert not (pipelines.parent / "build").exists()  # plan writes nothing


def test_quantize_writes_checked_outputs(pipelines, capsys):
    assert main(["quantize", "pipelines/demo/demo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "build/demo/digits_mlp.q.mlmodel" in out
    assert main(["check", "build/demo/digits_mlp.q.mlmodel", "build/demo/digits_cnn.q.mlmodel"]) == 0


def test_inspect(capsys):
    assert main(["inspect", str(REPO / "pipelines/demo/digits_cnn.mlmodel")]) == 0
    out = capsys.readouterr().out
    assert "pca_conv:weights" in out and "32x1x8x8" in out and "float32" in out
    assert main(["inspect", "--json", str(REPO / "pipelines/demo/digits_cnn.mlmodel")]) == 0
    rows = json.loads(capsys.readouterr().out)["weights"]
    assert {r["id"] for r in rows} >= {"pca_conv:weights", "standardize:gamma", "classifier:bias"}


def test_schema_prints_the_schema(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "mlqpipe recipe"


def test_usage_errors(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["plan"])
    assert e.value.code == 2
    assert main(["inspect", "nope.mlmodel"]) == 2
    assert "nope.mlmodel: no such model file" in capsys.readouterr().err


def test_verbose_flag_after_the_subcommand(pipelines, capsys):
    assert main(["plan", "pipelines/demo/demo.yaml"]) == 0
    short = capsys.readouterr().out
    assert "-v lists them" in short
    assert main(["plan", "pipelines/demo/demo.yaml", "-v"]) == 0
    after = capsys.readouterr().out
    assert main(["-v", "plan", "pipelines/demo/demo.yaml"]) == 0
    before = capsys.readouterr().out
    assert after == before and len(after.splitlines()) > len(short.splitlines()) and "-v lists them" not in after


def test_output_piped_into_head_ends_quietly(pipelines):
    import subprocess
    import sys

    code = "import sys; from mlqpipe.cli import main; sys.exit(main(sys.argv[1:]))"
    for args in (["plan", "-v", "pipelines/demo/demo.yaml"], ["inspect", "pipelines/demo/digits_mlp.mlmodel"], ["schema"]):
        proc = subprocess.run(f"{sys.executable} -c '{code}' {' '.join(args)} | head -n 1", shell=True,
                              capture_output=True, text=True, cwd=pipelines.parent, env={"PYTHONPATH": str(REPO)})
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc
        assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback


def test_report_json_of_a_recipe_is_one_document(pipelines, capsys):
    assert main(["quantize", "pipelines/demo/demo.yaml"]) == 0
    capsys.readouterr()
    assert main(["report", "--json", "pipelines/demo/demo.yaml"]) == 0
    doc = json.loads(capsys.readouterr().out)  # one document: a list of the recipe's reports
    assert [r["output"] for r in doc] == ["build/demo/digits_cnn.q.mlmodel", "build/demo/digits_mlp.q.mlmodel"]
    assert main(["report", "--json", "build/demo/digits_mlp.q.mlmodel"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == "build/demo/digits_mlp.q.mlmodel"


def test_plan_and_report_show_a_rising_specification_version(pipelines, capsys):
    assert main(["plan", "pipelines/demo/demo.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("specificationVersion 1 -> 3: the minimum deployment target moves from iOS 11 to iOS 12") == 2
    assert main(["plan", "--json", "pipelines/demo/demo.yaml"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["specification_version"] for m in doc["models"]] == [{"before": 1, "after": 3}] * 2
    assert main(["quantize", "pipelines/demo/demo.yaml"]) == 0
    report = json.loads((pipelines.parent / "build/demo/digits_mlp.q.report.json").read_text())
    assert report["specification_version"] == {"before": 1, "after": 3, "deployment_target_before": "iOS 11",
                                               "deployment_target_after": "iOS 12"}
    assert "specificationVersion 1 -> 3" in (pipelines.parent / "build/demo/digits_mlp.q.report.md").read_text()


def test_plan_says_nothing_when_the_version_stays(pipelines, capsys, tmp_path):
    (tmp_path / "v.yaml").write_text(
        "version: 1\nmodels:\n  - {input: pipelines/demo/digits_mlp.mlmodel, output: out/v.mlmodel}\n"
        "rules:\n  all: {}\nstages:\n  - {mode: dequantize, rules: [all]}\n")
    assert main(["plan", "v.yaml"]) == 0
    assert "specificationVersion" not in capsys.readouterr().out


def test_inspect_shows_inputs_and_outputs(capsys):
    assert main(["inspect", str(REPO / "pipelines/demo/digits_cnn.mlmodel")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:4] == ["  input  image: multiArray double 1x8x8", "  output classLabel: int64", "  output classProbability: dictionary"]
    assert main(["inspect", "--json", str(REPO / "pipelines/demo/digits_cnn.mlmodel")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"] == [{"name": "image", "type": "multiArray double", "shape": [1, 8, 8], "optional": False}]
    assert [o["name"] for o in doc["outputs"]] == ["classLabel", "classProbability"]


def test_inspect_real_models_inputs(real_model, capsys):
    assert main(["inspect", "--json", str(real_model)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"] and all(f["name"] and f["type"] != "unknown" for f in doc["inputs"] + doc["outputs"])
