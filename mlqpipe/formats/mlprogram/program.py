"""Walking a MIL program: functions, their active blocks, nested blocks, ops, and the values consts hold.

A function holds one block per opset specialization; the active one is `block_specializations[opset]`. Ops
may own blocks (cond, while_loop), walked depth first in stored order, so a walk visits every op of the
program exactly once, in the order a reader (and coremltools' blob writer) meets them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from math import prod

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.blob import BLOB_CODE_OF_MIL
from mlqpipe.formats.mlprogram.packing import unpack_lsb_first

# MIL dtype -> (numpy dtype for the values, bits per element on the wire)
DTYPES = {
    proto.FLOAT16: (np.float16, 16), proto.FLOAT32: (np.float32, 32), proto.FLOAT64: (np.float64, 64),
    proto.BFLOAT16: (np.uint16, 16), proto.INT8: (np.int8, 8), proto.INT16: (np.int16, 16), proto.INT32: (np.int32, 32),
    proto.INT64: (np.int64, 64), proto.INT4: (np.int8, 4), proto.UINT8: (np.uint8, 8), proto.UINT16: (np.uint16, 16),
    proto.UINT32: (np.uint32, 32), proto.UINT64: (np.uint64, 64), proto.UINT4: (np.uint8, 4), proto.UINT2: (np.uint8, 2),
    proto.UINT1: (np.uint8, 1), proto.UINT6: (np.uint8, 6), proto.UINT3: (np.uint8, 3), proto.BOOL: (np.bool_, 8),
    proto.FLOAT8E4M3FN: (np.uint8, 8), proto.FLOAT8E5M2: (np.uint8, 8),
}  # fmt: skip


@dataclass(frozen=True)
class OpSite:
    """One op and where it sits: its function, the path of its block ("main", "main/cond_0.blocks[1]")."""

    function: str
    block: str
    op: object  # proto.Operation

    @property
    def name(self) -> str:
        return op_name(self.op)


def functions(program) -> list[tuple[str, object]]:
    """(name, Function) in stored order."""
    return [(e.key, e.value) for e in program.functions]


def active_block(name: str, function, where: str):
    """The block of the function's own opset; a function whose opset names no block is a broken model."""
    block = proto.find_entry(function.block_specializations, function.opset)
    if block is None:
        keys = ", ".join(e.key for e in function.block_specializations) or "none"
        raise ModelError(f"{where}: function '{name}' declares opset {function.opset!r} but has no block for it "
                         f"(blocks: {keys}); the model is damaged (re-export it)")
    return block


def walk_block(block, function: str, path: str) -> Iterator[OpSite]:
    for op in block.operations:
        yield OpSite(function, path, op)
        for i, inner in enumerate(op.blocks):
            yield from walk_block(inner, function, f"{path}/{op_name(op)}.blocks[{i}]")


def walk(program, where: str) -> Iterator[OpSite]:
    """Every op of every function's active block, nested blocks included."""
    for name, function in functions(program):
        yield from walk_block(active_block(name, function, where), name, name)


def op_name(op) -> str:
    """The op's `name` attribute (coremltools writes one on every op), else its first output's name."""
    value = proto.find_entry(op.attributes, "name")
    if value is not None and value.HasField("immediateValue") and value.immediateValue.tensor.strings.values:
        return value.immediateValue.tensor.strings.values[0]
    return op.outputs[0].name if op.outputs else f"<{op.type}>"


def bound_names(op) -> dict[str, list[str]]:
    """parameter -> the names of the values bound to it (literal bindings are left out)."""
    return {e.key: [b.name for b in e.value.arguments if b.WhichOneof("binding") == "name"] for e in op.inputs}


def tensor_type(value_type) -> tuple[int, tuple[int, ...] | None] | None:
    """(MIL dtype, shape) of a tensor ValueType (shape None when a dimension is unknown); None for non-tensors."""
    if value_type.WhichOneof("type") != "tensorType":
        return None
    t = value_type.tensorType
    dims = []
    for d in t.dimensions:
        if d.WhichOneof("dimension") != "constant":
            return t.dataType, None
        dims.append(int(d.constant.size))
    return t.dataType, tuple(dims)


def const_value(op):
    """The `val` attribute of a const op (None when absent)."""
    return proto.find_entry(op.attributes, "val")


def immediate_array(value, where: str) -> np.ndarray | None:
    """The numbers of an immediate tensor Value, in its declared dtype and shape (None: not a tensor)."""
    tt = tensor_type(value.type)
    if tt is None or not value.HasField("immediateValue") or value.immediateValue.WhichOneof("value") != "tensor":
        return None
    dtype, shape = tt
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    count = prod(shape) if shape is not None else None
    if (dtype == proto.STRING) != (kind == "strings") and kind is not None:
        raise ModelError(f"{where}: an immediate value of dtype {proto.DATA_TYPE_NAMES.get(dtype, dtype)} holds "
                         f"{kind}; the model is damaged")
    if dtype not in DTYPES and dtype != proto.STRING:
        raise ModelError(f"{where}: immediate value of unknown dtype {dtype}; the model is damaged")
    np_type, bits = DTYPES.get(dtype, (object, 0))
    if kind == "bytes":
        raw = tensor.bytes.values
        if bits < 8:
            n = count if count is not None else len(raw) * 8 // bits
            values = unpack_lsb_first(raw, bits, n)
            if dtype == proto.INT4:
                values = ((values.astype(np.int16) ^ 8) - 8).astype(np.int8)
            values = values.astype(np_type)
        else:
            width = np.dtype(np_type).itemsize
            if len(raw) % width:
                raise ModelError(f"{where}: immediate value holds {len(raw)} bytes, not a whole number of {width}-byte values")
            values = np.frombuffer(raw, np.dtype(np_type).newbyteorder("<")).astype(np_type)
    elif kind is None:
        values = np.zeros(0, np_type)
    elif kind == "strings":
        values = np.array(list(tensor.strings.values), dtype=object)
    else:
        values = np.array(list(getattr(tensor, kind).values), dtype=np_type)
    if count is not None:
        if values.size != count:
            raise ModelError(f"{where}: immediate value holds {values.size} values, its type says {count}")
        values = values.reshape(shape)
    return values


def blob_dtype_code(mil_dtype: int) -> int | None:
    """weight.bin's dtype code for a MIL dtype (None: the blob format has none)."""
    return BLOB_CODE_OF_MIL.get(mil_dtype)
