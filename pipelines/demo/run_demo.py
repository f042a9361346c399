"""The demo: build pipelines/demo/demo.yaml through the doit build (cached, incremental) and compare size and
held-out accuracy before and after.

Run from anywhere: `python pipelines/demo/run_demo.py`. Outputs go to `build/demo/` in the repository; the
cache to `.mlqpipe-cache/` (run it twice: the second build is a no-op).
(The quality issue replaces the small forward pass below with mlqpipe's own evaluator and gates.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import mlqpipe
from mlqpipe.build.run import build
from mlqpipe.recipe import load_recipe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def predict(model, X: np.ndarray) -> np.ndarray:
    """A minimal forward pass for the demo's layer types."""
    w = {(r.layer, r.field): r.values() for r in mlqpipe.inventory(model.spec)}
    h = X.astype(np.float32).reshape(len(X), -1)
    for layer in model.spec.neuralNetworkClassifier.layers:
        kind = layer.WhichOneof("layer")
        if kind == "scale":
            h = h * w[(layer.name, "scale")]
        elif kind == "innerProduct":
            h = h @ w[(layer.name, "weights")].T + w.get((layer.name, "bias"), 0)
        elif kind == "convolution":  # an 8x8 'valid' convolution over an 8x8 image is a matrix product
            h = h @ w[(layer.name, "weights")].reshape(len(w[(layer.name, "weights")]), -1).T + w.get((layer.name, "bias"), 0)
        elif kind == "batchnorm":
            g, b, mu, var = (w[(layer.name, f)] for f in ("gamma", "beta", "mean", "variance"))
            h = (h - mu) / np.sqrt(var + layer.batchnorm.epsilon) * g + b
        elif kind == "activation":
            h = np.maximum(h, 0)
    return h.argmax(axis=1)


def main() -> int:
    os.chdir(ROOT)
    data = np.load(HERE / "digits_test.npz")
    X, y = data["X"], data["y"]
    recipe = load_recipe("pipelines/demo/demo.yaml")
    print(f"building {recipe.path}: " + ", ".join(s.label for s in recipe.stages))
    status = build(["pipelines/demo/demo.yaml"])
    if status != 0:
        return status
    print(f"\n{'model':<22}{'bytes before':>14}{'after':>9}{'ratio':>8}{'accuracy before':>18}{'after':>8}")
    for job in recipe.models:
        before, after = job.input.stat().st_size, job.output.stat().st_size
        acc0 = np.mean(predict(mlqpipe.load_model(job.input), X) == y)
        acc1 = np.mean(predict(mlqpipe.load_model(job.output), X) == y)
        print(f"{job.input.name:<22}{before:>14}{after:>9}{before / after:>8.2f}{acc0:>18.3f}{acc1:>8.3f}")
    print(f"outputs in {job.output.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
