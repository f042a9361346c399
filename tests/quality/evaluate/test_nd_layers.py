"""ND layers, one small model per layer type and setting, built with coremltools' NeuralNetworkBuilder in ND
mode (EXACT_ARRAY_MAPPING) and run with mlqpipe's evaluator on a batch of 3 samples; each output is compared
with a numpy computation written out here, sample by sample (relative L2 <= 1e-5, exact for integers)."""

import math

import numpy as np
import pytest

from mlqpipe.quality.evaluate.context import Unsupported

from . import harness

N = 3  # samples per batch


def net(inputs, outputs=("out",)):
    """An ND builder: inputs [(name, shape)], outputs by name (shapes left to the layers)."""
    return harness.builder(list(inputs), [(name, None) for name in outputs], nd=True)


def randn(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal((N, *shape)) * scale).astype(np.float32)


def ints(low, high, *shape, seed=0):
    return np.random.default_rng(seed).integers(low, high, (N, *shape)).astype(np.float32)


def each(fn, *arrays):
    """fn applied to every sample alone, stacked: the reference never sees the sample axis."""
    return np.stack([np.asarray(fn(*(a[s] for a in arrays)), dtype=np.float64) for s in range(N)])


def run(b, **feeds):
    return harness.run(b, feeds)


def check(b, ref, output="out", **feeds):
    out = run(b, **feeds)[output]
    assert out.shape == ref.shape, (out.shape, ref.shape)
    harness.assert_close(out, ref)
    return out


def check_exact(b, ref, output="out", **feeds):
    out = run(b, **feeds)[output]
    assert out.shape == ref.shape, (out.shape, ref.shape)
    np.testing.assert_array_equal(out, ref)


erf = np.vectorize(math.erf)

# --- element-wise --------------------------------------------------------------------------------------------

UNARY = [  # (builder method, extra kwargs, reference, input)
    ("add_ceil", {}, np.ceil, randn(2, 5, scale=3)),
    ("add_floor", {}, np.floor, randn(2, 5, scale=3)),
    ("add_sign", {}, np.sign, np.concatenate([randn(1, 5)[:, :, :4], np.zeros((N, 1, 1), np.float32)], axis=2)),
    ("add_round", {}, np.round, randn(2, 5, scale=3)),
    ("add_exp2", {}, np.exp2, randn(2, 5)),
    ("add_sin", {}, np.sin, randn(2, 5)),
    ("add_cos", {}, np.cos, randn(2, 5)),
    ("add_tan", {}, np.tan, randn(2, 5, scale=0.5)),
    ("add_asin", {}, np.arcsin, randn(2, 5, scale=0.3)),
    ("add_acos", {}, np.arccos, randn(2, 5, scale=0.3)),
    ("add_atan", {}, np.arctan, randn(2, 5)),
    ("add_sinh", {}, np.sinh, randn(2, 5)),
    ("add_cosh", {}, np.cosh, randn(2, 5)),
    ("add_tanh", {}, np.tanh, randn(2, 5)),
    ("add_asinh", {}, np.arcsinh, randn(2, 5)),
    ("add_acosh", {}, np.arccosh, 1 + np.abs(randn(2, 5))),
    ("add_atanh", {}, np.arctanh, randn(2, 5, scale=0.3)),
    ("add_erf", {}, erf, randn(2, 5, scale=2)),
    ("add_gelu", {"mode": "EXACT"}, lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))), randn(2, 5, scale=2)),
    ("add_gelu", {"mode": "TANH_APPROXIMATION"},
     lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))), randn(2, 5, scale=2)),
    ("add_gelu", {"mode": "SIGMOID_APPROXIMATION"}, lambda x: x / (1 + np.exp(-1.702 * x)), randn(2, 5, scale=2)),
]


@pytest.mark.parametrize("method,kwargs,ref,x", UNARY, ids=[f"{m[4:]}{k.get('mode', '')}" for m, k, *_ in UNARY])
def test_unary(method, kwargs, ref, x):
    b = net([("x", x.shape[1:])])
    getattr(b, method)("f", "x", "out", **kwargs)
    check(b, each(lambda v: ref(v.astype(np.float64)), x), x=x)


def test_erf_is_float32_accurate_everywhere():
    from mlqpipe.quality.evaluate.layers_nd import _erf

    x = np.linspace(-7, 7, 100_001)
    assert np.max(np.abs(_erf(x) - erf(x))) < 1e-8


def test_round_refuses_halves():
    b = net([("x", (3,))])
    b.add_round("r", "x", "out")
    with pytest.raises(Unsupported, match="layer 'r' .*halfway"):
        run(b, x=np.full((N, 3), 2.5, np.float32))


BINARY = [
    ("add_add_broadcastable", np.add),
    ("add_subtract_broadcastable", np.subtract),
    ("add_multiply_broadcastable", np.multiply),
    ("add_divide_broadcastable", np.divide),
    ("add_max_broadcastable", np.maximum),
    ("add_min_broadcastable", np.minimum),
]
SHAPES = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 4)), ((2, 1, 4), (3, 1)), ((1,), (2, 5))]


@pytest.mark.parametrize("method,ref", BINARY, ids=[m[4:] for m, _ in BINARY])
@pytest.mark.parametrize("sa,sb", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_broadcastable(method, ref, sa, sb):
    a, c = randn(*sa, seed=1), randn(*sb, seed=2)
    b = net([("a", sa), ("c", sb)])
    getattr(b, method)("op", ["a", "c"], "out")
    check(b, each(ref, a, c), a=a, c=c)


def test_pow_floor_div_and_mod():
    a, c = np.abs(randn(2, 4, seed=1)) * 5 + 0.1, np.abs(randn(4, seed=2)) + 0.5
    for method, ref in [("add_pow_broadcastable", np.power), ("add_floor_div_broadcastable", lambda x, y: np.floor(x / y)),
                        ("add_mod_broadcastable", np.mod)]:
        b = net([("a", (2, 4)), ("c", (4,))])
        getattr(b, method)("op", ["a", "c"], "out")
        check(b, each(ref, a, c), a=a, c=c)


def test_mod_refuses_mixed_signs():
    b = net([("a", (4,)), ("c", (4,))])
    b.add_mod_broadcastable("m", ["a", "c"], "out")
    with pytest.raises(Unsupported, match="layer 'm' .*different signs"):
        run(b, a=np.full((N, 4), -3, np.float32), c=np.full((N, 4), 2, np.float32))


COMPARE = [("add_equal", {}, np.equal), ("add_not_equal", {}, np.not_equal),
           ("add_less_than", {}, np.less), ("add_less_than", {"use_less_than_equal": True}, np.less_equal),
           ("add_greater_than", {}, np.greater), ("add_greater_than", {"use_greater_than_equal": True}, np.greater_equal)]


@pytest.mark.parametrize("method,kwargs,ref", COMPARE, ids=[f"{m[4:]}{'_equal' if k else ''}" for m, k, _ in COMPARE])
def test_comparisons(method, kwargs, ref):
    a, c = ints(-2, 3, 2, 4, seed=1), ints(-2, 3, 4, seed=2)
    b = net([("a", (2, 4)), ("c", (4,))])
    getattr(b, method)("two", ["a", "c"], "out", **kwargs)
    getattr(b, method)("one", ["a"], "out1", alpha=1.0, **kwargs)
    b.spec.description.output.add().name = "out1"
    check_exact(b, each(ref, a, c), a=a, c=c)
    check_exact(b, each(lambda x: ref(x, 1.0), a), output="out1", a=a, c=c)


@pytest.mark.parametrize("mode,ref", [("AND", np.logical_and), ("OR", np.logical_or), ("XOR", np.logical_xor)])
def test_logical(mode, ref):
    a, c = ints(0, 2, 2, 4, seed=1) * 3, ints(-1, 2, 4, seed=2)
    b = net([("a", (2, 4)), ("c", (4,))])
    b.add_logical("l", ["a", "c"], "out", mode)
    check_exact(b, each(lambda x, y: ref(x != 0, y != 0), a, c), a=a, c=c)


def test_logical_not_where_clip_clamped_relu():
    cond, x, y = ints(0, 2, 3, 1, seed=1), randn(3, 4, seed=2), randn(4, seed=3)
    b = net([("cond", (3, 1)), ("x", (3, 4)), ("y", (4,))], ("out", "not", "clip", "relu6"))
    b.add_where_broadcastable("w", ["cond", "x", "y"], "out")
    b.add_logical("n", ["cond"], "not", "NOT")
    b.add_clip("c", "x", "clip", min_value=-0.5, max_value=0.7)
    b.add_clamped_relu("r", "x", "relu6", alpha=0.1, beta=0.5)
    out = run(b, cond=cond, x=x, y=y)
    harness.assert_close(out["out"], each(lambda c, u, v: np.where(c != 0, u, v), cond, x, y))
    np.testing.assert_array_equal(out["not"], (cond == 0).astype(np.float32))
    harness.assert_close(out["clip"], each(lambda u: np.minimum(np.maximum(u, -0.5), 0.7), x))
    harness.assert_close(out["relu6"], each(lambda u: np.minimum(0.5, np.where(u >= 0, u, 0.1 * u)), x))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_nd(axis):
    x = randn(3, 5, scale=3)

    def ref(v):
        e = np.exp(v - v.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    b = net([("x", (3, 5))])
    b.add_softmax_nd("s", "x", "out", axis=axis)
    check(b, each(ref, x), x=x)


# --- reductions ----------------------------------------------------------------------------------------------

REDUCE = [
    ("add_reduce_sum", lambda v, ax, k: v.sum(axis=ax, keepdims=k)),
    ("add_reduce_mean", lambda v, ax, k: v.mean(axis=ax, keepdims=k)),
    ("add_reduce_prod", lambda v, ax, k: v.prod(axis=ax, keepdims=k)),
    ("add_reduce_max", lambda v, ax, k: v.max(axis=ax, keepdims=k)),
    ("add_reduce_min", lambda v, ax, k: v.min(axis=ax, keepdims=k)),
    ("add_reduce_l1", lambda v, ax, k: np.abs(v).sum(axis=ax, keepdims=k)),
    ("add_reduce_l2", lambda v, ax, k: np.sqrt((v * v).sum(axis=ax, keepdims=k))),
    ("add_reduce_sumsquare", lambda v, ax, k: (v * v).sum(axis=ax, keepdims=k)),
    ("add_reduce_logsum", lambda v, ax, k: np.log(v.sum(axis=ax, keepdims=k))),
    ("add_reduce_logsumexp", lambda v, ax, k: np.log(np.exp(v).sum(axis=ax, keepdims=k))),
]


@pytest.mark.parametrize("method,ref", REDUCE, ids=[m[11:] for m, _ in REDUCE])
@pytest.mark.parametrize("axes", [(-1,), (0, 2), (1,), (-3, -1), None], ids=str)
@pytest.mark.parametrize("keepdims", [True, False])
def test_reductions(method, ref, axes, keepdims):
    x = randn(2, 3, 4, seed=4)
    if method == "add_reduce_logsum":
        x = np.abs(x) + 0.1
    b = net([("x", (2, 3, 4))])
    getattr(b, method)("r", "x", "out", axes=axes, keepdims=keepdims, reduce_all=axes is None)
    expected = each(lambda v: ref(v.astype(np.float64), None if axes is None else tuple(axes), keepdims), x)
    check(b, expected.reshape(N, -1) if expected.ndim == 1 else expected, x=x)


# --- shapes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(4, 6), (2, -1), (24,), (1, 2, 3, 4)], ids=str)
def test_reshape_static(target):
    x = randn(2, 3, 4)
    b = net([("x", (2, 3, 4))])
    b.add_reshape_static("r", "x", "out", target)
    check(b, each(lambda v: v.reshape(target), x), x=x)


def test_reshape_like_dynamic_and_rank_preserving():
    x, like = randn(2, 3, 4), randn(6, 4, seed=1)
    shape = np.tile(np.array([[3, 8]], np.float32), (N, 1))
    b = net([("x", (2, 3, 4)), ("like", (6, 4)), ("shape", (2,))], ("out", "dyn", "keep"))
    b.add_reshape_like("l", ["x", "like"], "out")
    b.add_reshape_dynamic("d", ["x", "shape"], "dyn")
    b.add_rank_preserving_reshape("p", "x", "keep", [0, 4, -1])
    out = run(b, x=x, like=like, shape=shape)
    harness.assert_close(out["out"], each(lambda v: v.reshape(6, 4), x))
    harness.assert_close(out["dyn"], each(lambda v: v.reshape(3, 8), x))
    harness.assert_close(out["keep"], each(lambda v: v.reshape(2, 4, 3), x))


def test_reshape_dynamic_needs_one_shape_for_all_samples():
    b = net([("x", (2, 6)), ("shape", (2,))])
    b.add_reshape_dynamic("d", ["x", "shape"], "out")
    shape = np.array([[3, 4], [4, 3], [3, 4]], np.float32)
    with pytest.raises(Unsupported, match="layer 'd' .*differs between samples"):
        run(b, x=randn(2, 6), shape=shape)


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_flatten_to_2d(axis):
    x = randn(2, 3, 4)
    a = axis + 3 if axis < 0 else axis
    b = net([("x", (2, 3, 4))])
    b.add_flatten_to_2d("f", "x", "out", axis=axis)
    check(b, each(lambda v: v.reshape(int(np.prod(v.shape[:a])), -1), x), x=x)


@pytest.mark.parametrize("axes,squeeze_all,shape", [((0, 3), False, (1, 3, 4, 1)), ((-1,), False, (2, 3, 1)),
                                                     (None, True, (1, 3, 1, 4)), ((0,), False, (1,))], ids=str)
def test_squeeze(axes, squeeze_all, shape):
    x = randn(*shape)
    b = net([("x", shape)])
    b.add_squeeze("s", "x", "out", axes=axes, squeeze_all=squeeze_all)
    ref = each(lambda v: np.squeeze(v, axis=axes), x)
    check(b, ref.reshape(N, 1) if ref.ndim == 1 else ref, x=x)  # nothing left: Core ML keeps shape (1,)


@pytest.mark.parametrize("axes", [(0,), (0, 2), (-1,), (-2, -1), (1, -1)], ids=str)
def test_expand_dims(axes):
    x = randn(3, 4)
    b = net([("x", (3, 4))])
    b.add_expand_dims("e", "x", "out", axes=list(axes))
    check(b, each(lambda v: np.expand_dims(v, axes), x), x=x)


@pytest.mark.parametrize("axes", [(1, 0, 2), (2, 0, 1), (0, 1, 2)], ids=str)
def test_transpose(axes):
    x = randn(2, 3, 4)
    b = net([("x", (2, 3, 4))])
    b.add_transpose("t", axes, "x", "out")
    check(b, each(lambda v: v.transpose(axes), x), x=x)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("interleave", [False, True])
def test_concat_nd(axis, interleave):
    a, c = randn(2, 3, seed=1), randn(2, 3, seed=2)

    def ref(u, v):
        if interleave:  # [u0, v0, u1, v1, ...] along the axis
            s = np.stack([u, v], axis=(axis % 2) + 1)
            return s.reshape(u.shape[: axis % 2] + (-1,) + u.shape[axis % 2 + 1 :])
        return np.concatenate([u, v], axis=axis)

    b = net([("a", (2, 3)), ("c", (2, 3))])
    b.add_concat_nd("c", ["a", "c"], "out", axis=axis, interleave=interleave)
    check(b, each(ref, a, c), a=a, c=c)


def test_concat_nd_of_different_lengths():
    a, c = randn(2, 3, seed=1), randn(2, 5, seed=2)
    b = net([("a", (2, 3)), ("c", (2, 5))])
    b.add_concat_nd("c", ["a", "c"], "out", axis=-1)
    check(b, each(lambda u, v: np.concatenate([u, v], axis=-1), a, c), a=a, c=c)


@pytest.mark.parametrize("kwargs,sizes", [({"num_splits": 3}, [2, 2, 2]), ({"split_sizes": [1, 3, 2]}, [1, 3, 2])], ids=str)
def test_split_nd(kwargs, sizes):
    x = randn(3, 6)
    b = net([("x", (3, 6))], ("o0", "o1", "o2"))
    b.add_split_nd("s", "x", ["o0", "o1", "o2"], axis=-1, **kwargs)
    out = run(b, x=x)
    edges = np.cumsum(sizes)[:-1]
    for i in range(3):
        harness.assert_close(out[f"o{i}"], each(lambda v: np.split(v, edges, axis=-1)[i], x))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_stack(axis):
    a, c = randn(2, 3, seed=1), randn(2, 3, seed=2)
    b = net([("a", (2, 3)), ("c", (2, 3))])
    b.add_stack("s", ["a", "c"], "out", axis=axis)
    check(b, each(lambda u, v: np.stack([u, v], axis=axis), a, c), a=a, c=c)


@pytest.mark.parametrize("dims", [[True, False, True], [False, True, False], [False, False, False]], ids=str)
def test_reverse(dims):
    x = randn(2, 3, 4)
    b = net([("x", (2, 3, 4))])
    b.add_reverse("r", "x", "out", reverse_dim=dims)
    check(b, each(lambda v: np.flip(v, axis=[i for i, d in enumerate(dims) if d]), x), x=x)


def test_reverse_sequence():
    x = randn(3, 5, 2)
    lengths = np.array([[2, 5, 0], [1, 3, 4], [5, 5, 5]], np.float32)

    def ref(v, ls):
        out = v.copy()
        for i, n in enumerate(ls.astype(int)):
            out[i, :n] = v[i, :n][::-1]
        return out

    b = net([("x", (3, 5, 2)), ("lengths", (3,))])
    b.add_reverse_sequence("r", ["x", "lengths"], "out", batch_axis=0, seq_axis=1)
    check(b, each(ref, x, lengths), x=x, lengths=lengths)


@pytest.mark.parametrize("reps", [[1, 2, 3], [2], [3, 1]], ids=str)
def test_tile(reps):
    x = randn(2, 3, 2)
    b = net([("x", (2, 3, 2))])
    b.add_tile("t", "x", "out", reps=reps)
    check(b, each(lambda v: np.tile(v, reps), x), x=x)


def test_tile_with_reps_input():
    x = randn(2, 3)
    reps = np.tile(np.array([[2, 3]], np.float32), (N, 1))
    b = net([("x", (2, 3)), ("reps", (2,))])
    b.add_tile("t", ["x", "reps"], "out")
    check(b, each(lambda v: np.tile(v, (2, 3)), x), x=x, reps=reps)


SLICES = [  # begin, end, strides, begin_masks, end_masks, squeeze_masks, numpy index
    ([1, 0, 0], [3, 4, 5], [1, 1, 1], [False] * 3, [False] * 3, None, np.s_[1:3, 0:4, 0:5]),
    ([0, 1, -3], [4, -1, 5], [2, 1, 1], [False] * 3, [False] * 3, None, np.s_[0:4:2, 1:-1, -3:5]),
    ([1, 2, 3], [3, -3, 2], [2, 2, 2], [True, False, True], [False, True, True], None, np.s_[:3:2, 2::2, ::2]),
    ([3, 3, 4], [0, 0, 0], [-1, -2, -1], [False] * 3, [False] * 3, None, np.s_[3:0:-1, 3:0:-2, 4:0:-1]),
    ([1, 2, 3], [3, -3, 2], [2, 2, 2], [True, False, True], [False, True, True], [False, True, False], np.s_[:3:2, 2, ::2]),
    ([-1, 0, 0], [0, 4, 5], [1, 1, 1], [False] * 3, [False] * 3, [True, False, False], np.s_[-1, 0:4, 0:5]),
]


@pytest.mark.parametrize("begin,end,strides,bm,em,sm,index", SLICES, ids=[str(s[-1]) for s in SLICES])
def test_slice_static(begin, end, strides, bm, em, sm, index):
    x = randn(5, 5, 5)
    b = net([("x", (5, 5, 5))])
    b.add_slice_static("s", "x", "out", begin, end, strides, bm, em, squeeze_masks=sm)
    check(b, each(lambda v: v[index], x), x=x)


@pytest.mark.parametrize("begin,end,strides,bm,em,sm,index", SLICES[:3], ids=[str(s[-1]) for s in SLICES[:3]])
def test_slice_dynamic(begin, end, strides, bm, em, sm, index):
    x = randn(5, 5, 5)
    begin_in = np.tile(np.array([begin], np.float32), (N, 1))
    end_in = np.tile(np.array([end], np.float32), (N, 1))
    b = net([("x", (5, 5, 5)), ("begin", (3,)), ("end", (3,))], ("out", "out2"))
    b.add_slice_dynamic("s", ["x", "begin"], "out", end_ids=end, strides=strides, begin_masks=bm, end_masks=em)
    b.add_slice_dynamic("s2", ["x", "begin", "end"], "out2", end_ids=[0, 0, 0], strides=strides, begin_masks=bm, end_masks=em)
    out = run(b, x=x, begin=begin_in, end=end_in)
    harness.assert_close(out["out"], each(lambda v: v[index], x))
    harness.assert_close(out["out2"], each(lambda v: v[index], x))


def test_slice_by_size_and_sliding_windows():
    x = randn(4, 7)
    begin = np.full((N, 1), 2, np.float32)
    b = net([("x", (4, 7)), ("begin", (1,))], ("out", "win"))
    b.add_slice_by_size("s", ["x", "begin"], "out", axis=1, size=3)
    b.add_sliding_windows("w", "x", "win", axis=1, window_size=3, step=2)
    out = run(b, x=x, begin=begin)
    harness.assert_close(out["out"], each(lambda v: v[:, 2:5], x))
    harness.assert_close(out["win"], each(lambda v: np.stack([v[:, s : s + 3] for s in (0, 2, 4)], axis=1), x))


@pytest.mark.parametrize("pads,to_size,value", [([0, 1, 4, 0], False, 0.0), ([2, 2, 0, 3], False, -1.5),
                                                ([0, 5, 9, 0], True, 0.5)], ids=str)
def test_constant_pad(pads, to_size, value):
    x = randn(3, 4)
    if to_size:  # the non-zero amount is the output size, padded on its side
        widths = [(0, 5 - 3), (9 - 4, 0)]
    else:
        widths = [(pads[0], pads[1]), (pads[2], pads[3])]
    b = net([("x", (3, 4))])
    b.add_constant_pad("p", ["x"], "out", value=value, pad_to_given_output_size_mode=to_size, pad_amounts=pads)
    check(b, each(lambda v: np.pad(v, widths, constant_values=value), x), x=x)


def test_broadcast_to_and_shapes():
    x, like = randn(3, 1), randn(2, 3, 4, seed=1)
    shape = np.tile(np.array([[2, 3, 5]], np.float32), (N, 1))
    b = net([("x", (3, 1)), ("like", (2, 3, 4)), ("shape", (3,))], ("static", "like_out", "dyn", "shape_out"))
    b.add_broadcast_to_static("s", "x", "static", [4, 3, 6])
    b.add_broadcast_to_like("l", ["x", "like"], "like_out")
    b.add_broadcast_to_dynamic("d", ["x", "shape"], "dyn")
    b.add_get_shape("g", "like", "shape_out")
    out = run(b, x=x, like=like, shape=shape)
    harness.assert_close(out["static"], each(lambda v: np.broadcast_to(v, (4, 3, 6)), x))
    harness.assert_close(out["like_out"], each(lambda v: np.broadcast_to(v, (2, 3, 4)), x))
    harness.assert_close(out["dyn"], each(lambda v: np.broadcast_to(v, (2, 3, 5)), x))
    np.testing.assert_array_equal(out["shape_out"], np.tile([[2, 3, 4]], (N, 1)))


def test_fill_range_and_load_constant():
    x = randn(2, 3)
    shape = np.tile(np.array([[3, 2]], np.float32), (N, 1))
    end = np.full((N, 1), 7, np.float32)
    start = np.array([[1], [1.5], [2]], np.float32)
    const = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    outs = ("like", "static", "dyn", "range_s", "range_d1", "range_d2", "const")
    b = net([("x", (2, 3)), ("shape", (2,)), ("end", (1,)), ("start", (1,))], outs)
    b.add_fill_like("fl", "x", "like", value=2.5)
    b.add_fill_static("fs", "static", [2, 4], value=-1.0)
    b.add_fill_dynamic("fd", "shape", "dyn", value=3.0)
    b.add_range_static("rs", "range_s", end=5, start=-1.5, step=1.5)
    b.add_range_dynamic("rd1", ["end"], "range_d1", start=1, step=2)
    b.add_range_dynamic("rd2", ["end", "start"], "range_d2", step=2)
    b.add_load_constant_nd("c", "const", const, (2, 3))
    out = run(b, x=x, shape=shape, end=end, start=start)
    np.testing.assert_array_equal(out["like"], np.full((N, 2, 3), 2.5))
    np.testing.assert_array_equal(out["static"], np.full((N, 2, 4), -1.0))
    np.testing.assert_array_equal(out["dyn"], np.full((N, 3, 2), 3.0))
    harness.assert_close(out["range_s"], np.tile(np.arange(-1.5, 5, 1.5), (N, 1)))
    harness.assert_close(out["range_d1"], np.tile(np.arange(1, 7, 2), (N, 1)))
    harness.assert_close(out["range_d2"], np.stack([np.arange(s, 7, 2) for s in (1, 1.5, 2)]))
    harness.assert_close(out["const"], np.tile(const, (N, 1, 1)))


def test_range_whose_length_differs_between_samples():
    b = net([("end", (1,))])
    b.add_range_dynamic("rd", ["end"], "out")
    with pytest.raises(Unsupported, match="layer 'rd'"):
        run(b, end=np.array([[3], [4], [3]], np.float32))


# --- weights: matmul, embedding, layer normalisation -----------------------------------------------------------


@pytest.mark.parametrize("sa,sb,ta,tb", [
    ((3, 4), (4, 5), False, False), ((2, 3, 4), (4, 5), False, False), ((2, 3, 4), (2, 5, 4), False, True),
    ((2, 4, 3), (1, 4, 5), True, False), ((4, 3), (5, 4), True, True), ((4,), (4, 5), False, False),
    ((3, 4), (4,), False, False), ((2, 1, 3, 4), (5, 4, 2), False, False),
], ids=str)
def test_batched_matmul_two_inputs(sa, sb, ta, tb):
    a, c = randn(*sa, seed=1), randn(*sb, seed=2)

    def ref(u, v):
        u = u[None, :] if u.ndim == 1 else u  # Core ML keeps the prepended/appended 1 (rank max(2, ...))
        v = v[:, None] if v.ndim == 1 else v
        u = np.swapaxes(u, -1, -2) if ta else u
        v = np.swapaxes(v, -1, -2) if tb else v
        return np.matmul(u, v)

    b = net([("a", sa), ("c", sb)])
    b.add_batched_mat_mul("mm", ["a", "c"], "out", transpose_a=ta, transpose_b=tb)
    check(b, each(ref, a, c), a=a, c=c)


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_batched_matmul_with_weights(shape, bias):
    x = randn(*shape)
    w = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)  # [X1, X2]
    bvec = np.random.default_rng(6).standard_normal(6).astype(np.float32) if bias else None
    b = net([("x", shape)])
    b.add_batched_mat_mul("mm", ["x"], "out", weight_matrix_rows=4, weight_matrix_columns=6, W=w, bias=bvec)
    check(b, each(lambda v: v @ w + (bvec if bias else 0), x), x=x)


def test_embedding_nd():
    ids = ints(0, 10, 2, 3, 1, seed=3)
    w = np.random.default_rng(5).standard_normal((6, 10)).astype(np.float32)  # [embeddingSize, vocabSize]
    bias = np.random.default_rng(6).standard_normal(6).astype(np.float32)
    b = net([("ids", (2, 3, 1))])
    b.add_embedding_nd("e", "ids", "out", vocab_size=10, embedding_size=6, W=w, b=bias)
    check(b, each(lambda i: w.T[i[..., 0].astype(int)] + bias, ids), ids=ids)
    with pytest.raises(Unsupported, match="layer 'e'"):
        run(b, ids=np.full((N, 2, 3, 1), 10, np.float32))


@pytest.mark.parametrize("normalized", [(4,), (3, 4)], ids=str)
def test_layer_normalization(normalized):
    x = randn(2, 3, 4, scale=2) + 1
    gamma = np.random.default_rng(5).standard_normal(normalized).astype(np.float32)
    beta = np.random.default_rng(6).standard_normal(normalized).astype(np.float32)
    axes = tuple(range(3 - len(normalized), 3))

    def ref(v):
        mean = v.mean(axis=axes, keepdims=True)
        var = ((v - mean) ** 2).mean(axis=axes, keepdims=True)
        return (v - mean) / np.sqrt(var + 1e-5) * gamma + beta

    b = net([("x", (2, 3, 4))])
    b.add_layer_normalization("ln", "x", "out", list(normalized), gamma, beta, eps=1e-5)
    check(b, each(ref, x), x=x)


def test_band_part_and_triangles():
    x = randn(2, 4, 5)
    b = net([("x", (2, 4, 5))], ("band", "low", "up"))
    b.add_matrix_band_part("b", "x", "band", num_lower=1, num_upper=2)
    b.add_lower_triangular("l", "x", "low", k=-1)
    b.add_upper_triangular("u", "x", "up", k=1)
    out = run(b, x=x)
    m, n = np.arange(4)[:, None], np.arange(5)[None, :]
    harness.assert_close(out["band"], each(lambda v: v * ((m - n <= 1) & (n - m <= 2)), x))
    harness.assert_close(out["low"], each(lambda v: v * (n - m <= -1), x))
    harness.assert_close(out["up"], each(lambda v: v * (n - m >= 1), x))


# --- gather / scatter -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather(axis):
    data = randn(3, 4, 5)
    size = data.shape[1:][axis]
    idx = ints(-size, size, 2, 3, seed=8)
    b = net([("data", (3, 4, 5)), ("idx", (2, 3))])
    b.add_gather("g", ["data", "idx"], "out", axis=axis)
    check(b, each(lambda d, i: np.take(d, i.astype(int), axis=axis), data, idx), data=data, idx=idx)


def test_gather_out_of_range_is_not_evaluated():
    b = net([("data", (3, 4)), ("idx", (2,))])
    b.add_gather("g", ["data", "idx"], "out", axis=0)
    with pytest.raises(Unsupported, match="layer 'g'"):
        run(b, data=randn(3, 4), idx=np.full((N, 2), 3, np.float32))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_along_axis(axis):
    data = randn(3, 4, 5)
    shape = list(data.shape[1:])
    shape[axis] = 2
    size = data.shape[1:][axis]
    idx = ints(-size, size, *shape, seed=8)
    b = net([("data", (3, 4, 5)), ("idx", tuple(shape))])
    b.add_gather_along_axis("g", ["data", "idx"], "out", axis=axis)
    check(b, each(lambda d, i: np.take_along_axis(d, i.astype(int), axis=axis), data, idx), data=data, idx=idx)


@pytest.mark.parametrize("idx_shape", [(6, 2), (2, 3, 1), (4, 3)], ids=str)
def test_gather_nd(idx_shape):
    data = randn(3, 4, 5)
    depth = idx_shape[-1]
    idx = np.stack([ints(0, data.shape[1 + j], *idx_shape[:-1], seed=j) for j in range(depth)], axis=-1)
    b = net([("data", (3, 4, 5)), ("idx", idx_shape)])
    b.add_gather_nd("g", ["data", "idx"], "out")
    check(b, each(lambda d, i: d[tuple(i[..., j].astype(int) for j in range(depth))], data, idx), data=data, idx=idx)


MODES = {"UPDATE": None, "ADD": np.add, "SUB": np.subtract, "MUL": np.multiply, "DIV": np.divide,
         "MAX": np.maximum, "MIN": np.minimum}


def _scatter_ref(mode, container, positions, updates):
    """Sequential loop over (position, update) pairs: the definition, element by element."""
    out = container.astype(np.float64).copy()
    for pos, u in zip(positions, updates):
        out[pos] = u if MODES[mode] is None else MODES[mode](out[pos], u)
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter(mode, axis):
    container = randn(4, 3, 5, seed=1)
    a = axis % 3
    size = container.shape[1:][a]
    idx = np.stack([np.random.default_rng(s).permutation(size)[:2] for s in range(N)]).astype(np.float32)
    if mode != "UPDATE":
        idx[:, 1] = idx[:, 0]  # repeated indices accumulate
    upd_shape = list(container.shape[1:])
    upd_shape[a] = 2
    updates = randn(*upd_shape, seed=2) + (3 if mode == "DIV" else 0)

    def ref(c, i, u):
        pairs = [((slice(None),) * a + (int(k),), np.take(u, j, axis=a)) for j, k in enumerate(i)]
        return _scatter_ref(mode, c, [p for p, _ in pairs], [v for _, v in pairs])

    b = net([("c", (4, 3, 5)), ("i", (2,)), ("u", tuple(upd_shape))])
    b.add_scatter("s", ["c", "i", "u"], "out", axis=axis, mode=mode)
    check(b, each(ref, container, idx, updates), c=container, i=idx, u=updates)


def test_scatter_update_with_repeated_indices_is_not_evaluated():
    b = net([("c", (4, 3)), ("i", (2,)), ("u", (2, 3))])
    b.add_scatter("s", ["c", "i", "u"], "out", axis=0, mode="UPDATE")
    with pytest.raises(Unsupported, match="layer 's' .*repeated"):
        run(b, c=randn(4, 3), i=np.ones((N, 2), np.float32), u=randn(2, 3))


@pytest.mark.parametrize("mode", ["UPDATE", "ADD", "MAX"])
@pytest.mark.parametrize("depth", [1, 2])
def test_scatter_nd(mode, depth):
    container = randn(4, 3, 2, seed=1)
    rng = np.random.default_rng(3)
    flat = np.stack([rng.permutation(12 if depth == 2 else 4)[:3] for _ in range(N)])
    if mode != "UPDATE":
        flat[:, 2] = flat[:, 0]
    idx = np.stack(np.unravel_index(flat, (4, 3)[:depth]), axis=-1).astype(np.float32)  # (N, 3, depth)
    updates = randn(3, *container.shape[1 + depth :], seed=2)

    def ref(c, i, u):
        return _scatter_ref(mode, c, [tuple(int(v) for v in row) for row in i], list(u))

    b = net([("c", (4, 3, 2)), ("i", (3, depth)), ("u", updates.shape[1:])])
    b.add_scatter_nd("s", ["c", "i", "u"], "out", mode=mode)
    check(b, each(ref, container, idx, updates), c=container, i=idx, u=updates)


@pytest.mark.parametrize("mode", ["UPDATE", "ADD", "MIN"])
@pytest.mark.parametrize("axis", [0, -1])
def test_scatter_along_axis(mode, axis):
    container = randn(4, 5, seed=1)
    a = axis % 2
    shape = [4, 5]
    shape[a] = 2
    size = container.shape[1:][a]
    rng = np.random.default_rng(4)
    lines = [[rng.permutation(size)[:2] for _ in range(shape[1 - a])] for _ in range(N)]
    idx = np.stack([np.stack(s, axis=1 - a) for s in lines]).astype(np.float32)  # distinct along the axis
    if mode != "UPDATE":
        idx = np.take(idx, [0, 0], axis=a + 1)
    updates = randn(*shape, seed=2)

    def ref(c, i, u):
        positions = []
        for pos in np.ndindex(*i.shape):
            target = list(pos)
            target[a] = int(i[pos])
            positions.append(tuple(target))
        return _scatter_ref(mode, c, positions, [u[pos] for pos in np.ndindex(*i.shape)])

    b = net([("c", (4, 5)), ("i", tuple(shape)), ("u", tuple(shape))])
    b.add_scatter_along_axis("s", ["c", "i", "u"], "out", axis=axis, mode=mode)
    check(b, each(ref, container, idx, updates), c=container, i=idx, u=updates)


def test_where_nonzero():
    x = np.zeros((N, 3, 4), np.float32)
    for s in range(N):
        x[s].flat[np.random.default_rng(s).permutation(12)[:5]] = 1 + s
    b = net([("x", (3, 4))])
    b.add_where_nonzero("w", "x", "out")
    check_exact(b, each(lambda v: np.argwhere(v != 0), x), x=x)
    x[0].flat[np.flatnonzero(x[0] == 0)[0]] = 9  # sample 0 now has 6 non-zero values, the others 5
    with pytest.raises(Unsupported, match="layer 'w'"):
        run(b, x=x)


def test_one_hot():
    idx = ints(-1, 5, 3, seed=2)
    b = net([("i", (3,))], ("out", "first"))
    b.add_one_hot("h", ["i"], "out", one_hot_vector_size=4, axis=-1, on_value=5.0, off_value=-1.0)
    b.add_one_hot("h0", ["i"], "first", one_hot_vector_size=4, axis=0)
    out = run(b, i=idx)
    hot = each(lambda v: (v[:, None] == np.arange(4)), idx)
    np.testing.assert_array_equal(out["out"], np.where(hot, 5.0, -1.0))
    np.testing.assert_array_equal(out["first"], hot.transpose(0, 2, 1).astype(np.float32))


# --- order statistics and scans ----------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("keepdims", [True, False])
def test_argmax_argmin(axis, keepdims):
    x = randn(3, 4, 5, seed=9)
    b = net([("x", (3, 4, 5))], ("max", "min"))
    b.add_argmax("a", "x", "max", axis=axis, keepdims=keepdims)
    b.add_argmin("b", "x", "min", axis=axis, keepdims=keepdims)
    out = run(b, x=x)
    np.testing.assert_array_equal(out["max"], each(lambda v: np.argmax(v, axis=axis, keepdims=keepdims), x))
    np.testing.assert_array_equal(out["min"], each(lambda v: np.argmin(v, axis=axis, keepdims=keepdims), x))


def test_argmax_of_a_rank_1_input_keeps_its_axis_and_refuses_ties():
    b = net([("x", (4,))])
    b.add_argmax("a", "x", "out", axis=0, keepdims=False)
    np.testing.assert_array_equal(run(b, x=np.array([[0, 3, 1, 2]] * N, np.float32))["out"], np.ones((N, 1)))
    with pytest.raises(Unsupported, match="layer 'a' .*more than once"):
        run(b, x=np.array([[3, 3, 1, 2]] * N, np.float32))


@pytest.mark.parametrize("axis,k,bottom", [(-1, 2, False), (0, 3, True), (1, 1, False)], ids=str)
def test_topk(axis, k, bottom):
    x = randn(3, 4, 5, seed=10)

    def order(v):
        o = np.argsort(v if bottom else -v, axis=axis)
        return np.take(o, np.arange(k), axis=axis)

    b = net([("x", (3, 4, 5))], ("values", "indices"))
    b.add_topk("t", ["x"], ["values", "indices"], k=k, axis=axis, use_bottom_k=bottom)
    out = run(b, x=x)
    np.testing.assert_array_equal(out["indices"], each(order, x))
    harness.assert_close(out["values"], each(lambda v: np.take_along_axis(v, order(v), axis=axis), x))


def test_topk_with_k_input_and_ties():
    x = randn(6, seed=3)
    b = net([("x", (6,)), ("k", (1,))], ("values", "indices"))
    b.add_topk("t", ["x", "k"], ["values", "indices"], axis=0)
    out = run(b, x=x, k=np.full((N, 1), 2, np.float32))
    np.testing.assert_array_equal(out["indices"], each(lambda v: np.argsort(-v)[:2], x))
    tied = np.tile(np.array([[1, 5, 5, 2, 0, 0]], np.float32), (N, 1))
    with pytest.raises(Unsupported, match="layer 't' .*tied"):
        run(b, x=tied, k=np.full((N, 1), 1, np.float32))


@pytest.mark.parametrize("descending", [False, True])
def test_argsort(descending):
    x = randn(3, 5, seed=11)
    b = net([("x", (3, 5))])
    b.add_argsort("s", "x", "out", axis=1, descending=descending)
    check_exact(b, each(lambda v: np.argsort(-v if descending else v, axis=1), x), x=x)


@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("exclusive", [False, True])
def test_cumsum(axis, reverse, exclusive):
    x = randn(3, 4, seed=12)

    def ref(v):
        w = np.flip(v, axis) if reverse else v
        c = np.cumsum(w, axis=axis)
        if exclusive:  # the first position gets 0, each later one the sum before it
            c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), np.take(c, np.arange(w.shape[axis] - 1), axis=axis)], axis=axis)
        return np.flip(c, axis) if reverse else c

    b = net([("x", (3, 4))])
    b.add_cumsum("c", ["x"], "out", axis=axis, reverse=reverse, exclusive=exclusive)
    check(b, each(ref, x), x=x)


def test_cumsum_documented_example():
    b = net([("x", (3,))])
    b.add_cumsum("c", ["x"], "out", axis=0, reverse=True, exclusive=True)
    check(b, np.tile([13.0, 7.0, 0.0], (N, 1)), x=np.tile(np.array([[4, 6, 7]], np.float32), (N, 1)))


# --- networks -----------------------------------------------------------------------------------------------------


def test_nd_layer_in_a_rank5_network_is_not_evaluated():
    b = harness.builder([("x", (3,))], [("out", None)], nd=False)
    b.add_sin("s", "x", "out")
    with pytest.raises(Unsupported, match="layer 's' .*rank-5"):
        run(b, x=randn(3))


def test_keras_like_chain():
    """Dense -> bias -> GELU -> layer norm -> reshape -> transpose -> reduce, as a TF2 converter writes it."""
    x = randn(4, 8, seed=13)
    rng = np.random.default_rng(14)
    w, bias = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    b = net([("x", (4, 8))])
    b.add_batched_mat_mul("dense", ["x"], "h", weight_matrix_rows=8, weight_matrix_columns=6, W=w)
    b.add_load_constant_nd("bias", "bias_value", bias, (6,))
    b.add_add_broadcastable("add", ["h", "bias_value"], "h2")
    b.add_gelu("gelu", "h2", "h3")
    b.add_layer_normalization("ln", "h3", "h4", [6], gamma, beta, eps=1e-5)
    b.add_reshape_static("reshape", "h4", "h5", (4, 2, 3))
    b.add_transpose("transpose", (2, 0, 1), "h5", "h6")
    b.add_reduce_mean("mean", "h6", "out", axes=[-1], keepdims=False)

    def ref(v):
        h = v @ w + bias
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        h = (h - mean) / np.sqrt(var + 1e-5) * gamma + beta
        return h.reshape(4, 2, 3).transpose(2, 0, 1).mean(-1)

    check(b, each(ref, x), x=x)


def test_inputs_that_override_parameters():
    """constantPad's amounts, oneHot's size, rangeDynamic's step and cumSum's axis given as (per-sample) inputs."""
    x = randn(2, 3)
    const = lambda *v: np.tile(np.array([v], np.float32), (N, 1))  # noqa: E731 - the same value in every sample
    names = ("pad", "hot", "range", "cum")
    b = net([("x", (2, 3)), ("pads", (4,)), ("i", (3,)), ("size", (1,)), ("end", (1,)), ("start", (1,)),
             ("step", (1,)), ("axis", (1,))], names)
    b.add_constant_pad("p", ["x", "pads"], "pad", value=1.0)
    b.add_one_hot("h", ["i", "size"], "hot", axis=-1)
    b.add_range_dynamic("r", ["end", "start", "step"], "range")
    b.add_cumsum("c", ["x", "axis"], "cum", axis=-1)
    idx = ints(0, 5, 3, seed=1)
    out = run(b, x=x, pads=const(1, 0, 0, 2), i=idx, size=const(5), end=const(2), start=const(-1), step=const(0.5),
              axis=const(0))
    harness.assert_close(out["pad"], each(lambda v: np.pad(v, [(1, 0), (0, 2)], constant_values=1.0), x))
    np.testing.assert_array_equal(out["hot"], each(lambda v: v[:, None] == np.arange(5), idx))
    harness.assert_close(out["range"], np.tile(np.arange(-1, 2, 0.5), (N, 1)))
    harness.assert_close(out["cum"], each(lambda v: np.cumsum(v, axis=0), x))


@pytest.mark.parametrize("build,message", [
    (lambda b: b.add_reshape_static("l", "x", "out", (0, 12)), "reshape to"),
    (lambda b: b.add_squeeze("l", "x", "out", axes=[0]), "not all are 1"),
    (lambda b: b.add_transpose("l", (0, 0, 1), "x", "out"), "transpose axes"),
    (lambda b: b.add_split_nd("l", "x", ["out", "o2"], axis=1, num_splits=2), "equal splits"),
    (lambda b: b.add_slice_static("l", "x", "out", [0, 0], [1, 1], [1, 1], [False] * 2, [False] * 2), "input rank"),
    (lambda b: b.add_softmax_nd("l", "x", "out", axis=3), "out of range"),
], ids=["reshape-0", "squeeze-non-1", "transpose-repeated", "split-uneven", "slice-rank", "axis"])
def test_settings_outside_the_documentation_are_not_evaluated(build, message):
    b = net([("x", (2, 3, 2))])
    build(b)
    with pytest.raises(Unsupported, match=f"layer 'l' .*{message}"):
        run(b, x=randn(2, 3, 2))
