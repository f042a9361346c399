"""Kernel results into an ML program: a weight's `const` becomes the constexpr op of the function's opset.

The op keeps its name and its output (name and type), so every reader still binds the same value and
nothing else in the program changes — unlike coremltools, which re-runs its graph passes afterwards.
Parameters are attributes before iOS18 (opsets CoreML6/CoreML7) and inputs from iOS18 (CoreML8); arrays of
at least 10 elements go to the weight file (new blobs wait in the model's scratch file until it is saved),
smaller ones inline, encoded as MLPROGRAM.md §2 describes. A weight shared by several functions is one
record with one op site per function: every site gets the same new parameters, stored once.

Chains (iOS18): nested results (quant/results.py) and per-channel-scaled LUTs become several constexpr ops.
The weight's op stays the chain's last op (same name, same output); the upstream ops are inserted right
before it in its block, named after it with coremltools' suffixes (`_lut_quantized`, `_lut_pcs`,
`_nonzero_palettized`, `_nonzero_quantized`; a number is appended when the name is taken), their outputs
typed as the op defines them (lut_to_sparse and sparse_blockwise_shift_scale: mask and values). A
per-channel-scaled LUT is written as coremltools 9.0 leaves it after its canonicalisation pass: the table
repeated along the scale's axes and scaled by a constexpr_blockwise_shift_scale feeding the
constexpr_lut_to_dense (the same numbers as scaling the dense weight). Rewriting an already compressed
weight removes the upstream ops of its old chain that nothing reads any more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import constexpr, proto
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
class Ref:
    """A parameter bound to output `output` of upstream op number `op` of the chain being written (iOS18)."""

    op: int
    output: int = 0


@dataclass(frozen=True)
class Param:
    """One parameter of a new op: a name and an array with its MIL dtype (or a string, or a Ref)."""

    name: str
    value: object  # np.ndarray, str for string parameters, or Ref (then dtype is unused)
    dtype: int


@dataclass(frozen=True)
class Upstream:
    """An op of a chain before the weight's own op: its type, the suffix of its name (after the weight's op
    name), its parameters, and the (MIL dtype, shape) of each output."""

    op_type: str
    suffix: str
    params: tuple[Param, ...]
    outputs: tuple[tuple[int, tuple[int, ...]], ...]


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


def replace_const(rec, op_type: str, params: list[Param], upstream: list[Upstream] = ()) -> None:
    """Turn every op site of `rec` into `op_type` with `params`, in the form its function's opset takes,
    after the `upstream` ops of its chain (iOS18; a Ref binds their outputs); the arrays are stored once
    however many sites share them."""
    model = rec.handle.model
    ios18 = ios18_form(rec)
    names = _upstream_names(model, rec.handle.sites, upstream)
    built = [_new_op(u.op_type, name, _values(model, u.params, ios18, names), outs)
             for u, (name, outs) in zip(upstream, names)]
    values = _values(model, params, ios18, names)
    for site in rec.handle.sites:
        old = _old_upstream(model, site)
        released = _blob_refs(site.op)
        if built:
            block = _block_of(model, site)
            at = next(i for i, op in enumerate(block.operations) if op_name(op) == site.name)
            for k, op in enumerate(built):
                block.operations.insert(at + k, op)
        _rewrite_op(site.op, op_type, values, ios18)
        _drop_unused_constexprs(model, site, old)
        _release(model, released)


def _blob_refs(op) -> list[tuple[str, int]]:
    """(file name, offset) of the input weight-file blobs an op's parameters point at."""
    values = [e.value for e in op.attributes] + [b.value for e in op.inputs for b in e.value.arguments if b.HasField("value")]
    return [(v.blobFileValue.fileName, v.blobFileValue.offset) for v in values
            if v.HasField("blobFileValue") and v.blobFileValue.fileName != SCRATCH]


def _release(model, refs) -> None:
    """Drop the resident pages of blobs a rewrite replaced: compressing weight after weight keeps only the
    one being compressed in memory (mapped pages count as the process's memory)."""
    for name, offset in refs:
        try:
            model.blob_file(name).release(offset)
        except ModelError:  # advice only: a blob we cannot name is not ours to release
            pass


def restore_const(rec, values: np.ndarray) -> None:
    """Turn every op site of a compressed `rec` back into a plain `const` holding `values` (decompress);
    constexpr ops that fed only it are removed with it."""
    model = rec.handle.model
    dtype = _FLOAT_DTYPE.get(np.asarray(values).dtype)
    if dtype is None:
        raise ModelError(f"{rec.where}: cannot store {np.asarray(values).dtype} values in a const")
    value = _value(model, Param("val", np.asarray(values).reshape(rec.shape), dtype), ios18=False)
    for site in rec.handle.sites:
        old = _old_upstream(model, site)
        _rewrite_op(site.op, "const", [("val", value)], ios18=False)
        _drop_unused_constexprs(model, site, old)


def _values(model, params, ios18: bool, names) -> list:
    """(key, Value or bound name) per parameter."""
    out = []
    for p in params:
        if isinstance(p.value, Ref):
            out.append((p.name, names[p.value.op][1][p.value.output][0]))
        else:
            out.append((p.name, _value(model, p, ios18)))
    return out


def _upstream_names(model, sites, upstream) -> list[tuple[str, list]]:
    """(op name, [(output name, dtype, shape)]) per upstream op: the weight's op name + the op's suffix, made
    unique over every op and value name of the functions holding the sites (one output is named as its
    op, two get `_0` and `_1`, as coremltools names them)."""
    if not upstream:
        return []
    functions = {site.function for site in sites}
    taken = set()
    for s in walk(model.spec.mlProgram, model.source):
        if s.function in functions:
            taken.add(s.name)
            taken.update(o.name for o in s.op.outputs)
            taken.update(i.name for b in s.op.blocks for i in b.inputs)
    for name, function in ((e.key, e.value) for e in model.spec.mlProgram.functions):
        if name in functions:
            taken.update(i.name for i in function.inputs)
    out = []
    for u in upstream:
        base = f"{sites[0].name}_{u.suffix}"
        for n in range(len(taken) + 1):
            name = base if n == 0 else f"{base}_{n}"
            outs = [name] if len(u.outputs) == 1 else [f"{name}_{i}" for i in range(len(u.outputs))]
            if name not in taken and not taken.intersection(outs):
                break
        taken.update([name, *outs])
        out.append((name, [(o, dtype, shape) for o, (dtype, shape) in zip(outs, u.outputs)]))
    return out


def _new_op(op_type: str, name: str, values: list, outputs: list):
    """An iOS18 constexpr op: the `name` attribute, inputs (literal Values or bound names), typed outputs."""
    op = proto.Operation()
    op.type = op_type
    label = proto.Value()
    label.type.tensorType.dataType = proto.STRING
    label.immediateValue.tensor.strings.values.append(name)
    proto.set_entry(op.attributes, "name", label)
    for key, value in values:
        arg = op.inputs.add(key=key).value.arguments.add()
        if isinstance(value, str):
            arg.name = value
        else:
            arg.value.CopyFrom(value)
    for out_name, dtype, shape in outputs:
        o = op.outputs.add(name=out_name)
        t = o.type.tensorType
        t.dataType = dtype
        t.rank = len(shape)
        for d in shape:
            t.dimensions.add().constant.size = int(d)
    return op


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
        if isinstance(value, str):  # bound to an upstream op's output (iOS18 chains only)
            op.inputs.add(key=key).value.arguments.add().name = value
        elif ios18:
            op.inputs.add(key=key).value.arguments.add().value.CopyFrom(value)
        else:
            proto.set_entry(op.attributes, key, value)


def _function_sites(model, function: str) -> list:
    return [s for s in walk(model.spec.mlProgram, model.source) if s.function == function]


def _old_upstream(model, site) -> set[str]:
    """Names of the constexpr ops upstream of a compressed site (its current chain), before it is rewritten."""
    if site.op.type == "const":
        return set()
    sites = _function_sites(model, site.function)
    chain = constexpr.chain_sites(model, constexpr.producers(sites), site)
    return {s.name for s in chain[:-1] if constexpr.is_constexpr(s.op.type)}


def _drop_unused_constexprs(model, site, candidates: set[str]) -> None:
    """Remove the `candidates` (a rewritten chain's old upstream ops) of the site's block that nothing
    reads any more. Other ops are never removed."""
    if not candidates:
        return
    block = _block_of(model, site)
    while True:
        used = set(block.outputs)
        for s in _function_sites(model, site.function):
            for e in s.op.inputs:
                used.update(b.name for b in e.value.arguments if b.WhichOneof("binding") == "name")
        doomed = [i for i, op in enumerate(block.operations)
                  if op_name(op) in candidates and not any(o.name in used for o in op.outputs)]
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
        if array.dtype == np.bool_ and p.dtype == proto.UINT1:
            data = array  # a mask is packed as it is, without a byte per element first
        else:
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
        replace_const(rec, "constexpr_blockwise_shift_scale", _affine_params(r, _float_dtype(rec)))
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


def write_palette(rec, r: PaletteResult) -> None:
    """Palettization: iOS18 constexpr_lut_to_dense (typed n-bit indices in the weight's shape, a LUT per
    group, vector LUTs; the LUT may be quantized or scaled per channel by upstream ops); iOS16/17 the
    per-tensor scalar form (packed indices, a 1-D LUT of 2, 4, 16, 64 or 256 entries, the shape)."""
    if ios18_form(rec):
        upstream: list[Upstream] = []
        params = [Param("indices", r.indices, UINT_OF_BITS[r.nbits]), _lut_param(rec, r, upstream, "")]
        if r.vector_axis is not None:
            params.append(Param("vector_axis", np.int32(r.vector_axis), proto.INT32))
        replace_const(rec, "constexpr_lut_to_dense", params, upstream)
        return
    if r.per_channel_scale is not None:
        raise _needs_ios18(rec, "a per-channel-scaled LUT")
    if isinstance(r.lut, AffineResult):
        raise _needs_ios18(rec, f"a LUT quantized to {r.lut.dtype} (joint compression)")
    lut = np.asarray(r.lut)
    if r.nbits == 3:
        raise _needs_ios18(rec, "a 3-bit LUT")
    if any(n != 1 for n in lut.shape[:-2]) or lut.shape[-1] != 1:
        raise _needs_ios18(rec, "per-grouped-channel or vector palettization")
    packed = np.frombuffer(pack_lsb_first(np.asarray(r.indices, np.uint8).ravel(), r.nbits), np.uint8)
    replace_const(rec, "constexpr_lut_to_dense", [
        Param("indices", packed, proto.UINT8), Param("lut", lut.reshape(-1), _float_dtype(rec)),
        Param("shape", np.asarray(rec.shape, np.uint32), proto.UINT32)])


def write_sparse(rec, r: SparseResult) -> None:
    """Pruning: constexpr_sparse_to_dense — iOS18 a uint1 mask in the weight's shape, iOS16/17 the mask
    packed LSB-first plus the shape; the nonzero values in row-major order either way. iOS18 joint forms:
    palettized nonzero values come from a constexpr_lut_to_sparse, quantized ones from a
    constexpr_sparse_blockwise_shift_scale; both outputs (mask, values) feed the constexpr_sparse_to_dense."""
    mask = np.asarray(r.mask, bool)
    if not mask.any():
        raise ModelError(f"{rec.where}: every value would be pruned; a zero-length sparse weight is not written "
                         "(keep it dense)")
    nested = isinstance(r.nonzero, (PaletteResult, AffineResult))
    if ios18_form(rec):
        if nested:
            upstream = _sparse_upstream(rec, mask, r.nonzero)
            last = len(upstream) - 1
            replace_const(rec, "constexpr_sparse_to_dense", [Param("nonzero_data", Ref(last, 1), _float_dtype(rec)),
                                                             Param("mask", Ref(last, 0), proto.UINT1)], upstream)
            return
        replace_const(rec, "constexpr_sparse_to_dense", [Param("nonzero_data", np.asarray(r.nonzero), _float_dtype(rec)),
                                                         Param("mask", mask, proto.UINT1)])
        return
    if nested:
        kind = "palettized" if isinstance(r.nonzero, PaletteResult) else "quantized"
        raise _needs_ios18(rec, f"joint compression (a pruned weight's {kind} values)")
    packed = np.packbits(mask.ravel(), bitorder="little")
    replace_const(rec, "constexpr_sparse_to_dense", [
        Param("nonzero_data", np.asarray(r.nonzero), _float_dtype(rec)), Param("mask", packed, proto.UINT8),
        Param("shape", np.asarray(rec.shape, np.uint32), proto.UINT32)])


# --- chains (iOS18) -----------------------------------------------------------------------------------------


def _affine_params(r: AffineResult, float_dtype: int, data: str = "data") -> list[Param]:
    code = _CODE_DTYPES[r.dtype]
    params = [Param(data, np.asarray(r.data), code), Param("scale", np.asarray(r.scale), float_dtype)]
    if r.zero_point is not None:
        params.append(Param("offset", np.asarray(r.zero_point).astype(np.asarray(r.data).dtype), code))
    return params


def _lut_param(rec, r: PaletteResult, upstream: list, prefix: str) -> Param:
    """The `lut` parameter of a LUT op: the table itself, or bound to the upstream op(s) appended to
    `upstream` that dequantize it (a quantized LUT) and/or scale it per channel."""
    fl = _float_dtype(rec)
    table = r.lut
    shape = tuple(np.shape(table.data if isinstance(table, AffineResult) else table))
    scale = None
    if r.per_channel_scale is not None:
        scale, repeats = _lut_scale(rec, np.asarray(r.per_channel_scale), shape)
        table = _repeat_table(table, repeats)
        shape = tuple(n * k for n, k in zip(shape, repeats))
    if isinstance(table, AffineResult):
        upstream.append(Upstream("constexpr_blockwise_shift_scale", f"{prefix}lut_quantized",
                                 tuple(_affine_params(table, fl)), ((fl, shape),)))
        value = Ref(len(upstream) - 1)
    else:
        value = np.asarray(table)
    if scale is not None:
        upstream.append(Upstream("constexpr_blockwise_shift_scale", f"{prefix}lut_pcs",
                                 (Param("data", value, fl), Param("scale", scale, fl)), ((fl, shape),)))
        value = Ref(len(upstream) - 1)
    return Param("lut", value, fl)


def _lut_scale(rec, pcs: np.ndarray, lut_shape: tuple) -> tuple[np.ndarray, tuple[int, ...]]:
    """The per-channel scale in the LUT's layout ([scale shape…, 1, 1]) and how often each LUT axis must be
    repeated so that every table has one scale (coremltools' canonical pattern, e.g. a [128, 64] weight
    with one table and 64 column scales: lut [1, 64, 16, 1] scaled by [1, 64, 1, 1])."""
    rank = len(lut_shape) - 2
    dtype = np.float16 if rec.dtype == "fp16" else np.float32
    if pcs.ndim != rank:
        raise ModelError(f"{rec.where}: the per-channel scale has rank {pcs.ndim}, the weight rank {rank}; "
                         "it must have one entry per axis (1 or the axis' size)")
    repeats = []
    for axis, (s, n) in enumerate(zip(pcs.shape, lut_shape[:rank])):
        k = s // n if s > n and s % n == 0 else 1
        if (n * k) % s:
            raise ModelError(f"{rec.where}: a per-channel scale of shape {list(pcs.shape)} does not fit the LUT's "
                             f"{list(lut_shape[:rank])} groups on axis {axis}; palettize with per_tensor granularity")
        repeats.append(k)
    return pcs.astype(dtype, copy=False).reshape(pcs.shape + (1, 1)), tuple(repeats) + (1, 1)


def _repeat_table(table, repeats: tuple[int, ...]):
    """The LUT with every group repeated `repeats[i]` times along axis i (a quantized LUT: its codes; a
    per-block scale keeps its meaning, the blocks growing with the axis)."""
    if all(k == 1 for k in repeats):
        return table
    if isinstance(table, AffineResult):
        data = np.asarray(table.data)
        for axis, k in enumerate(repeats):
            data = np.repeat(data, k, axis=axis) if k > 1 else data
        return AffineResult(data, table.scale, table.zero_point, table.dtype)
    out = np.asarray(table)
    for axis, k in enumerate(repeats):
        out = np.repeat(out, k, axis=axis) if k > 1 else out
    return out


def _sparse_upstream(rec, mask: np.ndarray, nonzero) -> list[Upstream]:
    """The ops producing (mask, values) for a joint sparse weight's constexpr_sparse_to_dense."""
    fl = _float_dtype(rec)
    count = int(np.count_nonzero(mask))
    outputs = ((proto.UINT1, tuple(mask.shape)), (fl, (count,)))
    bits = mask.astype(np.uint8)
    what, held = ("codes", nonzero.data) if isinstance(nonzero, AffineResult) else ("indices", nonzero.indices)
    if np.size(held) != count:
        raise ModelError(f"{rec.where}: the mask keeps {count} values but the {what} hold {np.size(held)}; a pruned "
                         "weight's palettized or quantized values are the kept ones only")
    if isinstance(nonzero, AffineResult):
        params = _affine_params(nonzero, fl, data="nonzero_data")
        params[0] = Param("nonzero_data", np.asarray(nonzero.data).reshape(-1), _CODE_DTYPES[nonzero.dtype])
        return [Upstream("constexpr_sparse_blockwise_shift_scale", "nonzero_quantized",
                         (Param("data_mask", bits, proto.UINT1), *params), outputs)]
    lut_shape = np.shape(nonzero.lut.data if isinstance(nonzero.lut, AffineResult) else nonzero.lut)
    if nonzero.vector_axis is not None or lut_shape[-1] != 1:
        raise ModelError(f"{rec.where}: vector-palettized nonzero values of a pruned weight cannot be written; "
                         "palettize it with cluster_dim 1")
    upstream: list[Upstream] = []
    lut = _lut_param(rec, nonzero, upstream, "nonzero_palettized_")
    upstream.append(Upstream("constexpr_lut_to_sparse", "nonzero_palettized", (
        Param("indices_mask", bits, proto.UINT1),
        Param("indices_nonzero_data", np.asarray(nonzero.indices).reshape(-1), UINT_OF_BITS[nonzero.nbits]), lut),
        outputs))
    return upstream


WRITERS = {Float16Result: write_float16, Float32Result: write_float32, AffineResult: write_affine,
           PaletteResult: write_palette, SparseResult: write_sparse}


def write_result(rec, result, **options) -> None:
    writer = WRITERS.get(type(result))
    if writer is None:
        raise ModelError(f"{rec.where}: ML programs cannot store a {type(result).__name__} yet")
    writer(rec, result)
