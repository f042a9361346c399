"""A user's own dodo.py: doit list / run / -n 2 / clean / forget / info, and broken recipes under plain doit."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

DODO = """\
from mlqpipe.build import DOIT_CONFIG, tasks_from_recipes


def task_quantize():
    yield from tasks_from_recipes("pipelines/skip_dense_2.yaml", "pipelines/coremltools_linear8.yaml")
"""


@pytest.fixture()
def repo(tmp_path):
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    (tmp_path / "dodo.py").write_text(DODO)
    return tmp_path


def doit(repo, *args):
    env = {**os.environ, "MLQPIPE_CACHE": str(repo / "cache")}
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def executed(proc) -> list[str]:
    return [l[3:] for l in proc.stdout.splitlines() if l.startswith(".  ")]


def test_doit_commands_behave(repo):
    listed = doit(repo, "list")
    assert listed.returncode == 0 and "mlqpipe/pipelines/skip_dense_2/demo/digits_mlp.mlmodel/output" in listed.stdout
    first = doit(repo, "-n", "2")
    assert first.returncode == 0, first.stderr
    assert len(executed(first)) == 1 + 1 + 2 * 3 + 1  # skip_dense_2: stage+output; linear8: 2 models x (fold, linear8, output); lock
    assert executed(doit(repo)) == []
    info = doit(repo, "info", "mlqpipe/pipelines/skip_dense_2/demo/digits_mlp.mlmodel/output")
    assert "up-to-date" in info.stdout
    assert doit(repo, "clean").returncode == 0
    assert not (repo / "build" / "examples" / "digits_mlp.skip_dense_2.mlmodel").exists()
    again = doit(repo)
    assert "mlqpipe/pipelines/skip_dense_2/demo/digits_mlp.mlmodel/output" in executed(again)
    assert doit(repo, "forget", "--all").returncode == 0
    assert len(executed(doit(repo))) == 9  # every task runs again; the stage cache answers each


def test_broken_recipe_under_plain_doit(repo):
    (repo / "pipelines" / "skip_dense_2.yaml").write_text("version: 1\nmodels: []\nstagse: []\n")
    proc = doit(repo)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "pipelines/skip_dense_2.yaml:3:1: stagse: unknown key 'stagse' in the recipe (hint: did you mean 'stages'?)" in text
    assert "Traceback" not in text


ML_DODO = """\
from mlqpipe.build import DOIT_CONFIG, tasks_from_recipes


def task_quantize():
    yield from tasks_from_recipes("pipelines/mlprogram_prune_palettize.yaml")
"""


def test_an_ml_program_recipe_under_plain_doit_is_cached_and_incremental(repo):
    from mlqpipe.artifacts import digest

    (repo / "dodo.py").write_text(ML_DODO)
    first = doit(repo)
    assert first.returncode == 0, first.stderr
    prefix = "mlqpipe/pipelines/mlprogram_prune_palettize/demo/digits_mlp.mlpackage"
    assert executed(first) == [f"{prefix}/1-prune", f"{prefix}/2-palettize", f"{prefix}/output", "mlqpipe-lock"]
    out = repo / "build" / "examples" / "digits_mlp.prune_palettize.mlpackage"
    built = digest(out)
    assert executed(doit(repo)) == []  # nothing changed: nothing runs
    recipe = repo / "pipelines" / "mlprogram_prune_palettize.yaml"
    recipe.write_text(recipe.read_text().replace("nbits: 4", "nbits: 3"))
    assert executed(doit(repo)) == [f"{prefix}/2-palettize", f"{prefix}/output", "mlqpipe-lock"]  # the prune stage is cached
    assert digest(out) != built
