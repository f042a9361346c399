"""The demo: quantize the digits model in several modes and compare size and held-out accuracy.

Run from the repository root: `python pipelines/demo/run_demo.py`. Outputs go to `build/demo/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import mlqpipe

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "build" / "demo"


def predict(model, X: np.ndarray) -> np.ndarray:
    """A minimal forward pass for this demo's layer types (scale, innerProduct, ReLU, softmax)."""
    weights = {(r.layer, r.field): r.values() for r in mlqpipe.inventory(model.spec)}
    h = X.astype(np.float32)
    for layer in model.spec.neuralNetworkClassifier.layers:
        kind = layer.WhichOneof("layer")
        if kind == "scale":
            h = h * weights[(layer.name, "scale")]
        elif kind == "innerProduct":
            h = h @ weights[(layer.name, "weights")].T + weights[(layer.name, "bias")]
        elif kind == "activation":
            h = np.maximum(h, 0)
    return h.argmax(axis=1)


def main() -> int:
    data = np.load(HERE / "digits_test.npz")
    X, y = data["X"], data["y"]
    source = HERE / "digits_mlp.mlmodel"
    float_model = mlqpipe.load_model(source)
    base_acc = float(np.mean(predict(float_model, X) == y))
    print(f"{'mode':<22}{'bytes':>9}{'ratio':>8}{'accuracy':>10}")
    print(f"{'float32':<22}{source.stat().st_size:>9}{1.0:>8.2f}{base_acc:>10.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    for nbits, mode in [(16, "linear"), (8, "linear"), (4, "linear"), (4, "kmeans_lut"), (2, "kmeans_lut")]:
        q = mlqpipe.quantize_weights(source, nbits, mode)
        path = OUT / f"digits_{mode}{nbits}.mlmodel"
        q.save(path)
        size = path.stat().st_size
        acc = float(np.mean(predict(q, X) == y))
        label = "fp16" if nbits == 16 else f"{mode} {nbits}-bit"
        print(f"{label:<22}{size:>9}{source.stat().st_size / size:>8.2f}{acc:>10.3f}")
    print(f"outputs in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
