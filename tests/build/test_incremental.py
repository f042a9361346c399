"""Only changed models rebuild: counted from the tasks doit actually executed."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mlqpipe.build import tasks as build_tasks
from mlqpipe.artifacts import digest
from mlqpipe.cli import main
from tests.conftest import REPO

RECIPE = """\
version: 1
models:
  - {{input: {model}, output: 'out/{{stem}}.{name}.mlmodel'}}
rules:
  large: {{layer_type: innerProduct, field: weights, count: {{min: 4096}}}}
  rest: {{storage: float32}}
stages:
  - {{name: large, mode: linear, nbits: {nbits}, rules: [large]}}
  - {{name: rest, mode: fp16, rules: [rest]}}
"""


@pytest.fixture()
def project(tmp_path, monkeypatch):
    for name in ("digits_mlp.mlmodel", "digits_cnn.mlmodel"):
        shutil.copy(REPO / "pipelines" / "demo" / name, tmp_path / name)
    (tmp_path / "recipes").mkdir()
    for name, model in (("a", "digits_mlp.mlmodel"), ("b", "digits_mlp.mlmodel"), ("c", "digits_cnn.mlmodel")):
        write(tmp_path / "recipes" / f"{name}.yaml", name, f"../{model}", 8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def write(path, name, model, nbits, extra=""):
    text = RECIPE.format(model=model, name=name, nbits=nbits)
    if "digits_cnn" in model:  # the convnet's large weights are a convolution
        text = text.replace("layer_type: innerProduct", "layer_type: [innerProduct, convolution]").replace("min: 4096", "min: 256")
    path.write_text(extra + text)


def build(capsys, *args) -> list[str]:
    assert main(["build", "recipes/*.yaml", *args]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    return sorted(line[3:].strip() for line in out.splitlines() if line.startswith(".  "))


def summary(capsys, *args) -> str:
    assert main(["build", "recipes/*.yaml", *args]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("mlqpipe build:")][0]


def test_first_build_then_nothing(project, capsys):
    first = build(capsys)
    assert len(first) == 3 * 3 + 1  # 3 models x (2 stages + output) + lock
    assert build(capsys) == []


def test_editing_one_recipe_reruns_only_its_models(project, capsys):
    build(capsys)
    write(project / "recipes" / "b.yaml", "b", "../digits_mlp.mlmodel", 4)
    ran = build(capsys)
    assert all("/recipes/b/" in t for t in ran if t != "mlqpipe-lock"), ran
    assert ran == sorted(["mlqpipe/recipes/b/../digits_mlp.mlmodel/1-large", "mlqpipe/recipes/b/../digits_mlp.mlmodel/2-rest",
                          "mlqpipe/recipes/b/../digits_mlp.mlmodel/output", "mlqpipe-lock"])


def test_touch_without_change_reruns_nothing(project, capsys):
    build(capsys)
    later = time.time() + 5
    for p in project.glob("*.mlmodel"):
        os.utime(p, (later, later))
    assert build(capsys) == []


def test_stage_parameter_change_reruns_that_stage_and_later_only(project, capsys):
    build(capsys)
    text = (project / "recipes" / "a.yaml").read_text().replace("mode: fp16, rules: [rest]", "mode: linear, nbits: 6, rules: [rest]")
    (project / "recipes" / "a.yaml").write_text(text)
    ran = build(capsys)
    assert ran == sorted(["mlqpipe/recipes/a/../digits_mlp.mlmodel/2-rest", "mlqpipe/recipes/a/../digits_mlp.mlmodel/output", "mlqpipe-lock"])


def test_comment_change_rebuilds_no_model(project, capsys):
    build(capsys)
    p = project / "recipes" / "c.yaml"
    p.write_text("# a new comment\n" + p.read_text().replace("version: 1", "version: 1  # still one"))
    before = json.loads((project / "mlqpipe.lock.json").read_text())["outputs"]
    assert build(capsys) == ["mlqpipe-lock"]  # only the lock: it records the recipe file's new digest
    after = json.loads((project / "mlqpipe.lock.json").read_text())["outputs"]
    changed = {out for out in after if after[out] != before[out]}
    assert changed == {"recipes/out/digits_cnn.c.mlmodel"}
    assert after["recipes/out/digits_cnn.c.mlmodel"]["output_sha256"] == before["recipes/out/digits_cnn.c.mlmodel"]["output_sha256"]
    assert build(capsys) == []


def test_kernel_version_bump_invalidates_everything(project, capsys, monkeypatch):
    build(capsys)
    monkeypatch.setattr(build_tasks, "KERNEL_VERSION", build_tasks.KERNEL_VERSION + 1)
    assert len(build(capsys)) == 10
    assert "0 built, 3 from cache" in summary(capsys, "--force")  # forced tasks find every stage cached


def test_removed_model_is_reported_stale_and_pruned(project, capsys):
    build(capsys)
    (project / "recipes" / "c.yaml").unlink()
    assert main(["build", "recipes/*.yaml"]) == 0
    assert "stale: recipes/out/digits_cnn.c.mlmodel (no recipe produces it any more); --prune removes it" in capsys.readouterr().out
    assert (project / "recipes" / "out" / "digits_cnn.c.mlmodel").exists()
    assert main(["build", "recipes/*.yaml", "--dry-run"]) == 0
    assert "stale: recipes/out/digits_cnn.c.mlmodel" in capsys.readouterr().out
    assert main(["build", "recipes/*.yaml", "--prune"]) == 0
    assert "recipes/out/digits_cnn.c.mlmodel (no recipe produces it any more) — removed" in capsys.readouterr().out
    assert not (project / "recipes" / "out" / "digits_cnn.c.mlmodel").exists()


def test_lock_file_records_everything_stably(project, capsys):
    build(capsys)
    text = (project / "mlqpipe.lock.json").read_text()
    lock = json.loads(text)
    entry = lock["outputs"]["recipes/out/digits_mlp.a.mlmodel"]
    assert entry["inputs"] == {"digits_mlp.mlmodel": __import__("hashlib").sha256((project / "digits_mlp.mlmodel").read_bytes()).hexdigest()}
    assert len(entry["stage_keys"]) == 2 and all(len(k) == 64 for k in entry["stage_keys"])
    assert entry["output_sha256"] == __import__("hashlib").sha256((project / "recipes/out/digits_mlp.a.mlmodel").read_bytes()).hexdigest()
    assert set(lock["versions"]) == {"mlqpipe", "numpy", "protobuf", "kernel"}
    assert text == json.dumps(lock, sort_keys=True, indent=2) + "\n"


def test_broken_recipe_under_doit_prints_located_errors(project, capsys):
    (project / "recipes" / "a.yaml").write_text("version: 1\nstagse: []\n")
    assert main(["build", "recipes/*.yaml"]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "recipes/a.yaml:2:1: stagse: unknown key 'stagse'" in text
    assert "Traceback" not in text


@pytest.mark.invalid_models("recipes/out/digits_mlp.a.mlmodel", reason="an output tampered with on purpose: verify must notice")
def test_verify_and_diff(project, capsys):
    build(capsys)
    shutil.copy(project / "mlqpipe.lock.json", project / "old.lock.json")
    assert main(["verify"]) == 0
    assert "mlqpipe.lock.json: verified" in capsys.readouterr().out
    write(project / "recipes" / "b.yaml", "b", "../digits_mlp.mlmodel", 4)
    build(capsys)
    assert main(["diff", "old.lock.json", "mlqpipe.lock.json"]) == 1
    out = capsys.readouterr().out
    assert out.strip() == "~ recipes/out/digits_mlp.b.mlmodel: recipe changed, stage keys changed from stage 1, output bytes changed"
    (project / "recipes" / "out" / "digits_mlp.a.mlmodel").write_bytes(b"tampered")
    assert main(["verify"]) == 1
    assert "recipes/out/digits_mlp.a.mlmodel: content differs from the lock file" in capsys.readouterr().err


def test_cache_commands_and_corrupted_entry_is_rebuilt(project, capsys):
    build(capsys)
    assert main(["cache", "verify"]) == 0
    key = next(iter(_locked_keys(project).values()))[-1]  # an output's final entry: what a warm build reads
    obj = _manifest(project, key)["object"]
    (project / "cache" / "objects" / obj[:2] / obj).write_bytes(b"corrupted")
    assert main(["cache", "verify"]) == 1
    assert "bytes do not match their digest" in capsys.readouterr().err
    shutil.rmtree(project / ".mlqpipe-state")  # forget doit's state: every task runs, the cache answers
    shutil.rmtree(project / "recipes" / "out")
    line = summary(capsys)
    assert "0 built, 3 from cache" not in line and "from cache" in line  # one model recomputed its corrupted stage
    assert main(["cache", "verify"]) == 0  # healed
    capsys.readouterr()
    assert main(["cache", "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == 4  # recipes a and b share their stages: same model, same config


def test_shared_cache_two_checkouts_parallel_spawn(tmp_path):
    """Two directories, -n 1 and -n 4 (spawn start method: every task pickles), one shared cache:
    the second build is served from the cache and the outputs are byte-identical."""
    cache = tmp_path / "shared-cache"
    outs = []
    for name, jobs in (("one", "1"), ("two", "4")):
        d = tmp_path / name
        shutil.copytree(REPO / "pipelines", d / "pipelines")
        env = {**os.environ, "MLQPIPE_CACHE": str(cache), "MLQPIPE_START_METHOD": "spawn"}
        proc = subprocess.run([sys.executable, "-m", "mlqpipe.cli", "build", "-j", jobs, "pipelines/**/*.yaml"],
                              cwd=d, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        summary_line = [l for l in proc.stdout.splitlines() if l.startswith("mlqpipe build:")][0]
        models = [p for p in (d / "build").rglob("*")
                  if p.suffix in (".mlmodel", ".mlpackage") and not any(q.suffix == ".mlpackage" for q in p.parents)]
        outs.append((summary_line, {p.relative_to(d): digest(p) for p in models}))
    count = len(outs[0][1])
    assert count == 15 and sum(p.suffix == ".mlpackage" for p in outs[0][1]) == 4  # every example recipe's outputs
    assert outs[0][0].startswith(f"mlqpipe build: {count} built, 0 from cache")
    assert outs[1][0].startswith(f"mlqpipe build: 0 built, {count} from cache")
    assert outs[0][1] == outs[1][1]


def test_noop_build_imports_nothing_heavy(project, capsys):
    build(capsys)
    code = ("import sys; from mlqpipe.cli import main; assert main(['build', 'recipes/*.yaml']) == 0; "
            "print('HEAVY', sorted(m for m in ('numpy', 'google.protobuf', 'jsonschema', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout and "0 built, 0 from cache, 3 up to date" in proc.stdout


def test_cache_prune_keeps_what_the_lock_file_references(project, capsys):
    build(capsys)
    write(project / "recipes" / "b.yaml", "b", "../digits_mlp.mlmodel", 4)
    build(capsys)  # the 8-bit stage keys of b are no longer referenced... but a still uses them
    write(project / "recipes" / "a.yaml", "a", "../digits_mlp.mlmodel", 6)
    build(capsys)
    capsys.readouterr()
    assert main(["cache", "prune"]) == 0
    assert "removed 4 file(s)" in capsys.readouterr().out  # the old 8-bit stages: 2 manifests + 2 objects
    assert main(["cache", "verify"]) == 0
    shutil.rmtree(project / ".mlqpipe-state")
    assert "0 built, 3 from cache" in summary(capsys)


# --- what a warm build reads: the final entry of each output, not the stages before it ---------------------


def _outputs(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "recipes" / "out").rglob("*")) if p.is_file()}


def _manifest(root, key) -> dict:
    return json.loads((root / "cache" / "keys" / key[:2] / f"{key}.json").read_text())


def _locked_keys(root) -> dict:
    return {out: e["stage_keys"] for out, e in json.loads((root / "mlqpipe.lock.json").read_text())["outputs"].items()}


def _fresh_checkout(root) -> None:
    shutil.rmtree(root / ".mlqpipe-state")  # forget doit's state: every task runs, the cache answers
    shutil.rmtree(root / "recipes" / "out")


def test_a_warm_build_reads_only_each_outputs_final_entry(project, capsys, monkeypatch):
    """The output task writes the report from the rows each stage kept in its cache entry, so a fresh
    checkout reads the final model of each output and nothing of the stages before it; the reports are
    the cold build's, byte for byte."""
    from mlqpipe.build.cache import Cache

    build(capsys)
    cold = _outputs(project)
    keys = _locked_keys(project)
    assert all(len(k) == 2 for k in keys.values())
    final = {_manifest(project, k[-1])["object"] for k in keys.values()}
    intermediate = {_manifest(project, k[0])["object"] for k in keys.values()}
    assert final.isdisjoint(intermediate)
    _fresh_checkout(project)
    read = []
    real = Cache._object
    monkeypatch.setattr(Cache, "_object", lambda self, digest: read.append(digest) or real(self, digest))
    assert summary(capsys).startswith("mlqpipe build: 0 built, 3 from cache")
    assert set(read) == final
    assert _outputs(project) == cold


def test_a_corrupt_final_entry_is_rebuilt_from_the_stage_before(project, capsys):
    build(capsys)
    cold = _outputs(project)
    first, last = next(k for out, k in _locked_keys(project).items() if "digits_cnn" in out)
    obj = _manifest(project, last)["object"]
    (project / "cache" / "objects" / obj[:2] / obj).write_bytes(b"corrupted")
    _fresh_checkout(project)
    (project / ".mlqpipe-state").mkdir()
    line = summary(capsys)
    assert line.startswith("mlqpipe build: 1 built, 2 from cache")
    events = [json.loads(l) for l in (project / ".mlqpipe-state" / "run.jsonl").read_text().splitlines()]
    assert [e["computed"] for e in events if e["event"] == "stage"] == [False] * 6  # the first stage's entry served it
    assert main(["cache", "verify"]) == 0  # the corrupted object was rewritten
    assert _outputs(project) == cold


def test_entries_without_report_rows_give_the_same_reports(project, capsys):
    """A cache written before stages kept their report rows (or by another tool) still serves a build: the
    output task then reads every stage's model and computes the rows, with the same report bytes."""
    build(capsys)
    cold = _outputs(project)
    for path in (project / "cache" / "keys").glob("*/*.json"):
        manifest = json.loads(path.read_text())
        assert len(manifest.pop(build_tasks.ROWS)) in (1, 2)
        path.write_text(json.dumps(manifest))
    _fresh_checkout(project)
    assert summary(capsys).startswith("mlqpipe build: 0 built, 3 from cache")
    assert _outputs(project) == cold
