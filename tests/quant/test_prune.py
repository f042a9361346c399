"""ML-program pruning against coremltools 9.0's prune_weights math, and the tie fix."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlqpipe.quant import prune as prune_module
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


# --- the fast kernels against the straightforward reference (np.percentile, argsort, element-level ids) ------
#
# mlqpipe's pruning selects the percentile's order statistics in O(n), computes block decisions per block and
# n:m ranks by comparisons. The reference below is the plain formulation it replaced; both must agree bit for
# bit on every input, ties included.


def _ref_pruned(w, s):
    """Reference: the pruned bool of the weight's shape (magnitude mode), the plain way."""
    if s.n_m is not None:
        return _ref_n_m(w, s.n_m, 1 if s.dim is None else s.dim)
    q = float(s.target_sparsity) * 100
    if s.block_size is not None:
        magnitude, units = _ref_block_norms(w, s.block_size, 0 if s.dim is None else s.dim)
    else:
        magnitude, units = np.abs(w), None
    if q == 100:
        return np.ones(w.shape, dtype=bool)
    if q == 0:
        return np.zeros(w.shape, dtype=bool)
    thr = np.percentile(magnitude, q)
    pruned = np.array(magnitude < thr, order="C")  # an array in C order even for 0-d or transposed weights,
    at = np.flatnonzero(magnitude == thr)  # so that the writes below land (the old code lost them there)
    ids = at if units is None else units.ravel()[at]
    first_ids, first_pos, sizes = np.unique(ids, return_index=True, return_counts=True)
    if first_ids.size > 1:
        order = np.argsort(first_pos, kind="stable")
        need = int(np.floor(q / 100 * (magnitude.size - 1))) + 1 - np.count_nonzero(pruned)
        take = min(int(np.searchsorted(np.cumsum(sizes[order]), need)) + 1, order.size) if need > 0 else 0
        at = at[np.isin(ids, first_ids[order[:take]])]
    pruned.ravel()[at] = True
    return pruned


def _ref_block_norms(w, b, dim):
    swap = [1, 0] + list(range(2, w.ndim))
    moved = np.transpose(np.abs(w), swap) if dim == 1 else np.abs(w)
    channels, pad = moved.shape[0], -moved.shape[0] % b
    moved = np.pad(moved, [(0, pad)] + [(0, 0)] * (w.ndim - 1))
    blocks = np.ascontiguousarray(moved.reshape((moved.shape[0] // b, b) + moved.shape[1:]))
    norms = np.sqrt(np.sum(blocks * blocks, axis=1, keepdims=True))
    tiled = np.broadcast_to(norms, blocks.shape).reshape(moved.shape)[:channels]
    rest = int(np.prod(moved.shape[1:]))
    ids = (np.arange(channels)[:, None] // b * rest + np.arange(rest)[None, :]).reshape(tiled.shape)
    if dim == 1:
        tiled, ids = np.transpose(tiled, swap), np.transpose(ids, swap)
    return np.ascontiguousarray(tiled), np.ascontiguousarray(ids)


def _ref_n_m(w, n_m, dim):
    n, m = n_m
    perm = list(range(2, w.ndim)) + ([1, 0] if dim == 0 else [0, 1])
    moved = np.transpose(w, perm)
    rows = moved.reshape(-1, moved.shape[-1])
    channels, pad = rows.shape[-1], -rows.shape[-1] % m
    groups = np.pad(np.abs(rows), ((0, 0), (0, pad))).reshape(-1, m)
    hit = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(hit, np.argsort(groups, axis=-1, kind="stable")[:, :n], True, axis=-1)
    return np.transpose(hit.reshape(rows.shape[0], channels + pad)[:, :channels].reshape(moved.shape),
                        np.argsort(perm))


def _same_as_reference(w, s):
    mask = ~_ref_pruned(w, s) & (w != 0)
    r = prune(w, s)
    assert r.mask.shape == w.shape and r.mask.dtype == bool
    assert np.array_equal(r.mask, mask), s
    assert r.nonzero.dtype == w.dtype and r.nonzero.tobytes() == w[mask].tobytes(), s


@contextlib.contextmanager
def _tiny_sample(on=True):
    """Make arrays of a few dozen elements take the sampled-bracket path, with narrow brackets that often miss
    (and fall back)."""
    names = ("_SMALL", "_SAMPLE", "_SIGMAS", "_CHUNK")
    old = [getattr(prune_module, k) for k in names]
    for k, v in zip(names, (8, 32, 0.5, 5) if on else old):
        setattr(prune_module, k, v)
    try:
        yield
    finally:
        for k, v in zip(names, old):
            setattr(prune_module, k, v)


_SPARSITIES = st.one_of(st.sampled_from([0.0, 1.0, 1e-9, 0.001, 0.5, 0.999, 1 - 1e-9]), st.floats(0, 1))


@st.composite
def _weights(draw, rank=st.integers(2, 4)):
    """fp16/fp32 weights full of ties: lattice values, constants, zeros, tiny values (whose squares underflow),
    infinities, or plain random floats."""
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=draw(rank), max_size=4)))
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["lattice", "constant", "sparse", "tiny", "inf", "random", "mixed"]))
    if kind == "lattice":
        x = rng.integers(-4, 5, n) * 0.25
    elif kind == "constant":
        x = np.full(n, draw(st.sampled_from([0.5, -3.0, 0.0, 1e-30])))
    elif kind == "sparse":
        x = rng.standard_normal(n) * (rng.random(n) < draw(st.floats(0, 1)))
    elif kind == "tiny":
        x = rng.choice([0.0, 1e-30, -1e-30, 1e-7, 2e-7, 1.0], n)
    elif kind == "inf":
        x = rng.choice([np.inf, -np.inf, 0.0, 1.0, 2.0], n)
    elif kind == "random":
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)
    else:
        x = np.where(rng.random(n) < 0.5, rng.integers(-2, 3, n) * 0.5, rng.standard_normal(n))
    with np.errstate(over="ignore"):
        return x.astype(dtype).reshape(shape)


def _check_all_modes(w, t, data):
    _same_as_reference(w, PruneSettings(target_sparsity=t))
    b, dim = data.draw(st.integers(1, 4)), data.draw(st.sampled_from([0, 1]))
    if b <= w.shape[dim] / 2:
        _same_as_reference(w, PruneSettings(target_sparsity=t, block_size=b, dim=dim))
    m = data.draw(st.integers(1, 10))
    if m <= w.shape[dim] / 2:
        _same_as_reference(w, PruneSettings(n_m=(data.draw(st.integers(0, m)), m), dim=dim))


@settings(max_examples=150, deadline=None)
@given(_weights(), _SPARSITIES, st.data())
def test_equal_to_reference(w, t, data):
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf in the percentile, as in numpy
        _check_all_modes(w, t, data)


@settings(max_examples=150, deadline=None)
@given(_weights(), _SPARSITIES, st.data())
def test_equal_to_reference_through_the_sampled_bracket(w, t, data):
    with _tiny_sample(), np.errstate(invalid="ignore", over="ignore"):
        _check_all_modes(w, t, data)


@settings(max_examples=200, deadline=None)
@given(_weights(rank=st.just(2)), st.floats(0, 100), st.booleans())
def test_percentile_bit_equal_to_numpy(w, q, tiny):
    with _tiny_sample(tiny), np.errstate(invalid="ignore", over="ignore"):
        ours, ref = prune_module._percentile(prune_module._Magnitudes.of(w), q)[0], np.percentile(np.abs(w), q)
    assert type(ours) is type(ref) and np.asarray(ours).tobytes() == np.asarray(ref).tobytes(), (ours, ref)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("kind", ["normal", "lattice", "half_zeros", "columns"])
def test_large_weights_equal_to_reference(dtype, kind):
    """The real sample size on ~300k elements (the bracket path with default settings)."""
    rng = np.random.default_rng(11)
    shape = (96, 3200)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "lattice":
        x = rng.integers(-8, 9, shape) / 8
    elif kind == "half_zeros":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.5)
    else:  # magnitude grows along columns: a strided sample would be biased
        x = rng.standard_normal(shape) * np.arange(1, shape[1] + 1) / 64
    w = x.astype(dtype)
    for t in (0.5, 0.3, 0.001, 0.999):
        _same_as_reference(w, PruneSettings(target_sparsity=t))
    _same_as_reference(w, PruneSettings(target_sparsity=0.5, block_size=4, dim=1))
    _same_as_reference(w, PruneSettings(target_sparsity=0.4, block_size=5, dim=0))  # 96 % 5: a short block
    _same_as_reference(w, PruneSettings(n_m=(2, 4), dim=1))
    _same_as_reference(w, PruneSettings(n_m=(3, 16), dim=0))


def test_threshold_equal_to_reference():
    rng = np.random.default_rng(3)
    for dtype in (np.float16, np.float32):
        w = (rng.integers(-4, 5, (40, 30)) * 0.25).astype(dtype)
        for thr in (0.25, 0.3, 0.0, -1.0, 1e-12, 1e9, float("nan")):
            with np.errstate(over="ignore"):  # 1e9 is inf in fp16
                r = prune(w, PruneSettings(mode="threshold", threshold=thr, minimum_sparsity=0.0))
                mask = ~(np.abs(w) <= thr) & (w != 0)
            assert np.array_equal(r.mask, mask) and r.nonzero.tobytes() == w[mask].tobytes(), thr


@pytest.mark.parametrize("dtype", [np.float64, np.longdouble])
def test_wider_floats_equal_to_reference(dtype):
    w = (np.random.default_rng(4).integers(-6, 7, (30, 40)) / 3).astype(dtype)
    with _tiny_sample():
        for t in (0.2, 0.5, 0.77):
            _same_as_reference(w, PruneSettings(target_sparsity=t))
            _same_as_reference(w, PruneSettings(target_sparsity=t, block_size=3, dim=1))
        _same_as_reference(w, PruneSettings(n_m=(2, 4), dim=0))
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prune(w, PruneSettings(target_sparsity=0.5))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_nan_is_refused(dtype):
    for bits_of_nan in (np.asarray(np.nan, dtype), -np.asarray(np.nan, dtype)):
        w = np.full((3, 4), np.inf, dtype)
        w[2, 3] = bits_of_nan
        with pytest.raises(ValueError, match="NaN"):
            prune(w, PruneSettings(mode="threshold"))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape, dim", [((1, 60), 1), ((60, 1), 0), ((1, 60, 1, 1), 1), ((2, 60), 1), ((60, 3, 1), 0)])
def test_block_norm_rounding_equal_to_reference(dtype, shape, dim):
    """One row or column: numpy sums a block pairwise (in float32 for fp16); otherwise one square at a time."""
    w = (np.random.default_rng(8).standard_normal(shape) * 300).astype(dtype)  # fp16 squares overflow to inf
    with np.errstate(over="ignore", invalid="ignore"):
        for b in (3, 8, 9, 13, 30):
            for t in (0.3, 0.5, 0.81):
                _same_as_reference(w, PruneSettings(target_sparsity=t, block_size=b, dim=dim))


def test_non_contiguous_weights_equal_to_reference():
    base = np.random.default_rng(9).integers(-5, 6, (24, 36)).astype(np.float32) / 4
    for w in (base.T, base[::2, 1::3], np.asfortranarray(base), base.astype(np.float16)[:, ::-1]):
        for t in (0.3, 0.5):  # ties; also 0-d and 1-d weights (unstructured only)
            for x in (w, w[0], w[0, 0]):
                _same_as_reference(np.asarray(x), PruneSettings(target_sparsity=t))
        for s in (PruneSettings(target_sparsity=0.45), PruneSettings(target_sparsity=0.6, block_size=3, dim=1),
                  PruneSettings(target_sparsity=0.6, block_size=2, dim=0), PruneSettings(n_m=(1, 3), dim=0),
                  PruneSettings(n_m=(3, 5), dim=1)):
            _same_as_reference(w, s)
        r = prune(w, PruneSettings(mode="threshold", threshold=0.5, minimum_sparsity=0))
        assert np.array_equal(r.mask, np.abs(w) > 0.5) and r.nonzero.tobytes() == w[np.abs(w) > 0.5].tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_n_m_every_m_equal_to_reference(dtype):
    """Pairwise ranks (m <= 16) and the argsort beyond, on ties (a lattice) and padded groups."""
    rng = np.random.default_rng(12)
    for shape in ((40, 50), (3, 41, 2), (45, 3, 2, 2)):
        w = (rng.integers(-3, 4, shape) * 0.5).astype(dtype)
        for m in range(1, 21):
            for dim in (0, 1):
                if m <= shape[dim] / 2:
                    for n in {0, 1, m // 2, m - 1, m}:
                        _same_as_reference(w, PruneSettings(n_m=(n, m), dim=dim))
