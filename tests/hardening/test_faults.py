"""Faults: a failing disk, a corrupted doit state file — clear errors, nothing half-written, healed."""

import errno
import os
import shutil

import pytest

import mlqpipe
from mlqpipe import ModelError
from mlqpipe.cli import main
from tests.conftest import REPO


@pytest.fixture()
def project(tmp_path, monkeypatch):
    shutil.copy(REPO / "pipelines/demo/digits_mlp.mlmodel", tmp_path / "m.mlmodel")
    (tmp_path / "r.yaml").write_text("version: 1\nmodels: [{input: m.mlmodel, output: 'out/{stem}.q.mlmodel'}]\n"
                                     "rules: {all: {}}\nstages: [{name: q, mode: linear, nbits: 8, rules: [all]}]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _disk_full(monkeypatch, after_bytes: int = 1000):
    """Make every file write fail with ENOSPC once `after_bytes` have been written (a tiny full disk)."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))


def test_save_on_a_full_disk(project, monkeypatch):
    q = mlqpipe.quantize_weights(project / "m.mlmodel", 8)
    before = (project / "m.mlmodel").read_bytes()
    _disk_full(monkeypatch)
    with pytest.raises(ModelError, match=r"q\.mlmodel: cannot write the model: No space left on device; nothing was written"):
        q.save(project / "out" / "q.mlmodel")
    assert list((project / "out").iterdir()) == []  # no final file, no temporary left behind
    assert (project / "m.mlmodel").read_bytes() == before


def test_quantize_command_on_a_full_disk(project, monkeypatch, capsys):
    _disk_full(monkeypatch)
    assert main(["quantize", "r.yaml"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    out = project / "out"
    assert not out.exists() or [p.name for p in out.iterdir()] == []


def test_build_on_a_full_disk_then_heals(project, monkeypatch, capsys):
    with monkeypatch.context() as m:
        _disk_full(m, after_bytes=200)
        assert main(["build", "r.yaml"]) != 0
    out = project / "out"
    assert not (out / "m.q.mlmodel").exists()
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".")]
    capsys.readouterr()
    assert main(["build", "r.yaml"]) == 0
    assert mlqpipe.load_model(out / "m.q.mlmodel")
    assert main(["cache", "verify"]) == 0


def test_corrupted_doit_state_is_reported_and_healed(project, capsys):
    assert main(["build", "r.yaml"]) == 0
    state = project / ".mlqpipe-state" / "doit.sqlite3"
    state.write_bytes(b"this is not a database" * 100)
    capsys.readouterr()
    assert main(["build", "r.yaml"]) == 0
    captured = capsys.readouterr()
    assert f"doit state {os.path.relpath(state)} was corrupt" in captured.err or "was corrupt" in captured.err
    assert "0 built, 1 from cache" in captured.out  # forgotten state: the cache answers
    assert (project / ".mlqpipe-state" / "doit.sqlite3.corrupt").exists()
