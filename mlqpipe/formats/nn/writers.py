"""Kernel results into a neural network's WeightParams, and what each storage costs in bytes.

The kernels (mlqpipe/quant) say which numbers; this says how the format holds them: codes packed most
significant bit first in rawValue, linear scales and biases beside them, a 2**nbits table. Each writer
replaces the blob's storage, so a blob never ends up with two storage fields."""

from __future__ import annotations

import numpy as np

from mlqpipe.formats.nn.packing import pack_msb_first, packed_size
from mlqpipe.formats.nn.weights import Storage, clear_storage, storage_of, write_float16, write_float32
from mlqpipe.quant.results import Float16Result, Float32Result, LinearResult, LutResult


def write_result(rec, result, *, keep_empty_quantization: bool = False) -> None:
    """Put `result` into `rec`'s blob. `keep_empty_quantization`: leave an empty `quantization {}` where
    coremltools leaves one, for byte equality (Core ML ignores it next to float storage)."""
    _WRITERS[type(result)](rec, result, keep_empty_quantization)


def _float32(rec, r: Float32Result, keep: bool) -> None:
    keep = keep and storage_of(rec.wp).kind in ("linear", "lut")  # coremltools dequantizes in place
    write_float32(rec.wp, r.values)
    if keep:
        rec.wp.quantization.SetInParent()


def _float16(rec, r: Float16Result, keep: bool) -> None:
    keep = keep and rec.wp.HasField("quantization")  # coremltools leaves it
    write_float16(rec.wp, r.values)
    if keep:
        rec.wp.quantization.SetInParent()


def _linear(rec, r: LinearResult, keep: bool) -> None:
    scale, bias = r.scale, r.bias
    if rec.layer_type == "convolution" and r.axis == 1 and rec.groups > 1:
        # grouped deconvolution: Core ML wants 1 or outputChannels scales; the per-(out/groups) scales
        # repeated for every group read the same whichever way a runtime indexes them
        scale, bias = np.tile(scale, rec.groups), np.tile(bias, rec.groups)
    wp = rec.wp
    clear_storage(wp)
    wp.quantization.numberOfBits = r.nbits
    wp.quantization.linearQuantization.scale.extend(np.asarray(scale, dtype=np.float32).tolist())
    wp.quantization.linearQuantization.bias.extend(np.asarray(bias, dtype=np.float32).tolist())
    wp.rawValue = pack_msb_first(r.codes, r.nbits)


def _lut(rec, r: LutResult, keep: bool) -> None:
    wp = rec.wp
    clear_storage(wp)
    wp.quantization.numberOfBits = r.nbits
    wp.quantization.lookupTableQuantization.floatValue.extend(np.asarray(r.lut, dtype=np.float32).tolist())
    wp.rawValue = pack_msb_first(r.indices, r.nbits)


_WRITERS = {Float32Result: _float32, Float16Result: _float16, LinearResult: _linear, LutResult: _lut}


def stored_bytes(rec, st: Storage) -> int:
    """Stored bytes of a blob of rec's size in storage `st` (quantization parameters included); other
    kinds (int8, raw) count as linear: codes plus a scale and bias per channel."""
    return _SIZES.get(st.kind, _linear_size)(rec, st)


def _linear_size(rec, st: Storage) -> int:
    channels = rec.shape[rec.axis] if rec.axis is not None and rec.shape else 1
    if rec.layer_type == "convolution" and rec.axis == 1:
        channels *= rec.groups  # grouped deconvolution: the scales are repeated per group (see _linear)
    return packed_size(rec.count, st.nbits) + 8 * channels


_SIZES = {
    "float32": lambda rec, st: 4 * rec.count,
    "float16": lambda rec, st: 2 * rec.count,
    "lut": lambda rec, st: packed_size(rec.count, st.nbits) + 4 * (1 << st.nbits),
    "linear": _linear_size,
}
