import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlqpipe.quant.lut import check_custom_lut, kmeans_lut


def _mse(w, table, codes):
    return float(np.mean((w.astype(np.float64) - table[codes]) ** 2))


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 3000), elements=st.floats(-100, 100, allow_nan=False, width=32)),
    st.integers(1, 8),
)
def test_table_shape_codes_and_nearest_assignment(w, nbits):
    table, codes = kmeans_lut(w, nbits)
    assert table.shape == (2**nbits,) and table.dtype == np.float32
    assert codes.shape == w.shape and codes.dtype == np.uint8
    used = np.unique(codes)
    # every value maps to its nearest used table entry (ties either way)
    dist = np.abs(w[:, None].astype(np.float64) - table[used][None, :].astype(np.float64))
    assert np.all(dist[np.arange(w.size), np.searchsorted(used, codes)] <= dist.min(axis=1) + 1e-6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=16), st.integers(1, 500))
def test_few_distinct_values_are_exact(distinct, repeat):
    w = np.tile(np.array(distinct, np.float32), repeat)
    table, codes = kmeans_lut(w, 4)
    assert np.array_equal(table[codes], w)


def test_deterministic():
    w = np.random.default_rng(3).standard_normal(200_000).astype(np.float32)
    a = kmeans_lut(w, 4)
    b = kmeans_lut(w.copy(), 4)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


@pytest.mark.parametrize("dist", ["normal", "laplace", "mixture", "student"])
def test_four_bit_mse_within_half_a_percent_of_the_exact_optimum(dist):
    kmeans1d = pytest.importorskip("kmeans1d")
    rng = np.random.default_rng(7)
    n = 1 << 20
    w = {
        "normal": lambda: rng.standard_normal(n) * 0.02,
        "laplace": lambda: rng.laplace(size=n),
        "mixture": lambda: np.concatenate([rng.normal(0, 0.01, n - n // 4), rng.normal(0.3, 0.1, n // 4)]),
        "student": lambda: rng.standard_t(3, size=n),
    }[dist]().astype(np.float32)
    table, codes = kmeans_lut(w, 4)
    exact = kmeans1d.cluster(w.astype(np.float64), 16)
    optimum = float(np.mean((w - np.asarray(exact.centroids)[np.asarray(exact.clusters)]) ** 2))
    assert _mse(w, table, codes) <= 1.005 * optimum


def test_custom_lut_contract_checks():
    table, codes = check_custom_lut(([0.5, 1.5], [0, 1, 1]), 2, 3, "x")
    assert table.tolist() == [0.5, 1.5, 0.0, 0.0] and codes.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="5 entries, at most 2\\*\\*nbits = 4"):
        check_custom_lut((np.zeros(5), [0]), 2, 1, "x")
    with pytest.raises(ValueError, match="returned 2 indices for 3 weights"):
        check_custom_lut((np.zeros(4), [0, 1]), 2, 3, "x")
    with pytest.raises(ValueError, match="integers in 0..3"):
        check_custom_lut((np.zeros(4), [0, 4, 1]), 2, 3, "x")
    with pytest.raises(ValueError, match="must return \\(lut, quantized_indices\\)"):
        check_custom_lut(None, 2, 3, "x")
