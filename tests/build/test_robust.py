"""Killed builds and concurrent builds: no partial outputs, intact cache, identical results."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlqpipe.build.cache import Cache
from tests.builders import write_fleet

N = 24


def _project(root: Path) -> Path:
    return write_fleet(root, N, nbits=4)


def _build(root: Path, cache: Path, **kw):
    env = {**os.environ, "MLQPIPE_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "mlqpipe.cli", "build", "recipes/*.yaml"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _outputs(root: Path, temporaries: bool = True) -> dict:
    """Files in out/ (the hidden temporaries of atomic writes too, unless `temporaries` is False)."""
    if not (root / "out").exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted((root / "out").iterdir())
            if temporaries or not (p.name.startswith(".") and p.name.endswith(".tmp"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = _project(tmp_path_factory.mktemp("reference"))
    proc = _build(root, root / "cache")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return _outputs(root)


@pytest.mark.parametrize("delay", [0.4, 0.9, 1.4])
def test_killed_build_leaves_no_partial_output_and_heals(tmp_path, reference, delay):
    root = _project(tmp_path)
    cache = tmp_path / "cache"
    proc = _build(root, cache)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    partial = _outputs(root, temporaries=False)  # a killed writer may leave its hidden temporary, never a partial file
    assert all(reference[name] == data for name, data in partial.items())  # complete files or none
    assert Cache(cache).verify() == []
    again = _build(root, cache)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert _outputs(root) == reference


def test_two_builds_at_once(tmp_path, reference):
    root = _project(tmp_path)
    cache = tmp_path / "cache"
    a, b = _build(root, cache), _build(root, cache)
    assert a.wait(timeout=300) == 0, a.stderr.read()
    assert b.wait(timeout=300) == 0, b.stderr.read()
    assert _outputs(root) == reference
    assert Cache(cache).verify() == []
