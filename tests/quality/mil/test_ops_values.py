"""Every elementwise, activation, reduction and shape op on one input, checked against coremltools' value
inference (the MIL builder evaluates an op whose inputs are all constants: the reference), in one program
per opset converted once per session. Inputs are random per run: the rule must hold for any values."""

from __future__ import annotations

import numpy as np
import pytest

import mlqpipe
from mlqpipe.quality.mil import run

from .oracle import assert_close, convert_program

SHAPE = (2, 3, 4, 5)
_rng = np.random.default_rng()  # fresh values every session
X = (_rng.uniform(-2, 2, SHAPE)).astype(np.float32)
Y = (_rng.uniform(0.5, 2, (1, 3, 1, 5))).astype(np.float32)
ALPHA = np.array([0.1, 0.5, -0.3], dtype=np.float32)
BETA = np.array([1.0, 2.0, 0.5], dtype=np.float32)
E = _rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
ALONG = _rng.integers(-4, 4, (2, 3, 2, 5)).astype(np.int32)


def _cases(mb):
    """name -> function of x building the op (x is the input in the tested program, a const in the oracle)."""
    f32 = np.float32
    pos = lambda x: mb.add(x=mb.abs(x=x), y=f32(0.1))  # noqa: E731
    unit = lambda x: mb.clip(x=x, alpha=f32(-0.9), beta=f32(0.9))  # noqa: E731
    cases = {
        # unary math
        **{op: (lambda o: lambda x: getattr(mb, o)(x=x))(op) for op in
           ("abs", "exp", "exp2", "erf", "floor", "ceil", "round", "sign", "sin", "cos", "tan", "tanh", "atan", "sinh",
            "cosh", "square")},
        "acos": lambda x: mb.acos(x=unit(x)), "asin": lambda x: mb.asin(x=unit(x)), "atanh": lambda x: mb.atanh(x=unit(x)),
        "log": lambda x: mb.log(x=pos(x)), "sqrt": lambda x: mb.sqrt(x=pos(x)), "rsqrt": lambda x: mb.rsqrt(x=pos(x)),
        "inverse": lambda x: mb.inverse(x=pos(x)), "log_eps": lambda x: mb.log(x=pos(x), epsilon=f32(0.5)),
        "clip": lambda x: mb.clip(x=x, alpha=f32(-0.5), beta=f32(0.7)), "threshold": lambda x: mb.threshold(x=x, alpha=f32(0.1)),
        # activations
        **{op: (lambda o: lambda x: getattr(mb, o)(x=x))(op) for op in
           ("relu", "relu6", "sigmoid", "silu", "softplus", "softsign", "gelu")},
        "gelu_tanh": lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
        "gelu_sigmoid": lambda x: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
        "leaky_relu": lambda x: mb.leaky_relu(x=x, alpha=f32(0.2)), "elu": lambda x: mb.elu(x=x, alpha=f32(0.7)),
        "thresholded_relu": lambda x: mb.thresholded_relu(x=x, alpha=f32(0.3)),
        "prelu": lambda x: mb.prelu(x=x, alpha=ALPHA),
        "clamped_relu": lambda x: mb.clamped_relu(x=x, alpha=f32(0.3), beta=f32(0.8)),
        "sigmoid_hard": lambda x: mb.sigmoid_hard(x=x, alpha=f32(0.3), beta=f32(0.4)),
        "softplus_parametric": lambda x: mb.softplus_parametric(x=x, alpha=ALPHA, beta=BETA),
        "scaled_tanh": lambda x: mb.scaled_tanh(x=x, alpha=f32(1.5), beta=f32(0.5)),
        "linear_activation": lambda x: mb.linear_activation(x=x, alpha=f32(2.0), beta=f32(0.5)),
        "softmax1": lambda x: mb.softmax(x=x, axis=1), "softmax_last": lambda x: mb.softmax(x=x, axis=-1),
        # binary, broadcasting [2,3,4,5] with [1,3,1,5]
        **{op: (lambda o: lambda x: getattr(mb, o)(x=x, y=Y))(op) for op in
           ("add", "sub", "mul", "real_div", "maximum", "minimum", "floor_div", "mod", "equal", "not_equal", "less",
            "less_equal", "greater", "greater_equal")},
        "pow": lambda x: mb.pow(x=pos(x), y=Y),
        "logical": lambda x: mb.logical_xor(x=mb.logical_and(x=mb.greater(x=x, y=f32(0)), y=mb.less(x=x, y=f32(1))),
                                            y=mb.logical_or(x=mb.less(x=x, y=f32(-1)), y=mb.logical_not(x=mb.greater(x=x, y=f32(-1.5))))),
        "select": lambda x: mb.select(cond=mb.greater(x=x, y=f32(0)), a=x, b=Y),
        # reductions
        **{f"{op}_{keep}": (lambda o, k: lambda x: getattr(mb, o)(x=x, axes=[1, -1], keep_dims=k))(op, keep)
           for op in ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_l1_norm",
                      "reduce_l2_norm", "reduce_sum_square", "reduce_log_sum_exp") for keep in (False, True)},
        "reduce_log_sum": lambda x: mb.reduce_log_sum(x=pos(x), axes=[2]),
        "reduce_all": lambda x: mb.reduce_mean(x=x),
        "reduce_argmax": lambda x: mb.reduce_argmax(x=x, axis=2), "reduce_argmin": lambda x: mb.reduce_argmin(x=x, axis=-1, keep_dims=True),
        # shapes and selection
        "reshape": lambda x: mb.reshape(x=x, shape=[6, -1]), "transpose": lambda x: mb.transpose(x=x, perm=[0, 2, 3, 1]),
        "concat": lambda x: mb.concat(values=[x, x], axis=2),
        "concat_interleave": lambda x: mb.concat(values=[x, mb.mul(x=x, y=f32(2))], axis=1, interleave=True),
        "split": lambda x: mb.split(x=x, num_splits=2, axis=0),
        "split_sizes": lambda x: mb.split(x=x, split_sizes=[1, 3], axis=2),
        "slice_by_index": lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0, 1], end=[2, 3, 4, 5], stride=[1, 1, 2, 2]),
        "slice_masks": lambda x: mb.slice_by_index(x=x, begin=[1, 0, -1, 0], end=[0, 2, 0, 5], stride=[1, 1, -1, 2],
                                                   begin_mask=[False, True, False, False], end_mask=[True, False, True, False],
                                                   squeeze_mask=[True, False, False, False]),
        "slice_by_size": lambda x: mb.slice_by_size(x=x, begin=[0, 1, 1, 0], size=[-1, 2, 2, -1]),
        "squeeze": lambda x: mb.squeeze(x=mb.expand_dims(x=x, axes=[3]), axes=[3]),
        "expand_dims": lambda x: mb.expand_dims(x=x, axes=[-1]),
        "tile": lambda x: mb.tile(x=x, reps=[1, 2, 1, 3]),
        "pad": lambda x: mb.pad(x=x, pad=[1, 2, 0, 1], constant_val=f32(0.5)),
        "pad_reflect": lambda x: mb.pad(x=x, pad=[1, 2, 2, 1], mode="reflect"),
        "pad_replicate": lambda x: mb.pad(x=x, pad=[0, 0, 1, 0, 2, 3], mode="replicate"),
        "cast": lambda x: mb.cast(x=mb.mul(x=x, y=f32(3)), dtype="int32"),
        "shape": lambda x: mb.shape(x=x),
        "fill": lambda x: mb.fill(shape=mb.shape(x=x), value=f32(1.5)),
        "range_1d": lambda x: mb.range_1d(start=np.int32(1), end=np.int32(11), step=np.int32(3)),
        "gather": lambda x: mb.gather(x=x, indices=np.array([2, 0, -1], dtype=np.int32), axis=1),
        "gather_along_axis": lambda x: mb.gather_along_axis(x=x, indices=ALONG, axis=2),
        "gather_nd": lambda x: mb.gather_nd(x=x, indices=np.array([[0, 1], [1, 2], [1, 0]], dtype=np.int32)),
        "stack": lambda x: mb.stack(values=[x, x], axis=1),
        "flatten2d": lambda x: mb.flatten2d(x=x, axis=2),
        "reverse": lambda x: mb.reverse(x=x, axes=[1, 3]),
        "cumsum": lambda x: mb.cumsum(x=x, axis=2, reverse=True),
        "einsum": lambda x: mb.einsum(values=(x, E), equation="abcd,adce->abce"),
        "pixel_shuffle": lambda x: mb.pixel_shuffle(x=mb.reshape(x=x, shape=[2, 4, 3, 5]), upscale_factor=2),
        "depth_to_space": lambda x: mb.depth_to_space(x=mb.reshape(x=x, shape=[2, 4, 3, 5]), block_size=2),
        "space_to_depth": lambda x: mb.space_to_depth(x=mb.slice_by_size(x=x, begin=[0, 0, 0, 0], size=[-1, -1, 4, 4]), block_size=2),
        "one_hot": lambda x: mb.one_hot(indices=mb.reduce_argmax(x=x, axis=1), one_hot_vector_size=3, axis=1),
        "band_part": lambda x: mb.band_part(x=x, lower=1, upper=2),
        "topk": lambda x: mb.topk(x=x, k=3, axis=2),
        "argsort": lambda x: mb.argsort(x=x, axis=-1, ascending=True),
        "l2_norm": lambda x: mb.l2_norm(x=x, epsilon=f32(1e-3)),
    }
    return cases


def _pixel_shuffle(x, f):
    """out[:, c, h·f + i, w·f + j] = x[:, c·f² + i·f + j, h, w], written one (i, j) offset at a time."""
    n, ch, h, w = x.shape
    out = np.empty((n, ch // (f * f), h * f, w * f), x.dtype)
    for i in range(f):
        for j in range(f):
            out[:, :, i::f, j::f] = x[:, i * f + j::f * f]
    return out


def _depth_to_space(x, b):
    """Depth-column-row: out[:, c, h·b + i, w·b + j] = x[:, (i·b + j)·C + c, h, w]."""
    n, ch, h, w = x.shape
    c = ch // (b * b)
    out = np.empty((n, c, h * b, w * b), x.dtype)
    for i in range(b):
        for j in range(b):
            out[:, :, i::b, j::b] = x[:, (i * b + j) * c:(i * b + j + 1) * c]
    return out


def _space_to_depth(x, b):
    """The inverse: channel (i·b + j)·C + c of the output holds pixel (h·b + i, w·b + j) of channel c."""
    n, c, h, w = x.shape
    out = np.empty((n, c * b * b, h // b, w // b), x.dtype)
    for i in range(b):
        for j in range(b):
            out[:, (i * b + j) * c:(i * b + j + 1) * c] = x[:, :, i::b, j::b]
    return out


def _outputs(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


# ops coremltools 9.0 computes no value for (silu, gather_nd, one_hot, the depth/space moves), or a wrong one (its concat ignores interleave, which its own
# documentation defines as output[i::n] = values[i]): numpy gives their reference
NUMPY_REFERENCE = {
    "concat_interleave": lambda x: [np.stack([x, 2 * x], axis=2).reshape(2, 6, 4, 5)],
    "silu": lambda x: [x / (1 + np.exp(-x.astype(np.float64)))],
    "gather_nd": lambda x: [x[[0, 1, 1], [1, 2, 0]]],
    "einsum": lambda x: [np.einsum("abcd,adce->abce", x, E)],
    "pixel_shuffle": lambda x: [_pixel_shuffle(x.reshape(2, 4, 3, 5), 2)],
    "depth_to_space": lambda x: [_depth_to_space(x.reshape(2, 4, 3, 5), 2)],
    "space_to_depth": lambda x: [_space_to_depth(x[:, :, :4, :4], 2)],
    "one_hot": lambda x: [(x.argmax(1)[:, None] == np.arange(3)[None, :, None, None]).astype(np.int32)],
    "gather_along_axis": lambda x: [np.take_along_axis(x, ALONG % 4, axis=2)],  # negative indices count from the end
}


@pytest.fixture(scope="module")
def program(converted):
    """(package, [(case, number of outputs)], reference values in output order)."""
    from coremltools.converters.mil.mil import Builder as mb

    from .oracle import ct

    ios = ct().target.iOS17
    names, refs = [], []

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ios)
    def _oracle(unused):
        for name, build in _cases(mb).items():
            values = [None if v.val is None else np.array(v.val) for v in _outputs(build(X.copy()))]  # X copied: some value inference writes in place
            if name in NUMPY_REFERENCE:
                values = NUMPY_REFERENCE[name](X)
            assert all(v is not None and v.dtype != object for v in values), f"coremltools computes no value for {name}"
            names.append((name, len(values)))
            refs.extend(values)
        return unused


    @mb.program(input_specs=[mb.TensorSpec(shape=SHAPE)], opset_version=ios)
    def prog(x):
        return tuple(v for name, build in _cases(mb).items() for v in _outputs(build(x)))

    return converted("values_ios17", lambda p: convert_program(prog, 17, p)), names, refs


def test_every_op_matches_coremltools_value_inference(program):
    path, names, refs = program
    got = list(run(mlqpipe.load_model(path), {"x": X}).values())
    assert len(got) == len(refs)
    i = 0
    for name, count in names:
        for k in range(count):
            ref = np.asarray(refs[i])
            # bool results leave the program as fp32 (coremltools casts outputs a function cannot return)
            assert got[i].dtype.kind == ref.dtype.kind or (ref.dtype.kind, got[i].dtype.kind) == ("b", "f"), name
            assert_close(got[i], ref, f"{name}[{k}]")
            i += 1
