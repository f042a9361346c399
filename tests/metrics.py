"""Numbers the tests compute on weights: the one signal-to-noise ratio every test uses."""

from __future__ import annotations

import numpy as np


def snr_db(reference, approx) -> float:
    """10·log10(Σw² / Σ(w − wq)²) in float64; +inf when the two are identical."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    noise = ref - np.asarray(approx, dtype=np.float64).ravel()
    energy = float(np.sum(noise**2))
    if energy == 0.0:
        return float("inf")
    return float(10.0 * np.log10(float(np.sum(ref**2)) / energy))
