"""The numba-compiled exact fp16 k-means (mlqpipe/quant/kmeans_jit.py): bit-identical to kmeans.py's numpy DP
and to kmeans1d (what coremltools 9.0 runs on fp16 groups), on every kind of fp16 group."""

import importlib.util
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import mlqpipe.quant as Q
import mlqpipe.quant.kmeans as K

pytest.importorskip("numba")

NBITS = [1, 2, 3, 4, 6, 8]


# coremltools' vendored kmeans1d is the oracle (the PyPI release has no weights argument); without
# coremltools the tests still compare the compiled path with the numpy one
HAVE_KMEANS1D = importlib.util.find_spec("coremltools") is not None


def _kmeans1d():
    return pytest.importorskip("coremltools._deps.kmeans1d")


def _reference(x, nbits):
    """kmeans1d on one group's distinct values and counts, as coremltools calls it (test_kmeans.py)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    k = min(len(values), 1 << nbits)
    r = _kmeans1d().cluster(values, k, weights=counts)
    lut = np.zeros(1 << nbits)
    lut[:k] = r.centroids
    return lut.astype(np.float16), np.array(r.clusters)[inverse.ravel()].astype(np.uint8)


def _run(groups, nbits, jit):
    """kmeans1d_fp16 on numba (from the first call: no work threshold) or on numpy."""
    saved = K._JIT, K._JIT_MIN_WORK
    K._JIT, K._JIT_MIN_WORK = jit, 0
    try:
        assert (K._jit_solver() is not None) == jit
        return K.kmeans1d_fp16(groups, nbits)
    finally:
        K._JIT, K._JIT_MIN_WORK = saved


def _finite_raw(rng, shape, top=0x7C00):
    """Random finite fp16 bit patterns below `top` (no inf, no NaN), either sign."""
    return (rng.integers(0, top, shape) | (rng.integers(0, 2, shape) << 15)).astype(np.uint16).view(np.float16)


def _make(kind, g, m, seed):
    rng = np.random.default_rng(seed)
    shape = (g, m)
    if kind == "t3":  # trained-looking weights at several scales
        x = rng.standard_t(3, shape) * rng.choice([2e-2, 1.0, 300.0, 1e-5])
    elif kind == "raw":  # any finite fp16: all magnitudes, subnormals, zeros
        x = _finite_raw(rng, shape)
    elif kind == "subnormal":
        x = _finite_raw(rng, shape, top=0x0400)
    elif kind == "large":  # near ±65504
        x = (rng.integers(0x7800, 0x7C00, shape) | (rng.integers(0, 2, shape) << 15)).astype(np.uint16).view(np.float16)
    elif kind == "few":  # a pool of a few distinct values (often fewer than 2**nbits)
        pool = _finite_raw(rng, int(rng.integers(1, 40)))
        x = pool[rng.integers(0, len(pool), shape)]
    elif kind == "lattice":  # equally spaced, equally frequent values: exact cost ties
        x = rng.integers(-8, 9, shape) * 2.0 ** -int(rng.integers(0, 12))
    elif kind == "symmetric":
        h = rng.standard_normal((g, (m + 1) // 2)) * 0.1
        x = np.concatenate([h, -h], axis=1)[:, :m]
    elif kind == "zeros":  # ±0 with a few other values
        x = np.where(rng.random(shape) < 0.5, -0.0, 0.0) + (rng.random(shape) < 0.1) * rng.integers(-2, 3, shape)
    else:  # constant
        x = np.full(shape, _finite_raw(rng, 1)[0])
    return np.asarray(x).astype(np.float16)


KINDS = ["t3", "raw", "subnormal", "large", "few", "lattice", "symmetric", "zeros", "constant"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), nbits=st.sampled_from(NBITS), g=st.integers(1, 3), m=st.integers(1, 1500),
       seed=st.integers(0, 2**32 - 1))
@example(kind="t3", nbits=6, g=2, m=12000, seed=0)  # deep divide and conquer, thousands of distinct values
@example(kind="lattice", nbits=3, g=3, m=4000, seed=1)
@example(kind="constant", nbits=1, g=1, m=1, seed=2)
@example(kind="zeros", nbits=8, g=2, m=50, seed=3)
def test_jit_is_bit_identical_to_numpy_and_kmeans1d(kind, nbits, g, m, seed):
    if nbits == 8:
        m = min(m, 400)  # the numpy DP's slowest case
    groups = _make(kind, g, m, seed)
    jl, jc = _run(groups, nbits, True)
    nl, nc = _run(groups, nbits, False)
    assert jl.dtype == np.float16 and jl.shape == (g, 1 << nbits) and jc.dtype == np.uint8 and jc.shape == (g, m)
    assert np.array_equal(jl.view(np.uint16), nl.view(np.uint16)) and np.array_equal(jc, nc)
    for x, lut, idx in zip(groups, jl, jc) if HAVE_KMEANS1D else ():
        ref_lut, ref_idx = _reference(x, nbits)
        assert np.array_equal(lut.view(np.uint16), ref_lut.view(np.uint16))
        assert np.array_equal(idx, ref_idx)


def test_jit_takes_any_float16_layout():
    """A non-contiguous (G, m) float16 view gives the same result as its contiguous copy."""
    view = _make("t3", 4, 600, 5)[::2, ::2]
    assert all(np.array_equal(a, b) for a, b in zip(_run(view, 4, True), _run(view.copy(), 4, True)))


def test_numba_is_loaded_once_the_work_so_far_is_worth_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "mlqpipe.quant.kmeans_jit", raising=False)  # not loaded yet
    monkeypatch.delattr(Q, "kmeans_jit", raising=False)
    monkeypatch.setattr(K, "_JIT_MIN_WORK", 1000)
    monkeypatch.setattr(K, "_work_seen", 0)
    assert K._jit_solver(400) is None and K._jit_solver(500) is None
    assert K._jit_solver(100) is not None  # 1000 so far
    assert K._jit_solver(1) is not None  # loaded: used for any size from now on
    monkeypatch.setattr(K, "_work_seen", 0)
    assert K._jit_solver(1) is not None
    monkeypatch.setattr(K, "_work_seen", 0)
    K.kmeans1d_fp16(np.zeros((3, 5), np.float16), 4)
    assert K._work_seen == 3 * 5 * 16


def test_no_jit_env_var_and_missing_numba_use_numpy(monkeypatch):
    monkeypatch.setattr(K, "_JIT_MIN_WORK", 0)
    assert K._jit_solver() is not None
    monkeypatch.setenv("MLQPIPE_NO_JIT", "1")
    assert K._jit_solver() is None
    monkeypatch.delenv("MLQPIPE_NO_JIT")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now raises ImportError
    monkeypatch.delitem(sys.modules, "mlqpipe.quant.kmeans_jit")
    monkeypatch.delattr(Q, "kmeans_jit")
    assert K._jit_solver() is None
    groups = _make("t3", 2, 500, 7)
    lut, idx = K.kmeans1d_fp16(groups, 3)
    monkeypatch.undo()
    ref_lut, ref_idx = _run(groups, 3, True)
    assert np.array_equal(lut.view(np.uint16), ref_lut.view(np.uint16)) and np.array_equal(idx, ref_idx)


def test_without_a_cache_location_it_compiles_uncached():
    """numba refuses cache=True where it finds no cache location (here: a function with no source file)."""
    from mlqpipe.quant.kmeans_jit import _jit

    ns = {}
    exec("def f(x):\n    return x / 2.0\n", ns)
    assert _jit(ns["f"])(3.0) == 1.5


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["t3", "lattice", "rounded", "wide"]), m=st.integers(1, 300),
       k=st.sampled_from([1, 2, 4, 8, 16, 64, 256]), seed=st.integers(0, 2**32 - 1))
@example(kind="rounded", m=2, k=4, seed=0)  # np.cumsum's first sum is the first term: -0.0 keeps its sign
def test_optimal_1d_is_bit_identical_to_lut(kind, m, k, seed):
    """kmeans_jit.optimal_1d == lut._optimal_1d on numpy (mlqpipe's own exact DP for float32 bins and small
    groups, which calls the compiled one once kmeans says so)."""
    from mlqpipe.quant.kmeans_jit import optimal_1d
    from mlqpipe.quant.lut import _optimal_1d

    rng = np.random.default_rng(seed)
    if kind == "t3":
        c = np.sort(rng.standard_t(3, m))
    elif kind == "lattice":  # equal spacing and weights: exact ties
        c = np.arange(m) * 0.25 - 3
    elif kind == "rounded":
        c = np.unique(np.abs(np.round(rng.standard_normal(m) * 4) / 4))
        c[0] = -0.0 if seed % 2 == 0 else c[0]  # a -0.0 first point
    else:
        c = np.sort(rng.standard_normal(m) * 1e3)
    n = np.ones(c.size) if kind == "lattice" else rng.integers(1, 6, c.size).astype(np.float64)
    s = c * n
    ours = optimal_1d(c, n, s, k)
    saved, K._JIT = K._JIT, False  # the numpy DP as the reference
    try:
        ref = _optimal_1d(c, n, s, k)
    finally:
        K._JIT = saved
    assert ours.shape == ref.shape and np.array_equal(ours.view(np.uint64), ref.view(np.uint64))
