"""ML-program pruning against coremltools 9.0's prune_weights math, and the tie fix."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlqpipe.quant.affine import NotApplicable
from mlqpipe.quant.prune import PruneSettings, densify, prune


@pytest.fixture(scope="module")
def ct():
    passes = pytest.importorskip("coremltools.optimize.coreml._quantization_passes")
    return passes.prune_weights


def _dense(p):
    n = int(np.prod(p.shape))
    mask = np.unpackbits(p.mask, count=n, bitorder="little").reshape(p.shape).astype(bool)
    out = np.zeros(p.shape, dtype=p.nonzero_data.dtype)
    out[mask] = p.nonzero_data
    return out, mask


def _same(ours, ref):
    dense, mask = _dense(ref)
    return (np.array_equal(ours.mask, mask) and np.array_equal(ours.nonzero, ref.nonzero_data)
            and ours.nonzero.dtype == ref.nonzero_data.dtype and np.array_equal(densify(ours), dense))


_RNG = np.random.default_rng(5)
SHAPES = [(16, 64), (8, 6, 3, 3), (10, 7), (33, 9)]


def _distinct_magnitudes(shape):
    """Random signs and order, magnitudes 0.01·k (k = 1…n): distinct in fp16 too, so no ties anywhere."""
    n = int(np.prod(shape))
    return (_RNG.permutation(np.arange(1, n + 1)) * 0.01 * _RNG.choice([-1, 1], n)).reshape(shape)


WEIGHTS = [_distinct_magnitudes(s) for s in SHAPES]


@pytest.mark.parametrize("i", range(len(WEIGHTS)))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_magnitude_equal_to_coremltools_without_ties(ct, i, dtype):
    w = WEIGHTS[i].astype(dtype)
    for t in (0.0, 0.07, 0.1, 0.25, 0.5, 0.9, 1.0):
        ours = prune(w, PruneSettings(target_sparsity=t))
        assert _same(ours, ct.compress_by_magnitude(w, t)), t


@pytest.mark.parametrize("i", range(len(WEIGHTS)))
def test_block_equal_to_coremltools_without_ties(ct, i):
    w = WEIGHTS[i].astype(np.float32)  # fp32 block norms have no ties here (fp16 norms can tie: see below)
    for t in (0.1, 0.5, 0.9):
        for b, dim in ((2, 0), (2, 1), (3, 0), (3, 1)):
            ref = ct.compress_by_magnitude(w, t, b, dim)
            if ref is None:
                with pytest.raises(NotApplicable, match="more than half"):
                    prune(w, PruneSettings(target_sparsity=t, block_size=b, dim=dim))
                continue
            assert _same(prune(w, PruneSettings(target_sparsity=t, block_size=b, dim=dim)), ref), (t, b, dim)


@pytest.mark.parametrize("i", range(len(WEIGHTS)))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_n_m_equal_to_coremltools(ct, i, dtype):
    w = WEIGHTS[i].astype(dtype)
    for nm in ((1, 2), (2, 4), (3, 4), (1, 3)):
        for dim in (0, 1):
            ref = ct.compress_by_nm_sparsity(w, nm, dim)
            s = PruneSettings(n_m=nm, dim=dim)
            if ref is None:
                with pytest.raises(NotApplicable):
                    prune(w, s)
            else:
                assert _same(prune(w, s), ref), (nm, dim)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_threshold_equal_to_coremltools(ct, dtype):
    w = WEIGHTS[0].astype(dtype)
    for thr, minimum in ((0.1, 0.0), (0.5, 0.3), (0.5, 0.9), (1e-12, 0.5)):
        ref = ct.compress_by_threshold(w, thr, minimum)
        ours = prune(w, PruneSettings(mode="threshold", threshold=thr, minimum_sparsity=minimum))
        assert (ref is None) == (ours is None)
        if ref is not None:
            assert _same(ours, ref)


def test_ties_are_broken_by_position_not_all_pruned(ct):
    const = np.full((64, 64), 0.5, np.float32)
    ours = prune(const, PruneSettings(target_sparsity=0.5))
    assert ct.compress_by_magnitude(const, 0.5).nonzero_data.size == 0  # coremltools: 100 %
    assert ours.nonzero.size == 2048 and not ours.mask.ravel()[:2048].any() and ours.mask.ravel()[2048:].all()
    lattice = np.round(np.random.default_rng(1).standard_normal((64, 64)) * 2) / 2
    ref_zeros = np.count_nonzero(_dense(ct.compress_by_magnitude(lattice, 0.5))[0] == 0)
    ours = prune(lattice, PruneSettings(target_sparsity=0.5))
    assert ref_zeros > 2200 and np.count_nonzero(~ours.mask) == 2048


def test_block_ties_prune_whole_blocks_in_order():
    w = np.ones((8, 4), np.float32)
    r = prune(w, PruneSettings(target_sparsity=0.5, block_size=2, dim=0))
    # 4 x 4 tied blocks (2 channels x 1 column): the first half in row-major order of their first element
    assert np.count_nonzero(~r.mask) == 16 and not r.mask[:4].any() and r.mask[4:].all()


def test_all_zero_result_and_existing_zeros():
    r = prune(np.zeros((4, 8), np.float16), PruneSettings(target_sparsity=0.1))
    assert not r.mask.any() and r.nonzero.size == 0 and r.nonzero.dtype == np.float16
    w = np.arange(32, dtype=np.float32).reshape(4, 8)
    r = prune(w, PruneSettings(target_sparsity=0.0))
    assert not r.mask[0, 0] and r.mask.sum() == 31  # a zero is never stored


def test_nan_and_bad_settings_are_refused():
    w = np.ones((4, 8), np.float32)
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prune(w, PruneSettings(target_sparsity=0.5))
    with pytest.raises(ValueError, match="exactly one"):
        prune(np.ones((4, 8), np.float32), PruneSettings(target_sparsity=0.5, n_m=(2, 4)))
    with pytest.raises(ValueError, match="rank 2 to 5"):
        prune(np.ones(8, np.float32), PruneSettings(n_m=(1, 2)))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(2, 9), st.integers(2, 9)),
               elements=st.floats(-4, 4, allow_nan=False, width=32)),
    st.floats(0.01, 0.99),
)
def test_unstructured_invariants(w, t):
    r = prune(w, PruneSettings(target_sparsity=t))
    n = w.size
    pruned = n - np.count_nonzero(r.mask)
    rank = int(np.floor(t * 100 / 100 * (n - 1))) + 1
    assert abs(pruned - max(rank, np.count_nonzero(w == 0))) <= 1  # exact up to the percentile's float rounding
    assert r.mask.shape == w.shape and r.nonzero.dtype == w.dtype
    assert np.array_equal(r.nonzero, w[r.mask]) and np.all(r.nonzero != 0)
    # whatever is kept is at least as large as whatever was pruned
    if r.mask.any() and (~r.mask).any():
        assert np.abs(w[r.mask]).min() >= np.abs(w[~r.mask]).max()
