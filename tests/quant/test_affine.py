"""ML-program linear quantization against coremltools 9.0's own math (optimize/_utils.py), bit for bit."""

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlqpipe.quant.affine import AffineSettings, NotApplicable, dequantize, linear_quantize, quant_range

BITS = {"int8": (8, True), "uint8": (8, False), "int4": (4, True), "uint4": (4, False)}


def _weights():
    rng = np.random.default_rng(11)
    return {
        "normal": rng.standard_normal((16, 64)) * 0.05,
        "conv": rng.standard_normal((8, 4, 3, 3)),
        "zero": np.zeros((8, 32)),
        "constant+": np.full((8, 32), 0.3),
        "constant-": np.full((8, 32), -2.0),
        "tiny": rng.standard_normal((8, 32)) * 1e-6,
        "subnormal16": rng.standard_normal((8, 32)) * 1e-7,
        "lattice": np.round(rng.standard_normal((8, 32)) * 4) / 4,
        "positive": rng.uniform(0, 1, (8, 32)),
        "negative": -rng.uniform(0, 1, (8, 32)),
        "one-zero-row": np.vstack([np.zeros((1, 32)), rng.standard_normal((7, 32))]),
    }


def _ct_block_sizes(shape, granularity, axis, block):
    sizes = [0] * len(shape)
    if granularity == "per_channel":
        sizes[axis] = 1
    elif granularity == "per_block":
        sizes[1 - axis] = block
        sizes[axis] = 1
    return sizes


@pytest.fixture(scope="module")
def ct_utils():
    return pytest.importorskip("coremltools.optimize._utils")


@pytest.mark.parametrize("name", list(_weights()))
@pytest.mark.parametrize("float_dtype", [np.float32, np.float16])
def test_equal_to_coremltools(ct_utils, name, float_dtype):
    w = _weights()[name].astype(float_dtype)
    checked = 0
    for mode, dtype, granularity, axis in itertools.product(
        ["linear", "linear_symmetric"], BITS, ["per_tensor", "per_channel", "per_block"], [0, 1]
    ):
        block = 8 if w.shape[1 - axis] % 8 == 0 else 2
        ours = linear_quantize(w, AffineSettings(mode, dtype, granularity, block, axis))
        bits, signed = BITS[dtype]
        with np.errstate(all="ignore"):
            data, scale, zp = ct_utils.compute_qparams(
                w, bits, signed, mode.upper(), None, _ct_block_sizes(w.shape, granularity, axis, block)
            )
        where = (mode, dtype, granularity, axis)
        assert np.array_equal(ours.data, data) and ours.data.dtype == data.dtype, where
        assert np.array_equal(ours.scale, scale) and ours.scale.dtype == scale.dtype == w.dtype, where
        assert ours.scale.shape == scale.shape and ours.scale.ndim == w.ndim, where
        if zp is None:
            assert ours.zero_point is None, where
        else:
            assert np.array_equal(ours.zero_point, zp) and ours.zero_point.dtype == zp.dtype, where
        checked += 1
    assert checked == 48


def test_degenerate_blocks_as_coremltools():
    zero = np.zeros((4, 16), np.float32)
    r = linear_quantize(zero, AffineSettings("linear", "uint8", "per_channel"))
    assert not r.data.any() and not r.scale.any() and not r.zero_point.any()
    r = linear_quantize(zero, AffineSettings("linear_symmetric", "uint8", "per_tensor"))
    assert np.all(r.zero_point == 127) and np.array_equal(dequantize(r), zero)
    const = np.full((4, 16), 0.75, np.float32)
    r = linear_quantize(const, AffineSettings("linear", "int8", "per_channel"))
    assert np.all(r.data == 127) and np.all(r.zero_point == -128) and np.array_equal(dequantize(r), const)


def test_fp16_zero_point_overflow_is_fixed(ct_utils):
    """coremltools computes the linear zero point in fp16: (−128·600 …) overflows and clips to −128."""
    rng = np.random.default_rng(2)
    w = np.concatenate([np.full((4, 1), -100.0), rng.uniform(-100, 600, (4, 30)), np.full((4, 1), 600.0)], axis=1)
    w = w.astype(np.float16)  # true zero point round((−128·600 + 127·100) / 700) = −92
    s = AffineSettings("linear", "int8", "per_channel", axis=0)
    ours = linear_quantize(w, s)
    with np.errstate(all="ignore"):
        data, scale, zp = ct_utils.compute_qparams(w, 8, True, "LINEAR", None, [1, 0])
    assert np.all(zp == -128) and np.all(ours.zero_point == -92)
    err_ours = np.abs(dequantize(ours).astype(np.float32) - w.astype(np.float32)).max()
    err_ct = np.abs(scale.astype(np.float32) * (data.astype(np.float32) - zp) - w.astype(np.float32)).max()
    assert err_ours <= float(ours.scale.max()) and err_ct > 4 * float(scale.max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused(bad):
    w = np.ones((4, 8), np.float32)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        linear_quantize(w, AffineSettings())


def test_block_size_must_divide():
    with pytest.raises(NotApplicable, match="not a multiple of the block size 32"):
        linear_quantize(np.ones((4, 48), np.float32), AffineSettings(granularity="per_block", block_size=32))
    with pytest.raises(ValueError, match="one entry per axis"):
        linear_quantize(np.ones((4, 48), np.float32), AffineSettings(granularity="per_block", block_size=(1, 2, 3)))


def test_block_size_tuple_and_input_axis():
    w = np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)
    a = linear_quantize(w, AffineSettings(granularity="per_block", block_size=(0, 4, 1)))
    assert a.scale.shape == (1, 2, 16)
    b = linear_quantize(w, AffineSettings(granularity="per_block", block_size=4, axis=2, input_axis=1))
    assert b.scale.shape == (1, 2, 16) and np.array_equal(a.data, b.data)


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([4, 8, 16])),
               elements=st.floats(-1e3, 1e3, allow_nan=False, width=32)),
    st.sampled_from(["linear", "linear_symmetric"]),
    st.sampled_from(list(BITS)),
    st.sampled_from(["per_tensor", "per_channel", "per_block"]),
    st.sampled_from([np.float32, np.float16]),
)
@example(np.array([[1.0, -164.0, -164.0, -164.0]], np.float32), "linear", "int8", "per_tensor", np.float16)  # found by hypothesis
def test_invariants(w, mode, dtype, granularity, float_dtype):
    w = w.astype(float_dtype)
    r = linear_quantize(w, AffineSettings(mode, dtype, granularity, 4, 0))
    lo, hi = quant_range(dtype, mode)
    assert r.data.shape == w.shape and r.data.dtype == (np.int8 if BITS[dtype][1] else np.uint8)
    assert r.data.min() >= lo and r.data.max() <= hi
    assert r.scale.dtype == w.dtype and r.scale.ndim == w.ndim
    assert all(d % s == 0 for d, s in zip(w.shape, r.scale.shape))
    if r.zero_point is not None:
        assert r.zero_point.shape == r.scale.shape and r.zero_point.dtype == r.data.dtype
    # every value decodes within half a step (plus float rounding of the scale)
    step = np.kron(r.scale.astype(np.float64), np.ones([d // s for d, s in zip(w.shape, r.scale.shape)]))
    err = np.abs(dequantize(r).astype(np.float64) - w.astype(np.float64))
    slack = 1e-2 if float_dtype == np.float16 else 1e-5
    # fp16 scales below 2**-14 are subnormal (absolute precision 2**-25, 0 below 2**-25: such a block decodes to
    # 0, as coremltools'): up to 256 codes times that
    subnormal = 256 * 2.0**-24 if float_dtype == np.float16 else 0.0
    # an fp16 zero point is computed in fp16, as coremltools computes it (products such as 127 * 164 round
    # to a multiple of 16 there): its rounding can shift every value by up to half a step more
    half = 1.0 if float_dtype == np.float16 and mode == "linear" else 0.5
    assert np.all(err <= step * (half + slack) + np.abs(w) * slack + subnormal + 1e-30)
