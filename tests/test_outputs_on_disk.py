"""What mlqpipe leaves on disk: permissions of every file it writes, and inputs it refuses to overwrite."""

import os
import shutil
import stat

import pytest

import mlqpipe
from mlqpipe.cli import main
from mlqpipe.fileio import atomic_write
from tests.conftest import REPO


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_follows_the_umask(tmp_path, umask_022):
    atomic_write(tmp_path / "a.bin", b"x")
    assert _mode(tmp_path / "a.bin") == 0o644
    os.umask(0o077)
    atomic_write(tmp_path / "b.bin", b"x")
    assert _mode(tmp_path / "b.bin") == 0o600


def test_models_reports_and_lock_are_readable(tmp_path, monkeypatch, umask_022):
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLQPIPE_CACHE", str(tmp_path / "cache"))
    assert main(["build", "pipelines/demo/demo.yaml"]) == 0
    written = [p for p in (tmp_path / "build").rglob("*") if p.is_file()] + [tmp_path / "mlqpipe.lock.json"]
    assert len(written) == 7  # 2 models, 2 x 2 reports, the lock file
    assert {p.name: _mode(p) for p in written} == {p.name: 0o644 for p in written}
    assert all(_mode(p) == 0o644 for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_save_refuses_to_overwrite_the_file_it_was_loaded_from(tmp_path):
    src = tmp_path / "m.mlmodel"
    shutil.copy(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel", src)
    original = src.read_bytes()
    q = mlqpipe.quantize_weights(src, 8, "linear")
    with pytest.raises(mlqpipe.ModelError, match="this is the file the model was loaded from; refusing to overwrite an input"):
        q.save(src)
    os.symlink(src, tmp_path / "link.mlmodel")
    with pytest.raises(mlqpipe.ModelError, match="refusing to overwrite an input"):
        q.save(tmp_path / "link.mlmodel")  # the same file by another name
    assert src.read_bytes() == original
    q.save(tmp_path / "q.mlmodel")
    q.save(src, overwrite=True)
    assert src.read_bytes() == (tmp_path / "q.mlmodel").read_bytes() != original


def test_temporaries_of_killed_writers_are_swept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".m.bin.{dead}.abc123.tmp"
    live = tmp_path / f".m.bin.{os.getpid()}.def456.tmp"  # a concurrent writer (this process): kept
    other = tmp_path / f".n.bin.{dead}.abc123.tmp"  # another file's temporary: not this write's business
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    atomic_write(tmp_path / "m.bin", b"whole")
    assert (tmp_path / "m.bin").read_bytes() == b"whole"
    assert not stale.exists() and live.exists() and other.exists()
