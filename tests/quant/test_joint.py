"""quant/joint.py: joint compression kernels (a pruned weight palettized or quantized, a LUT quantized) —
the same numbers as coremltools 9.0's joint_compression passes compute, and nested results decoding to
what their parts say."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlqpipe.quant.affine import AffineSettings, dequantize, linear_quantize
from mlqpipe.quant.joint import dense, palettize_nonzero, quantize_lut, quantize_nonzero
from mlqpipe.quant.palette import PaletteSettings, depalettize, palettize
from mlqpipe.quant.prune import PruneSettings, densify, prune
from mlqpipe.quant.results import AffineResult, PaletteResult, SparseResult

_RNG = np.random.default_rng(11)
W = (_RNG.standard_normal((32, 48)) * 0.05).astype(np.float32)
SPARSE = prune(W, PruneSettings(target_sparsity=0.5))
UNIFORM4 = PaletteSettings(mode="uniform", nbits=4)


@pytest.fixture(scope="module")
def passes():
    return pytest.importorskip("coremltools.optimize.coreml._quantization_passes")


def _ct_quantize(passes, values, dtype, mode, sizes):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return passes.linear_quantize_weights.blockwise_compress_by_dtype(values, dtype, mode.upper(), sizes)


def _ct_palettize(passes, values, mode, nbits, sizes, axis=0):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return passes.palettize_weights.blockwise_compress(values, mode.upper(), nbits, sizes, None, 1, channel_axis=axis)


# -- against coremltools' arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, mode", [("int8", "linear_symmetric"), ("uint8", "linear_symmetric"), ("uint8", "linear"), ("int8", "linear")])
@pytest.mark.parametrize("group", [0, 8])
def test_a_lut_is_quantized_per_tensor_as_coremltools_quantizes_it(passes, dtype, mode, group):
    p = palettize(W, PaletteSettings(mode="uniform", nbits=4, granularity="per_grouped_channel" if group else "per_tensor",
                                      group_size=group or 32))
    ours = quantize_lut(p, dtype, mode)
    ref = _ct_quantize(passes, p.lut, dtype, mode, [0] * p.lut.ndim)  # joint quantization of a LUT: per tensor only
    assert isinstance(ours.lut, AffineResult) and ours.lut.dtype == dtype
    assert np.array_equal(ours.lut.data, ref.data) and ours.lut.data.dtype == ref.data.dtype
    assert np.array_equal(ours.lut.scale, ref.scale) and ours.lut.scale.shape == (1,) * p.lut.ndim
    if ref.offset is None:
        assert ours.lut.zero_point is None
    else:
        assert np.array_equal(ours.lut.zero_point, ref.offset)
    assert ours.indices is p.indices and ours.nbits == 4


@pytest.mark.parametrize("granularity, group", [("per_tensor", 32), ("per_grouped_channel", 8)])
def test_a_pruned_weight_is_palettized_dense_zeros_included_as_coremltools_does(passes, granularity, group):
    ours = palettize_nonzero(SPARSE, PaletteSettings(mode="uniform", nbits=4, granularity=granularity, group_size=group))
    sizes = [group if granularity == "per_grouped_channel" else 0, 0]
    ref = _ct_palettize(passes, densify(SPARSE), "uniform", 4, sizes)
    assert np.array_equal(ours.mask, SPARSE.mask)
    assert np.array_equal(ours.nonzero.lut, ref.lut) and ours.nonzero.lut.ndim == SPARSE.mask.ndim + 2
    assert np.array_equal(ours.nonzero.indices, ref.indices[SPARSE.mask]) and ours.nonzero.indices.ndim == 1


@pytest.mark.parametrize("settings_", [AffineSettings(), AffineSettings(mode="linear", dtype="uint8"),
                                       AffineSettings(dtype="int4", granularity="per_block", block_size=16),
                                       AffineSettings(granularity="per_tensor")], ids=repr)
def test_a_pruned_weight_is_quantized_dense_zeros_included_as_coremltools_does(passes, settings_):
    from mlqpipe.quant.affine import block_sizes

    ours = quantize_nonzero(SPARSE, settings_)
    ref = _ct_quantize(passes, densify(SPARSE), settings_.dtype, settings_.mode, block_sizes(W.shape, settings_))
    a = ours.nonzero
    assert isinstance(a, AffineResult) and a.data.ndim == 1 and a.scale.ndim == SPARSE.mask.ndim
    assert np.array_equal(a.data, ref.data[SPARSE.mask]) and np.array_equal(a.scale, ref.scale)
    assert (a.zero_point is None) == (ref.offset is None)
    if ref.offset is not None:
        assert np.array_equal(a.zero_point, ref.offset)


def test_a_pruned_and_palettized_weight_gets_its_lut_quantized():
    pal = palettize_nonzero(SPARSE, UNIFORM4)
    both = quantize_nonzero(pal, AffineSettings(granularity="per_tensor"))
    assert np.array_equal(both.nonzero.lut.data, quantize_lut(pal.nonzero).lut.data)
    assert both.nonzero.indices is pal.nonzero.indices and both.mask is pal.mask


# -- decoding nested results ---------------------------------------------------------------------------------


def test_nested_results_decode_to_their_parts():
    pal = palettize(densify(SPARSE), UNIFORM4)
    assert np.array_equal(dense(palettize_nonzero(SPARSE, UNIFORM4)), np.where(SPARSE.mask, depalettize(pal), 0))
    q = linear_quantize(densify(SPARSE), AffineSettings())
    assert np.array_equal(dense(quantize_nonzero(SPARSE, AffineSettings())), np.where(SPARSE.mask, dequantize(q), 0))
    lut = quantize_lut(pal)
    assert np.array_equal(dense(lut), depalettize(PaletteResult(dequantize(lut.lut), pal.indices, 4, None)))
    assert np.array_equal(dense(SPARSE), densify(SPARSE)) and dense(W) is W


@settings(max_examples=30, deadline=None)
@given(w=hnp.arrays(np.float32, st.tuples(st.sampled_from([4, 8]), st.integers(2, 12)),
                    elements=st.floats(-4, 4, width=32)),
       keep=st.data(), dtype=st.sampled_from(["int8", "uint8"]), nbits=st.sampled_from([1, 2, 3, 4]))
def test_joint_results_are_zero_exactly_where_the_mask_is_clear(w, keep, dtype, nbits):
    mask = keep.draw(hnp.arrays(bool, w.shape))
    r = SparseResult(mask, w[mask])
    mode = "linear_symmetric" if dtype == "int8" else "linear"
    for joint in (palettize_nonzero(r, PaletteSettings(mode="uniform", nbits=nbits)),
                  quantize_nonzero(r, AffineSettings(mode=mode, dtype=dtype)),
                  quantize_nonzero(palettize_nonzero(r, PaletteSettings(mode="unique")), AffineSettings(dtype=dtype, granularity="per_tensor"))):
        got = dense(joint)
        assert got.shape == w.shape and got.dtype == w.dtype
        assert not got[~mask].any()
        inner = joint.nonzero
        count = (inner.indices if isinstance(inner, PaletteResult) else inner.data).size
        assert count == mask.sum()
    exact = dense(quantize_nonzero(palettize_nonzero(r, PaletteSettings(mode="unique", nbits=8)), AffineSettings(dtype=dtype,
                                                                                                           granularity="per_tensor")))
    step = np.abs(w).max() / 127 if w.size else 0  # one code step at most (unique LUT: every value exact before quantizing)
    assert np.all(np.abs(exact[mask] - w[mask]) <= step * 1.0001 + 1e-6)


# -- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: quantize_lut(palettize(W, UNIFORM4), "int4"), "a LUT can be quantized to int8 or uint8, not int4"),
    (lambda: quantize_lut(quantize_lut(palettize(W, UNIFORM4))), "the LUT is already quantized"),
    (lambda: palettize_nonzero(SPARSE, PaletteSettings(mode="kmeans", nbits=4, cluster_dim=2)),
     r"vector palettization \(cluster_dim > 1\) of a pruned weight is not supported"),
    (lambda: palettize_nonzero(SPARSE, PaletteSettings(mode="uniform", nbits=4, enable_per_channel_scale=True)),
     "cannot be palettized with a per-channel scale"),
    (lambda: palettize_nonzero(quantize_nonzero(SPARSE, AffineSettings()), UNIFORM4), "values are already quantized"),
    (lambda: quantize_nonzero(quantize_nonzero(SPARSE, AffineSettings()), AffineSettings()), "values are already quantized"),
    (lambda: quantize_nonzero(palettize_nonzero(SPARSE, UNIFORM4), AffineSettings()), "LUT is quantized per tensor only"),
])
def test_unsupported_joint_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
