"""Torch models of every op family, converted by coremltools 9.0 (its default pass pipeline, float32
compute), run by the interpreter on several samples at once and compared with torch's outputs:
||ours - torch||_2 / ||torch||_2 <= 1e-4 per output. A float16 conversion is held to FP16_TOLERANCE. Each
converted program must hold the op types and settings its family is tested with (torch_models.EXPECTED_OPS,
EXPECTED_SETTINGS): converters fuse and rewrite, and coverage must not vanish unseen."""

from __future__ import annotations

import numpy as np
import pytest

import mlqpipe
from mlqpipe.formats.mlprogram import constexpr
from mlqpipe.formats.mlprogram.program import const_value, walk
from mlqpipe.quality.mil import Interpreter

from .oracle import assert_close, convert_torch, torch_outputs
from .torch_models import EXPECTED_OPS, EXPECTED_SETTINGS, MODELS, build, example

SEED = int(np.random.default_rng().integers(1 << 30))  # fresh weights every session
FP16_TOLERANCE = 3e-3  # fp16 programs: every op rounded to float16 (unit roundoff 4.9e-4); observed up to 1e-3


def op_types(path) -> set[str]:
    """Every op type of the package's program, nested blocks included."""
    return {site.op.type for site in walk(mlqpipe.load_model(path).spec.mlProgram, str(path))}


def op_settings(path) -> set[tuple]:
    """(op type, input, value) of every input bound to a one-value const (strings, flags, numbers)."""
    model = mlqpipe.load_model(path)
    consts, out = {}, set()
    for site in walk(model.spec.mlProgram, str(path)):
        op = site.op
        if op.type == "const" and const_value(op) is not None:
            value = constexpr.read_value(model, const_value(op), str(path))
            if isinstance(value, str) or np.size(value) == 1:
                consts[op.outputs[0].name] = value if isinstance(value, str) else np.asarray(value).reshape(-1)[0]
        for entry in op.inputs:
            names = [b.name for b in entry.value.arguments if b.WhichOneof("binding") == "name"]
            if len(names) == 1 and names[0] in consts:
                value = consts[names[0]]
                out.add((op.type, entry.key, value.item() if isinstance(value, np.generic) else value))
    return out


def assert_contains(path, types: set[str], settings=()) -> None:
    """The program holds these op types and settings (so a converter's rewrite cannot drop a family unseen)."""
    have = op_types(path)
    assert types <= have, f"op types missing from the converted program: {sorted(types - have)}"
    missing = set(settings) - op_settings(path)
    assert not missing, f"settings missing from the converted program: {sorted(missing, key=str)}"


def _package(converted, name: str, precision: str = "fp32"):
    module, specs = build(name, SEED)
    examples = {k: np.zeros(shape, dtype) for k, (shape, dtype) in specs.items()}
    path = converted(f"torch_{name}_{precision}", lambda p: convert_torch(module, examples, p, precision=precision), torch=True)
    return module, specs, path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_model_outputs(converted, name):
    module, specs, path = _package(converted, name)
    assert_contains(path, EXPECTED_OPS[name], EXPECTED_SETTINGS.get(name, ()))
    assert_reproduces_torch(path, module, specs, name)


def assert_reproduces_torch(path, module, specs: dict, name: str, samples: int = 3) -> None:
    """The interpreter's outputs of the package on random samples equal torch's, output by output."""
    inputs = example(specs, samples, np.random.default_rng())
    ours = list(Interpreter(mlqpipe.load_model(path)).run(inputs).values())
    ref = torch_outputs(module, inputs)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"{name} output {i}")


@pytest.mark.parametrize("name", ["conv2d", "activations"])
def test_fp16_program_within_fp16_tolerance(converted, name):
    """fp16 compute (the converter casts the fp32 inputs to fp16): every output within FP16_TOLERANCE. Only
    continuous ops: rounding to fp16 moves floor / comparison / argmax results across their steps."""
    module, specs, path = _package(converted, name, "fp16")
    assert_contains(path, {"cast"} | EXPECTED_OPS[name])
    inputs = example(specs, 2, np.random.default_rng())
    ours = list(Interpreter(mlqpipe.load_model(path)).run(inputs).values())
    ref = torch_outputs(module, inputs)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"fp16 {name} output {i}", FP16_TOLERANCE)
