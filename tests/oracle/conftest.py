"""Oracle tests: mlqpipe's coremltools-compatible API against coremltools 9.0 itself.

The modules here are plain pytest modules (no __init__.py); their model builders and helpers are in
oracle_models.py, imported as `tests.oracle.oracle_models` (the project root is on pytest's pythonpath).
Keep the test module basenames unique across tests/: under pytest's default import mode two test
modules with the same basename in different folders cannot both be collected.
"""

from __future__ import annotations

import numpy as np
import pytest


def snr_db(reference, approx) -> float:
    """10·log10(Σw² / Σ(w − wq)²); +inf when the two are identical."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    noise = ref - np.asarray(approx, dtype=np.float64).ravel()
    energy = float(np.sum(noise**2))
    if energy == 0.0:
        return float("inf")
    return float(10.0 * np.log10(float(np.sum(ref**2)) / energy))


@pytest.fixture
def snr():
    return snr_db
