"""ND models through mlqpipe's public path: quantize_weights, then compare.evaluate on the float and quantized
models; and what "not evaluated" looks like for an ND setting the evaluator does not run."""

import numpy as np
import pytest

import mlqpipe
from mlqpipe.formats.nn.inventory import inventory
from mlqpipe.quality.evaluate.compare import evaluate

from . import harness


def keras_like_classifier():
    """Dense(16 -> 10) as batchedMatmul, its bias as loadConstantND + addBroadcastable, softmax over the last
    axis: what the TF2 converter writes for a Keras Dense + softmax on a (4, 16) input."""
    rng = np.random.default_rng(0)
    b = harness.builder([("x", (4, 16))], [("probs", (4, 10))], nd=True)
    b.add_batched_mat_mul("dense", ["x"], "logits", weight_matrix_rows=16, weight_matrix_columns=10,
                          W=rng.standard_normal((16, 10)).astype(np.float32) / 4)
    b.add_load_constant_nd("bias", "bias_value", rng.standard_normal(10).astype(np.float32), (10,))
    b.add_add_broadcastable("add", ["logits", "bias_value"], "biased")
    b.add_softmax_nd("softmax", "biased", "probs", axis=-1)
    return harness.spec_of(b)


def test_quantized_nd_model_is_evaluated_with_a_small_error():
    float_spec = keras_like_classifier()
    quant_spec = mlqpipe.quantize_weights(float_spec.SerializeToString(), 8, "linear").spec
    assert {str(r.storage) for r in inventory(quant_spec)} == {"linear8"}  # weights and the bias constant
    r = evaluate(float_spec, quant_spec, None, samples=8)
    assert r.evaluated, r.reason
    assert r.samples == 8 and r.random_inputs
    err = r.outputs["probs"]["relative_l2"]
    assert 0 < err < 0.01


def test_unimplemented_nd_setting_is_not_evaluated_and_names_the_layer():
    spec = keras_like_classifier()
    spec.neuralNetwork.layers[0].batchedMatmul.int8DynamicQuantize = True  # runtime input quantization: undocumented
    r = evaluate(spec, spec, None, samples=4)
    assert not r.evaluated
    assert "layer 'dense' (batchedMatmul)" in r.reason and "int8DynamicQuantize" in r.reason
    assert "not implemented by mlqpipe's evaluator" in r.reason


@pytest.mark.parametrize("build", ["randomNormalLike", "interleave_mismatch"])
def test_unimplemented_nd_layer_types_and_shapes_are_not_evaluated(build):
    b = harness.builder([("x", (2, 3)), ("y", (2, 4))], [("out", None)], nd=True)
    if build == "randomNormalLike":
        b.add_random_normal_like("noise", "x", "out")  # Core ML's generator cannot be reproduced
        name = "noise"
    else:
        b.add_concat_nd("cat", ["x", "y"], "out", axis=-1, interleave=True)  # interleave needs equal shapes
        name = "cat"
    r = evaluate(harness.spec_of(b), harness.spec_of(b), None, samples=4)
    assert not r.evaluated and f"layer '{name}'" in r.reason
