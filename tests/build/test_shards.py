"""Sharded builds: `mlqpipe build --shard I/N` builds a deterministic part of the outputs; every output is built
by exactly one shard; `mlqpipe lock merge` of the partial locks equals the lock of one unsharded build, byte
for byte; stale outputs and --prune stay within a shard; merges of locks from different builds are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from mlqpipe.build.lock import shard_of
from mlqpipe.cli import main
from tests.builders import write_fleet
from tests.conftest import REPO


def _copy_examples(root):
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    return root


def _fleet(root, n: int = 50):
    return write_fleet(root, n, nbits=8)


def _build(root, monkeypatch, capsys, *args) -> str:
    monkeypatch.chdir(root)
    assert main(["build", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _built(out: str) -> set[str]:
    """Outputs a build's table lists (built, from cache or up to date)."""
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].endswith((".mlmodel", ".mlpackage"))]
    return set(rows)


@pytest.fixture(scope="module")
def examples_reference(tmp_path_factory):
    """One unsharded build of every example recipe: its lock, its outputs, and the cache it filled."""
    import os

    root = _copy_examples(tmp_path_factory.mktemp("unsharded"))
    cache = tmp_path_factory.mktemp("shared-cache")
    old = (os.getcwd(), os.environ.get("MLQPIPE_CACHE"))
    os.chdir(root)
    os.environ["MLQPIPE_CACHE"] = str(cache)
    try:
        assert main(["build"]) == 0
    finally:
        os.chdir(old[0])
        if old[1] is None:
            os.environ.pop("MLQPIPE_CACHE")
        else:
            os.environ["MLQPIPE_CACHE"] = old[1]
    lock = (root / "mlqpipe.lock.json").read_text()
    return lock, set(json.loads(lock)["outputs"]), cache


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_of_the_examples_build_every_output_once_and_merge_to_the_unsharded_lock(examples_reference, tmp_path, monkeypatch, capsys, n):
    lock, outputs, cache = examples_reference
    monkeypatch.setenv("MLQPIPE_CACHE", str(cache))  # the shared (remote) cache of CI's runners
    partials, seen = [], []
    for i in range(1, n + 1):
        root = _copy_examples(tmp_path / f"shard{i}")
        out = _build(root, monkeypatch, capsys, "--shard", f"{i}/{n}")
        partial = root / f"mlqpipe.lock.shard-{i}-of-{n}.json"
        assert partial.is_file() and not (root / "mlqpipe.lock.json").exists()
        mine = set(json.loads(partial.read_text())["outputs"])
        assert mine == {o for o in outputs if shard_of(o, n) == i} == _built(out)
        assert "0 built" in out  # the shared cache answers every stage
        seen.append(mine)
        partials.append(str(partial))
    assert sum(len(s) for s in seen) == len(outputs) and set().union(*seen) == outputs  # each exactly once
    monkeypatch.chdir(tmp_path)
    assert main(["lock", "merge", *partials, "-o", "merged.json"]) == 0
    assert (tmp_path / "merged.json").read_text() == lock


def test_a_fleet_of_50_recipes_in_3_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    whole = _fleet(tmp_path / "whole")
    _build(whole, monkeypatch, capsys, "recipes/*.yaml")
    lock = (whole / "mlqpipe.lock.json").read_text()
    partials, counts = [], []
    for i in (1, 2, 3):
        root = _fleet(tmp_path / f"s{i}")
        monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / f"cache{i}"))  # cold: each shard really builds its part
        out = _build(root, monkeypatch, capsys, "recipes/*.yaml", "--shard", f"{i}/3")
        counts.append(int(out.split("mlqpipe build: ")[1].split(" built")[0]))
        partials.append(str(root / f"mlqpipe.lock.shard-{i}-of-3.json"))
    assert sum(counts) == 50 and all(10 <= c <= 25 for c in counts)  # every output built once; a hash spreads them
    monkeypatch.chdir(tmp_path)
    assert main(["lock", "merge", *partials, "-o", "merged.json"]) == 0
    assert (tmp_path / "merged.json").read_text() == lock


def test_a_shard_never_calls_another_shards_outputs_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    root = _fleet(tmp_path / "p", n=8)
    for i in (1, 2):
        _build(root, monkeypatch, capsys, "recipes/*.yaml", "--shard", f"{i}/2")
    outputs = {i: f"out/m{i:02d}.q.mlmodel" for i in range(8)}
    second = next(i for i, o in outputs.items() if shard_of(o, 2) == 2)
    first = next(i for i, o in outputs.items() if shard_of(o, 2) == 1)
    (root / "recipes" / f"r{second:02d}.yaml").unlink()  # shard 2's output is now stale
    (root / "recipes" / f"r{first:02d}.yaml").unlink()  # and one of shard 1's
    out = _build(root, monkeypatch, capsys, "recipes/*.yaml", "--shard", "1/2", "--prune")
    assert not (root / outputs[first]).exists()  # its own stale output pruned
    assert (root / outputs[second]).exists(), out  # another shard's left alone
    _build(root, monkeypatch, capsys, "recipes/*.yaml", "--shard", "2/2", "--prune")
    assert not (root / outputs[second]).exists()


def test_merging_locks_of_different_builds_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    root = _fleet(tmp_path / "p", n=6)
    _build(root, monkeypatch, capsys, "recipes/*.yaml", "--shard", "1/2")
    a = root / "mlqpipe.lock.shard-1-of-2.json"
    doc = json.loads(a.read_text())
    out, entry = next(iter(doc["outputs"].items()))
    other = dict(doc, outputs={out: dict(entry, output_sha256="0" * 64)})
    b = tmp_path / "other.json"
    b.write_text(json.dumps(other))
    assert main(["lock", "merge", str(a), str(b), "-o", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert f"other.json: {out} is recorded differently in {a}; these partial locks come from different builds" in err
    b.write_text(json.dumps(dict(doc, versions=dict(doc["versions"], numpy="0.0"))))
    assert main(["lock", "merge", str(a), str(b), "-o", str(tmp_path / "m.json")]) == 2
    assert "merge the partial locks of one build" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("bad", ["0/2", "3/2", "two", "1/0"])
def test_a_bad_shard_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--shard", bad])
    assert e.value.code == 2
    assert "--shard" in capsys.readouterr().err
