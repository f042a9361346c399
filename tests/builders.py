"""Tiny model builders on mlqpipe's own message classes (no coremltools needed)."""

from __future__ import annotations

import numpy as np

from mlqpipe.formats.nn import proto
from mlqpipe.formats.description import describe  # noqa: F401  (tests import it from here)

_rng = np.random.default_rng(1234)


def weights(*shape, seed=None, scale=0.1) -> np.ndarray:
    rng = np.random.default_rng(seed) if seed is not None else _rng
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def set_float(wp, values, dtype="<f4"):
    if dtype == "<f2":
        wp.float16Value = np.asarray(values, dtype="<f2").tobytes()
    else:
        wp.floatValue = np.asarray(values, dtype="<f4").tobytes()


def model(kind="neuralNetwork", version=1):
    m = proto.Model(specificationVersion=version)
    getattr(m, kind).SetInParent()
    return m


def network(m):
    return getattr(m, m.WhichOneof("Type"))


def add_inner_product(nn, name, inp, out, ic, oc, bias=True, dtype="<f4", seed=None):
    layer = nn.layers.add(name=name, input=[inp], output=[out])
    p = layer.innerProduct
    p.inputChannels, p.outputChannels = ic, oc
    set_float(p.weights, weights(oc, ic, seed=seed), dtype)
    if bias:
        p.hasBias = True
        set_float(p.bias, weights(oc, seed=seed), dtype)
    return layer


def add_conv(nn, name, inp, out, oc, kc, k=3, groups=1, bias=True, deconv=False, dtype="<f4", seed=None):
    layer = nn.layers.add(name=name, input=[inp], output=[out])
    c = layer.convolution
    c.outputChannels, c.kernelChannels, c.nGroups = oc, kc, groups
    c.kernelSize.extend([k, k])
    c.valid = b""
    c.isDeconvolution = deconv
    shape = (kc, oc // groups, k, k) if deconv else (oc, kc, k, k)
    set_float(c.weights, weights(*shape, seed=seed), dtype)
    if bias:
        c.hasBias = True
        set_float(c.bias, weights(oc, seed=seed), dtype)
    return layer


def add_activation(nn, name, inp, out):
    layer = nn.layers.add(name=name, input=[inp], output=[out])
    layer.activation.ReLU = b""
    return layer


def small_model(dtype="<f4") -> "proto.Model":
    m = model()
    nn = network(m)
    add_conv(nn, "conv1", "x", "c1", oc=8, kc=4, seed=1, dtype=dtype)
    add_activation(nn, "relu1", "c1", "r1")
    add_inner_product(nn, "dense", "r1", "y", ic=32, oc=10, seed=2, dtype=dtype)
    return describe(m, [("x", [4, 4, 4])], [("y", [10])])


def deconvolution_model():
    """A one-layer deconvolution model with a declared input and output."""
    m = model()
    add_conv(network(m), "up", "x", "y", oc=2, kc=2, k=2, deconv=True, seed=3)
    return describe(m, [("x", [2, 4, 4])], [("y", [2, 5, 5])])


def unevaluable_model():
    """innerProduct -> a custom layer: quantizable weights, and a layer type mlqpipe's evaluator cannot run
    (its computation lives in the app), so evaluating it always reports "not evaluated"."""
    m = model(version=3)  # custom layers need specification 3
    nn = network(m)
    add_inner_product(nn, "dense", "x", "h", ic=4, oc=3, seed=3)
    nn.layers.add(name="custom", input=["h"], output=["y"]).custom.className = "AppLayer"
    return describe(m, [("x", [4])], [("y", [3])])




def conv_batchnorm_model(empty: str | None = None, scale_after: bool = False):
    """conv (4 out) -> batchnorm [-> scale]; `empty` names a batchnorm parameter left without values."""
    m = model()
    nn = network(m)
    add_conv(nn, "conv", "x", "c", oc=4, kc=3, seed=1)
    bn = nn.layers.add(name="bn", input=["c"], output=["b" if scale_after else "y"]).batchnorm
    bn.channels, bn.epsilon = 4, 1e-5
    for f in ("gamma", "beta", "mean", "variance"):
        if f != empty:
            set_float(getattr(bn, f), np.abs(weights(4, seed=7)) + 0.5)
    if scale_after:
        sc = nn.layers.add(name="sc", input=["b"], output=["y"]).scale
        sc.shapeScale.extend([4])
        set_float(sc.scale, weights(4, seed=8) + 1)
    return describe(m, [("x", [3, 8, 8])], [("y", [4, 6, 6])])


def layer_types(m) -> list[str]:
    return [layer.WhichOneof("layer") for layer in network(m).layers]


def write_fleet(root, n: int, nbits: int = 8):
    """bench/build_timing.py's fleet under `root`: models/mNN.mlmodel (three innerProducts, seeded) and one
    recipe per model, recipes/rNN.yaml (linear `nbits` on the big matrices, fp16 for the rest)."""
    from pathlib import Path

    from bench.build_timing import RECIPE, make_model

    root = Path(root)
    (root / "models").mkdir(parents=True)
    (root / "recipes").mkdir()
    for i in range(n):
        (root / "models" / f"m{i:02d}.mlmodel").write_bytes(make_model(i))
        (root / "recipes" / f"r{i:02d}.yaml").write_text(RECIPE.format(i=i, nbits=nbits))
    return root

