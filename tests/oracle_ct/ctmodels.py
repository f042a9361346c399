"""Test models built with coremltools' own protobuf classes, and a quiet coremltools quantize_weights."""

from __future__ import annotations

import contextlib
import io

import numpy as np

ct = None


def setup():
    global ct
    import coremltools

    ct = coremltools


def proto():
    from coremltools.proto import Model_pb2

    return Model_pb2


def ct_quantize(spec_bytes: bytes, nbits, mode, **kw):
    from coremltools.models.neural_network import quantization_utils as qu

    spec = proto().Model.FromString(spec_bytes)
    with contextlib.redirect_stdout(io.StringIO()):
        out = qu.quantize_weights(ct.models.MLModel(spec), nbits, mode, **kw)
    return out.get_spec() if hasattr(out, "get_spec") else out


def canonical(data: bytes) -> bytes:
    return proto().Model.FromString(data).SerializeToString(deterministic=True)


def rnd(*shape, seed=0, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def base(kind="neuralNetwork"):
    m = proto().Model(specificationVersion=1)
    getattr(m, kind).SetInParent()
    return m


def nn(m):
    return getattr(m, m.WhichOneof("Type"))


def conv(net, name, inp, out, oc, kc, k=3, groups=1, bias=True, deconv=False, seed=0, fp16=False):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    c = layer.convolution
    c.outputChannels, c.kernelChannels, c.nGroups = oc, kc, groups
    c.kernelSize.extend([k, k])
    c.valid.SetInParent()
    c.isDeconvolution = deconv
    shape = (kc, oc // groups, k, k) if deconv else (oc, kc, k, k)
    _fill(c.weights, rnd(*shape, seed=seed), fp16)
    if bias:
        c.hasBias = True
        _fill(c.bias, rnd(oc, seed=seed + 1), fp16)
    return layer


def inner(net, name, inp, out, ic, oc, bias=True, seed=0, fp16=False):
    layer = net.layers.add(name=name, input=[inp], output=[out])
    p = layer.innerProduct
    p.inputChannels, p.outputChannels = ic, oc
    _fill(p.weights, rnd(oc, ic, seed=seed), fp16)
    if bias:
        p.hasBias = True
        _fill(p.bias, rnd(oc, seed=seed + 1), fp16)
    return layer


def _fill(wp, values, fp16=False):
    if fp16:
        wp.float16Value = values.astype("<f2").tobytes()
    else:
        wp.floatValue.extend(values.ravel().tolist())
