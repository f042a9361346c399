"""ML-program palettization against coremltools 9.0 (palettize_weights.blockwise_compress and its kmeans1d)."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlqpipe.quant.affine import NotApplicable
from mlqpipe.quant.palette import PaletteSettings, depalettize, palettize


@pytest.fixture(scope="module")
def ct():
    passes = pytest.importorskip("coremltools.optimize.coreml._quantization_passes")
    return passes.palettize_weights


def _ct(ct, w, mode, nbits, group, axis, v=1, fn=None):
    sizes = [0] * w.ndim
    sizes[axis] = group
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return ct.blockwise_compress(w, mode.upper(), nbits, sizes, fn, v, channel_axis=axis)


def _same(ours, ref):
    return (np.array_equal(ours.lut, ref.lut) and ours.lut.dtype == ref.lut.dtype and ours.lut.shape == ref.lut.shape
            and np.array_equal(ours.indices, ref.indices) and ours.indices.shape == ref.indices.shape
            and ours.vector_axis == ref.vector_axis)


_RNG = np.random.default_rng(3)
WEIGHTS = {
    "normal": _RNG.standard_normal((16, 64)) * 0.05,
    "conv": _RNG.standard_normal((8, 4, 3, 3)),
    "constant": np.full((8, 32), 0.3),
    "zero": np.zeros((8, 32)),
    "lattice": np.round(_RNG.standard_normal((8, 32)) * 2) / 2,
    "signed-zeros": np.where(_RNG.random((8, 32)) < 0.5, -0.0, 0.0) + np.round(_RNG.random((8, 32))),
}
LAYOUTS = [("per_tensor", 0, 0), ("per_tensor", 0, 1), ("per_grouped_channel", 4, 0), ("per_grouped_channel", 2, 1)]


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_uniform_unique_equal_to_coremltools(ct, name, dtype):
    w = WEIGHTS[name].astype(dtype)
    for mode, nbits, v in [("uniform", 2, 1), ("uniform", 3, 1), ("uniform", 8, 1), ("unique", None, 1), ("unique", None, 2)]:
        for granularity, group, axis in LAYOUTS:
            ref = _ct(ct, w, mode, nbits, group, axis, v)
            s = PaletteSettings(mode, nbits, granularity, group, axis, v)
            if ref is None:  # coremltools skips: more than 256 distinct values
                with pytest.raises(NotApplicable):
                    palettize(w, s)
                continue
            ours = palettize(w, s)
            assert _same(ours, ref), (mode, nbits, granularity, axis, v)
            assert np.array_equal(depalettize(ours), ct.decompress(ref))


def test_custom_equal_to_coremltools(ct):
    w = WEIGHTS["conv"].astype(np.float32)

    def fn(v):  # sees each group as coremltools hands it over (channel axis first)
        lut = np.array([v.min(), -0.5, 0.5, v.max()], dtype=v.dtype)
        return lut, np.digitize(v.ravel(), [-0.75, 0, 0.75]).astype(np.uint8)

    for granularity, group, axis in LAYOUTS:
        ours = palettize(w, PaletteSettings("custom", None, granularity, group, axis, lut_function=fn))
        assert _same(ours, _ct(ct, w, "custom", None, group, axis, fn=fn)) and ours.nbits == 2


def test_per_channel_scale_as_coremltools(ct):
    w = (WEIGHTS["normal"] * np.linspace(0.1, 3, 64)).astype(np.float16)
    w[:, 5] = 0
    for axis in (0, 1):
        scale = np.max(np.abs(w), axis=axis, keepdims=True)  # coremltools' transform_op, step for step
        scale[scale == 0] = 1
        ref = _ct(ct, w / scale, "uniform", 4, 0, axis)
        ours = palettize(w, PaletteSettings("uniform", 4, channel_axis=axis, enable_per_channel_scale=True))
        assert _same(ours, ref) and np.array_equal(ours.per_channel_scale, scale)
        assert ours.per_channel_scale.dtype == np.float16
        assert np.array_equal(depalettize(ours), ct.decompress(ref) * scale)


def _fp16_cases():
    rng = np.random.default_rng(8)
    n = 12_000
    normal = rng.standard_normal(n) * 0.02
    return {
        "normal": normal, "lattice": np.round(normal * 400) / 400, "few": rng.integers(-3, 4, n) * 0.25,
        "constant": np.full(n, 0.25), "laplace": rng.laplace(size=n), "symmetric": np.concatenate([normal[: n // 2], -normal[: n // 2]]),
    }


@pytest.mark.parametrize(
    "name,nbits", [(n, b) for n in _fp16_cases() for b in (1, 4)] + [("few", 8), ("constant", 8), ("lattice", 8)]
)
def test_fp16_kmeans_equals_coremltools_kmeans1d(ct, name, nbits):
    w = _fp16_cases()[name].astype(np.float16).reshape(16, -1)
    assert w.size >= 10_000
    ours = palettize(w, PaletteSettings("kmeans", nbits, channel_axis=1))
    assert _same(ours, _ct(ct, w, "kmeans", nbits, 0, 1))


def test_fp16_kmeans_grouped_equals_coremltools(ct):
    w = (np.random.default_rng(4).standard_normal((4, 6000)) * 0.1).astype(np.float16)
    ours = palettize(w, PaletteSettings("kmeans", 3, "per_grouped_channel", 2, 0))
    assert ours.lut.shape == (2, 1, 8, 1) and _same(ours, _ct(ct, w, "kmeans", 3, 2, 0))


def _mse(r, w):
    return float(np.mean((depalettize(r).astype(np.float64) - w.astype(np.float64)) ** 2))


@pytest.mark.parametrize("dist", ["normal", "laplace", "mixture"])
def test_fp32_kmeans_beats_scikit_learn_and_is_near_optimal(ct, dist):
    kmeans1d = pytest.importorskip("coremltools._deps.kmeans1d")
    rng = np.random.default_rng(9)
    w = {"normal": lambda: rng.standard_normal((64, 128)) * 0.02, "laplace": lambda: rng.laplace(size=(64, 128)),
         "mixture": lambda: np.concatenate([rng.normal(-1, 0.1, (32, 128)), rng.normal(2, 0.3, (32, 128))])}[dist]()
    w = w.astype(np.float32)
    for nbits in (2, 4):
        ours = palettize(w, PaletteSettings("kmeans", nbits))
        ref = _ct(ct, w, "kmeans", nbits, 0, 0)
        values, counts = np.unique(w, return_counts=True)
        best = kmeans1d.cluster(values, 1 << nbits, weights=counts)
        optimum = float(np.sum(counts * (values - np.array(best.centroids)[best.clusters]) ** 2) / w.size)
        assert _mse(ours, w) <= _mse_ct(ct, ref, w) and _mse(ours, w) <= 1.005 * optimum, nbits


def _mse_ct(ct, ref, w):
    return float(np.mean((ct.decompress(ref).astype(np.float64) - w.astype(np.float64)) ** 2))


@pytest.mark.parametrize("v,axis", [(2, 0), (4, 1)])
def test_vector_kmeans_beats_coremltools(ct, v, axis):
    w = (np.random.default_rng(6).standard_normal((64, 96)) * 0.02).astype(np.float32)
    ours = palettize(w, PaletteSettings("kmeans", 4, channel_axis=axis, cluster_dim=v))
    ref = _ct(ct, w, "kmeans", 4, 0, axis, v)
    assert ours.lut.shape == ref.lut.shape == (1, 1, 16, v) and ours.indices.shape == ref.indices.shape
    assert ours.vector_axis == ref.vector_axis == axis
    assert _mse(ours, w) <= _mse_ct(ct, ref, w)
    assert np.array_equal(palettize(w, PaletteSettings("kmeans", 4, channel_axis=axis, cluster_dim=v)).lut, ours.lut)


def test_inf_is_refused_where_coremltools_writes_nan(ct):
    w = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    w[2, 3] = np.inf
    assert np.isnan(ct.decompress(_ct(ct, w, "uniform", 4, 0, 0))).any()
    for mode in ("uniform", "kmeans"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            palettize(w, PaletteSettings(mode, 4))


def test_bad_settings_and_custom_results():
    w = np.ones((6, 8), np.float32)
    with pytest.raises(NotApplicable, match="group_size 4"):
        palettize(w, PaletteSettings("uniform", 2, "per_grouped_channel", 4))
    with pytest.raises(NotApplicable, match="cluster_dim 4"):
        palettize(w, PaletteSettings("kmeans", 2, cluster_dim=4))
    with pytest.raises(ValueError, match="nbits in"):
        palettize(w, PaletteSettings("kmeans", 5))
    with pytest.raises(ValueError, match="lut_function raised ZeroDivisionError"):
        palettize(w, PaletteSettings("custom", lut_function=lambda v: 1 / 0))
    with pytest.raises(ValueError, match="2, 4, 8, 16, 64 or 256 entries"):
        palettize(w, PaletteSettings("custom", lut_function=lambda v: (np.zeros(3), np.zeros(v.size, np.uint8))))
    with pytest.raises(ValueError, match="outside 0..1"):
        palettize(w, PaletteSettings("custom", lut_function=lambda v: (np.zeros(2), np.full(v.size, 2))))


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.sampled_from([2, 4, 8]), st.integers(1, 12)),
               elements=st.floats(-100, 100, allow_nan=False, width=32)),
    st.sampled_from(["kmeans", "uniform", "unique"]),
    st.sampled_from([1, 2, 3, 4, 6, 8]),
    st.sampled_from([("per_tensor", 0), ("per_grouped_channel", 2)]),
    st.sampled_from([1, 2]),
    st.sampled_from([np.float32, np.float16]),
)
def test_invariants(w, mode, nbits, layout, v, dtype):
    w = w.astype(dtype)
    if mode == "uniform":
        v = 1
    if mode == "unique" and len(np.unique(w)) > 256:
        return
    r = palettize(w, PaletteSettings(mode, None if mode == "unique" else nbits, layout[0], layout[1], 0, v))
    groups = w.shape[0] // (layout[1] or w.shape[0])
    assert r.lut.shape == (groups, 1, 1 << r.nbits, v) and r.lut.dtype == w.dtype
    assert r.indices.dtype == np.uint8 and r.indices.max() < 1 << r.nbits
    assert r.indices.shape == (w.shape[0] // v, w.shape[1]) and r.vector_axis == (None if v == 1 else 0)
    out = depalettize(r)
    assert out.shape == w.shape and out.dtype == w.dtype
    if mode == "unique":
        assert np.array_equal(out, w)
    if mode == "uniform":  # within half a step of the group's range (fp16: coremltools' fp16 arithmetic)
        span = float(w.max()) - float(w.min())
        slack = span * 4e-3 if dtype == np.float16 else 0.0
        assert np.all(np.abs(out.astype(np.float64) - w) <= span / ((1 << nbits) - 1) * 0.51 + np.abs(w) * 2e-3 + slack + 1e-6)
