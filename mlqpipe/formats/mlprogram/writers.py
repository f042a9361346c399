"""Kernel results into an ML program: a weight's `const` becomes the constexpr op of the function's opset.

The op keeps its name and its output (name and type), so every reader still binds the same value and
nothing else in the program changes — unlike coremltools, which re-runs its graph passes afterwards.
Parameters are attributes before iOS18 (opsets CoreML6/CoreML7) and inputs from iOS18 (CoreML8); arrays of
at least 10 elements go to the weight file (new blobs wait in the model's scratch file until it is saved),
smaller ones inline, encoded as MLPROGRAM.md §2 describes. A weight shared by several functions is one
record with one op site per function: every site gets the same new parameters, stored once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.blob import BLOB_CODE_OF_MIL
from mlqpipe.formats.mlprogram.model import SCRATCH
from mlqpipe.formats.mlprogram.packing import pack_lsb_first
from mlqpipe.formats.mlprogram.program import active_block, op_name, walk
from mlqpipe.quant.results import AffineResult, Float16Result, Float32Result, PaletteResult, SparseResult

_IOS18_OPSETS = {"CoreML8", "CoreML9"}
_CONSTEXPR_OPSETS = {"CoreML6", "CoreML7"} | _IOS18_OPSETS
BLOB_MIN_ELEMENTS = 10  # what coremltools stores in the weight file (smaller arrays are inline)
_BLOB_DTYPES = {proto.FLOAT16, proto.FLOAT32, proto.UINT8, proto.INT8, proto.INT4, proto.UINT4, proto.UINT3,
                proto.UINT6, proto.UINT2, proto.UINT1}
_BLOB_DTYPES_IOS18 = {proto.INT16, proto.UINT16, proto.INT32, proto.UINT32}
_SUB_BYTE = {proto.INT4: 4, proto.UINT4: 4, proto.UINT3: 3, proto.UINT6: 6, proto.UINT2: 2, proto.UINT1: 1}
_FLOAT_DTYPE = {np.dtype(np.float16): proto.FLOAT16, np.dtype(np.float32): proto.FLOAT32}
UINT_OF_BITS = {1: proto.UINT1, 2: proto.UINT2, 3: proto.UINT3, 4: proto.UINT4, 6: proto.UINT6, 8: proto.UINT8}


@dataclass(frozen=True)
class Param:
    """One parameter of a new op: a name and an array with its MIL dtype (or a string)."""

    name: str
    value: object  # np.ndarray, or str for string parameters
    dtype: int


def opset_of(rec) -> str:
    fn = proto.find_entry(rec.handle.model.spec.mlProgram.functions, rec.handle.site.function)
    return fn.opset


def ios18_form(rec) -> bool:
    """Whether the weight's function takes iOS18 constexpr ops (parameters as inputs)."""
    opset = opset_of(rec)
    if opset not in _CONSTEXPR_OPSETS:
        raise ModelError(f"{rec.where}: opset {opset} has no compressed-weight ops (they need iOS16, opset CoreML6); "
                         "raise the model's deployment target first")
    return opset in _IOS18_OPSETS


def replace_const(rec, op_type: str, params: list[Param]) -> None:
    """Turn every op site of `rec` into `op_type` with `params`, in the form its function's opset takes;
    the arrays are stored once however many sites share them."""
    model = rec.handle.model
    ios18 = ios18_form(rec)
    values = [(p.name, _value(model, p, ios18)) for p in params]
    for site in rec.handle.sites:
        _rewrite_op(site.op, op_type, values, ios18)


def restore_const(rec, values: np.ndarray) -> None:
    """Turn every op site of a compressed `rec` back into a plain `const` holding `values` (decompress);
    constexpr ops that fed only it are removed with it."""
    model = rec.handle.model
    dtype = _FLOAT_DTYPE.get(np.asarray(values).dtype)
    if dtype is None:
        raise ModelError(f"{rec.where}: cannot store {np.asarray(values).dtype} values in a const")
    value = _value(model, Param("val", np.asarray(values).reshape(rec.shape), dtype), ios18=False)
    for site in rec.handle.sites:
        _rewrite_op(site.op, "const", [("val", value)], ios18=False)
        _drop_unused_constexprs(model, site)


def _rewrite_op(op, op_type: str, values: list, ios18: bool) -> None:
    name = proto.find_entry(op.attributes, "name")
    kept = proto.Value()
    if name is not None:
        kept.CopyFrom(name)
    op.type = op_type
    op.ClearField("inputs")
    op.ClearField("attributes")
    if name is not None:
        proto.set_entry(op.attributes, "name", kept)
    for key, value in values:
        if ios18:
            op.inputs.add(key=key).value.arguments.add().value.CopyFrom(value)
        else:
            proto.set_entry(op.attributes, key, value)


def _drop_unused_constexprs(model, site) -> None:
    """Remove constexpr ops of the site's block whose outputs nothing reads any more (a decompressed
    chain's upstream ops). Other ops are never removed."""
    block = _block_of(model, site)
    while True:
        used = set(block.outputs)
        for s in walk(model.spec.mlProgram, model.source):
            if s.function == site.function:
                for e in s.op.inputs:
                    used.update(b.name for b in e.value.arguments if b.WhichOneof("binding") == "name")
        doomed = [i for i, op in enumerate(block.operations)
                  if op.type.startswith("constexpr_") and not any(o.name in used for o in op.outputs)]
        if not doomed:
            return
        for i in reversed(doomed):
            del block.operations[i]


def _block_of(model, site):
    fn = proto.find_entry(model.spec.mlProgram.functions, site.function)
    block = active_block(site.function, fn, model.source)
    for part in site.block.split("/")[1:]:  # "main/loop.blocks[1]" -> the op "loop", its block 1
        name, _, index = part.rpartition(".blocks[")
        op = next(o for o in block.operations if op_name(o) == name)
        block = op.blocks[int(index.rstrip("]"))]
    return block


# --- values -------------------------------------------------------------------------------------------------


def _value(model, p: Param, ios18: bool):
    """A Value holding `p`: in the weight file when coremltools would put it there, else inline."""
    v = proto.Value()
    t = v.type.tensorType
    t.dataType = p.dtype
    if isinstance(p.value, str):
        t.rank = 0
        v.immediateValue.tensor.strings.values.append(p.value)
        return v
    array = np.asarray(p.value)
    t.rank = array.ndim
    for d in array.shape:
        t.dimensions.add().constant.size = int(d)
    storable = p.dtype in _BLOB_DTYPES or (ios18 and p.dtype in _BLOB_DTYPES_IOS18)
    if array.size >= BLOB_MIN_ELEMENTS and storable:
        data = array.astype(np.uint8 if p.dtype in _SUB_BYTE and p.dtype != proto.INT4 else array.dtype, copy=False)
        v.blobFileValue.fileName = SCRATCH
        v.blobFileValue.offset = model.new_blob(data.ravel(), BLOB_CODE_OF_MIL[p.dtype])
        return v
    _immediate(v.immediateValue.tensor, array, p.dtype)
    return v


def _immediate(tensor, array: np.ndarray, dtype: int) -> None:
    """Inline values as coremltools writes them: fp16, 8-bit and sub-byte integers and uint32 as raw
    little-endian bytes (sub-byte packed LSB-first), int16/uint16/int32 as ints, 64-bit ints as longInts,
    fp32 as floats, fp64 as doubles, bools as bools."""
    flat = array.ravel()
    if dtype in _SUB_BYTE:
        codes = flat.astype(np.int16) & ((1 << _SUB_BYTE[dtype]) - 1)
        tensor.bytes.values = pack_lsb_first(codes.astype(np.uint8), _SUB_BYTE[dtype])
    elif dtype in (proto.FLOAT16, proto.INT8, proto.UINT8, proto.UINT32):
        np_type = {proto.FLOAT16: "<f2", proto.INT8: "i1", proto.UINT8: "u1", proto.UINT32: "<u4"}[dtype]
        tensor.bytes.values = flat.astype(np_type).tobytes()
    elif dtype in (proto.INT16, proto.UINT16, proto.INT32):
        tensor.ints.values.extend(int(x) for x in flat)
    elif dtype in (proto.INT64, proto.UINT64):
        tensor.longInts.values.extend(int(x) for x in flat)
    elif dtype == proto.FLOAT32:
        tensor.floats.values.extend(flat.astype(np.float32).tolist())
    elif dtype == proto.FLOAT64:
        tensor.doubles.values.extend(flat.astype(np.float64).tolist())
    elif dtype == proto.BOOL:
        tensor.bools.values.extend(bool(x) for x in flat)
    else:
        raise ModelError(f"cannot write an inline value of MIL dtype {proto.DATA_TYPE_NAMES.get(dtype, dtype)}")


# --- results ------------------------------------------------------------------------------------------------


def write_float16(rec, r: Float16Result) -> None:
    """fp16 storage without touching compute precision: constexpr_cast(source_val fp16) -> fp32."""
    if rec.dtype != "fp32":
        raise ModelError(f"{rec.where}: fp16 storage needs an fp32 weight (this one is {rec.dtype})")
    replace_const(rec, "constexpr_cast", [Param("source_val", r.values.reshape(rec.shape), proto.FLOAT16),
                                          Param("output_dtype", "fp32", proto.STRING)])


def write_float32(rec, r: Float32Result) -> None:
    """Decompression: the dense values back into a const of the weight's dtype."""
    dtype = np.float16 if rec.dtype == "fp16" else np.float32
    restore_const(rec, r.values.astype(dtype).reshape(rec.shape))


_CODE_DTYPES = {"int8": proto.INT8, "uint8": proto.UINT8, "int4": proto.INT4, "uint4": proto.UINT4}


def _float_dtype(rec) -> int:
    return proto.FLOAT16 if rec.dtype == "fp16" else proto.FLOAT32


def _needs_ios18(rec, what: str) -> ModelError:
    return ModelError(f"{rec.where}: {what} needs iOS18 (opset CoreML8); this function's opset is {opset_of(rec)}: "
                      "raise the model's deployment target, or choose a setting iOS16 supports")


def write_affine(rec, r) -> None:
    """Linear quantization: iOS18 constexpr_blockwise_shift_scale (data, scale, offset), any granularity and
    4/8-bit codes; iOS16/17 constexpr_affine_dequantize (8-bit, per tensor or per channel, with a zero point
    always, zeros when symmetric, as coremltools writes it)."""
    code = _CODE_DTYPES[r.dtype]
    scale = np.asarray(r.scale)
    if ios18_form(rec):
        params = [Param("data", r.data, code), Param("scale", scale, _float_dtype(rec))]
        if r.zero_point is not None:
            params.append(Param("offset", np.asarray(r.zero_point).astype(r.data.dtype), code))
        replace_const(rec, "constexpr_blockwise_shift_scale", params)
        return
    if r.dtype not in ("int8", "uint8"):
        raise _needs_ios18(rec, f"{r.dtype} codes")
    channel = [i for i, n in enumerate(scale.shape) if n > 1]
    if len(channel) > 1 or (channel and scale.shape[channel[0]] != r.data.shape[channel[0]]):
        raise _needs_ios18(rec, "per-block quantization")
    axis = channel[0] if channel else 0
    zero = np.zeros_like(scale, dtype=r.data.dtype) if r.zero_point is None else np.asarray(r.zero_point).astype(r.data.dtype)
    shape = (scale.size,) if channel else ()
    replace_const(rec, "constexpr_affine_dequantize", [
        Param("quantized_data", r.data, code), Param("zero_point", zero.reshape(shape), code),
        Param("scale", scale.reshape(shape), _float_dtype(rec)), Param("axis", np.int32(axis), proto.INT32)])


def write_palette(rec, r) -> None:
    """Palettization: iOS18 constexpr_lut_to_dense (typed n-bit indices in the weight's shape, a LUT per
    group, vector LUTs); iOS16/17 the per-tensor scalar form (packed indices, a 1-D LUT of 2, 4, 16, 64 or
    256 entries, the shape)."""
    if getattr(r, "per_channel_scale", None) is not None:
        raise ModelError(f"{rec.where}: per-channel-scaled LUTs cannot be written yet")
    lut = np.asarray(r.lut)
    if ios18_form(rec):
        params = [Param("indices", r.indices, UINT_OF_BITS[r.nbits]), Param("lut", lut, _float_dtype(rec))]
        if r.vector_axis is not None:
            params.append(Param("vector_axis", np.int32(r.vector_axis), proto.INT32))
        replace_const(rec, "constexpr_lut_to_dense", params)
        return
    if r.nbits == 3:
        raise _needs_ios18(rec, "a 3-bit LUT")
    if any(n != 1 for n in lut.shape[:-2]) or lut.shape[-1] != 1:
        raise _needs_ios18(rec, "per-grouped-channel or vector palettization")
    packed = np.frombuffer(pack_lsb_first(np.asarray(r.indices, np.uint8).ravel(), r.nbits), np.uint8)
    replace_const(rec, "constexpr_lut_to_dense", [
        Param("indices", packed, proto.UINT8), Param("lut", lut.reshape(-1), _float_dtype(rec)),
        Param("shape", np.asarray(rec.shape, np.uint32), proto.UINT32)])


def write_sparse(rec, r) -> None:
    """Pruning: constexpr_sparse_to_dense — iOS18 a uint1 mask in the weight's shape, iOS16/17 the mask
    packed LSB-first plus the shape; the nonzero values in row-major order either way."""
    mask = np.asarray(r.mask, bool)
    if not mask.any():
        raise ModelError(f"{rec.where}: every value would be pruned; a zero-length sparse weight is not written "
                         "(keep it dense)")
    nonzero = np.asarray(r.nonzero)
    if ios18_form(rec):
        replace_const(rec, "constexpr_sparse_to_dense", [Param("nonzero_data", nonzero, _float_dtype(rec)),
                                                         Param("mask", mask.astype(np.uint8), proto.UINT1)])
        return
    packed = np.packbits(mask.ravel(), bitorder="little")
    replace_const(rec, "constexpr_sparse_to_dense", [
        Param("nonzero_data", nonzero, _float_dtype(rec)), Param("mask", packed, proto.UINT8),
        Param("shape", np.asarray(rec.shape, np.uint32), proto.UINT32)])


WRITERS = {Float16Result: write_float16, Float32Result: write_float32, AffineResult: write_affine,
           PaletteResult: write_palette, SparseResult: write_sparse}


def write_result(rec, result, **options) -> None:
    writer = WRITERS.get(type(result))
    if writer is None:
        raise ModelError(f"{rec.where}: ML programs cannot store a {type(result).__name__} yet")
    writer(rec, result)
