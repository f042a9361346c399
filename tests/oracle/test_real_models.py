"""The three real models in ../shared/models: byte-identical to coremltools 9.0, and 8-bit SNR >= 35 dB.

Skipped when the shared folder is absent. The byte comparisons also need coremltools (skipped without it);
the SNR check uses mlqpipe alone.
"""

from pathlib import Path

import numpy as np
import pytest

import mlqpipe

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
MODEL_FILES = sorted(p.name for p in SHARED_MODELS.glob("*.mlmodel")) if SHARED_MODELS.is_dir() else []
MODES = [(n, "linear") for n in range(1, 9)] + [(8, "linear_symmetric"), (16, "linear"), (4, "linear_lut")]


@pytest.fixture(params=MODEL_FILES or ["<absent>"])
def model_path(request) -> Path:
    if request.param == "<absent>":
        pytest.skip(f"{SHARED_MODELS} is absent")
    return SHARED_MODELS / request.param


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("coremltools")
    from tests.oracle import oracle_models

    return oracle_models


def test_three_models_present():
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"{SHARED_MODELS} is absent")
    assert len(MODEL_FILES) == 3, MODEL_FILES


@pytest.mark.parametrize("nbits, mode", MODES, ids=[f"{m}{n}" for n, m in MODES])
def test_same_bytes_as_coremltools(model_path, nbits, mode, oracle):
    data = model_path.read_bytes()
    theirs = oracle.ct_quantize(data, nbits, mode)
    ours = oracle.ours_quantize(data, nbits, mode)
    oracle.assert_same(ours, theirs, f"{model_path.name} {mode} {nbits}")
    # from the path as well
    oracle.assert_same(oracle.ours_quantize(str(model_path), nbits, mode), theirs, f"{model_path.name} (path)")
    assert model_path.read_bytes() == data


def test_linear8_snr_at_least_35_db(model_path, snr):
    data = model_path.read_bytes()
    original = {r.id: r for r in mlqpipe.inventory(mlqpipe.load_model(data).spec)}
    quantized = mlqpipe.quantize_weights(data, 8, "linear")
    checked = 0
    for rec in mlqpipe.inventory(quantized.spec):
        if str(rec.storage) != "linear8":
            continue
        w = original[rec.id].values()
        wq = rec.values()
        assert wq.shape == w.shape, rec.id
        if not np.any(w):
            np.testing.assert_array_equal(wq, w)
            continue
        value = snr(w, wq)
        assert value >= 35.0, f"{model_path.name} {rec.id}: SNR {value:.1f} dB"
        checked += 1
    assert checked >= 4
    assert str(original[next(iter(original))].storage) == "float32"
