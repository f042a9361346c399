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


def _dp_by_full_scan(centres, counts, sums, k):
    """Reference for the k-means dynamic programme: every split of every end scanned, earliest best kept."""
    m = centres.size
    k = min(k, m)
    cn, cs, cq = (np.concatenate(([0.0], np.cumsum(x))) for x in (counts, sums, sums * centres))

    def cost(a, b):
        ds = cs[b] - cs[a]
        return (cq[b] - cq[a]) - ds * ds / (cn[b] - cn[a])

    best = np.full((k, m + 1), np.inf)
    split = np.zeros((k, m + 1), dtype=int)
    best[0, 1:] = cost(0, np.arange(1, m + 1))
    for layer in range(1, k):
        for b in range(layer + 1, m + 1):
            a = np.arange(layer, b)
            v = best[layer - 1, a] + cost(a, b)
            split[layer, b], best[layer, b] = a[np.argmin(v)], v.min()
    edges = [m]
    for layer in range(k - 1, 0, -1):
        edges.append(split[layer, edges[-1]])
    edges = np.array([0] + edges[::-1])
    return (cs[edges[1:]] - cs[edges[:-1]]) / (cn[edges[1:]] - cn[edges[:-1]])


@pytest.mark.parametrize(
    "m, k, ties", [(1, 4, False), (5, 1, False), (7, 16, False), (60, 4, False), (150, 16, False), (120, 8, True), (40, 16, True)]
)
def test_dynamic_programme_matches_a_full_scan_bit_for_bit(m, k, ties):
    from mlqpipe.quant.lut import _optimal_1d

    rng = np.random.default_rng(m * 100 + k)
    # ties: evenly spaced points of equal weight, where many splits cost exactly the same
    centres = np.arange(m, dtype=np.float64) if ties else np.sort(rng.standard_normal(m))
    counts = np.full(m, 3.0) if ties else rng.integers(1, 50, m).astype(np.float64)
    got = _optimal_1d(centres, counts, centres * counts, k)
    assert np.array_equal(got, _dp_by_full_scan(centres, counts, centres * counts, k))


def test_chunked_passes_change_no_bit(monkeypatch):
    from mlqpipe.quant import lut

    w = np.concatenate([np.random.default_rng(5).laplace(size=70_001), np.full(999, 0.25)]).astype(np.float32)
    whole = kmeans_lut(w, 4)
    monkeypatch.setattr(lut, "_CHUNK", 1000)
    chunked = kmeans_lut(w, 4)
    assert whole[0].tobytes() == chunked[0].tobytes() and whole[1].tobytes() == chunked[1].tobytes()


@pytest.mark.parametrize("dist", ["normal", "integers", "halves"])
def test_codes_are_exactly_the_nearest_entry_with_ties_low(dist):
    from mlqpipe.quant.lut import nearest_codes

    rng = np.random.default_rng(11)
    w = {
        "normal": lambda: rng.standard_normal(300_000),
        "integers": lambda: rng.integers(0, 100, 300_000),  # midpoints between means often land on values
        "halves": lambda: rng.integers(-300, 300, 300_000) / 2,
    }[dist]().astype(np.float32)
    for nbits in (3, 4, 8):
        table, codes = kmeans_lut(w, nbits)
        size = int(np.argmax(np.diff(table) <= 0)) + 1 if np.any(np.diff(table) <= 0) else table.size
        assert np.array_equal(codes, nearest_codes(w, table[:size]))
