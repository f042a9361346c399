"""A failing build leaves nothing shippable, and the lock file proves exactly what shipped (tested on the demo
models with their test data, and on the real models in ../shared/models when present)."""

import hashlib
import json
import shutil

import pytest

from mlqpipe.cli import main
from tests.conftest import REPO, SHARED_MODELS

DEMO = REPO / "pipelines" / "demo"

BASE = """\
version: 1
defaults:
  evaluation: {data: ../digits_test.npz, inputs: {image: X}, labels: y}
rules:
  big: {layer_type: innerProduct, field: weights, count: {min: 4096}}
gates:
  max_accuracy_drop: 0.05
"""

RECIPE = """\
version: 1
extends: base.yaml
models:
  - {{input: ../digits_mlp.mlmodel, output: 'out/{{stem}}.mlmodel'{gates}}}
  - {{input: ../digits_cnn.mlmodel, output: 'out/{{stem}}.mlmodel'}}
rules:
  conv: {{layer_type: convolution, field: weights, optional: true}}
stages:
  - {{name: q, mode: kmeans_lut, nbits: {nbits}, rules: [big, conv]}}
"""


def write(project, nbits=8, gates=""):
    (project / "recipes" / "r.yaml").write_text(RECIPE.format(nbits=nbits, gates=gates))


@pytest.fixture()
def project(tmp_path, monkeypatch):
    for name in ("digits_mlp.mlmodel", "digits_cnn.mlmodel", "digits_test.npz"):
        shutil.copy(DEMO / name, tmp_path / name)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text(BASE)
    write(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock(project) -> dict:
    return json.loads((project / "mlqpipe.lock.json").read_text())


def verify(capsys) -> tuple[int, str]:
    status = main(["verify"])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_lock_records_recipe_chain_data_and_gate_verdicts(project, capsys):
    assert main(["build", "recipes/r.yaml"]) == 0
    doc = lock(project)
    assert doc["lock_format"] == 2
    entry = doc["outputs"]["recipes/out/digits_mlp.mlmodel"]
    assert entry["status"] == "passed"
    assert entry["recipe"] == "recipes/r.yaml"
    assert entry["recipe_files"] == {"recipes/r.yaml": sha(project / "recipes/r.yaml"), "recipes/base.yaml": sha(project / "recipes/base.yaml")}
    assert entry["data"] == {"digits_test.npz": sha(project / "digits_test.npz")}
    assert entry["inputs"] == {"digits_mlp.mlmodel": sha(project / "digits_mlp.mlmodel")}
    assert entry["output_sha256"] == sha(project / "recipes/out/digits_mlp.mlmodel")
    assert entry["gates"] == [{"gate": "max_accuracy_drop", "threshold": 0.05, "passed": True}]  # no measured values
    assert entry["reports"] == ["recipes/out/digits_mlp.report.json", "recipes/out/digits_mlp.report.md"]
    capsys.readouterr()
    assert verify(capsys) == (0, "mlqpipe.lock.json: verified\n")


def test_lock_is_byte_identical_across_checkouts(project, tmp_path_factory, monkeypatch, capsys):
    assert main(["build", "recipes/r.yaml"]) == 0
    first = (project / "mlqpipe.lock.json").read_bytes()
    other = tmp_path_factory.mktemp("elsewhere") / "checkout"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("cache", ".mlqpipe-state", "mlqpipe.lock.json", "out"))
    monkeypatch.chdir(other)
    monkeypatch.setenv("MLQPIPE_CACHE", str(other / "cache"))
    assert main(["build", "recipes/r.yaml", "-j", "2"]) == 0
    assert (other / "mlqpipe.lock.json").read_bytes() == first


def test_lock_is_rewritten_only_when_it_changes(project, capsys):
    assert main(["build", "recipes/r.yaml"]) == 0
    path = project / "mlqpipe.lock.json"
    stamp = path.stat().st_mtime_ns
    assert main(["build", "recipes/r.yaml", "--force"]) == 0  # every task runs again, same results
    assert path.stat().st_mtime_ns == stamp


def test_editing_one_models_gate_refreshes_every_outputs_recipe_digest(project, capsys):
    assert main(["build", "recipes/r.yaml"]) == 0
    write(project, gates=", gates: {max_accuracy_drop: 0.06}")
    assert main(["build", "recipes/r.yaml"]) == 0
    digest = sha(project / "recipes/r.yaml")
    for entry in lock(project)["outputs"].values():
        assert entry["recipe_files"]["recipes/r.yaml"] == digest
    assert verify(capsys)[0] == 0


def test_failed_gate_removes_the_old_output_and_verify_fails(project, capsys):
    assert main(["build", "recipes/r.yaml"]) == 0
    assert (project / "recipes/out/digits_mlp.mlmodel").exists()
    write(project, nbits=1, gates=", gates: {max_accuracy_drop: 0.0}")
    assert main(["build", "recipes/r.yaml"]) == 1
    capsys.readouterr()
    assert not (project / "recipes/out/digits_mlp.mlmodel").exists()  # nothing shippable left behind
    assert json.loads((project / "recipes/out/digits_mlp.report.json").read_text())["status"] == "failed"
    entry = lock(project)["outputs"]["recipes/out/digits_mlp.mlmodel"]
    assert entry["status"] == "failed" and entry["failure"] == "gates" and entry["output_sha256"] is None
    assert {"gate": "max_accuracy_drop", "threshold": 0.0, "passed": False} in entry["gates"]
    status, text = verify(capsys)
    assert status == 1 and "recipes/out/digits_mlp.mlmodel: not shippable (gates failed: max_accuracy_drop); see its report" in text


def test_failed_gate_in_quantize_removes_the_old_output(project, capsys):
    assert main(["quantize", "recipes/r.yaml"]) == 0
    write(project, nbits=1, gates=", gates: {max_accuracy_drop: 0.0}")
    assert main(["quantize", "recipes/r.yaml"]) == 1
    assert not (project / "recipes/out/digits_mlp.mlmodel").exists()


def test_failed_stage_removes_the_old_output(project, capsys):
    assert main(["build", "recipes/r.yaml"]) == 0
    (project / "recipes" / "lib").mkdir()
    (project / "recipes" / "lib" / "luts.py").write_text("def bad(nbits, w):\n    raise RuntimeError('no')\n")
    text = (project / "recipes/r.yaml").read_text().replace("mode: kmeans_lut, nbits: 8", "mode: custom_lut, nbits: 4, function: 'luts:bad'")
    (project / "recipes/r.yaml").write_text("python_path: [lib]\n" + text)
    assert main(["build", "recipes/r.yaml"]) == 1
    captured = capsys.readouterr()
    assert "custom LUT function raised RuntimeError: no" in captured.out + captured.err
    assert not (project / "recipes/out/digits_mlp.mlmodel").exists()
    assert lock(project)["outputs"]["recipes/out/digits_mlp.mlmodel"]["failure"] == "error"
    assert verify(capsys)[0] == 1


@pytest.mark.parametrize("what, change, message", [
    ("recipe", lambda p: (p / "recipes/base.yaml").write_text(BASE.replace("0.05", "0.04")), "recipe file recipes/base.yaml changed since the build"),
    ("data", lambda p: (p / "digits_test.npz").write_bytes(b"x"), "data file digits_test.npz changed since the build"),
    ("input", lambda p: (p / "digits_cnn.mlmodel").unlink(), "input digits_cnn.mlmodel is missing"),
    ("output", lambda p: (p / "recipes/out/digits_cnn.mlmodel").unlink(), "recipes/out/digits_cnn.mlmodel: missing"),
])
def test_verify_compares_with_the_files_on_disk_now(project, capsys, what, change, message):
    assert main(["build", "recipes/r.yaml"]) == 0
    change(project)
    status, text = verify(capsys)
    assert status == 1 and message in text, text


def test_other_versions_are_a_warning(project, capsys):
    assert main(["build", "recipes/r.yaml"]) == 0
    doc = lock(project)
    doc["versions"]["mlqpipe"] = "0.0.1"
    (project / "mlqpipe.lock.json").write_text(json.dumps(doc))
    status, text = verify(capsys)
    assert status == 0 and "warning: written with mlqpipe 0.0.1, this is" in text and "verified" in text


def test_a_lock_from_an_older_mlqpipe_is_named(project, capsys):
    (project / "mlqpipe.lock.json").write_text(json.dumps({"lock_format": 1, "outputs": {}}))
    status, text = verify(capsys)
    assert status == 2 and "mlqpipe.lock.json: lock format 1, written by an older mlqpipe (this one writes format 2); " \
                           "run `mlqpipe build` to rewrite it" in text
    assert "Traceback" not in text
    assert main(["build", "recipes/r.yaml"]) == 0
    assert lock(project)["lock_format"] == 2


def test_real_models_lock_and_verify(tmp_path, monkeypatch, capsys):
    if not SHARED_MODELS.is_dir():
        pytest.skip("../shared/models is absent")
    for name in ("keras_mnist_cnn.mlmodel", "keras_mnist_cnn.digits28.npz"):
        shutil.copy(SHARED_MODELS / name, tmp_path / name)
    (tmp_path / "r.yaml").write_text(
        "version: 1\nmodels:\n  - {input: keras_mnist_cnn.mlmodel, output: out/mnist.mlmodel,\n"
        "     evaluation: {data: keras_mnist_cnn.digits28.npz, labels: y}, gates: {max_accuracy_drop: 0.01}}\n"
        "rules:\n  all: {layer_type: [convolution, innerProduct]}\nstages:\n  - {mode: linear, nbits: 8, rules: [all]}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    assert main(["build", "r.yaml"]) == 0
    assert verify(capsys)[0] == 0
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("nbits: 8", "nbits: 2"))
    assert main(["build", "r.yaml"]) == 1
    capsys.readouterr()
    assert not (tmp_path / "out/mnist.mlmodel").exists()
    assert verify(capsys)[0] == 1


# --- what a build prints ---------------------------------------------------------------------------------

def _two_failing(project):
    (project / "recipes" / "r.yaml").write_text(
        "version: 1\nextends: base.yaml\nmodels:\n  - {input: ../digits_mlp.mlmodel, output: 'out/{stem}.mlmodel'}\n"
        "  - {input: ../digits_cnn.mlmodel, output: 'out/{stem}.mlmodel'}\nrules:\n  all: {layer_type: [innerProduct, convolution], field: weights}\n"
        "stages:\n  - {name: tiny, mode: kmeans_lut, nbits: 1, rules: [big, all]}\ngates:\n  max_accuracy_drop: 0.0\n")


def _build(capsys, *args):
    status = main(["build", "recipes/r.yaml", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_keep_going_reports_every_failing_model(project, capsys):
    _two_failing(project)
    status, out, err = _build(capsys, "--keep-going")
    assert status == 1
    assert err.count("quality gate failed") == 2, err
    assert "recipes/out/digits_mlp.mlmodel: quality gate failed" in err and "recipes/out/digits_cnn.mlmodel: quality gate failed" in err
    assert "mlqpipe build: 0 built, 0 from cache, 0 up to date, 2 failed, 0 not run, build FAILED" in out
    assert "Python Task failed" not in out + err and "TaskFailed" not in out + err and "Traceback" not in out + err
    assert "<function" not in out + err


def test_without_keep_going_the_rest_is_not_run(project, capsys):
    _two_failing(project)
    status, out, err = _build(capsys, "--no-keep-going")
    assert status == 1 and err.count("quality gate failed") == 1
    assert "mlqpipe build: 0 built, 0 from cache, 0 up to date, 1 failed, 1 not run, build FAILED" in out


def test_keep_going_is_the_default_in_ci(project, capsys, monkeypatch):
    _two_failing(project)
    monkeypatch.setenv("CI", "true")
    assert _build(capsys)[2].count("quality gate failed") == 2
    monkeypatch.delenv("CI")
    shutil.rmtree(project / ".mlqpipe-state")
    assert _build(capsys)[2].count("quality gate failed") == 1


def test_counts_and_table_are_true(project, capsys):
    status, out, _ = _build(capsys)
    assert status == 0 and "mlqpipe build: 2 built, 0 from cache, 0 up to date, 0 failed, 0 not run" in out
    status, out, _ = _build(capsys)
    assert "mlqpipe build: 0 built, 0 from cache, 2 up to date, 0 failed, 0 not run" in out
    rows = [line for line in out.splitlines() if line.startswith("recipes/out/")]
    assert len(rows) == 2
    mlp = next(r for r in rows if "digits_mlp" in r)
    report = json.loads((project / "recipes/out/digits_mlp.report.json").read_text())
    t, ev = report["totals"], report["evaluation"]
    assert f"{t['bytes_before']} -> {t['bytes_after']}" in mlp
    assert f"accuracy {ev['accuracy_float']:.3f} -> {ev['accuracy_quantized']:.3f}" in mlp
    assert "max_accuracy_drop" in mlp and "<= 0.05 ok" in mlp and mlp.rstrip().endswith("passed")
    shutil.rmtree(project / "recipes" / "out")
    status, out, _ = _build(capsys)
    assert "mlqpipe build: 0 built, 2 from cache, 0 up to date, 0 failed, 0 not run" in out


def test_quantize_prints_the_same_table(project, capsys):
    _two_failing(project)
    assert main(["quantize", "recipes/r.yaml"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("quality gate failed") == 2  # it goes on after the first failing model
    rows = [line for line in captured.out.splitlines() if line.startswith("recipes/out/")]
    assert len(rows) == 2 and all(r.rstrip().endswith("FAILED") and "max_accuracy_drop" in r and "FAILED" in r for r in rows)


def _run_build(project, stderr_tty: bool):
    import os
    import pty
    import subprocess
    import sys

    env = {**os.environ, "MLQPIPE_PROGRESS_AFTER": "0", "MLQPIPE_CACHE": str(project / "cache"), "PYTHONPATH": str(REPO)}
    code = "import sys; from mlqpipe.cli import main; sys.exit(main(sys.argv[1:]))"
    if not stderr_tty:
        proc = subprocess.run([sys.executable, "-c", code, "build", "recipes/r.yaml"], cwd=project, env=env, capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code, "build", "recipes/r.yaml"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=follower, text=True)
    out, _ = proc.communicate(timeout=300)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.returncode, out, b"".join(chunks).decode()


def test_progress_on_a_terminal_only(project):
    status, out, err = _run_build(project, stderr_tty=True)
    assert status == 0
    assert "digits_mlp.mlmodel: stage 1-q …" in err and "digits_cnn.mlmodel: evaluation, report and output …" in err
    assert ".  mlqpipe/recipes/r/../digits_mlp.mlmodel/1-q" in out  # CI-style lines: one per finished task
    shutil.rmtree(project / "recipes" / "out")
    shutil.rmtree(project / ".mlqpipe-state")
    status, out, err = _run_build(project, stderr_tty=False)
    assert status == 0 and "\r" not in err and "…" not in err
    assert sum(line.startswith(".  ") for line in out.splitlines()) == 5  # 2 x (stage, output), lock
