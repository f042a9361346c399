"""Shared test helpers: where the real models live, and small model builders using our own messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"


def real_model_paths():
    return sorted(SHARED_MODELS.glob("*.mlmodel")) if SHARED_MODELS.is_dir() else []


@pytest.fixture(params=[p.name for p in real_model_paths()] or ["<absent>"])
def real_model(request) -> Path:
    if request.param == "<absent>":
        pytest.skip("../shared/models is absent")
    return SHARED_MODELS / request.param


def snr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    ref = np.asarray(reference, dtype=np.float64).ravel()
    noise = ref - np.asarray(approx, dtype=np.float64).ravel()
    if not np.any(noise):
        return float("inf")
    return float(10 * np.log10(np.sum(ref**2) / np.sum(noise**2)))


def _inputs() -> list[Path]:
    files = sorted((REPO / "pipelines").rglob("*.mlmodel")) + sorted((REPO / "pipelines").rglob("*.npz"))
    return files + (sorted(SHARED_MODELS.iterdir()) if SHARED_MODELS.is_dir() else [])


def _fingerprint(path: Path):
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.fixture(autouse=True)
def inputs_are_never_modified():
    """Every test: the repository's and shared/ input models and data are byte-for-byte unchanged after it."""
    import hashlib

    before = {p: (_fingerprint(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in _inputs()} if not _HASHES else _HASHES
    _HASHES.update(before)
    yield
    for p, (stat, digest) in before.items():
        assert p.exists(), f"input {p} was removed"
        if _fingerprint(p) != stat:  # touched: the bytes must still be the same
            assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, f"input {p} was modified"


_HASHES: dict = {}
