"""The compiled exact 1-D k-means (mlqpipe/quant/_kmeans1d.c): bit-identical to kmeans.py's numpy DP and to
kmeans1d (what coremltools 9.0 runs on fp16 groups) on every kind of fp16 group, and to lut.py's own DP."""

import importlib.util
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import mlqpipe.quant as Q
import mlqpipe.quant.kmeans as K


def test_the_extension_is_built_wherever_a_c_compiler_is():
    """setup.py builds it as optional: a broken build would otherwise only show as slow k-means."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert K.compiled() is not None


_native = pytest.importorskip("mlqpipe.quant._kmeans1d")

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


def _run(groups, nbits, native):
    """kmeans1d_fp16 compiled or on numpy."""
    saved, K._COMPILED = K._COMPILED, native
    try:
        assert (K.compiled() is not None) == native
        return K.kmeans1d_fp16(groups, nbits)
    finally:
        K._COMPILED = saved


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
def test_compiled_is_bit_identical_to_numpy_and_kmeans1d(kind, nbits, g, m, seed):
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


def test_compiled_takes_any_float16_layout():
    """A non-contiguous (G, m) float16 view gives the same result as its contiguous copy."""
    view = _make("t3", 4, 600, 5)[::2, ::2]
    assert all(np.array_equal(a, b) for a, b in zip(_run(view, 4, True), _run(view.copy(), 4, True)))


def test_env_var_and_a_missing_extension_use_numpy(monkeypatch):
    monkeypatch.setenv("MLQPIPE_NO_COMPILED", "1")
    assert K.compiled() is None
    monkeypatch.delenv("MLQPIPE_NO_COMPILED")
    monkeypatch.setitem(sys.modules, "mlqpipe.quant._kmeans1d", None)  # its import now raises ImportError
    monkeypatch.delattr(Q, "_kmeans1d")
    assert K.compiled() is None
    groups = _make("t3", 2, 500, 7)
    lut, idx = K.kmeans1d_fp16(groups, 3)
    monkeypatch.undo()
    assert K.compiled() is not None
    ref_lut, ref_idx = _run(groups, 3, True)
    assert np.array_equal(lut.view(np.uint16), ref_lut.view(np.uint16)) and np.array_equal(idx, ref_idx)


def test_buffers_of_the_wrong_size_or_keys_out_of_range_are_refused():
    raw = np.zeros(6, np.uint16)
    cents, codes = np.zeros(2 * 4), np.zeros(6, np.uint8)
    args = [raw, 2, 3, K._KEY_OF_RAW, K._VALUE_OF_KEY, 4, cents, codes]
    _native.cluster_fp16(*args)
    with pytest.raises(ValueError, match="raw: 12 bytes, expected 14"):
        _native.cluster_fp16(raw, 7, 1, *args[3:6], np.zeros(7 * 4), np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="cents: 64 bytes, expected 80"):
        _native.cluster_fp16(*args[:5], 5, cents, codes)
    bad = K._KEY_OF_RAW.copy()
    bad[7] = 1 << 16
    with pytest.raises(ValueError, match="keys must lie in 0..65535"):
        _native.cluster_fp16(raw, 2, 3, bad, *args[4:])
    with pytest.raises(ValueError, match="1 <= kmax <= 256"):
        _native.cluster_fp16(*args[:5], 512, np.zeros(2 * 512), codes)
    with pytest.raises(TypeError):  # read-only output
        _native.cluster_fp16(*args[:6], b"\0" * 64, codes)
    with pytest.raises(ValueError, match="1 <= k <= m"):
        _native.optimal_1d(np.zeros(3), np.ones(3), np.zeros(3), 3, 4, np.zeros(4))


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["t3", "lattice", "rounded", "wide"]), m=st.integers(1, 300),
       k=st.sampled_from([1, 2, 4, 8, 16, 64, 256]), seed=st.integers(0, 2**32 - 1))
@example(kind="rounded", m=2, k=4, seed=0)  # np.cumsum's first sum is the first term: -0.0 keeps its sign
def test_optimal_1d_is_bit_identical_to_lut(kind, m, k, seed):
    """lut._optimal_1d compiled == on numpy (mlqpipe's own exact DP for float32 bins and small groups)."""
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
    assert K.compiled() is not None
    ours = _optimal_1d(c, n, s, k)
    saved, K._COMPILED = K._COMPILED, False  # the numpy DP as the reference
    try:
        ref = _optimal_1d(c, n, s, k)
    finally:
        K._COMPILED = saved
    assert ours.shape == ref.shape and np.array_equal(ours.view(np.uint64), ref.view(np.uint64))
