import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlqpipe.quant.linear import (
    COREMLTOOLS_MIN_SCALE,
    EXACT_MIN_SCALE,
    dequantize_linear,
    linear_lut,
    quantize_linear,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40), elements=finite),
    st.integers(1, 8),
)
def test_error_at_most_half_a_step_per_channel(w, nbits):
    q, scale, bias = quantize_linear(w, nbits, min_scale=EXACT_MIN_SCALE)
    assert q.dtype == np.uint8 and q.max(initial=0) <= 2**nbits - 1
    err = np.abs(dequantize_linear(q, scale, bias) - w)
    # half a step, plus float32 rounding of the affine map
    tol = scale[:, None] / 2 + 1e-5 * (np.abs(w).max(axis=1, keepdims=True) + 1e-30)
    assert np.all(err <= tol)


@settings(max_examples=40)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=30), elements=finite),
    st.integers(2, 8),
)
def test_symmetric_error_bound_and_zero_level(w, nbits):
    q, scale, bias = quantize_linear(w, nbits, symmetric=True, min_scale=EXACT_MIN_SCALE)
    assert np.allclose(bias, -(2 ** (nbits - 1)) * scale)
    err = np.abs(dequantize_linear(q, scale, bias) - w)
    assert np.all(err <= scale[:, None] / 2 + 1e-5 * (np.abs(w).max(axis=1, keepdims=True) + 1e-30))


def test_constant_channel_is_exact():
    w = np.full((2, 5), 0.25, np.float32)
    q, scale, bias = quantize_linear(w, 4)
    assert np.all(q == 0) and np.all(scale == 0) and np.all(bias == 0.25)
    assert np.array_equal(dequantize_linear(q, scale, bias), w)


def test_coremltools_threshold_collapses_tiny_ranges_and_exact_mode_does_not():
    w = (0.1 + np.linspace(0, 1e-4, 50, dtype=np.float32)).reshape(1, -1)
    q_ct, s_ct, b_ct = quantize_linear(w, 8, min_scale=COREMLTOOLS_MIN_SCALE)
    assert np.all(q_ct == 0)  # collapsed to the minimum, as coremltools does
    q, s, b = quantize_linear(w, 8, min_scale=EXACT_MIN_SCALE)
    assert np.abs(dequantize_linear(q, s, b) - w).max() <= s[0] / 2 + 1e-8
    assert np.abs(dequantize_linear(q_ct, s_ct, b_ct) - w).max() > 50 * s[0]


def test_symmetric_refuses_one_bit():
    with pytest.raises(ValueError, match="nbits >= 2"):
        quantize_linear(np.ones((1, 3), np.float32), 1, symmetric=True)


def test_linear_lut_table_is_evenly_spaced():
    w = np.linspace(-1, 1, 100, dtype=np.float32)
    table, codes = linear_lut(w, 3)
    assert table.shape == (8,) and table.dtype == np.float32
    assert np.allclose(np.diff(table), 2 / 7, atol=1e-6)
    assert np.abs(table[codes] - w).max() <= 1 / 7 + 1e-6
