"""The built wheel carries the JSON Schema (top-level schemas/ shipped as mlqpipe/schemas)."""

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}")
    (path,) = out.glob("mlqpipe-*.whl")
    return path


def test_wheel_contains_schema(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlqpipe/schemas/recipe.schema.json" in names
    for module in ("cli.py", "build/tasks.py", "coreml/proto.py", "quant/lut.py", "recipe/load.py"):
        assert f"mlqpipe/{module}" in names, module


def test_installed_wheel_finds_schema(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what installing a pure-Python wheel does
    code = (
        "import mlqpipe.schema as s;"
        "assert s.__file__.startswith(%r), s.__file__;"
        "print(s.recipe_schema()['$id'])" % str(site)
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("recipe.schema.json")
