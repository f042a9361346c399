"""Trained models on scikit-learn's digits (digits.py), converted by coremltools 9.0 to float32 ML programs
with a batch-1 input and run by the interpreter on the whole test split: its logits equal torch's within
the interpreter tolerance, its accuracy equals torch's exactly, and the numpy forward pass the bench times
the interpreter against computes the same logits. Each model is trained and converted once per session."""

from __future__ import annotations

import numpy as np
import pytest

import mlqpipe
from mlqpipe.quality.mil import Interpreter

from . import digits
from .oracle import TOLERANCE, assert_close

pytest.importorskip("torch")
pytest.importorskip("sklearn")
# torch's LSTM checks its input sizes in Python: harmless when tracing the fixed-shape models here
pytestmark = pytest.mark.filterwarnings("ignore:.*might cause the trace to be incorrect")

MIN_ACCURACY = {"convnet": 0.9, "mlp": 0.9, "transformer": 0.85, "lstm": 0.85}  # trained, so accuracy means something
NEAR_TIE = 1e-4  # a top-2 logit gap below this (relative to the logits' scale) may flip an argmax


@pytest.fixture(scope="module")
def trained(digits_cache):
    """`trained(name) -> torch module`, trained once per session."""
    return digits_cache.module


@pytest.fixture(scope="module")
def runs(digits_cache):
    """`runs(name) -> (torch logits, interpreter logits, numpy logits)` on the test split, computed once."""
    _, _, x_test, _ = digits.digits_split()
    done: dict = {}

    def get(name: str):
        if name not in done:
            module = digits_cache.module(name)
            x = digits.as_input(name, x_test)
            interpreter = Interpreter(mlqpipe.load_model(digits_cache.package(name)))
            ours = interpreter.run({digits.INPUT: x})
            assert list(ours) == [digits.OUTPUT]
            assert interpreter.batched, f"{name}: the samples ran one by one"  # the bench's speed depends on it
            done[name] = (digits.torch_logits(module, x), ours[digits.OUTPUT], digits.numpy_forward(name, module)(x))
        return done[name]

    return get


@pytest.mark.parametrize("name", digits.MODELS)
def test_interpreter_logits_equal_torch(runs, name):
    ref, ours, _ = runs(name)
    assert ours.shape == ref.shape == (len(digits.digits_split()[3]), 10)
    assert ours.dtype == np.float32
    assert_close(ours, ref, f"digits {name} logits", TOLERANCE)


@pytest.mark.parametrize("name", digits.MODELS)
def test_interpreter_accuracy_equals_torch(runs, name):
    ref, ours, _ = runs(name)
    labels = digits.digits_split()[3]
    flipped = np.flatnonzero(ours.argmax(-1) != ref.argmax(-1))
    top2 = np.sort(ref[flipped], axis=-1)[:, -2:]
    gaps = (top2[:, 1] - top2[:, 0]) / np.abs(ref).max()
    assert np.all(gaps < NEAR_TIE), f"{name}: argmax differs on samples {flipped.tolist()} with top-2 gaps {gaps.tolist()} (not near-ties)"
    torch_acc, our_acc = digits.accuracy(ref, labels), digits.accuracy(ours, labels)
    assert our_acc == torch_acc, f"{name}: interpreter accuracy {our_acc} != torch {torch_acc} (near-tie flips at {flipped.tolist()})"
    assert torch_acc >= MIN_ACCURACY[name], f"{name}: trained to only {torch_acc:.3f} test accuracy"


@pytest.mark.parametrize("name", digits.MODELS)
def test_numpy_forward_equals_torch(runs, name):
    ref, _, plain = runs(name)
    assert plain.dtype == np.float32
    assert_close(plain, ref, f"digits {name} numpy forward", TOLERANCE)


def test_training_is_deterministic(trained):
    """The MLP trained again gives the same weights bit for bit (fixed seeds, one thread)."""
    a, b = digits.weights(trained("mlp")), digits.weights(digits.train("mlp"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
