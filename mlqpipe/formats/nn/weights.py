"""Reading and writing the storage of one WeightParams.

A WeightParams holds its numbers in exactly one of: floatValue (float32), float16Value, rawValue (n-bit
codes with linear or lookup-table quantization parameters) or int8RawValue. Readers here return float32
numpy arrays; writers replace whatever storage was there, so a blob never ends up with two.
"""

from __future__ import annotations

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.base import Storage
from mlqpipe.formats.nn.packing import unpack_msb_first

STORAGE_FIELDS = ("floatValue", "float16Value", "rawValue", "int8RawValue")


def set_fields(wp) -> list[str]:
    """The storage fields that hold bytes (more than one makes the blob invalid).

    Presence is asked with HasField: reading a bytes field copies it (milliseconds for millions of
    weights), so lengths are only looked at when several fields are present."""
    present = [f for f in STORAGE_FIELDS if wp.HasField(f)]
    if len(present) > 1:
        present = [f for f in present if len(getattr(wp, f))]
    return present


def storage_of(wp) -> Storage:
    fields = set_fields(wp)
    if len(fields) > 1:
        return Storage("conflict")
    if not fields:
        return Storage("empty")
    field = fields[0]
    if field == "floatValue":
        return Storage("float32", 32)
    if field == "float16Value":
        return Storage("float16", 16)
    if field == "int8RawValue":
        return Storage("int8", 8)
    q = wp.quantization
    kind = {"linearQuantization": "linear", "lookupTableQuantization": "lut"}.get(q.WhichOneof("QuantizationType"), "raw")
    return Storage(kind, int(q.numberOfBits))


def stored_count(wp, st: Storage) -> int:
    """How many values a float or int8 blob holds (reads the bytes: call once)."""
    if st.kind == "float32":
        return len(wp.floatValue) // 4
    if st.kind == "float16":
        return len(wp.float16Value) // 2
    if st.kind == "int8":
        return len(wp.int8RawValue)
    return 0


def holds_values(wp, st: Storage, count: int) -> bool:
    """Whether a quantized blob's bytes are enough for `count` values (Core ML's packed-size rule)."""
    if st.kind == "int8":
        return len(wp.int8RawValue) >= count
    return len(wp.rawValue) * 8 >= count * st.nbits


def read_values(wp, count: int, where: str, *, shape=None, axis=None, groups: int = 1) -> np.ndarray:
    """The blob's numbers as a flat float32 array of `count` values (dequantized if needed)."""
    st = storage_of(wp)
    if st.kind == "conflict":
        raise ModelError(f"{where}: several storage fields set ({', '.join(set_fields(wp))}); the model is invalid")
    if st.kind == "empty":
        return np.zeros(0, dtype=np.float32)
    if st.kind in ("float32", "float16"):
        dtype = "<f4" if st.kind == "float32" else "<f2"
        data = wp.floatValue if st.kind == "float32" else wp.float16Value
        if len(data) % np.dtype(dtype).itemsize:
            raise ModelError(f"{where}: {st.kind} data of {len(data)} bytes is not a whole number of values")
        values = np.frombuffer(data, dtype=dtype).astype(np.float32, copy=False)
    else:
        values = _dequantize(wp, st, count, where, shape, axis, groups)
    if count and values.size != count:
        raise ModelError(
            f"{where}: holds {values.size} values but the layer's parameters imply {count} "
            f"(shape {tuple(shape) if shape else (count,)}); the model is inconsistent"
        )
    return values


def _dequantize(wp, st: Storage, count: int, where: str, shape, axis, groups) -> np.ndarray:
    if not count:
        raise ModelError(f"{where}: quantized blob without a known element count")
    if st.kind == "int8":
        codes = np.frombuffer(wp.int8RawValue, dtype=np.int8)[:count].astype(np.float32)
        scale = np.asarray(wp.quantization.linearQuantization.scale, dtype=np.float32)
        return _apply_channel_params(codes, scale, np.zeros(0, np.float32), shape, axis, groups, where)
    if not 1 <= st.nbits <= 8:
        raise ModelError(f"{where}: quantized with numberOfBits={st.nbits}; Core ML allows 1..8")
    try:
        codes = unpack_msb_first(wp.rawValue, count, st.nbits)
    except ValueError as e:
        raise ModelError(f"{where}: {e}") from None
    if st.kind == "lut":
        table = np.asarray(wp.quantization.lookupTableQuantization.floatValue, dtype=np.float32)
        if table.size != 1 << st.nbits:
            raise ModelError(f"{where}: lookup table has {table.size} entries, expected {1 << st.nbits}")
        return table[codes]
    if st.kind != "linear":
        raise ModelError(f"{where}: rawValue without linear or lookup-table quantization parameters")
    lq = wp.quantization.linearQuantization
    scale = np.asarray(lq.scale, dtype=np.float32)
    bias = np.asarray(lq.bias, dtype=np.float32)
    return _apply_channel_params(codes.astype(np.float32), scale, bias, shape, axis, groups, where)


def _apply_channel_params(codes, scale, bias, shape, axis, groups, where) -> np.ndarray:
    """codes * scale + bias with one scale per output channel (or one for all).

    Computed in float64 and rounded once to float32, as coremltools' dequantization does."""
    return _affine(codes.astype(np.float64), scale.astype(np.float64), bias.astype(np.float64), shape, axis, groups, where).astype(np.float32)


def _affine(codes, scale, bias, shape, axis, groups, where) -> np.ndarray:
    if scale.size == 0:
        raise ModelError(f"{where}: linear quantization without scale")
    if bias.size not in (0, scale.size):
        raise ModelError(f"{where}: {bias.size} quantization biases for {scale.size} scales")
    if bias.size == 0:
        bias = np.zeros_like(scale)
    if scale.size == 1:
        return codes * scale[0] + bias[0]
    if shape is None or axis is None:
        raise ModelError(f"{where}: {scale.size} scales on a blob without output channels")
    shape = tuple(shape)
    if axis == 0 and scale.size == shape[0]:
        return (codes.reshape(shape[0], -1) * scale[:, None] + bias[:, None]).ravel()
    if axis == 1 and scale.size == shape[1]:
        w = codes.reshape(shape[0], shape[1], -1)
        return (w * scale[None, :, None] + bias[None, :, None]).ravel()
    if axis == 1 and scale.size == shape[1] * groups and shape[0] % groups == 0:
        # grouped deconvolution with one scale per true output channel
        w = codes.reshape(groups, shape[0] // groups, shape[1], -1)
        s = scale.reshape(groups, 1, shape[1], 1)
        b = bias.reshape(groups, 1, shape[1], 1)
        return (w * s + b).ravel()
    raise ModelError(f"{where}: {scale.size} quantization scales do not match the output channels of shape {shape}")


def clear_storage(wp) -> None:
    for f in STORAGE_FIELDS:
        wp.ClearField(f)
    wp.ClearField("quantization")


def write_float32(wp, values: np.ndarray) -> None:
    clear_storage(wp)
    wp.floatValue = np.ascontiguousarray(values, dtype="<f4").tobytes()


def write_float16(wp, values: np.ndarray) -> None:
    clear_storage(wp)
    wp.float16Value = np.ascontiguousarray(values, dtype="<f2").tobytes()

