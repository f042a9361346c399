"""A linear digits classifier as an ML program (coremltools 9.0's MIL builder + classifier_config; test-only),
fitted in numpy on the demo's test data, so tests of evaluation have a classifier with a real accuracy and a
reference that is numpy's own arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "digits_test.npz"


def digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA) as d:
        return d["X"].astype(np.float32), d["y"].astype(np.int64)


def fit(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares on one-hot targets: weight [10, 64] on raw pixels (0..16), bias [10], float32."""
    a = np.hstack([x / 16.0, np.ones((len(x), 1), np.float32)]).astype(np.float64)
    w = np.linalg.solve(a.T @ a + 1e-1 * np.eye(a.shape[1]), a.T @ np.eye(10)[y])
    return w[:-1].T.astype(np.float32) / 16.0, w[-1].astype(np.float32)


def softmax_probs(x, weight, bias) -> np.ndarray:
    z = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_classifier(path: Path, weight, bias, labels, ios: int = 18) -> None:
    """softmax(linear(x)) with input `x` [1, 64], classify'd into `labels` (outputs classLabel, classLabel_probs)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb

    target = {16: ct.target.iOS16, 18: ct.target.iOS18}[ios]

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=target)
    def prog(x):
        return mb.softmax(x=mb.linear(x=x, weight=weight, bias=bias, name="fc"), axis=-1, name="probs")

    ct.convert(prog, convert_to="mlprogram", classifier_config=ct.ClassifierConfig(labels), pass_pipeline=ct.PassPipeline.EMPTY,
               minimum_deployment_target=target).save(str(path))
