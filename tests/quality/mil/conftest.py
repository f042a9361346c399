"""Session fixtures of the MIL interpreter tests: converted .mlpackage models, built on first use, once per
session, in a directory outside pytest's base temp (they are coremltools' output, i.e. test inputs).
Tests treat them as read-only."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def package_dir():
    directory = Path(tempfile.mkdtemp(prefix="mlqpipe-mil-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def converted(package_dir):
    """`converted(name, make) -> Path`: the package `make(path)` saves, built once per name."""
    built: dict[str, Path] = {}

    def get(name: str, make, *, torch: bool = False) -> Path:
        if importlib.util.find_spec("coremltools") is None:
            pytest.skip("coremltools is not installed (it converts the test models)")
        if torch and importlib.util.find_spec("torch") is None:
            pytest.skip("torch is not installed (it defines the reference models)")
        if name not in built:
            path = package_dir / f"{name}.mlpackage"
            make(path)
            built[name] = path
        return built[name]

    return get


@pytest.fixture(scope="session")
def digits_cache(package_dir):
    """digits.Cache of the session: the four digits models trained and converted once (skips without torch,
    scikit-learn or coremltools)."""
    for module in ("torch", "sklearn", "coremltools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the digits models need it)")
    from .digits import Cache

    return Cache(package_dir / "digits")
