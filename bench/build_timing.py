"""Build timings on 50 small generated models with one recipe each (deterministic, no downloads).

    python bench/build_timing.py

Prints the cold build, the no-op build (plain, and after touching every input without changing it) and a
one-changed-model rebuild, each the median of several runs of `mlqpipe build` as a fresh process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlqpipe.formats.nn import proto
from mlqpipe.formats.description import describe

N = 50
RECIPE = """version: 1
models:
  - {{input: ../models/m{i:02d}.mlmodel, output: '../out/{{stem}}.q.mlmodel'}}
rules:
  big: {{layer_type: innerProduct, field: weights, count: {{min: 1000}}}}
  rest: {{storage: float32}}
stages:
  - {{name: big, mode: linear, nbits: {nbits}, rules: [big]}}
  - {{name: rest, mode: fp16, rules: [rest]}}
"""


def make_model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    m = proto.Model(specificationVersion=1)
    blob = "x"
    for j, (i, o) in enumerate([(64, 128), (128, 64), (64, 10)]):
        layer = m.neuralNetwork.layers.add(name=f"dense_{j}", input=[blob], output=[f"h{j}"])
        ip = layer.innerProduct
        ip.inputChannels, ip.outputChannels, ip.hasBias = i, o, True
        ip.weights.floatValue = (rng.standard_normal(i * o) * 0.05).astype("<f4").tobytes()
        ip.bias.floatValue = (rng.standard_normal(o) * 0.05).astype("<f4").tobytes()
        blob = f"h{j}"
    return describe(m, [("x", [64])], [(blob, [10])]).SerializeToString()


def run(cwd: Path, *args) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlqpipe.cli", "build", "recipes/*.yaml", *args], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return elapsed


def median(fn, n=5) -> float:
    return statistics.median(fn() for _ in range(n))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "models").mkdir()
        (root / "recipes").mkdir()
        for i in range(N):
            (root / "models" / f"m{i:02d}.mlmodel").write_bytes(make_model(i))
            (root / "recipes" / f"r{i:02d}.yaml").write_text(RECIPE.format(i=i, nbits=8))
        cold = run(root)
        noop = median(lambda: run(root))
        later = time.time() + 10
        for p in (root / "models").iterdir():
            os.utime(p, (later, later))
        touched = median(lambda: run(root))
        (root / "recipes" / "r07.yaml").write_text(RECIPE.format(i=7, nbits=4))
        one = run(root)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlqpipe.cli", "--help"], capture_output=True)
        help_time = time.perf_counter() - t
    print(f"{'build, 50 recipes (fresh process each)':<46}{'seconds':>9}")
    for name, value in [("cold build", cold), ("no-op build (median of 5)", noop), ("no-op after touching every input", touched),
                        ("one changed recipe", one), ("mlqpipe --help", help_time)]:
        print(f"{name:<46}{value:>9.3f}")


if __name__ == "__main__":
    main()
