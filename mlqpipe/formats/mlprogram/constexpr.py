"""Compressed weights of ML programs: one table entry per `constexpr_*` op, decoding and describing them.

A compressed weight is a constexpr op whose output replaces a `const` (MLPROGRAM.md §4). Before iOS18
(opsets CoreML6/CoreML7) the parameters are attributes, from iOS18 (CoreML8) inputs; `MLProgram.op_parameters`
reads both the same way, so an entry only says which parameter names its form takes. Ops may be chained
(iOS18): a parameter bound by name to another constexpr's output (joint sparse + LUT, a LUT scaled per
channel, a quantized LUT) is decoded first, recursively. Everything here is numpy, vectorised: broadcasting
for scales, fancy indexing for LUTs, `np.flatnonzero` scatters for masks.

`decode_chain` gives the dense value coremltools' `decompress_weights` gives (bit for bit: affine iOS16
dequantization is computed in float32 and rounded to the scale's dtype, blockwise iOS18 in the scale's
dtype, as coremltools does). `describe_chain` gives the `Storage` reports and `inspect` show, from types
and shapes only (no weight data is read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from typing import Callable

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.base import Storage
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.packing import WIDTHS, unpack_lsb_first
from mlqpipe.formats.mlprogram.program import DTYPES, const_value, tensor_type

# bits per element of the MIL integer/float dtypes a constexpr parameter can have
_FLOATS = (proto.FLOAT16, proto.FLOAT32)
_INT_NAMES = {proto.INT4: "int4", proto.UINT4: "uint4", proto.INT8: "int8", proto.UINT8: "uint8"}


class _Bad(Exception):
    """A broken parameter; `decode_chain` turns it into a located ModelError."""


@dataclass(frozen=True)
class ParamInfo:
    """What `describe` knows of one parameter: declared shape and MIL dtype, the storage of the constexpr
    it is chained to (None for a literal), and the value of a small literal (an iOS16 `shape`)."""

    shape: tuple[int, ...] | None
    dtype: int
    source: Storage | None = None
    value: np.ndarray | None = None


@dataclass(frozen=True)
class ConstexprOp:
    """One constexpr op in one serialisation form ("ios16": attributes, "ios18": inputs)."""

    op_type: str
    form: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    outputs: int  # lut_to_sparse / sparse_blockwise_shift_scale: (mask, nonzero values)
    decode: Callable[[dict, np.dtype, tuple], np.ndarray | tuple]
    describe: Callable[[dict], Storage]

    @property
    def value_output(self) -> int:
        """The index of the output holding the values (the last)."""
        return self.outputs - 1


# -- decoding, one pure function per op ------------------------------------------------------------------


def _int(params: dict, name: str) -> int:
    v = np.asarray(params[name])
    if v.size != 1:
        raise _Bad(f"parameter {name} must be a scalar, got shape {list(v.shape)}")
    return int(v.reshape(()))


def _shape_param(params: dict) -> tuple[int, ...]:
    return tuple(int(d) for d in np.asarray(params["shape"]).reshape(-1))


def _block_sizes(data_shape: tuple, param_shape: tuple, what: str) -> tuple[int, ...]:
    """data.shape[i] / param.shape[i] for every axis; the counts must divide the dimensions."""
    if len(data_shape) != len(param_shape):
        raise _Bad(f"{what} has rank {len(param_shape)}, the data rank {len(data_shape)}; they must be equal")
    blocks = []
    for d, s in zip(data_shape, param_shape):
        if s == 0 or d % s:
            raise _Bad(f"{what} shape {list(param_shape)} does not divide the data shape {list(data_shape)}")
        blocks.append(d // s)
    return tuple(blocks)


def _blockwise(values: np.ndarray, params: np.ndarray, blocks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """`values` reshaped to (n0, b0, n1, b1, ...) and `params` to (n0, 1, n1, 1, ...): broadcasting applies
    one parameter per block without repeating it."""
    split = tuple(x for n, b in zip(params.shape, blocks) for x in (n, b))
    return values.reshape(split), params.reshape(tuple(x for n in params.shape for x in (n, 1)))


def dequantize_blockwise(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """scale · (data − offset), one scale/offset per block (iOS18), computed in the scale's dtype."""
    blocks = _block_sizes(data.shape, scale.shape, "scale")
    if offset is not None and offset.shape != scale.shape:
        raise _Bad(f"offset shape {list(offset.shape)} differs from scale shape {list(scale.shape)}")
    d, s = _blockwise(data.astype(scale.dtype), scale, blocks)
    if offset is not None:
        d = d - _blockwise(data, offset, blocks)[1]
    return (d * s).reshape(data.shape)


def _decode_blockwise(params, out_dtype, out_shape):
    return dequantize_blockwise(params["data"], params["scale"], params.get("offset")).astype(out_dtype, copy=False)


def _decode_affine(params, out_dtype, out_shape):
    """iOS16: scale · (q − zp) along `axis`, computed in float32, rounded to the scale's dtype."""
    q, zp, scale = params["quantized_data"], np.asarray(params["zero_point"]), np.asarray(params["scale"])
    rank = q.ndim
    axis = _int(params, "axis")
    if not -rank <= axis < rank:
        raise _Bad(f"axis {axis} is out of range for data of rank {rank}")
    axis %= rank

    def along(v: np.ndarray, name: str) -> np.ndarray:
        if v.ndim > 1 or (v.ndim == 1 and v.size not in (1, q.shape[axis])):
            raise _Bad(f"{name} must be a scalar or hold {q.shape[axis]} values (axis {axis}), got shape {list(v.shape)}")
        shape = [1] * rank
        if v.ndim == 1:
            shape[axis] = v.size
        return v.reshape(shape)

    out = (q.astype(np.float32) - along(zp, "zero_point").astype(np.float32)) * along(scale, "scale")
    return out.astype(scale.dtype).astype(out_dtype, copy=False)


def lut_lookup(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """iOS18 LUT decoding: lut has shape [k1…kK, 2^n, V]; every block of indices.shape/k uses its own
    table; V > 1 writes V consecutive values along `vector_axis` per index."""
    rank = indices.ndim
    if lut.ndim != rank + 2:
        raise _Bad(f"lut has rank {lut.ndim}; it must be the indices rank {rank} + 2")
    blocks = _block_sizes(indices.shape, lut.shape[:rank], "lut")
    entries, vector = lut.shape[-2], lut.shape[-1]
    if indices.size and int(indices.max()) >= entries:
        raise _Bad(f"an index is {int(indices.max())} but the lut has {entries} entries")
    groups = np.ix_(*(np.arange(n) // b for n, b in zip(indices.shape, blocks))) if rank else ()
    picked = lut[(*groups, indices.astype(np.intp))]  # indices.shape + (V,)
    if vector == 1:
        return picked[..., 0]
    if vector_axis is None:
        raise _Bad(f"the lut holds vectors of {vector} values but there is no vector_axis")
    if not -rank <= vector_axis < rank:
        raise _Bad(f"vector_axis {vector_axis} is out of range for indices of rank {rank}")
    axis = vector_axis % rank
    shape = list(indices.shape)
    shape[axis] *= vector
    return np.moveaxis(picked, -1, axis + 1).reshape(shape)


def _vector_axis(params) -> int | None:
    return _int(params, "vector_axis") if params.get("vector_axis") is not None else None


def _decode_lut18(params, out_dtype, out_shape):
    return lut_lookup(params["indices"], params["lut"], _vector_axis(params)).astype(out_dtype, copy=False)


def _nbits_of_entries(entries: int) -> int:
    nbits = entries.bit_length() - 1
    if entries != 1 << nbits or nbits not in WIDTHS:
        raise _Bad(f"the lut has {entries} entries; it must have 2, 4, 8, 16, 64 or 256")
    return nbits


def _unpack(packed: np.ndarray, nbits: int, count: int, name: str) -> np.ndarray:
    need = (count * nbits + 7) // 8
    if packed.size != need:
        raise _Bad(f"{name} holds {packed.size} bytes; {count} values of {nbits} bits need {need}")
    return unpack_lsb_first(np.ascontiguousarray(packed, dtype=np.uint8), nbits, count)


def _decode_lut16(params, out_dtype, out_shape):
    """iOS16: a flat LUT of 2^n entries; indices packed LSB first into uint8, `shape` gives the output."""
    lut = np.asarray(params["lut"]).reshape(-1)
    shape = _shape_param(params)
    codes = _unpack(np.asarray(params["indices"]).reshape(-1), _nbits_of_entries(lut.size), prod(shape), "indices")
    return lut[codes].reshape(shape).astype(out_dtype, copy=False)


def scatter(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A dense array of mask's shape: the nonzero values at the mask's set positions (row-major), 0 elsewhere."""
    where = np.flatnonzero(mask)
    nonzero = np.asarray(nonzero).reshape(-1)
    if where.size != nonzero.size:
        raise _Bad(f"the mask sets {where.size} positions but nonzero_data holds {nonzero.size} values")
    dense = np.zeros(mask.size, dtype=nonzero.dtype)
    dense[where] = nonzero
    return dense.reshape(mask.shape)


def _decode_sparse18(params, out_dtype, out_shape):
    return scatter(params["nonzero_data"], params["mask"]).astype(out_dtype, copy=False)


def _decode_sparse16(params, out_dtype, out_shape):
    """iOS16: mask = one bit per element packed LSB first into uint8, `shape` gives the output."""
    shape = _shape_param(params)
    bits = _unpack(np.asarray(params["mask"]).reshape(-1), 1, prod(shape), "mask").reshape(shape)
    return scatter(params["nonzero_data"], bits).astype(out_dtype, copy=False)


def _decode_lut_to_sparse(params, out_dtype, out_shape):
    """(mask, values): the mask widened by V along vector_axis, the LUT values at its set positions."""
    mask = params["indices_mask"]
    axis = _vector_axis(params)
    dense = lut_lookup(scatter(params["indices_nonzero_data"], mask), params["lut"], axis)
    vector = params["lut"].shape[-1]
    out_mask = np.repeat(mask, vector, axis=axis) if vector > 1 else mask
    return out_mask.astype(np.uint8), dense.reshape(-1)[np.flatnonzero(out_mask)].astype(out_dtype, copy=False)


def _decode_sparse_shift_scale(params, out_dtype, out_shape):
    """(mask, values): the nonzero data dequantized with the scale/offset of the block each sits in."""
    mask, data = params["data_mask"], np.asarray(params["nonzero_data"]).reshape(-1)
    scale, offset = params["scale"], params.get("offset")
    where = np.flatnonzero(mask)
    if where.size != data.size:
        raise _Bad(f"the mask sets {where.size} positions but nonzero_data holds {data.size} values")
    blocks = _block_sizes(mask.shape, scale.shape, "scale")
    if offset is not None and offset.shape != scale.shape:
        raise _Bad(f"offset shape {list(offset.shape)} differs from scale shape {list(scale.shape)}")
    block = tuple(c // b for c, b in zip(np.unravel_index(where, mask.shape), blocks))
    values = data.astype(scale.dtype)
    if offset is not None:
        values = values - offset[block]
    return mask.astype(np.uint8), (values * scale[block]).astype(out_dtype, copy=False)


def _decode_cast(params, out_dtype, out_shape):
    wanted = str(np.asarray(params["output_dtype"]).reshape(-1)[0])
    if wanted != "fp32":
        raise _Bad(f"output_dtype is {wanted!r}; only 'fp32' is defined")
    return np.asarray(params["source_val"]).astype(np.float32).astype(out_dtype, copy=False)


# -- describing -------------------------------------------------------------------------------------------


def _bits(dtype: int) -> int:
    return DTYPES[dtype][1] if dtype in DTYPES else 0


def _granularity(data_shape: tuple | None, param_shape: tuple | None, word: str = "per_block") -> str:
    """per_tensor / per_channel / per_block(b) from a data shape and its per-block parameter's shape."""
    if data_shape is None or param_shape is None or len(data_shape) != len(param_shape):
        return "per_block(?)"
    split = [i for i, s in enumerate(param_shape) if s > 1]
    if not split:
        return "per_tensor"
    sizes = [data_shape[i] // param_shape[i] if param_shape[i] else 0 for i in split]
    if all(b == 1 for b in sizes) and len(split) == 1:
        return "per_channel"
    blocks = [str(b) for b in sizes if b != 1]
    return f"{word}({', '.join(blocks)})"


def _describe_affine(info: dict) -> Storage:
    data, scale = info["quantized_data"], info["scale"]
    channel = scale.shape is not None and len(scale.shape) == 1 and prod(scale.shape) > 1
    return Storage("linear", _bits(data.dtype), f"{_INT_NAMES.get(data.dtype, '?')} {'per_channel' if channel else 'per_tensor'}")


def _describe_blockwise(info: dict) -> Storage:
    data, scale = info["data"], info["scale"]
    gran = _granularity(data.shape, scale.shape)
    if data.source is not None:  # a dense weight (e.g. a LUT's output) scaled afterwards
        scaled = "per_channel_scale" if gran == "per_channel" else f"{gran} scale"
        return Storage(data.source.kind, data.source.nbits, f"{data.source.detail} + {scaled}")
    if data.dtype in _FLOATS:  # a float tensor times a scale: a per-channel-scaled LUT's table
        return Storage("scaled", _bits(data.dtype), f"{gran} scale")
    return Storage("linear", _bits(data.dtype), f"{_INT_NAMES.get(data.dtype, '?')} {gran}")


def _lut_detail(indices_shape, lut: ParamInfo) -> tuple[int, str]:
    """(nbits, detail) of an iOS18 LUT parameter [k1…kK, 2^n, V]."""
    shape = lut.shape
    if shape is None or indices_shape is None or len(shape) != len(indices_shape) + 2:
        return 0, "?"
    entries, vector = shape[-2], shape[-1]
    nbits = entries.bit_length() - 1
    tables = list(shape[:-2])
    extra = []
    if lut.source is not None and lut.source.kind == "scaled":
        # canonical per-channel-scaled LUT: the table repeated along the scale's axes; the grouping is the
        # table's own, the scale is reported separately
        extra.append("per_channel_scale")
        tables = [1] * len(tables)
    elif lut.source is not None:
        extra.append(f"{lut.source.describe()} lut")
    gran = _granularity(tuple(indices_shape), tuple(tables), "per_grouped_channel")
    if gran == "per_channel":
        gran = "per_grouped_channel(1)"
    detail = gran + (f", vector({vector})" if vector > 1 else "")
    return nbits, " + ".join([detail, *extra])


def _describe_lut18(info: dict) -> Storage:
    nbits, detail = _lut_detail(info["indices"].shape, info["lut"])
    return Storage("lut", nbits, detail)


def _describe_lut16(info: dict) -> Storage:
    entries = prod(info["lut"].shape or (0,))
    return Storage("lut", entries.bit_length() - 1, "per_tensor")


def _zeros(nonzero: ParamInfo, mask_shape) -> str:
    total = prod(mask_shape) if mask_shape is not None else 0
    kept = prod(nonzero.shape) if nonzero.shape is not None else 0
    return f"{round(100 * (1 - kept / total), 1):g}% zeros" if total else "?% zeros"


def _describe_sparse(info: dict, mask_shape) -> Storage:
    nonzero = info["nonzero_data"]
    zeros = _zeros(nonzero, mask_shape)
    if nonzero.source is not None:
        return Storage("sparse", nonzero.source.nbits, f"{zeros} + {nonzero.source.describe()}")
    return Storage("sparse", _bits(nonzero.dtype), zeros)


def _describe_sparse18(info: dict) -> Storage:
    return _describe_sparse(info, info["mask"].shape)


def _describe_sparse16(info: dict) -> Storage:
    return _describe_sparse(info, None if info["shape"].value is None else tuple(int(x) for x in info["shape"].value))


def _describe_lut_to_sparse(info: dict) -> Storage:
    nbits, detail = _lut_detail(info["indices_mask"].shape, info["lut"])
    return Storage("lut", nbits, detail)


def _describe_sparse_shift_scale(info: dict) -> Storage:
    data = info["nonzero_data"]
    gran = _granularity(info["data_mask"].shape, info["scale"].shape)
    return Storage("linear", _bits(data.dtype), f"{_INT_NAMES.get(data.dtype, '?')} {gran}")


def _describe_cast(info: dict) -> Storage:
    return Storage("float16", 16, "constexpr_cast")


def _op(op_type, form, required, optional, decode, describe, outputs=1) -> ConstexprOp:
    return ConstexprOp(op_type, form, tuple(required), tuple(optional), outputs, decode, describe)


_TABLE = [
    _op("constexpr_affine_dequantize", "ios16", ("quantized_data", "zero_point", "scale", "axis"), (), _decode_affine, _describe_affine),
    _op("constexpr_lut_to_dense", "ios16", ("indices", "lut", "shape"), (), _decode_lut16, _describe_lut16),
    _op("constexpr_sparse_to_dense", "ios16", ("nonzero_data", "mask", "shape"), (), _decode_sparse16, _describe_sparse16),
    _op("constexpr_cast", "ios16", ("source_val", "output_dtype"), (), _decode_cast, _describe_cast),
    _op("constexpr_blockwise_shift_scale", "ios18", ("data", "scale"), ("offset",), _decode_blockwise, _describe_blockwise),
    _op("constexpr_lut_to_dense", "ios18", ("indices", "lut"), ("vector_axis",), _decode_lut18, _describe_lut18),
    _op("constexpr_sparse_to_dense", "ios18", ("nonzero_data", "mask"), (), _decode_sparse18, _describe_sparse18),
    _op("constexpr_lut_to_sparse", "ios18", ("indices_mask", "indices_nonzero_data", "lut"), ("vector_axis",),
        _decode_lut_to_sparse, _describe_lut_to_sparse, outputs=2),
    _op("constexpr_sparse_blockwise_shift_scale", "ios18", ("data_mask", "nonzero_data", "scale"), ("offset",),
        _decode_sparse_shift_scale, _describe_sparse_shift_scale, outputs=2),
    _op("constexpr_cast", "ios18", ("source_val", "output_dtype"), (), _decode_cast, _describe_cast),
]  # fmt: skip
OPS: dict[tuple[str, str], ConstexprOp] = {(e.op_type, e.form): e for e in _TABLE}
# the iOS16 ops are part of every later opset too (still with attributes): the iOS18 table takes the rest
for (_type, _form), _entry in list(OPS.items()):
    if _form == "ios16":
        OPS.setdefault((_type, "ios18"), _entry)


def is_constexpr(op_type: str) -> bool:
    return op_type.startswith("constexpr_")


def form_of(opset: str) -> str:
    """"ios18" for opsets CoreML8 and later (parameters are inputs), else "ios16" (attributes)."""
    m = re.fullmatch(r"CoreML(\d+)", opset or "")
    return "ios18" if m and int(m.group(1)) >= 8 else "ios16"


def lookup(op, opset: str, where: str) -> ConstexprOp:
    """The table entry for a constexpr op: the form whose parameter names its parameters are exactly (the
    iOS16 LUT and sparse forms carry `shape`), else one whose required names are all there, else the form
    of the opset (the missing names are reported later); a located ModelError for an unknown op."""
    names = {e.key for e in op.attributes if e.key != "name"} | {e.key for e in op.inputs}
    preferred = form_of(opset)
    forms = sorted((f for f in ("ios16", "ios18") if (op.type, f) in OPS), key=lambda f: f != preferred)
    if not forms:
        known = ", ".join(sorted({t for t, _ in OPS}))
        raise ModelError(f"{where}: unknown compressed-weight op {op.type}; mlqpipe knows {known} "
                         "(the model needs a newer mlqpipe)")
    entries = [OPS[op.type, f] for f in forms]
    exact = [e for e in entries if set(e.required) <= names <= set(e.required) | set(e.optional)]
    enough = [e for e in entries if set(e.required) <= names]
    return (exact or enough or entries)[0]


def opset_of(model, site) -> str:
    """The opset of the function a site belongs to."""
    function = proto.find_entry(model.spec.mlProgram.functions, site.function)
    return function.opset if function is not None else ""


# -- reading parameters and chains -----------------------------------------------------------------------


def read_value(model, value, where: str):
    """A Value's numbers (strings as an object array), via `model.value_array`."""
    tt = tensor_type(value.type)
    if tt is not None and tt[0] == proto.STRING and value.HasField("immediateValue"):
        strings = np.array(list(value.immediateValue.tensor.strings.values), dtype=object)
        return strings.reshape(tt[1]) if tt[1] is not None and prod(tt[1]) == strings.size else strings
    return model.value_array(value, where)


def parameter_values(op) -> dict:
    """parameter -> the Value (a literal) or the bound name (a str), for attributes and single inputs."""
    out: dict = {}
    for e in op.attributes:
        if e.key != "name":
            out[e.key] = e.value
    for e in op.inputs:
        args = list(e.value.arguments)
        if len(args) != 1:
            out[e.key] = None  # a constexpr parameter is one tensor; several bindings is a damaged op
            continue
        b = args[0]
        out[e.key] = b.name if b.WhichOneof("binding") == "name" else b.value
    return out


def producers(sites) -> dict[str, tuple[object, int]]:
    """output name -> (OpSite, output index), for one function's sites (names are per function)."""
    out = {}
    for site in sites:
        for i, o in enumerate(site.op.outputs):
            out.setdefault(o.name, (site, i))
    return out


def _where(model, site) -> str:
    return f"{model.source}: op '{site.name}' ({site.op.type})"


def _entry(model, site) -> tuple[ConstexprOp, dict]:
    """The table entry and the parameters (Values / names) of a constexpr site, checked for presence."""
    where = _where(model, site)
    entry = lookup(site.op, opset_of(model, site), where)
    params = parameter_values(site.op)
    missing = [p for p in entry.required if params.get(p) is None]
    if missing:
        raise ModelError(f"{where}: parameter(s) {', '.join(missing)} missing (it needs {', '.join(entry.required)}); "
                         "the model is damaged (re-export it)")
    if len(site.op.outputs) != entry.outputs:
        raise ModelError(f"{where}: has {len(site.op.outputs)} outputs, {entry.op_type} has {entry.outputs}; "
                         "the model is damaged (re-export it)")
    return entry, params


def _upstream(model, by_name, site, name: str):
    found = by_name.get(name)
    if found is None:
        raise ModelError(f"{_where(model, site)}: a parameter is bound to '{name}', which no op of the function "
                         "produces; the model is damaged (re-export it)")
    up, index = found
    if up.op.type != "const" and not is_constexpr(up.op.type):
        raise ModelError(f"{_where(model, site)}: a parameter is bound to '{name}', the output of "
                         f"{up.op.type} '{up.name}', which is not a compile-time constant; the model is damaged")
    return up, index


def _check_cycle(model, site, seen: tuple) -> None:
    if site.name in seen:
        raise ModelError(f"{_where(model, site)}: its parameters depend on its own output; the model is damaged")


def decode_chain(model, by_name: dict, site, _seen: tuple = ()) -> np.ndarray | tuple:
    """The dense value(s) of a constexpr op, its chained parameters decoded first (a tuple for ops with
    two outputs). `by_name` is `producers(sites)` of the op's function."""
    _check_cycle(model, site, _seen)
    entry, raw = _entry(model, site)
    where = _where(model, site)
    params = {}
    for key, v in raw.items():
        if v is None:
            continue
        if isinstance(v, str):
            up, index = _upstream(model, by_name, site, v)
            if up.op.type == "const":
                val = const_value(up.op)
                if val is None:
                    raise ModelError(f"{where}: parameter {key} is bound to const '{up.name}', which has no value; "
                                     "the model is damaged (re-export it)")
                params[key] = read_value(model, val, f"{model.source}: op '{up.name}' (const)")
            else:
                got = decode_chain(model, by_name, up, (*_seen, site.name))
                params[key] = got[index] if isinstance(got, tuple) else got
        else:
            params[key] = read_value(model, v, f"{where} parameter {key}")
    types = [tensor_type(o.type) for o in site.op.outputs]
    if any(t is None or t[0] not in DTYPES for t in types):
        raise ModelError(f"{where}: an output is not a tensor of a known dtype; the model is damaged")
    value_dtype, value_shape = types[entry.value_output]
    try:
        with np.errstate(all="ignore"):
            got = entry.decode(params, np.dtype(DTYPES[value_dtype][0]), value_shape)
    except (_Bad, ValueError, TypeError, IndexError) as e:  # numpy's complaints about odd parameters included
        raise ModelError(f"{where}: {e}; the model is damaged (re-export it)") from None
    outs = got if isinstance(got, tuple) else (got,)
    for (_, shape), out, o in zip(types, outs, site.op.outputs):
        if shape is not None and tuple(out.shape) != shape and not (out.ndim == 1 and out.size == prod(shape)):
            raise ModelError(f"{where}: decodes to shape {list(out.shape)} but output {o.name} is declared "
                             f"{list(shape)}; the model is damaged (re-export it)")
    outs = tuple(out.reshape(shape) if shape is not None else out for (_, shape), out in zip(types, outs))
    return outs if isinstance(got, tuple) else outs[0]


def chain_sites(model, by_name: dict, site) -> list:
    """The sites of a chain ending at `site`, upstream first (each once), `site` last."""
    order: list = []

    def visit(s, seen):
        _check_cycle(model, s, seen)
        for v in parameter_values(s.op).values():
            if isinstance(v, str):
                up, _ = _upstream(model, by_name, s, v)
                if is_constexpr(up.op.type) or up.op.type == "const":
                    visit(up, (*seen, s.name))
        if all(o is not s for o in order):
            order.append(s)

    visit(site, ())
    return order


def describe_chain(model, by_name: dict, site, _seen: tuple = ()) -> Storage:
    """The Storage of a constexpr chain ending at `site`, from types and shapes only."""
    _check_cycle(model, site, _seen)
    entry, raw = _entry(model, site)
    info = {}
    for key, v in raw.items():
        if v is None:
            continue
        if isinstance(v, str):
            up, index = _upstream(model, by_name, site, v)
            tt = tensor_type(up.op.outputs[index].type) or (0, None)
            source = describe_chain(model, by_name, up, (*_seen, site.name)) if is_constexpr(up.op.type) else None
            info[key] = ParamInfo(tt[1], tt[0], source, None)
        else:
            tt = tensor_type(v.type) or (0, None)
            small = tt[1] is not None and prod(tt[1]) <= 16
            info[key] = ParamInfo(tt[1], tt[0], None, read_value(model, v, "") if small else None)
    return entry.describe(info)


def stored_bytes(value) -> int:
    """Bytes a literal Value takes as stored (weight-file data or immediate), from its type."""
    tt = tensor_type(value.type)
    if tt is None or tt[1] is None:
        return 0
    if tt[0] == proto.STRING:
        return sum(len(s.encode()) for s in value.immediateValue.tensor.strings.values)
    return (prod(tt[1]) * _bits(tt[0]) + 7) // 8


def chain_nbytes(model, by_name: dict, site) -> int:
    """Stored bytes of every literal parameter of the chain ending at `site` (a const's `val` included)."""
    total = 0
    for s in chain_sites(model, by_name, site):
        total += sum(stored_bytes(v) for v in parameter_values(s.op).values() if v is not None and not isinstance(v, str))
    return total


def blob_refs(model, by_name: dict, site) -> tuple:
    """(fileName, offset) of every weight-file value of the chain ending at `site`, in chain order: what
    identifies the stored weight (coremltools writes a weight shared by functions once)."""
    refs = []
    for s in chain_sites(model, by_name, site):
        for v in parameter_values(s.op).values():
            if v is not None and not isinstance(v, str) and v.HasField("blobFileValue"):
                refs.append((v.blobFileValue.fileName, int(v.blobFileValue.offset)))
    return tuple(refs)
