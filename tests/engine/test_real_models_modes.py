"""The three real models from ../shared/models: every mode writes a model that passes Core ML's rules."""

import numpy as np
import pytest

import mlqpipe
from mlqpipe.formats.nn.check import check_spec
from tests.metrics import snr_db

MODES = [(n, "linear") for n in range(1, 9)] + [
    (8, "linear_symmetric"),
    (4, "linear_symmetric"),
    (16, "linear"),
    (4, "linear_lut"),
    (8, "linear_lut"),
    (4, "kmeans_lut"),
    (2, "kmeans_lut"),
]


def _custom(nbits, w):
    """A simple custom table: evenly spaced quantiles."""
    table = np.quantile(w, np.linspace(0, 1, 2**nbits))
    codes = np.abs(w.reshape(-1, 1) - table[None, :]).argmin(axis=1)
    return table, codes


@pytest.mark.parametrize("nbits, mode", MODES)
def test_every_mode_gives_valid_output(real_model, nbits, mode, tmp_path):
    before = real_model.read_bytes()
    q = mlqpipe.quantize_weights(real_model, nbits, mode)
    assert check_spec(q.spec) == []
    out = tmp_path / "q.mlmodel"
    q.save(out)
    assert mlqpipe.load_model(out).SerializeToString() == q.SerializeToString()
    assert real_model.read_bytes() == before  # the input is never modified
    stored = {str(r.storage) for r in mlqpipe.inventory(q.spec)}
    expected = "float16" if nbits == 16 else (f"lut{nbits}" if "lut" in mode else f"linear{nbits}")
    assert expected in stored


def test_custom_lut_and_dequantize_round_trip(real_model):
    q = mlqpipe.quantize_weights(real_model, 3, "custom_lut", lut_function=_custom)
    assert check_spec(q.spec) == [] and {str(r.storage) for r in mlqpipe.inventory(q.spec)} == {"lut3"}
    d = mlqpipe.quantize_weights(q, 8, "dequantization")
    assert check_spec(d.spec) == []
    for a, b in zip(mlqpipe.inventory(q.spec), mlqpipe.inventory(d.spec)):
        assert str(b.storage) == "float32"
        assert np.array_equal(a.values(), b.values())


def test_linear8_snr_at_least_35_db(real_model):
    float_weights = {r.id: r.values() for r in mlqpipe.inventory(mlqpipe.load_model(real_model).spec)}
    q = mlqpipe.quantize_weights(real_model, 8, "linear")
    for r in mlqpipe.inventory(q.spec):
        assert snr_db(float_weights[r.id], r.values()) >= 35, r.id
