"""The engine, plan, build, cache, lock and reports run against the ModelFormat protocol alone: a fake
directory format (tests/engine/fake_format.py) goes through all of them; what it cannot do is a located
problem."""

import json

import numpy as np
import pytest

from mlqpipe.artifacts import digest, tree_files
from mlqpipe.build.cache import Cache
from mlqpipe.cli import main
from mlqpipe.engine.plan import plan_recipe
from mlqpipe.formats import registry
from mlqpipe.recipe import load_recipe
from tests.engine.fake_format import FAKE, write_fake_model

rng = np.random.default_rng(7)
W = {"dense": rng.standard_normal((8, 16)).astype(np.float32), "small": rng.standard_normal((4, 4)).astype(np.float32),
     "b": rng.standard_normal(8).astype(np.float32)}

RECIPE = """\
version: 1
models:
  - {input: m.fakemodel, output: 'out/{stem}.q.fakemodel'}
rules:
  big: {layer_type: dense, count: {min: 100}}
  rest: {storage: float32}
stages:
  - {name: big, mode: linear, nbits: 8, rules: [big]}
  - {name: rest, mode: fp16, rules: [rest]}
"""


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    registry.register(FAKE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    write_fake_model(tmp_path / "m.fakemodel", W)
    (tmp_path / "r.yaml").write_text(RECIPE)
    yield tmp_path
    registry.unregister(FAKE)


def _ran(capsys, *args) -> list[str]:
    assert main(["build", "r.yaml", *args]) == 0, capsys.readouterr()
    return sorted(line[3:].strip() for line in capsys.readouterr().out.splitlines() if line.startswith(".  "))


def test_plan_decides_and_estimates_sizes(fake):
    (plan,), problems = plan_recipe(load_recipe("r.yaml"))
    assert problems == []
    big, rest = plan.stages
    assert {d.id: d.action for d in big.decisions} == {"dense:weight": "quantize", "small:weight": "keep", "b:weight": "keep"}
    assert {d.id: d.storage_after for d in rest.decisions} == {"dense:weight": "linear8", "small:weight": "float16", "b:weight": "float16"}
    assert plan.bytes_before == 4 * (128 + 16 + 8)
    assert plan.bytes_after == (128 + 8 * 8) + 2 * (16 + 8)
    assert (plan.version_before, plan.version_after) == (1, 3)


def test_build_writes_the_directory_records_it_in_cache_lock_and_report(fake, capsys):
    first = _ran(capsys)
    assert len(first) == 2 + 1 + 1  # two stages, the output, the lock
    out = fake / "out" / "m.q.fakemodel"
    files = {p.relative_to(out).as_posix() for p in tree_files(out)}
    assert files == {"model.json", "data/dense.bin", "data/small.bin", "data/b.bin"}
    doc = json.loads((out / "model.json").read_text())
    assert [t["storage"] for t in doc["tensors"]] == ["linear", "float16", "float16"] and doc["version"] == 3
    got = FAKE.inventory(FAKE.load(out))
    assert np.allclose(got[0].values(), W["dense"], atol=np.ptp(W["dense"], axis=1, keepdims=True) / 255)
    assert np.array_equal(got[1].values(), W["small"].astype(np.float16).astype(np.float32))

    entry = json.loads((fake / "mlqpipe.lock.json").read_text())["outputs"]["out/m.q.fakemodel"]
    assert entry["status"] == "passed"
    assert entry["output_sha256"] == digest(out)  # the tree digest of what was written
    assert entry["inputs"] == {"m.fakemodel": digest(fake / "m.fakemodel")}
    cache = Cache(fake / "cache")
    trees = [cache.get_tree(k) for k in entry["stage_keys"]]
    assert all(t is not None for t in trees) and trees[-1] == {p: (out / p).read_bytes() for p in files}
    report = json.loads((fake / "out" / "m.q.fakemodel.report.json").read_text())
    assert [(w["id"], w["stage"]) for w in report["weights"]] == [("dense:weight", "big"), ("small:weight", "rest"), ("b:weight", "rest")]
    assert report["specification_version"] == {"before": 1, "after": 3, "deployment_target_before": "iOS 11",
                                                "deployment_target_after": "iOS 12"}
    sizes = [sum(f.stat().st_size for f in tree_files(d)) for d in (fake / "m.fakemodel", out)]
    assert [report["totals"]["bytes_before"], report["totals"]["bytes_after"]] == sizes

    assert _ran(capsys) == []  # nothing changed: nothing runs
    (fake / "m.fakemodel" / "data" / "small.bin").write_bytes((W["small"] * 2).astype("<f4").tobytes())
    assert len(_ran(capsys)) == 4  # one file of the input directory changed: its model rebuilds
    (fake / "m.fakemodel" / "data" / "extra.bin").write_bytes(b"x")
    assert len(_ran(capsys)) == 4  # a new file in the input: rebuilt too (doit tracks the directory's listing)


def test_a_failed_build_leaves_no_directory(fake, capsys):
    _ran(capsys)
    (fake / "r.yaml").write_text(RECIPE.replace("count: {min: 100}}", "count: {min: 100}, gates: {min_snr_db: 200}}"))
    assert main(["build", "r.yaml"]) == 1
    assert not (fake / "out" / "m.q.fakemodel").exists()
    assert "min_snr_db" in capsys.readouterr().err


@pytest.mark.parametrize("change, at, message", [
    ("layer_type: dense, count: {min: 100}", "r.yaml:5", "condition in_channels cannot be answered for fake models"),
    ("mode: linear, nbits: 8", "r.yaml:8", "mode kmeans_lut is not available for fake models"),
])
def test_what_a_format_cannot_do_is_a_located_problem(fake, capsys, change, at, message):
    replacement = {"layer_type: dense, count: {min: 100}": "layer_type: dense, in_channels: {min: 4}",
                   "mode: linear, nbits: 8": "mode: kmeans_lut, nbits: 4"}[change]
    (fake / "r.yaml").write_text(RECIPE.replace(change, replacement))
    assert main(["validate", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert at in err and message in err, err


def test_evaluation_of_a_format_without_evaluator_is_refused(fake, capsys):
    (fake / "r.yaml").write_text(RECIPE.replace("stages:", "gates: {min_top1_agreement: 0.9}\nstages:"))
    assert main(["validate", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:7:29: gates.min_top1_agreement" in err and "fake models cannot be evaluated yet" in err, err
