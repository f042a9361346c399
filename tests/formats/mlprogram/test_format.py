"""The ML-program format behind the public API: dispatch, load -> save byte for byte through our own
decoding and encoding, deterministic outputs, coremltools MLModels, recipes and plans on packages."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mlqpipe
from mlqpipe.artifacts import digest, read_tree
from mlqpipe.cli import main
from mlqpipe.formats import registry
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.model import MLProgram
from tests.conftest import REPO

from .packages import CATALOG

NAMES = list(CATALOG)  # torch_cnn skips where torch is absent
# coreml-validate's [mil-check] rejects coremltools' while_loop (both blocks name their inputs alike, which
# MIL.proto allows: block inputs are block-local); our copies of it are rejected the same way
WHILE_LOOP = pytest.mark.invalid_models("a.mlpackage", "b.mlpackage", reason="coreml-validate's mil-check takes a while_loop's "
                                        "block-local inputs for redefinitions (coremltools writes them so)")


def _marks(name):
    return [WHILE_LOOP] if name == "control_flow_ios17" else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NAMES])
def test_load_save_is_byte_identical_and_our_output_too(mlpackage, tmp_path, name):
    src = mlpackage(name)
    before = digest(src)
    model = mlqpipe.load_model(src)
    assert isinstance(model, MLProgram)
    model.save(tmp_path / "a.mlpackage", check=False)
    assert read_tree(tmp_path / "a.mlpackage") == read_tree(src)  # every file, Manifest.json included
    mlqpipe.load_model(tmp_path / "a.mlpackage").save(tmp_path / "b.mlpackage", check=False)
    assert read_tree(tmp_path / "b.mlpackage") == read_tree(src)
    assert digest(src) == before  # the input is never modified


def test_a_changed_model_gets_identifiers_derived_from_its_content(mlpackage, tmp_path):
    src = mlpackage("mlp_ios18_fp32")
    model = mlqpipe.load_model(src)
    model.spec.specificationVersion += 1  # any change to the model message
    model.save(tmp_path / "a.mlpackage", check=False)
    model.save(tmp_path / "b.mlpackage", check=False)
    a, b = read_tree(tmp_path / "a.mlpackage"), read_tree(tmp_path / "b.mlpackage")
    assert a == b
    old, new = json.loads(read_tree(src)["Manifest.json"]), json.loads(a["Manifest.json"])
    assert new["rootModelIdentifier"] != old["rootModelIdentifier"]
    assert sorted(e["path"] for e in new["itemInfoEntries"].values()) == sorted(e["path"] for e in old["itemInfoEntries"].values())
    assert a["Data/com.apple.CoreML/weights/weight.bin"] == read_tree(src)["Data/com.apple.CoreML/weights/weight.bin"]


def test_outputs_are_the_same_bytes_in_another_process(mlpackage, tmp_path):
    src = mlpackage("multifunction_ios18")
    script = ("import sys, mlqpipe; m = mlqpipe.load_model(sys.argv[1]); m.spec.specificationVersion += 0; "
              "m.spec.mlProgram.docString = 'x'; m.save(sys.argv[2], check=False)")
    for out in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / f"{out}.mlpackage")], check=True, cwd=REPO)
    assert read_tree(tmp_path / "a.mlpackage") == read_tree(tmp_path / "b.mlpackage")


def test_dispatch_by_path_and_content(mlpackage, tmp_path):
    assert registry.format_for(mlpackage("mlp_ios16_fp32")).name == "mlprogram"
    assert registry.format_for(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel").name == "neuralnetwork"
    zipped = tmp_path / "m.mlpackage.zip"
    shutil.make_archive(str(zipped)[:-4], "zip", mlpackage("mlp_ios16_fp32"))
    assert registry.format_for(zipped).name == "mlprogram"
    with pytest.raises(mlqpipe.ModelError, match="unzip"):
        mlqpipe.load_model(zipped)


@pytest.mark.invalid_models("x.mlmodel", reason="an ML program's model.mlmodel without its package: its weights are missing")
def test_a_bare_program_model_file_points_to_its_package(mlpackage, tmp_path):
    shutil.copy(mlpackage("mlp_ios16_fp32") / "Data" / "com.apple.CoreML" / "model.mlmodel", tmp_path / "x.mlmodel")
    with pytest.raises(mlqpipe.ModelError, match=r"x\.mlmodel: is an ML program's model.mlmodel on its own; load its "
                                                 r"\.mlpackage directory"):
        mlqpipe.load_model(tmp_path / "x.mlmodel")


def test_a_coremltools_mlmodel_is_read_from_its_package_without_importing_coremltools(mlpackage):
    ct = pytest.importorskip("coremltools")
    src = mlpackage("mlp_ios18_fp32")
    loaded = mlqpipe.load_model(ct.models.MLModel(str(src), skip_model_load=True))
    assert isinstance(loaded, MLProgram)
    assert loaded.spec.SerializeToString() == (src / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes()
    assert "coremltools" not in " ".join(m for m in sys.modules if m.startswith("mlqpipe"))  # sanity: our names only


def test_quantize_weights_points_ml_programs_to_the_optimize_api(mlpackage):
    with pytest.raises(mlqpipe.ModelError, match="this is an ML program .* mlqpipe.optimize"):
        mlqpipe.quantize_weights(str(mlpackage("mlp_ios16_fp32")), 8)


RECIPE = """\
version: 1
models:
  - {input: m.mlpackage, output: 'out/{stem}.q.mlpackage'}
rules:
  big: {count: {min: 1000}}
stages:
  - {name: fold, mode: fold}
  - {name: big, mode: linear, nbits: 8, rules: [big]}
"""


def test_plan_shows_what_a_stage_would_select_and_that_fold_is_for_neural_networks(mlpackage, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlqpipe.formats.mlprogram.inventory")
    shutil.copytree(mlpackage("mlp_ios16_fp32"), tmp_path / "m.mlpackage")
    (tmp_path / "r.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    from mlqpipe.engine.plan import plan_recipe
    from mlqpipe.recipe import load_recipe

    (plan,), problems = plan_recipe(load_recipe("r.yaml"))
    chosen = {d.id for d in plan.stages[1].decisions if d.action == "quantize"}
    records = mlqpipe.inventory(tmp_path / "m.mlpackage")
    assert chosen == {r.id for r in records if r.count >= 1000} and chosen
    assert [str(p) for p in problems] == [
        "r.yaml:7:24: stages[0].mode: m.mlpackage: stage 'fold': mode fold is not available for mlprogram models "
        "(hint: mlqpipe changes an ML program's weights, not its graph (fold is a neural-network layer rewrite))"]
    assert main(["validate", "r.yaml"]) == 2
    assert not (tmp_path / "out").exists()


def test_inspect_shows_weights_consumers_functions_and_parameters(mlpackage, capsys):
    src = mlpackage("multifunction_ios18")
    assert main(["inspect", str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["format"], doc["type"], doc["specificationVersion"]) == ("mlprogram", "mlProgram", 9)
    assert [(f["name"], f["opset"], f["default"]) for f in doc["functions"]] == [("main_a", "CoreML8", True), ("main_b", "CoreML8", False)]
    assert [w["id"] for w in doc["weights"]] == ["fc1_weight_0", "fc1_bias_0", "fc2_weight_0", "main_b/fc2_weight_0"]
    shared = doc["weights"][0]
    assert shared["functions"] == ["main_a", "main_b"] and shared["consumers"][0] == {"op": "fc1", "op_type": "linear", "parameter": "weight"}
    assert [p["name"] for p in doc["parameters"]] == ["fc2_bias_0", "fc2_bias_0"]
    assert [f["name"] for f in doc["inputs"]] == ["x"]
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "function main_a (default): opset CoreML8" in text and "fc1.weight" in text


@pytest.mark.parametrize("name", ["mlp_ios15_fp32", "ios16_lut", "ios18_joint_sparse_lut", pytest.param(
    "multifunction_ios18", marks=pytest.mark.invalid_models("broken.mlpackage", reason="several functions need "
                                                            "specificationVersion 9: Core ML's validator agrees"))])
def test_check_passes_catalog_packages_and_fails_broken_ones(mlpackage, tmp_path, capsys, name):
    assert main(["check", str(mlpackage(name))]) == 0
    assert "OK (0 errors" in capsys.readouterr().out
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(mlpackage(name), broken)
    spec_file = broken / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = proto.Model.FromString(spec_file.read_bytes())
    spec.specificationVersion = 5  # below every ML-program opset's minimum
    spec_file.write_bytes(spec.SerializeToString())
    assert main(["check", str(broken)]) == 1
    assert "[spec-version]" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "nope.mlpackage")]) == 2


def test_plan_command_shows_the_selection_then_the_problem(mlpackage, tmp_path, monkeypatch, capsys):
    shutil.copytree(mlpackage("mlp_ios16_fp32"), tmp_path / "m.mlpackage")
    (tmp_path / "r.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "r.yaml"]) == 2
    out, err = capsys.readouterr()
    assert "fc1_weight_0  const  128x64  float32 -> linear8" in out and "rule 'big'" in out
    assert "mode fold is not available for mlprogram models" in err
    assert main(["build", "r.yaml"]) == 1  # a build fails the same way, one line, nothing written
    assert "mode fold is not available for mlprogram models" in capsys.readouterr().err
    assert not (tmp_path / "out" / "m.q.mlpackage").exists()


FP16_RECIPE = """\
version: 1
models:
  - {input: m.mlpackage, output: 'out/{stem}.fp16.mlpackage'}
rules:
  matrices: {count: {min: 100}, field: weight}
gates: {min_compression: 1.3}
stages:
  - {name: half, mode: fp16, rules: [matrices]}
"""


@pytest.mark.parametrize("name", ["mlp_ios16_fp32", "multifunction_ios18", "conv_ios16"])
def test_an_fp16_recipe_builds_a_package_through_doit_cache_and_lock(mlpackage, tmp_path, monkeypatch, capsys, name):
    shutil.copytree(mlpackage(name), tmp_path / "m.mlpackage")
    (tmp_path / "r.yaml").write_text(FP16_RECIPE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err
    assert main(["build", "r.yaml"]) == 0, capsys.readouterr().err
    out = tmp_path / "out" / "m.fp16.mlpackage"
    entry = json.loads((tmp_path / "mlqpipe.lock.json").read_text())["outputs"]["out/m.fp16.mlpackage"]
    assert entry["output_sha256"] == digest(out) and entry["inputs"] == {"m.mlpackage": digest(tmp_path / "m.mlpackage")}
    halves = [r for r in mlqpipe.inventory(out) if r.layer_type == "constexpr_cast"]
    originals = {r.id: r for r in mlqpipe.inventory(tmp_path / "m.mlpackage")}
    assert halves and all(r.storage == "float16" and r.field == "weight" for r in halves)
    for r in halves:
        assert np.array_equal(r.values(), originals[r.id].values().astype(np.float16).astype(np.float32))
    report = json.loads((tmp_path / "out" / "m.fp16.report.json").read_text())
    assert {w["id"] for w in report["weights"]} == {r.id for r in halves}
    capsys.readouterr()
    assert main(["build", "r.yaml"]) == 0 and "0 built" in capsys.readouterr().out  # nothing to do
    first = read_tree(out)
    shutil.rmtree(tmp_path / "cache")
    shutil.rmtree(out)
    assert main(["build", "r.yaml"]) == 0
    assert read_tree(out) == first  # rebuilt from scratch: the same bytes


def test_rank_one_consts_are_a_located_problem(mlpackage, tmp_path, monkeypatch, capsys):
    shutil.copytree(mlpackage("mlp_ios16_fp32"), tmp_path / "m.mlpackage")
    (tmp_path / "r.yaml").write_text(FP16_RECIPE.replace("field: weight", "field: bias"))
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:8:" in err and "would fp16 fc1_bias_0: a rank-1 const (compressed weights need rank >= 2" in err, err
