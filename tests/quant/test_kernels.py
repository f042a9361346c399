"""quant/kernels.py: every mode's kernel returns a neutral result (numbers, no format) whose values
reconstruct the weights; the neural-network writer (formats/nn/writers.py) packs them."""

import numpy as np
import pytest

from mlqpipe.errors import ModelError
from mlqpipe.quant import kernels
from mlqpipe.quant.results import Float16Result, Float32Result, LinearResult, LutResult


def _w():
    return (np.random.default_rng(3).standard_normal((4, 5, 3)) * np.array([0.1, 1, 5, 0.01])[:, None, None]).astype(np.float32)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_linear_codes_in_blob_order_one_scale_per_channel(axis):
    w = _w()
    r = kernels.linear(w, kernels.KernelSettings(nbits=8, axis=axis))
    assert isinstance(r, LinearResult) and r.nbits == 8 and r.axis == axis and r.codes.shape == (w.size,)
    assert r.scale.size == (1 if axis is None else w.shape[axis])
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    back = r.codes.reshape(w.shape) * r.scale.reshape(shape) + r.bias.reshape(shape)
    assert np.all(np.abs(back - w) <= r.scale.reshape(shape) / 2 * (1 + 1e-4) + 1e-7)


@pytest.mark.parametrize("kernel", [kernels.linear_lut, kernels.kmeans_lut])
def test_lut_kernels_give_a_full_table(kernel):
    w = _w()
    r = kernel(w, kernels.KernelSettings(nbits=3))
    assert isinstance(r, LutResult) and r.lut.size == 8 and r.indices.size == w.size and r.indices.max() < 8


def test_custom_lut_is_checked_and_named():
    w = _w()
    r = kernels.custom_lut(w, kernels.KernelSettings(nbits=1, lut_function=lambda n, v: ([0.0, 1.0], (v.ravel() > 0).astype(int))))
    assert r.lut.tolist() == [0.0, 1.0] and r.indices.size == w.size
    with pytest.raises(ModelError, match="here: custom LUT has 3 entries"):
        kernels.custom_lut(w, kernels.KernelSettings(nbits=1, lut_function=lambda n, v: ([0, 1, 2], np.zeros(v.size)), where="here"))


def test_float_kernels():
    w = _w()
    assert isinstance(kernels.float32(w, kernels.KernelSettings()), Float32Result)
    r = kernels.float16(w, kernels.KernelSettings())
    assert isinstance(r, Float16Result) and r.values.dtype == np.float16 and r.values.shape == (w.size,)
    with pytest.raises(ModelError, match="w: values up to 70000 do not fit float16"):
        kernels.float16(np.array([70000.0], np.float32), kernels.KernelSettings(where="w"))
