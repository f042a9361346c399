"""Untrusted recipes: outputs stay in the project, custom code only when allowed, inputs never modified."""

import os
import shutil

import pytest

from mlqpipe.cli import main
from tests.conftest import REPO


@pytest.fixture()
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "pipelines/demo/digits_mlp.mlmodel", root / "m.mlmodel")
    (root / "luts.py").write_text("import numpy as np\ndef lut(nbits, w):\n    t = np.linspace(w.min(), w.max(), 2 ** nbits)\n    return t, np.abs(w.reshape(-1, 1) - t).argmin(1)\n")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLQPIPE_CACHE", str(root / "cache"))
    return root


def _recipe(root, output, stage="{mode: fp16, rules: [all]}"):
    (root / "recipes" / "r.yaml").write_text(
        f"version: 1\nmodels: [{{input: ../m.mlmodel, output: '{output}'}}]\nrules: {{all: {{}}}}\nstages: [{stage}]\n")


@pytest.mark.parametrize("output", ["../../escape.mlmodel", "/tmp/mlqpipe-absolute-escape.mlmodel", "link/out.mlmodel"])
def test_outputs_cannot_leave_the_project(project, tmp_path, capsys, output):
    (project / "recipes" / "link").symlink_to(tmp_path, target_is_directory=True)  # a symlink pointing out
    _recipe(project, output)
    for command in (["validate"], ["quantize"], ["build"]):
        assert main([*command, "recipes/r.yaml"]) != 0
        text = "".join(capsys.readouterr())
        assert "is outside the project root" in text and "--allow-outside-root" in text, command
    assert not list(tmp_path.glob("*.mlmodel")) and not os.path.exists("/tmp/mlqpipe-absolute-escape.mlmodel")
    if output.startswith("../"):
        assert main(["quantize", "--allow-outside-root", "recipes/r.yaml"]) == 0
        assert (tmp_path / "escape.mlmodel").exists()


def test_custom_code_allow_list(project, capsys):
    _recipe(project, "out/x.mlmodel", "{mode: custom_lut, nbits: 2, function: 'luts:lut', rules: [all]}")
    (project / "recipes" / "r.yaml").write_text((project / "recipes" / "r.yaml").read_text().replace("version: 1\n", "version: 1\npython_path: [..]\n"))
    assert main(["quantize", "--custom-code-allow", "other_module", "recipes/r.yaml"]) == 2
    assert "module 'luts' is not in the allow-list (other_module)" in capsys.readouterr().err
    assert not (project / "recipes/out/x.mlmodel").exists()
    assert main(["quantize", "--custom-code-allow", "luts", "recipes/r.yaml"]) == 0
    assert main(["build", "--no-custom-code", "recipes/r.yaml", "--force"]) != 0


def test_yaml_is_data_only(project, capsys):
    marker = project / "pwned"
    (project / "recipes" / "r.yaml").write_text(f"version: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["validate", "recipes/r.yaml"]) == 2
    assert not marker.exists()
    assert "unsupported YAML value" in capsys.readouterr().err
