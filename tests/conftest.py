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
