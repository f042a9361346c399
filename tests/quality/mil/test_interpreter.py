"""The interpreter's contract beyond single ops: batching, weights decoded once, compressed weights,
control flow, and refusals with exact messages."""

from __future__ import annotations

import numpy as np
import pytest

import mlqpipe
from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import constexpr
from mlqpipe.quality.mil import OPS, Interpreter, Unsupported, run

from .oracle import assert_close, convert_program, ct

_rng = np.random.default_rng()
W1, B1 = (_rng.standard_normal((96, 64)) * 0.1).astype(np.float32), _rng.standard_normal(96).astype(np.float32)
W2, B2 = (_rng.standard_normal((40, 96)) * 0.1).astype(np.float32), _rng.standard_normal(40).astype(np.float32)
WT, WF, WB = ((_rng.standard_normal(s) * 0.2).astype(np.float32) for s in ((32, 64), (32, 64), (32, 32)))


def _mlp(path, ios: int):
    from coremltools.converters.mil.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=ct().target.iOS16 if ios == 16 else ct().target.iOS18)
    def prog(x):
        h = mb.relu(x=mb.linear(x=x, weight=W1, bias=B1, name="fc1"), name="relu1")
        return mb.linear(x=h, weight=W2, bias=B2, name="fc2")

    convert_program(prog, ios, path)


def _mlp_numpy(x, w1, w2):
    return np.maximum(x @ w1.T + B1, 0) @ w2.T + B2


@pytest.fixture(scope="module")
def mlp(converted):
    return converted("mlp_ios16", lambda p: _mlp(p, 16))


def test_samples_run_one_by_one_and_concatenate(mlp):
    model = mlqpipe.load_model(mlp)
    x = _rng.standard_normal((5, 64)).astype(np.float32)
    one_by_one = Interpreter(model)
    one_by_one.batched = False  # the definition of a [1, ...] program on N samples
    (name,) = one_by_one.outputs
    got = one_by_one.run({"x": x})[name]
    assert got.shape == (5, 40) and got.dtype == np.float32
    assert_close(got, _mlp_numpy(x, W1, W2), "mlp")
    # the declared shape itself runs once, and gives the same first sample
    assert np.array_equal(run(model, {"x": x[:1]})[name], got[:1])
    # all samples at once: tested against the per-sample run first, then the same up to BLAS rounding
    batched = Interpreter(model)
    fast = batched.run({"x": x})[name]
    assert batched.batched is True
    assert fast.shape == got.shape and fast.dtype == got.dtype
    assert np.abs(fast - got).max() <= 1e-5 * np.abs(got).max()


def test_bad_inputs_are_refused_with_a_message(mlp):
    model = mlqpipe.load_model(mlp)
    with pytest.raises(Unsupported) as e:
        run(model, {"x": np.zeros((2, 63), np.float32)})
    assert str(e.value) == ("not evaluated: input 'x' has shape [2, 63], the function declares [1, 64] "
                            "(samples go on axis 0 of a [1, ...] input)")
    with pytest.raises(Unsupported) as e:
        run(model, {})
    assert str(e.value) == "not evaluated: no array for input 'x' of function 'main'"
    with pytest.raises(Unsupported) as e:
        run(model, {"x": np.zeros((1, 64), np.float32), "z": np.zeros(1)})
    assert str(e.value) == "not evaluated: input(s) 'z' are not inputs of function 'main' (its inputs: x)"
    with pytest.raises(ModelError) as e:
        run(model, {"x": np.zeros((1, 64), np.float32)}, function="other")
    assert str(e.value) == f"{mlp}: the program has no function 'other' (functions: main); name one of them"


def _records(model) -> dict:
    """op name of the consumer -> its decoded `weight` (mlqpipe's inventory, decoding as compress does)."""
    return {c.op: r.values() for r in mlqpipe.inventory(model) for c in r.consumers if c.parameter == "weight"}


@pytest.mark.parametrize("how", ["int8", "lut4", "int4_block_ios18"])
def test_compressed_weights_equal_numpy_with_the_decoded_weights(mlp, converted, how, monkeypatch):
    from mlqpipe.optimize.config import OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig

    if how == "int4_block_ios18":
        model = mlqpipe.load_model(converted("mlp_ios18", lambda p: _mlp(p, 18)))
        config = OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=16, weight_threshold=100)
        small = mlqpipe.linear_quantize_weights(model, OptimizationConfig(global_config=config))
    elif how == "int8":
        model = mlqpipe.load_model(mlp)
        small = mlqpipe.linear_quantize_weights(model, OptimizationConfig(global_config=OpLinearQuantizerConfig(weight_threshold=100)))
    else:
        model = mlqpipe.load_model(mlp)
        config = OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=100)
        small = mlqpipe.palettize_weights(model, OptimizationConfig(global_config=config))
    weights = _records(small)
    assert all(r.compressed for r in mlqpipe.inventory(small) if len(r.shape) == 2)
    assert not np.array_equal(weights["fc1"], W1)  # the weights really are the compressed ones

    calls = []
    real = constexpr.decode_chain
    monkeypatch.setattr(constexpr, "decode_chain", lambda *a, **k: calls.append(1) or real(*a, **k))
    interpreter = Interpreter(small)
    (name,) = interpreter.outputs
    x = _rng.standard_normal((3, 64)).astype(np.float32)
    for _ in range(2):
        assert_close(interpreter.run({"x": x})[name], _mlp_numpy(x, weights["fc1"], weights["fc2"]), how, 1e-5)
    assert len(calls) == 2  # each compressed weight decoded once for 2 runs of 3 samples


def _control_flow(path):
    from coremltools.converters.mil.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=ct().target.iOS17)
    def prog(x):
        positive = mb.greater(x=mb.reduce_sum(x=x), y=np.float32(0.0))
        h = mb.cond(pred=positive, _true_fn=lambda: mb.linear(x=x, weight=WT), _false_fn=lambda: mb.linear(x=x, weight=WF))

        def keep_going(i, v):
            return mb.less(x=i, y=np.int32(3))

        def body(i, v):
            return mb.add(x=i, y=np.int32(1)), mb.tanh(x=mb.linear(x=v, weight=WB))

        _, out = mb.while_loop(_cond=keep_going, _body=body, loop_vars=(np.int32(0), h))
        return out

    convert_program(prog, 17, path)


def test_cond_and_while_loop_per_sample(converted):
    model = mlqpipe.load_model(converted("control_flow_ios17", _control_flow))
    x = _rng.standard_normal((4, 64)).astype(np.float32)
    x[0] = np.abs(x[0])
    x[1] = -np.abs(x[1])  # both branches are taken
    got = next(iter(run(model, {"x": x}).values()))
    ref = np.stack([np.where(s.sum() > 0, s @ WT.T, s @ WF.T) for s in x])
    for _ in range(3):
        ref = np.tanh(ref @ WB.T)
    assert_close(got, ref, "control flow")


def _unsupported(path):
    from coremltools.converters.mil.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 3, 4))], opset_version=ct().target.iOS16)
    def prog(x):
        return mb.space_to_batch(x=mb.relu(x=x, name="r"), block_shape=[2, 2], paddings=[[1, 0], [0, 0]], name="up")

    convert_program(prog, 16, path)


def _refused_setting(path):
    from coremltools.converters.mil.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4))], opset_version=ct().target.iOS16)
    def prog(x):
        return mb.gather(x=x, indices=np.zeros((2, 1), np.int32), axis=1, batch_dims=1, name="g")

    convert_program(prog, 16, path)


def test_an_op_outside_the_table_is_not_evaluated(converted):
    assert "space_to_batch" not in OPS
    model = mlqpipe.load_model(converted("unsupported_ios16", _unsupported))
    with pytest.raises(Unsupported) as e:
        run(model, {"x": np.zeros((1, 2, 3, 4), np.float32)})
    assert str(e.value) == "not evaluated: op up of type space_to_batch"


def test_a_setting_the_row_does_not_cover_is_not_evaluated(converted):
    model = mlqpipe.load_model(converted("refused_ios16", _refused_setting))
    with pytest.raises(Unsupported) as e:
        run(model, {"x": np.zeros((2, 3, 4), np.float32)})
    assert str(e.value) == "not evaluated: op g of type gather (batch_dims other than 0)"


def test_the_table_is_one_declarative_mapping():
    assert all(callable(r.fn) and isinstance(r.tuples, tuple) for r in OPS.values())
    assert {"concat", "einsum", "stack"} == {name for name, r in OPS.items() if r.tuples}
    for family in ("linear", "matmul", "einsum", "conv", "conv_transpose", "max_pool", "avg_pool", "batch_norm",
                   "instance_norm", "layer_norm", "softmax", "gelu", "reduce_sum", "gather_nd", "slice_by_index", "range_1d"):
        assert family in OPS


WC = _rng.standard_normal((6, 3, 4, 4)).astype(np.float32)


def _padding(path):
    from coremltools.converters.mil.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 9, 9))], opset_version=ct().target.iOS16)
    def prog(x):
        return (mb.conv(x=x, weight=WC, pad_type="same_lower"), mb.conv(x=x, weight=WC, pad_type="custom", pad=[2, 1, 2, 1]),
                mb.conv(x=x, weight=WC, pad_type="same", strides=[2, 2]), mb.conv(x=x, weight=WC, pad_type="custom", pad=[1, 2, 1, 2], strides=[2, 2]),
                mb.l2_pool(x=x, kernel_sizes=[3, 3], strides=[3, 3], pad_type="valid"))

    convert_program(prog, 16, path)


def test_same_padding_is_the_custom_padding_it_implies(converted):
    """9 pixels, kernel 4: 'same' pads 3 (1 before, 2 after; 'same_lower' the other way round); with stride 2
    it pads 3 too (5 outputs). l2_pool is the root of each window's sum of squares."""
    model = mlqpipe.load_model(converted("padding_ios16", _padding))
    x = _rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    lower, custom, same2, custom2, l2 = run(model, {"x": x}).values()
    assert lower.shape == (2, 6, 9, 9) and np.array_equal(lower, custom)
    assert same2.shape == (2, 6, 5, 5) and np.array_equal(same2, custom2)
    assert_close(l2, np.sqrt((x.reshape(2, 3, 3, 3, 3, 3) ** 2).sum(axis=(3, 5))), "l2_pool")


def _batch_programs(path, which: str):
    from coremltools.converters.mil.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 4))], opset_version=ct().target.iOS16)
    def flatten(x):  # the target shape [1, 16] carries the batch: widened in a batched run
        return mb.linear(x=mb.reshape(x=x, shape=[1, 16]), weight=W1[:8, :16], name="fc")

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 4))], opset_version=ct().target.iOS16)
    def mixing(x):  # sums over axis 0: per sample an identity, over a batch a mix of samples
        return mb.mul(x=mb.reduce_sum(x=x, axes=[0], keep_dims=True), y=2.0, name="twice")

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 4))], opset_version=ct().target.iOS16)
    def moved(x):  # the batch axis moves to the middle and back, as sequence models do
        t = mb.transpose(x=x, perm=[1, 0, 2], name="t")
        r = mb.reshape(x=t, shape=[4, 1, 2, 2], name="r")
        return mb.transpose(x=mb.reshape(x=r, shape=[4, 1, 4]), perm=[1, 0, 2], name="back")

    convert_program({"flatten": flatten, "mixing": mixing, "moved": moved}[which], 16, path)


@pytest.mark.parametrize("which, batches", [("flatten", True), ("mixing", False), ("moved", True)])
def test_batched_run_only_where_it_gives_the_per_sample_result(converted, which, batches):
    model = mlqpipe.load_model(converted(f"batch_{which}", lambda p: _batch_programs(p, which)))
    x = _rng.standard_normal((6, 4, 4)).astype(np.float32)
    fast, slow = Interpreter(model), Interpreter(model)
    slow.batched = False
    got, want = fast.run({"x": x}), slow.run({"x": x})
    assert fast.batched is batches
    for name in want:
        assert got[name].shape == want[name].shape
        assert np.abs(got[name] - want[name]).max() <= 1e-5 * max(np.abs(want[name]).max(), 1.0), name
    if which == "mixing":
        assert np.array_equal(got["twice"], 2 * x)  # per sample: no sample leaks into another


def test_equal_samples_are_not_taken_for_a_batch_test(converted):
    model = mlqpipe.load_model(converted("batch_mixing", lambda p: _batch_programs(p, "mixing")))
    x = np.repeat(_rng.standard_normal((1, 4, 4)).astype(np.float32), 5, axis=0)
    it = Interpreter(model)
    assert np.array_equal(it.run({"x": x})["twice"], 2 * x)
    assert it.batched is False  # nothing told the two ways apart: one by one
