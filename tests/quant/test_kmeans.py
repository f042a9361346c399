"""k-means kernels (mlqpipe/quant/kmeans.py) against coremltools 9.0's kmeans1d and its scikit-learn KMeans."""

import warnings

import numpy as np
import pytest

import mlqpipe.quant.kmeans as K


@pytest.fixture(scope="module")
def kmeans1d():
    return pytest.importorskip("coremltools._deps.kmeans1d")


@pytest.fixture(params=["compiled", "numpy"])
def backend(request, monkeypatch):
    """Each exact 1-D k-means test runs on both paths (test_kmeans_compiled.py compares them directly)."""
    if request.param == "compiled" and K.compiled() is None:
        pytest.skip("mlqpipe.quant._kmeans1d is not built")
    monkeypatch.setattr(K, "_COMPILED", request.param == "compiled")
    return request.param


def _reference(kmeans1d, x, nbits):
    """What coremltools does with one fp16 group (MLPROGRAM.md §7)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    k = min(len(values), 1 << nbits)
    r = kmeans1d.cluster(values, k, weights=counts)
    lut = np.zeros(1 << nbits)
    lut[:k] = r.centroids
    return lut.astype(np.float16), np.array(r.clusters)[inverse.ravel()].astype(np.uint8)


def _groups():
    rng = np.random.default_rng(11)
    n = 4000  # the kernel has no minimum size (coremltools uses it from 10,000 values)
    h = rng.standard_normal(n // 2) * 0.1
    return {
        "normal": rng.standard_normal(n) * 0.02,
        "t3": rng.standard_t(3, n),
        "lattice": np.round(rng.standard_normal(n) * 50) / 50,
        "symmetric": np.concatenate([h, -h]),
        "signed-zeros": np.where(rng.random(n) < 0.3, -0.0, 0.0) + np.round(rng.random(n) * 8) / 8 * (rng.random(n) < 0.5),
        "few": rng.integers(-2, 3, n) * 0.5,
        "wide": rng.laplace(size=n) * 1000,
    }


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_fp16_batch_is_bit_exact_with_kmeans1d(kmeans1d, nbits, backend):
    """All groups go through one batched DP (different distinct counts, fewer distinct values than 2**nbits)."""
    names = list(_groups())[: 3 if nbits == 8 else None]  # 8 bits: the slowest DP, fewer groups
    groups = np.stack([_groups()[n].astype(np.float16) for n in names])
    luts, codes = K.kmeans1d_fp16(groups, nbits)
    assert luts.shape == (len(groups), 1 << nbits) and codes.shape == groups.shape and codes.dtype == np.uint8
    for name, g, lut, idx in zip(names, groups, luts, codes):
        ref_lut, ref_idx = _reference(kmeans1d, g, nbits)
        assert np.array_equal(lut.view(np.uint16), ref_lut.view(np.uint16)), name
        assert np.array_equal(idx, ref_idx), name


def test_fp16_batches_split_by_budget_give_the_same_result(monkeypatch):
    monkeypatch.setattr(K, "_COMPILED", False)  # the numpy path's batching
    groups = np.stack([g.astype(np.float16) for g in _groups().values()])
    whole = K.kmeans1d_fp16(groups, 4)
    monkeypatch.setattr(K, "_DP_BUDGET", 1)  # one group per DP run
    monkeypatch.setattr(K, "_UNIQUE_BUDGET", 1)  # one group per histogram
    split = K.kmeans1d_fp16(groups, 4)
    assert all(np.array_equal(a, b) for a, b in zip(whole, split))


def _sk_mse(x, nbits):
    cluster = pytest.importorskip("sklearn.cluster")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km = cluster.KMeans(n_clusters=1 << nbits, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(x)
    return km.inertia_ / x.size


@pytest.mark.parametrize("v,nbits", [(2, 4), (4, 3)])
def test_vector_kmeans_sample_then_full_beats_scikit_learn(monkeypatch, v, nbits):
    """The sample-then-all-points path (a small sample forced) is deterministic and no worse than
    coremltools' scikit-learn KMeans."""
    monkeypatch.setattr(K, "_SAMPLE", 2048)
    x = (np.random.default_rng(2).standard_normal((16384, v)) * 0.02).astype(np.float32)
    lut, labels = K.vector_kmeans(x, nbits)
    assert lut.shape == (1 << nbits, v) and lut.dtype == np.float32 and labels.dtype == np.uint8
    mse = float(np.mean((lut[labels].astype(np.float64) - x) ** 2))
    assert mse <= _sk_mse(x, nbits)
    again = K.vector_kmeans(x, nbits)
    assert np.array_equal(again[0], lut) and np.array_equal(again[1], labels)
    d = ((x[:, None, :].astype(np.float64) - lut[None].astype(np.float64)) ** 2).sum(axis=2)
    assert np.all(d[np.arange(len(x)), labels] <= d.min(axis=1) * (1 + 1e-5) + 1e-12)  # nearest entry


def test_vector_kmeans_fewer_points_than_clusters():
    x = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]], dtype=np.float16)
    lut, labels = K.vector_kmeans(x, 2)
    assert lut.dtype == np.float16 and np.array_equal(lut[labels], x)
