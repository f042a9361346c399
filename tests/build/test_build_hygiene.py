"""What builds leave behind: a no-op writes nothing, clean and prune take every report, custom-code refusals
read the same in `build` and `quantize`."""

import os
import shutil
import subprocess
import sys

import pytest

from mlqpipe.cli import main
from tests.conftest import REPO

PNG_RECIPE = """\
version: 1
models:
  - {input: ../pipelines/demo/digits_mlp.mlmodel, output: 'out/{stem}.mlmodel'}
rules:
  all: {}
stages:
  - {mode: linear, nbits: 8, rules: [all]}
report: {formats: [json, markdown, png]}
"""

CUSTOM_RECIPE = """\
version: 1
python_path: [lib]
models:
  - {input: ../pipelines/demo/digits_mlp.mlmodel, output: 'out/{stem}.custom.mlmodel'}
rules:
  all: {}
stages:
  - {mode: custom_lut, nbits: 3, function: 'luts:even', rules: [all]}
"""

LUTS = """\
import numpy as np

def even(nbits, w):
    table = np.linspace(w.min(), w.max(), 2 ** nbits)
    return table, np.abs(w.reshape(-1, 1) - table[None, :]).argmin(axis=1)
"""


@pytest.fixture()
def project(tmp_path, monkeypatch):
    shutil.copytree(REPO / "pipelines" / "demo", tmp_path / "pipelines" / "demo")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "png.yaml").write_text(PNG_RECIPE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _tree(root):
    """Every path under root with its mtime and size (directories included: a deleted file changes them)."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else 0) for p in [root, *root.rglob("*")]}


def test_noop_build_writes_nothing(project, capsys):
    pytest.importorskip("matplotlib")
    assert main(["build", "recipes/*.yaml"]) == 0
    assert main(["build", "recipes/*.yaml"]) == 0  # settles anything a first build leaves for the second
    before = _tree(project)
    assert main(["build", "recipes/*.yaml"]) == 0
    assert "0 built, 0 from cache, 1 up to date" in capsys.readouterr().out
    assert _tree(project) == before


def test_doit_clean_removes_png_reports(project):
    pytest.importorskip("matplotlib")
    (project / "dodo.py").write_text(
        "from mlqpipe.build import DOIT_CONFIG, tasks_from_recipes\n\n\ndef task_quantize():\n"
        "    yield from tasks_from_recipes('recipes/*.yaml')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "doit", *a], cwd=project, env=env, capture_output=True, text=True)  # noqa: E731
    assert run().returncode == 0
    out = project / "recipes" / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "digits_mlp.mlmodel", "digits_mlp.report.json", "digits_mlp.report.md", "digits_mlp.report.png"]
    assert run("clean").returncode == 0
    assert list(out.iterdir()) == []


def test_prune_removes_the_reports_of_pruned_outputs(project, capsys):
    pytest.importorskip("matplotlib")
    assert main(["build", "recipes/*.yaml"]) == 0
    (project / "recipes" / "png.yaml").unlink()
    (project / "recipes" / "other.yaml").write_text(PNG_RECIPE.replace("out/{stem}", "other/{stem}").replace(", png", ""))
    assert main(["build", "recipes/*.yaml"]) == 0
    assert "stale: recipes/out/digits_mlp.mlmodel" in capsys.readouterr().out
    assert main(["build", "recipes/*.yaml", "--prune"]) == 0
    assert not (project / "recipes" / "out").exists() or list((project / "recipes" / "out").iterdir()) == []
    assert sorted(p.name for p in (project / "recipes" / "other").iterdir()) == [
        "digits_mlp.mlmodel", "digits_mlp.report.json", "digits_mlp.report.md"]


def test_no_custom_code_reads_the_same_in_build_and_quantize(project, capsys):
    (project / "recipes" / "lib").mkdir()
    (project / "recipes" / "lib" / "luts.py").write_text(LUTS)
    (project / "recipes" / "custom.yaml").write_text(CUSTOM_RECIPE)
    message = "custom code 'luts:even' is disabled (--no-custom-code); this recipe cannot be built here"
    assert main(["quantize", "recipes/custom.yaml", "--no-custom-code"]) == 2
    assert f"mlqpipe: error: {message}" in capsys.readouterr().err
    assert main(["build", "recipes/custom.yaml", "--no-custom-code"]) != 0
    captured = capsys.readouterr()
    assert f"mlqpipe: error: {message}" in captured.out + captured.err  # doit replays a task's stderr
    assert "Traceback" not in captured.out + captured.err
    assert not (project / "recipes" / "out").exists()
    sys.modules.pop("luts", None)
