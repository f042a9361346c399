"""Torch models of every op family, converted by coremltools 9.0 (its default pass pipeline, float32
compute), run by the interpreter on several samples at once and compared with torch's outputs:
||ours - torch||_2 / ||torch||_2 <= 1e-4 per output. A float16 conversion is held to FP16_TOLERANCE."""

from __future__ import annotations

import numpy as np
import pytest

import mlqpipe
from mlqpipe.quality.mil import Interpreter

from .oracle import assert_close, convert_torch, torch_outputs
from .torch_models import MODELS, build, example

SEED = int(np.random.default_rng().integers(1 << 30))  # fresh weights every session
FP16_TOLERANCE = 3e-3  # fp16 programs: every op rounded to float16 (MIL fp16 storage); observed ~5e-4


def _package(converted, name: str, precision: str = "fp32"):
    module, specs = build(name, SEED)
    examples = {k: np.zeros(shape, dtype) for k, (shape, dtype) in specs.items()}
    path = converted(f"torch_{name}_{precision}", lambda p: convert_torch(module, examples, p, precision=precision), torch=True)
    return module, specs, path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_model_outputs(converted, name):
    module, specs, path = _package(converted, name)
    inputs = example(specs, 3, np.random.default_rng())
    ours = list(Interpreter(mlqpipe.load_model(path)).run(inputs).values())
    ref = torch_outputs(module, inputs)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"{name} output {i}")


def test_fp16_program_within_fp16_tolerance(converted):
    module, specs, path = _package(converted, "conv2d", "fp16")
    model = mlqpipe.load_model(path)
    ops = {op.type for op in Interpreter(model).block.operations}
    assert "cast" in ops  # the converter runs the program in fp16 between casts
    inputs = example(specs, 2, np.random.default_rng())
    ours = list(Interpreter(model).run(inputs).values())
    for i, (a, b) in enumerate(zip(ours, torch_outputs(module, inputs))):
        assert_close(a, b, f"fp16 conv2d output {i}", FP16_TOLERANCE)
