"""Helpers shared by the interpreter tests: coremltools conversion (test-only oracle), the comparison rule,
and MIL-builder programs whose reference values come from coremltools' own value inference (the builder
computes an op's value when all its inputs are constants: an implementation independent of ours)."""

from __future__ import annotations

import numpy as np

TOLERANCE = 1e-4  # ||ours - ref||_2 / ||ref||_2 per output, float32 programs


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(ours - ref) / (scale if scale else 1.0))


def assert_close(ours, ref, what: str, tolerance: float = TOLERANCE) -> None:
    ref = np.asarray(ref)
    if ref.dtype.kind in "iub":
        assert np.array_equal(np.asarray(ours), ref), what
        return
    err = relative_error(ours, ref)
    assert err <= tolerance, f"{what}: relative error {err:.3g} > {tolerance}"


def ct():
    import coremltools

    return coremltools


def target(ios: int):
    t = ct().target
    return {15: t.iOS15, 16: t.iOS16, 17: t.iOS17, 18: t.iOS18}[ios]


def convert_program(prog, ios: int, path) -> None:
    """Save a MIL-builder program as written (EMPTY pass pipeline: nothing folded or fused)."""
    c = ct()
    model = c.convert(prog, convert_to="mlprogram", minimum_deployment_target=target(ios),
                      compute_precision=c.precision.FLOAT32, pass_pipeline=c.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(path))


def convert_torch(module, inputs: dict, path, *, ios: int = 16, precision: str = "fp32", outputs: list[str] | None = None) -> None:
    """Trace `module` on `inputs` (name -> example array, batch 1) and save coremltools' ML program (its
    default pass pipeline, as users get it)."""
    import torch

    c = ct()
    examples = tuple(torch.from_numpy(v) for v in inputs.values())
    traced = torch.jit.trace(module.eval(), examples)
    types = [c.TensorType(name=n, shape=v.shape, dtype=v.dtype.type) for n, v in inputs.items()]
    model = c.convert(traced, inputs=types, outputs=[c.TensorType(name=n) for n in outputs] if outputs else None,
                      convert_to="mlprogram", minimum_deployment_target=target(ios),
                      compute_precision=c.precision.FLOAT32 if precision == "fp32" else c.precision.FLOAT16,
                      skip_model_load=True)
    model.save(str(path))


def torch_outputs(module, inputs: dict) -> list[np.ndarray]:
    """torch's outputs, one sample at a time (the model was traced with batch 1), concatenated on axis 0."""
    import torch

    n = next(iter(inputs.values())).shape[0]
    runs = []
    with torch.no_grad():
        for i in range(n):
            got = module.eval()(*(torch.from_numpy(v[i:i + 1]) for v in inputs.values()))
            runs.append([g.numpy() for g in (got if isinstance(got, (tuple, list)) else (got,))])
    return [np.concatenate(outs, axis=0) for outs in zip(*runs)]
