"""The `mlpackage` fixture: catalog packages (packages.py), built on first use, once per session.

The packages live in a session directory outside pytest's base temp on purpose: they are coremltools'
output, i.e. inputs, and the tree-wide Core ML validator check (tests/conftest.py) judges what a *test*
writes under the base temp, after whichever test happens to build a package first. (coreml-validate's
mil-check also rejects coremltools' own while_loop encoding, whose two blocks declare the same input names:
control_flow_ios17.) Tests must treat the returned packages as read-only: copy them to tmp_path first.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

from .packages import CATALOG, NEEDS_TORCH, build


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="session")
def mlpackage():
    """`mlpackage(name) -> Path` of catalog package `name` (skips without coremltools, or torch for the
    torch-converted ones)."""
    directory = Path(tempfile.mkdtemp(prefix="mlqpipe-mlpackages-"))
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in CATALOG:
            raise KeyError(f"no catalog package {name!r}; known: {sorted(CATALOG)}")
        if not _importable("coremltools"):
            pytest.skip("coremltools is not installed (it builds the .mlpackage test models)")
        if name in NEEDS_TORCH and not _importable("torch"):
            pytest.skip(f"{name} needs torch, which is not installed")
        if name not in built:
            built[name] = build(name, directory)
        return built[name]

    yield get
    shutil.rmtree(directory, ignore_errors=True)
