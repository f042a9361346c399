"""Evaluator tests: build small models with coremltools' own builders (its NeuralNetworkBuilder and model
classes are independent of mlqpipe), run them with mlqpipe's evaluator, and compare each output with an
independent numpy computation: ||ours - ref||_2 / ||ref||_2 <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest

from mlqpipe.formats.nn.model import load_model
from mlqpipe.quality.evaluate.models import Probabilities, run_model

TOLERANCE = 1e-5


def coremltools():
    """coremltools (test-only), or skip."""
    ct = pytest.importorskip("coremltools")
    return ct


def builder(inputs, outputs, *, nd: bool = True, mode=None):
    """A NeuralNetworkBuilder; inputs/outputs: [(name, shape)] of float32 multiarrays.
    `nd`: disable_rank5_shape_mapping (EXACT_ARRAY_MAPPING), as TF2/PyTorch converters write."""
    ct = coremltools()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    ins = [(n, datatypes.Array(*s)) for n, s in inputs]
    outs = [(n, datatypes.Array(*s) if s else None) for n, s in outputs]
    del ct
    return NeuralNetworkBuilder(ins, outs, disable_rank5_shape_mapping=nd, mode=mode)


def spec_of(builder_or_spec):
    """Our own Model message for a coremltools builder or spec (through bytes: nothing shared)."""
    spec = getattr(builder_or_spec, "spec", builder_or_spec)
    return load_model(spec.SerializeToString()).spec


def run(builder_or_spec, feeds: dict) -> dict:
    """Outputs of mlqpipe's evaluator; feeds: name -> array with the sample axis first."""
    return run_model(spec_of(builder_or_spec), {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()})


def rel_l2(ours, ref) -> float:
    if isinstance(ours, Probabilities):
        ours = ours.values
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(ours, dtype=np.float64).reshape(a.shape)
    norm = np.linalg.norm(a)
    return float(np.linalg.norm(b - a) / norm) if norm else float(np.linalg.norm(b - a))


def assert_close(ours, ref, tol: float = TOLERANCE):
    err = rel_l2(ours, ref)
    assert err <= tol, f"relative L2 error {err:.3g} > {tol}"
