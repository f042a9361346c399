"""Two models whose reports land on one file (m.q.mlmodel and m.q.mlpackage both report to m.q.report.*)
are a located problem naming both, not a doit error at build time."""

import shutil

from mlqpipe.cli import main
from tests.conftest import REPO

RECIPE = """\
version: 1
models:
  - {{input: {model}, output: 'out/{{stem}}.q.{suffix}'}}
rules:
  all: {rule}
stages:
  - {{mode: fp16, rules: [all]}}
"""


def test_reports_of_two_recipes_on_one_file_are_a_located_problem(tmp_path, monkeypatch, capsys):
    demo = REPO / "pipelines" / "demo"
    shutil.copy(demo / "digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    shutil.copytree(demo / "digits_mlp.mlpackage", tmp_path / "m.mlpackage")
    (tmp_path / "nn.yaml").write_text(RECIPE.format(model="m.mlmodel", suffix="mlmodel", rule="{layer: '*'}"))
    (tmp_path / "ml.yaml").write_text(RECIPE.format(model="m.mlpackage", suffix="mlpackage", rule="{field: weight}"))
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "nn.yaml", "ml.yaml"]) == 2
    err = capsys.readouterr().err
    assert "ml.yaml:3:5: models[0]: report 'out/m.q.report.json' of m.mlpackage is also written for nn.yaml (models[0], " \
           "m.mlmodel) (hint: give this recipe a report path of its own, e.g. report: {path: 'build/{stem}.{recipe}'})" in err, err
    assert main(["build", "nn.yaml", "ml.yaml"]) == 2 and not (tmp_path / "out").exists()  # bad input, as for any recipe problem
    capsys.readouterr()
    with open(tmp_path / "ml.yaml", "a") as f:
        f.write("report: {path: 'out/{stem}.{recipe}'}\n")
    assert main(["validate", "nn.yaml", "ml.yaml"]) == 0, capsys.readouterr().err
