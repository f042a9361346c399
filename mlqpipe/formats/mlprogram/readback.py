"""An already compressed ML-program weight read back into its kernel result (quant/results.py), so that a
later `joint: true` stage can compress on top of it (prune, then palettize or quantize the nonzero values;
palettize, then quantize the LUT).

Every form the writers produce and coremltools 9.0 writes is understood: iOS16/17 attribute forms (read
into the iOS18 layout: a LUT [1…1, 2^n, 1], indices in the weight's shape, scale and zero point with the
weight's rank) and iOS18 chains — a quantized LUT, a per-channel-scaled LUT in coremltools' canonical
form (table repeated along the scale's axes: folded back where the copies are equal) or scaling the dense
weight, lut_to_sparse / sparse_blockwise_shift_scale feeding sparse_to_dense. The arrays are decoded
copies (sub-byte codes as uint8/int8), independent of the model's weight file.
"""

from __future__ import annotations

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import constexpr, proto
from mlqpipe.formats.mlprogram.packing import WIDTHS, unpack_lsb_first
from mlqpipe.quant.results import AffineResult, PaletteResult, SparseResult

_CODES = {proto.INT8: "int8", proto.UINT8: "uint8", proto.INT4: "int4", proto.UINT4: "uint4"}
_INDEX_BITS = {proto.UINT1: 1, proto.UINT2: 2, proto.UINT3: 3, proto.UINT4: 4, proto.UINT6: 6, proto.UINT8: 8}
_FLOATS = (proto.FLOAT16, proto.FLOAT32)


class _Other(Exception):
    """A form that has no kernel result (constexpr_cast, float zero points, …): the weight reads back as None."""


def compressed_result(rec) -> SparseResult | PaletteResult | AffineResult | None:
    """The result a compressed weight's chain encodes; None for a plain const and for forms no result
    describes (fp16 storage, a chain shape no kernel writes). Damaged parameters raise ModelError."""
    if not rec.compressed or rec.handle.output != 0:
        return None
    handle = rec.handle
    try:
        return _result(_Op(handle.model, handle.producers, handle.site))
    except _Other:
        return None
    except (ValueError, TypeError, IndexError) as e:  # numpy's complaints about parameters that do not fit
        raise ModelError(f"{handle.model.source}: {rec.where}: {e}; the model is damaged (re-export it)") from None


class _Op:
    """One constexpr site with its parameters: literals decoded (with their MIL dtype), names resolved to
    the upstream op and output index."""

    def __init__(self, model, by_name: dict, site):
        self.model, self.by_name, self.site = model, by_name, site
        where = f"{model.source}: op '{site.name}' ({site.op.type})"
        self.entry = constexpr.lookup(site.op, constexpr.opset_of(model, site), where)
        self.type, self.form, self.where = site.op.type, self.entry.form, where
        self.raw = {k: v for k, v in constexpr.parameter_values(site.op).items() if v is not None}
        missing = [p for p in self.entry.required if p not in self.raw]
        if missing:
            raise ModelError(f"{where}: parameter(s) {', '.join(missing)} missing (it needs {', '.join(self.entry.required)}); "
                             "the model is damaged (re-export it)")

    def bound(self, key: str) -> tuple[_Op, int] | None:
        """(upstream op, output index) when `key` is bound to a constexpr's output, else None."""
        v = self.raw.get(key)
        if not isinstance(v, str):
            return None
        found = self.by_name.get(v)
        if found is None or not constexpr.is_constexpr(found[0].op.type):
            raise _Other  # a const feeding a constexpr (not what coremltools writes) or damage, which decode reports
        return _Op(self.model, self.by_name, found[0]), found[1]

    def array(self, key: str) -> tuple[np.ndarray, int] | None:
        """(decoded copy, MIL dtype) of a literal parameter; None when absent; _Other when bound."""
        v = self.raw.get(key)
        if v is None:
            return None
        if isinstance(v, str):
            raise _Other
        return np.array(constexpr.read_value(self.model, v, f"{self.where} parameter {key}")), v.type.tensorType.dataType


def _result(op: _Op):
    kinds = {"constexpr_blockwise_shift_scale": _blockwise, "constexpr_affine_dequantize": _affine16,
             "constexpr_lut_to_dense": _lut, "constexpr_sparse_to_dense": _sparse}
    reader = kinds.get(op.type)
    if reader is None:
        raise _Other
    return reader(op)


def _unpack(op: _Op, packed: np.ndarray, nbits: int, shape: tuple) -> np.ndarray:
    """iOS16 packed codes (LSB first) in `shape`, their byte count checked."""
    count = int(np.prod(shape))
    need = (count * nbits + 7) // 8
    if packed.size != need:
        raise ModelError(f"{op.where}: {packed.size} bytes of packed codes; {count} values of {nbits} bits need {need} "
                         "(the model is damaged: re-export it)")
    return unpack_lsb_first(np.ascontiguousarray(packed.reshape(-1), np.uint8), nbits, count).reshape(shape)


# -- linear ------------------------------------------------------------------------------------------------


def _affine18(op: _Op, data_key: str) -> AffineResult:
    data, code = op.array(data_key)
    if code not in _CODES:
        raise _Other
    scale, _ = op.array("scale")
    offset = op.array("offset")
    return AffineResult(data, scale, None if offset is None else offset[0].astype(data.dtype), _CODES[code])


def _blockwise(op: _Op):
    """Quantized weight, or (lut_to_dense → blockwise_shift_scale) a LUT whose dense output is scaled."""
    up = op.bound("data")
    if up is None:
        return _affine18(op, "data")
    lut_op, _ = up
    if lut_op.type != "constexpr_lut_to_dense" or op.raw.get("offset") is not None:
        raise _Other
    palette = _lut(lut_op)
    scale, _ = op.array("scale")
    shape = tuple(np.shape(palette.indices))  # not vector-palettized here: the weight's shape
    if palette.per_channel_scale is not None or palette.vector_axis is not None:
        raise _Other
    if scale.ndim != len(shape) or any(s not in (1, n) for s, n in zip(scale.shape, shape)):
        raise _Other  # blockwise scales of a dense weight: no per-channel scale says that
    return PaletteResult(palette.lut, palette.indices, palette.nbits, None, scale)


def _affine16(op: _Op) -> AffineResult:
    """iOS16 scale · (q − zp) along `axis`, in the iOS18 layout (scale with the weight's rank)."""
    q, code = op.array("quantized_data")
    zp, zp_code = op.array("zero_point")
    scale, _ = op.array("scale")
    axis, _ = op.array("axis")
    if code not in _CODES or zp_code != code:
        raise _Other  # a float zero point: not what a kernel writes
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[int(axis) % q.ndim] = scale.size
    zero = np.broadcast_to(zp.reshape(-1), (scale.size,)) if zp.size == 1 else zp.reshape(-1)
    zero = zero.reshape(shape).astype(q.dtype)
    symmetric = _CODES[code] == "int8" and not zero.any()
    return AffineResult(q, scale.reshape(shape), None if symmetric else zero, _CODES[code])


# -- LUTs ----------------------------------------------------------------------------------------------------


def _lut(op: _Op) -> PaletteResult:
    if op.form == "ios16":
        lut, _ = op.array("lut")
        packed, _ = op.array("indices")
        shape = tuple(int(d) for d in op.array("shape")[0].reshape(-1))
        nbits = lut.size.bit_length() - 1
        if lut.size != 1 << nbits or nbits not in WIDTHS:
            raise ModelError(f"{op.where}: the lut has {lut.size} entries; it must have 2, 4, 8, 16, 64 or 256 "
                             "(the model is damaged: re-export it)")
        indices = _unpack(op, packed, nbits, shape)
        return PaletteResult(lut.reshape((1,) * len(shape) + (lut.size, 1)), indices.astype(np.uint8), nbits, None)
    indices, code = op.array("indices")
    if code not in _INDEX_BITS:
        raise _Other
    table, scale = _table(op)
    vector = op.array("vector_axis")
    return PaletteResult(table, indices.astype(np.uint8), _INDEX_BITS[code], None if vector is None else int(vector[0]), scale)


def _table(op: _Op) -> tuple[np.ndarray | AffineResult, np.ndarray | None]:
    """A LUT op's table (float, or quantized) and the per-channel scale applied to it, if any."""
    up = op.bound("lut")
    if up is None:
        return op.array("lut")[0], None
    src, _ = up
    if src.type != "constexpr_blockwise_shift_scale":
        raise _Other
    inner = src.bound("data")
    if inner is None:
        data, code = src.array("data")
        if code in _CODES:  # a quantized LUT (coremltools' joint palettize + quantize)
            return _affine18(src, "data"), None
        if code not in _FLOATS:
            raise _Other
        table = data
    elif inner[0].type == "constexpr_blockwise_shift_scale" and inner[0].bound("data") is None:
        table = _affine18(inner[0], "data")  # a quantized LUT, then scaled per channel (mlqpipe's form)
    else:
        raise _Other
    if src.raw.get("offset") is not None:
        raise _Other
    scale, _ = src.array("scale")
    if scale.ndim < 2 or scale.shape[-2:] != (1, 1):
        raise _Other  # a scale per LUT entry: no per-channel scale says that
    return _fold(table, scale), scale.reshape(scale.shape[:-2])


def _fold(table, scale: np.ndarray):
    """The table with the copies the canonical per-channel-scaled form made (one per scale entry) folded
    back to one wherever they are all equal."""
    data = table.data if isinstance(table, AffineResult) else table
    for axis in range(scale.ndim - 2):
        first = data.take([0], axis)
        if scale.shape[axis] > 1 and data.shape[axis] > 1 and np.array_equal(data, np.broadcast_to(first, data.shape)):
            data = first
    if isinstance(table, AffineResult):
        if any(s != 1 for s in np.shape(table.scale)):
            return table  # blockwise-scaled codes: keep the layout they were quantized in
        return AffineResult(data, table.scale, table.zero_point, table.dtype)
    return data


# -- sparse --------------------------------------------------------------------------------------------------


def _mask(op: _Op, key: str) -> np.ndarray:
    bits, _ = op.array(key)
    return bits.astype(bool)


def _sparse(op: _Op) -> SparseResult:
    if op.form == "ios16":
        packed, _ = op.array("mask")
        shape = tuple(int(d) for d in op.array("shape")[0].reshape(-1))
        mask = _unpack(op, packed, 1, shape).astype(bool)
        return SparseResult(mask, op.array("nonzero_data")[0].reshape(-1))
    up = op.bound("nonzero_data")
    if up is None:
        mask = _final_mask(op, None)
        return SparseResult(mask, op.array("nonzero_data")[0].reshape(-1))
    src, index = up
    if index != 1:
        raise _Other
    if src.type == "constexpr_lut_to_sparse":
        inner = _mask(src, "indices_mask")
        if src.array("vector_axis") is not None:
            raise _Other
        indices, code = src.array("indices_nonzero_data")
        if code not in _INDEX_BITS:
            raise _Other
        table, scale = _table(src)
        nonzero = PaletteResult(table, indices.reshape(-1).astype(np.uint8), _INDEX_BITS[code], None, scale)
    elif src.type == "constexpr_sparse_blockwise_shift_scale":
        inner = _mask(src, "data_mask")
        a = _affine18(src, "nonzero_data")
        nonzero = AffineResult(a.data.reshape(-1), a.scale, a.zero_point, a.dtype)
    else:
        raise _Other
    return SparseResult(_final_mask(op, (src, inner)), nonzero)


def _final_mask(op: _Op, upstream) -> np.ndarray:
    """sparse_to_dense's mask: a literal, or the mask output of the op producing its values."""
    bound = op.bound("mask")
    if bound is None:
        mask = _mask(op, "mask")
    elif upstream is not None and bound[0].site.name == upstream[0].site.name and bound[1] == 0:
        mask = upstream[1]
    else:
        raise _Other
    if upstream is not None and not np.array_equal(mask, upstream[1]):
        raise _Other  # the values were laid out on another mask
    return mask
