"""branch / loop / loopBreak / loopContinue / copy against NeuralNetwork.proto's description of them.

What the proto says (and these tests pin down):
- branch: the ifBranch runs when |condition| > 1e-6, else the elseBranch (optional); the condition is a scalar.
- loop: with an input, the input is the iteration count and maxLoopIterations is ignored; without a condition
  network it is a for loop of that many iterations; with one, `conditionVar = conditionNetwork()` runs before
  the first iteration and after every body, and the loop runs while it holds (and, when a count is given, while
  fewer iterations than the count have run). Blobs the condition and body networks write are visible after it.
- loopBreak ends the loop, loopContinue the iteration (the condition network then runs again); both may sit in a
  branch inside the body.
- copy may overwrite a blob that already exists, which is how loop bodies and branches update enclosing blobs.
Samples may take different paths: each runs alone, and an enclosing blob rewritten by only some samples keeps
its old value in the others. Every model is written to tmp_path, so Core ML's own validator judges it too.
"""

import numpy as np
import pytest

from mlqpipe.quality.evaluate import forward
from mlqpipe.quality.evaluate.context import Unsupported

from . import harness

N = 3


def net(inputs, outputs):
    return harness.builder([(n, s) for n, s in inputs], [(n, s) for n, s in outputs], nd=True)


def sub(network):
    """A builder writing into a branch's or loop's sub-network."""
    from coremltools.models.neural_network import NeuralNetworkBuilder

    return NeuralNetworkBuilder(nn_spec=network, disable_rank5_shape_mapping=True)


def run(b, tmp_path, **feeds):
    """mlqpipe's outputs; the model is also written to tmp_path, where Core ML's validator judges it after the
    test (tests/conftest.py)."""
    (tmp_path / "model.mlmodel").write_bytes(b.spec.SerializeToString())
    return harness.run(b, feeds)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal((N, *shape)).astype(np.float32)


def accumulate_loop(b, **loop_kwargs):
    """acc = 0; loop: acc = acc + x (the body rewrites the enclosing blob with copy)."""
    b.add_fill_like("zero", "x", "acc", value=0.0)
    loop = b.add_loop("loop", **loop_kwargs)
    body = sub(loop.loop.bodyNetwork)
    body.add_add_broadcastable("add", ["acc", "x"], "acc_next")
    body.add_copy("copy", "acc_next", "acc")
    return loop


# --- branch -----------------------------------------------------------------------------------------------------


def test_branch_threshold_is_1e_6_and_samples_take_their_own_path(tmp_path):
    b = net([("x", (3,)), ("cond", (1,))], [("out", (3,))])
    branch = b.add_branch("branch", "cond")
    sub(branch.branch.ifBranch).add_sin("sin", "x", "out")
    sub(branch.branch.elseBranch).add_cos("cos", "x", "out")
    x = randn(3)
    cond = np.array([[1.0], [1e-7], [-2.0]], np.float32)  # 1e-7 is "false": |c| <= 1e-6
    out = run(b, tmp_path, x=x, cond=cond)["out"]
    harness.assert_close(out, np.stack([np.sin(x[0]), np.cos(x[1]), np.sin(x[2])]))


def test_branch_without_else_keeps_an_overwritten_blob_for_the_other_samples(tmp_path):
    b = net([("x", (3,)), ("cond", (1,))], [("y", (3,))])
    b.add_elementwise("double", ["x"], "y", "MULTIPLY", alpha=2.0)
    branch = b.add_branch("branch", "cond")
    then = sub(branch.branch.ifBranch)
    then.add_sin("sin", "x", "s")
    then.add_copy("copy", "s", "y")
    x = randn(3)
    out = run(b, tmp_path, x=x, cond=np.array([[1], [0], [1]], np.float32))["y"]
    harness.assert_close(out, np.stack([np.sin(x[0]), 2 * x[1], np.sin(x[2])]))


def test_branch_condition_must_be_a_scalar(tmp_path):
    b = net([("x", (3,)), ("cond", (2,))], [("out", (3,))])
    branch = b.add_branch("branch", "cond")
    sub(branch.branch.ifBranch).add_sin("sin", "x", "out")
    sub(branch.branch.elseBranch).add_cos("cos", "x", "out")
    with pytest.raises(Unsupported, match="layer 'branch' .*2 values"):
        harness.run(b, {"x": randn(3), "cond": np.ones((N, 2), np.float32)})


# --- loop -------------------------------------------------------------------------------------------------------


def test_for_loop_runs_max_loop_iterations(tmp_path):
    b = net([("x", (3,))], [("acc", (3,))])
    accumulate_loop(b, max_iterations=4)
    x = randn(3)
    harness.assert_close(run(b, tmp_path, x=x)["acc"], 4 * x)


def test_loop_input_is_the_count_and_max_loop_iterations_is_ignored(tmp_path):
    b = net([("x", (3,)), ("n", (1,))], [("acc", (3,))])
    accumulate_loop(b, input_name="n", max_iterations=1)
    x = randn(3)
    counts = np.array([[0], [2], [5]], np.float32)  # per sample, beyond maxLoopIterations
    harness.assert_close(run(b, tmp_path, x=x, n=counts)["acc"], counts * x)


def test_loop_count_must_be_a_whole_number():
    b = net([("x", (3,)), ("n", (1,))], [("acc", (3,))])
    accumulate_loop(b, input_name="n")
    with pytest.raises(Unsupported, match="layer 'loop'"):
        harness.run(b, {"x": randn(3), "n": np.full((N, 1), 2.5, np.float32)})


def _counter_loop(b, **loop_kwargs):
    """acc = 0; while acc < limit (the condition network writes `go`): acc += 1."""
    b.add_fill_like("zero", "x", "acc", value=0.0)
    loop = b.add_loop("loop", condition="go", **loop_kwargs)  # (its condition_network= argument fails in 9.0)
    sub(loop.loop.conditionNetwork).add_less_than("below", ["acc", "limit"], "go")
    body = sub(loop.loop.bodyNetwork)
    body.add_elementwise("inc", ["acc"], "acc_next", "ADD", alpha=1.0)
    body.add_copy("copy", "acc_next", "acc")
    return loop


def test_while_loop_with_a_condition_network(tmp_path):
    b = net([("x", (1,)), ("limit", (1,))], [("acc", (1,)), ("go", (1,))])
    _counter_loop(b)
    limit = np.array([[3], [0], [5.5]], np.float32)
    out = run(b, tmp_path, x=np.zeros((N, 1), np.float32), limit=limit)
    harness.assert_close(out["acc"], np.ceil(np.maximum(limit, 0)))
    np.testing.assert_array_equal(out["go"], np.zeros((N, 1)))  # the condition network ran after the last body


def test_condition_and_count_together(tmp_path):
    b = net([("x", (1,)), ("limit", (1,))], [("acc", (1,)), ("go", (1,))])
    _counter_loop(b, max_iterations=2)
    limit = np.array([[1], [5], [2]], np.float32)
    out = run(b, tmp_path, x=np.zeros((N, 1), np.float32), limit=limit)
    harness.assert_close(out["acc"], np.array([[1], [2], [2]]))
    np.testing.assert_array_equal(out["go"], np.array([[0], [1], [0]]))  # re-run after the count ended the loop


def test_blobs_written_by_the_body_are_visible_after_the_loop(tmp_path):
    b = net([("x", (3,))], [("acc", (3,)), ("before", (3,))])
    loop = accumulate_loop(b, max_iterations=3)
    sub(loop.loop.bodyNetwork).add_copy("keep", "acc", "before")  # runs after the update in the body
    x = randn(3)
    out = run(b, tmp_path, x=x)
    harness.assert_close(out["acc"], 3 * x)
    harness.assert_close(out["before"], 3 * x)


def test_loop_condition_near_zero_is_not_guessed():
    b = net([("x", (1,)), ("limit", (1,))], [("acc", (1,))])
    b.add_fill_like("zero", "x", "acc", value=0.0)
    loop = b.add_loop("loop", condition="go")
    sub(loop.loop.conditionNetwork).add_elementwise("tiny", ["limit"], "go", "MULTIPLY", alpha=1e-7)
    sub(loop.loop.bodyNetwork).add_copy("c", "x", "acc")
    with pytest.raises(Unsupported, match="layer 'loop' .*1e-6"):
        harness.run(b, {"x": np.zeros((N, 1), np.float32), "limit": np.ones((N, 1), np.float32)})


def test_endless_while_loop_is_not_evaluated(monkeypatch):
    monkeypatch.setattr(forward, "MAX_LOOP_ITERATIONS", 20)
    b = net([("x", (1,)), ("limit", (1,))], [("acc", (1,))])
    _counter_loop(b)
    with pytest.raises(Unsupported, match="layer 'loop' .*20 iterations"):
        harness.run(b, {"x": np.zeros((N, 1), np.float32), "limit": np.full((N, 1), 1e9, np.float32)})


def _guarded(body, name, threshold, kind):
    """In `body`: if acc > threshold: loopBreak / loopContinue (inside a branch)."""
    body.add_greater_than(f"{name}_test", ["acc"], f"{name}_cond", alpha=threshold)
    branch = body.add_branch(f"{name}_branch", f"{name}_cond")
    inner = sub(branch.branch.ifBranch)
    inner.add_loop_break(f"{name}_break") if kind == "break" else inner.add_loop_continue(f"{name}_continue")


def test_loop_break_inside_a_branch_ends_the_loop(tmp_path):
    b = net([("x", (1,))], [("acc", (1,))])
    b.add_fill_like("zero", "x", "acc", value=0.0)
    loop = b.add_loop("loop", max_iterations=10)
    body = sub(loop.loop.bodyNetwork)
    body.add_elementwise("inc", ["acc"], "acc_next", "ADD", alpha=1.0)
    body.add_copy("copy", "acc_next", "acc")
    _guarded(body, "stop", 3.0, "break")
    out = run(b, tmp_path, x=np.zeros((N, 1), np.float32))
    harness.assert_close(out["acc"], np.full((N, 1), 4.0))


def test_loop_continue_skips_the_rest_of_the_body(tmp_path):
    b = net([("x", (1,))], [("acc", (1,)), ("count", (1,))])
    b.add_fill_like("zero", "x", "acc", value=0.0)
    b.add_fill_like("zero2", "x", "count", value=0.0)
    loop = b.add_loop("loop", max_iterations=5)
    body = sub(loop.loop.bodyNetwork)
    body.add_elementwise("inc", ["acc"], "acc_next", "ADD", alpha=1.0)
    body.add_copy("copy", "acc_next", "acc")
    _guarded(body, "skip", 2.0, "continue")
    body.add_elementwise("inc2", ["count"], "count_next", "ADD", alpha=1.0)
    body.add_copy("copy2", "count_next", "count")
    out = run(b, tmp_path, x=np.zeros((N, 1), np.float32))
    harness.assert_close(out["acc"], np.full((N, 1), 5.0))
    harness.assert_close(out["count"], np.full((N, 1), 2.0))  # iterations 1 and 2 only


def test_break_ends_only_the_innermost_loop(tmp_path):
    b = net([("x", (1,))], [("count", (1,))])
    b.add_fill_like("zero", "x", "count", value=0.0)
    outer = b.add_loop("outer", max_iterations=3)
    inner_loop = sub(outer.loop.bodyNetwork).add_loop("inner", max_iterations=10)
    inner = sub(inner_loop.loop.bodyNetwork)
    inner.add_elementwise("inc", ["count"], "count_next", "ADD", alpha=1.0)
    inner.add_copy("copy", "count_next", "count")
    inner.add_loop_break("stop")
    out = run(b, tmp_path, x=np.zeros((N, 1), np.float32))
    harness.assert_close(out["count"], np.full((N, 1), 3.0))


@pytest.mark.invalid_models("*.mlmodel", reason="loopBreak outside a loop body")
def test_loop_break_outside_a_loop_is_not_evaluated(tmp_path):
    b = net([("x", (1,))], [("y", (1,))])
    b.add_copy("copy", "x", "y")
    b.add_loop_break("stray")
    with pytest.raises(Unsupported, match="layer 'stray' .*outside"):
        run(b, tmp_path, x=np.zeros((N, 1), np.float32))


def test_copy_overwrites_an_existing_blob(tmp_path):
    b = net([("x", (3,))], [("y", (3,))])
    b.add_elementwise("double", ["x"], "y", "MULTIPLY", alpha=2.0)
    b.add_sin("sin", "x", "s")
    b.add_copy("copy", "s", "y")
    x = randn(3)
    harness.assert_close(run(b, tmp_path, x=x)["y"], np.sin(x))


def test_constant_layers_inside_a_body_run_per_sample(tmp_path):
    """fillStatic / loadConstantND have no input to take the sample count from: inside a body each sample runs
    alone, and the results are stacked again."""
    b = net([("x", (2,)), ("n", (1,))], [("acc", (2,))])
    b.add_fill_like("zero", "x", "acc", value=0.0)
    loop = b.add_loop("loop", input_name="n")
    body = sub(loop.loop.bodyNetwork)
    body.add_load_constant_nd("step", "step_value", np.array([1.0, -2.0], np.float32), (2,))
    body.add_add_broadcastable("add", ["acc", "step_value"], "acc_next")
    body.add_copy("copy", "acc_next", "acc")
    counts = np.array([[1], [3], [0]], np.float32)
    out = run(b, tmp_path, x=np.zeros((N, 2), np.float32), n=counts)
    harness.assert_close(out["acc"], counts * np.array([1.0, -2.0]))
