"""The weight inventory of an ML program: one record per weight, in every function and nested block.

A *weight* is a `const` whose value is a float16/float32/int8/uint8 tensor of at least 10 elements (what
coremltools stores in weight.bin), or a chain of constexpr ops (a compressed weight: one record for the
chain, named after its last op). Consts feeding only constexpr ops are parts of a chain. Everything else a
const holds (shapes, axes, strides, modes, small tables, bools, strings, tensors of < 10 elements) is a
*parameter*: listed by `parameters` for `inspect`, never selected by rules.

Names (what rule authors write):
- `layer` is the op name of the const (or of the chain's last constexpr), e.g. `fc1_weight_0`; `field` the
  parameter of its first consumer (`weight`, `bias`, `x`, `y`, ...; `output` when it only feeds block
  outputs, `unused` when nothing reads it); `names` holds every consumer's parameter.
- `network` is "" in the default function's top block (the `defaultFunctionName`, else `main`, else the
  only function), `"<function>/"` in another function's top block, and the block path inside nested
  blocks: `"branch.blocks[0]/"`, `"main_b/loop.blocks[1]/"`. It always ends with "/" when not empty.
- `id` = `network + layer`, e.g. `fc1_weight_0`, `main_b/fc2_weight_0`, `loop.blocks[1]/fc_body_weight_1`:
  op names are unique within a function, so this is unique and as stable as the op names.

Shared weights: consts (or chains) reading the same weight-file data are one weight, whichever functions
hold them (coremltools writes a weight shared by functions once, and each function has its own const op
with the same name): one record, every consumer, every function, and every op site in `handle.sites`, so
a writer replaces them all and the data stays shared. The record is named after the site in the first
function of the inventory's order (the default function first, then the others by name), so ids do not
depend on the (random) order coremltools writes the functions map in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any, ClassVar, NamedTuple

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.base import Storage
from mlqpipe.formats.base import WeightRecord as BaseRecord
from mlqpipe.formats.mlprogram import constexpr, proto
from mlqpipe.formats.mlprogram.program import OpSite, active_block, bound_names, const_value, functions, op_name, tensor_type

WEIGHT_DTYPES = {proto.FLOAT32: "float32", proto.FLOAT16: "float16", proto.INT8: "int8", proto.UINT8: "uint8"}
MIN_WEIGHT_ELEMENTS = 10

MIL_DTYPE_NAMES = {
    proto.BOOL: "bool", proto.STRING: "string", proto.FLOAT16: "fp16", proto.FLOAT32: "fp32", proto.FLOAT64: "fp64",
    proto.BFLOAT16: "bf16", proto.INT8: "int8", proto.INT16: "int16", proto.INT32: "int32", proto.INT64: "int64",
    proto.INT4: "int4", proto.UINT8: "uint8", proto.UINT16: "uint16", proto.UINT32: "uint32", proto.UINT64: "uint64",
    proto.UINT4: "uint4", proto.UINT2: "uint2", proto.UINT1: "uint1", proto.UINT6: "uint6", proto.UINT3: "uint3",
    proto.FLOAT8E4M3FN: "fp8e4m3fn", proto.FLOAT8E5M2: "fp8e5m2",
}  # fmt: skip


def mil_dtype_name(dtype: int) -> str:
    return MIL_DTYPE_NAMES.get(dtype, f"dtype{dtype}")


class Consumer(NamedTuple):
    """An op reading a value: its name, type and the parameter the value is bound to (a plain tuple)."""

    op: str
    op_type: str
    parameter: str


@dataclass(frozen=True)
class WeightHandle:
    """What a writer needs: the model, every op site holding the weight (one per function sharing it; the
    const, or the chain's last constexpr), and the index of the output that is the weight."""

    model: Any
    sites: tuple[OpSite, ...]
    output: int = 0
    producers: dict = field(default_factory=dict, repr=False, compare=False)  # of the first site's function

    @property
    def site(self) -> OpSite:
        return self.sites[0]


@dataclass(kw_only=True)
class MLWeightRecord(BaseRecord):
    """One weight of an ML program (see the module docstring for the names).

    dtype: the MIL dtype of the weight's value ("fp32", "fp16", "int8", "uint8"; a compressed weight's
      output dtype). axis / input_axis: the output / input channel axis coremltools would use (0/1; 1/0 for
      conv_transpose; matmul operands by transpose flags), non-negative, None when consumers disagree or
      the weight has no such axis. consumers: (op, op type, parameter) of every reader; functions: the
      functions holding it; feeds_only_outputs: no op reads it, only block outputs.
    """

    dtype: str
    input_axis: int | None
    consumers: tuple[Consumer, ...]
    functions: tuple[str, ...]
    feeds_only_outputs: bool
    conv_groups: tuple[int, ...] = ()  # `groups` of each conv / conv_transpose reading it as its weight
    stored: int = 0  # bytes as stored, parameters included

    CONDITIONS: ClassVar[frozenset[str]] = frozenset({"function", "in_channels", "out_channels", "position"})
    FORMAT: ClassVar[str] = "mlprogram"

    @property
    def id(self) -> str:
        """`network + layer`: unique within the model (op names are unique within a function)."""
        return f"{self.network}{self.layer}"

    @property
    def where(self) -> str:
        used = f" ({self.consumers[0].op}.{self.consumers[0].parameter})" if self.consumers else ""
        return f"op '{self.layer}' ({self.layer_type}){used}" + (f" in {self.network.rstrip('/')}" if self.network else "")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.field, *(c.parameter for c in self.consumers)]))

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The const's own name and every reader's (rules name the layer that uses a weight)."""
        return tuple(dict.fromkeys([self.layer, *(c.op for c in self.consumers)]))

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Every reader's op type (conv, linear, matmul, gather, ...), then the weight's own (const or a constexpr)."""
        return tuple(dict.fromkeys([*(c.op_type for c in self.consumers), self.layer_type]))

    @property
    def out_channels(self) -> int | None:
        return self.shape[self.axis] if self.shape and self.axis is not None else None

    @property
    def in_channels(self) -> int | None:
        return self.shape[self.input_axis] if self.shape and self.input_axis is not None else None

    @property
    def compressed(self) -> bool:
        return self.layer_type != "const"

    @property
    def nbytes(self) -> int:
        return self.stored

    def values(self, count: int | None = None) -> np.ndarray:
        """The weight as float32 in its shape: a const read through the weight file's mapping (one copy, in
        float32), a compressed weight decoded by its constexpr chain."""
        handle: WeightHandle = self.handle
        model, site = handle.model, handle.site
        if site.op.type == "const":
            value = model.value_array(const_value(site.op), f"{model.source}: op '{site.name}' (const)")
            return np.array(value, dtype=np.float32)
        got = constexpr.decode_chain(model, handle.producers, site)
        got = got[handle.output] if isinstance(got, tuple) else got
        return np.asarray(got, dtype=np.float32)

    def native_values(self) -> np.ndarray:
        """A const's values in its own dtype (fp16 or fp32): a read-only view of the weight file's mapping
        (no copy; a kernel writing into it fails loudly), or a decoded compressed weight."""
        handle: WeightHandle = self.handle
        model, site = handle.model, handle.site
        if site.op.type != "const":
            return self.values()
        return np.asarray(model.value_array(const_value(site.op), f"{model.source}: op '{site.name}' (const)"))


@dataclass(frozen=True)
class ParameterRecord:
    """A const that is not a weight: shown by `inspect`, never selected."""

    name: str
    network: str
    function: str
    dtype: str
    shape: tuple[int, ...] | None
    value: str  # a short summary of the value
    consumers: tuple[Consumer, ...] = ()


# -- walking ----------------------------------------------------------------------------------------------


def default_function(spec) -> str | None:
    """The function whose top block is network "": `defaultFunctionName`, else `main`, else the only one."""
    names = [name for name, _ in functions(spec.mlProgram)]
    default = proto.read_description(spec).defaultFunctionName
    if default in names:
        return default
    if "main" in names:
        return "main"
    return names[0] if len(names) == 1 else None


def ordered_functions(spec) -> list[tuple[str, Any]]:
    """(name, Function): the default function first, then the others by name."""
    default = default_function(spec)
    return sorted(functions(spec.mlProgram), key=lambda nf: (nf[0] != default, nf[0]))


@dataclass
class _Function:
    """One function's ops and the uses of every value name in it."""

    name: str
    sites: list[OpSite]
    uses: dict[str, list[tuple[OpSite, str]]]
    outputs: set[str]  # names returned by some block
    producers: dict[str, tuple[OpSite, int]]


def _walk(block, function: str, path: str, sites: list, outputs: set) -> None:
    outputs.update(block.outputs)
    for op in block.operations:
        sites.append(OpSite(function, path, op))
        for i, inner in enumerate(op.blocks):
            _walk(inner, function, f"{path}/{op_name(op)}.blocks[{i}]", sites, outputs)


def _scan(spec, name: str, function, where: str) -> _Function:
    sites: list[OpSite] = []
    outputs: set[str] = set()
    _walk(active_block(name, function, where), name, name, sites, outputs)
    uses: dict[str, list] = {}
    for site in sites:
        for param, bound in bound_names(site.op).items():
            for value in bound:
                uses.setdefault(value, []).append((site, param))
    return _Function(name, sites, uses, outputs, constexpr.producers(sites))


def network_of(site: OpSite, default: str | None) -> str:
    """"" / "<function>/" / "[<function>/]<block path>/" (see the module docstring)."""
    inner = site.block[len(site.function) + 1:] if site.block != site.function else ""
    parts = ([] if site.function == default else [site.function]) + ([inner] if inner else [])
    return "".join(p + "/" for p in parts)


# -- channel axes -----------------------------------------------------------------------------------------


def _flag(fn: _Function, model, site: OpSite, name: str) -> bool | None:
    """A bool parameter of a consumer (matmul's transpose flags): False when absent, None when unknown."""
    bound = bound_names(site.op).get(name)
    if not bound:
        value = proto.find_entry(site.op.inputs, name)
        if value is None:
            return False
        literal = [b.value for b in value.arguments if b.WhichOneof("binding") == "value"]
        return _bool(model, literal[0]) if literal else None
    found = fn.producers.get(bound[0])
    if found is None or found[0].op.type != "const":
        return None
    return _bool(model, const_value(found[0].op))


def _int(fn: _Function, model, site: OpSite, name: str, default: int) -> int | None:
    """An int parameter of a consumer (conv's groups): `default` when absent, None when unknown."""
    bound = bound_names(site.op).get(name)
    if bound:
        found = fn.producers.get(bound[0])
        value = const_value(found[0].op) if found is not None and found[0].op.type == "const" else None
    else:
        entry = proto.find_entry(site.op.inputs, name)
        if entry is None:
            return default
        literal = [b.value for b in entry.arguments if b.WhichOneof("binding") == "value"]
        value = literal[0] if literal else None
    if value is None:
        return None
    try:
        v = np.asarray(constexpr.read_value(model, value, model.source))
    except ModelError:
        return None
    return int(v.reshape(-1)[0]) if v.size == 1 and v.dtype.kind in "iu" else None


def _bool(model, value) -> bool | None:
    try:
        v = np.asarray(constexpr.read_value(model, value, model.source))
    except ModelError:
        return None
    return bool(v.reshape(-1)[0]) if v.size == 1 and v.dtype != object else None


def channel_axes(fn: _Function, model, site: OpSite, parameter: str) -> tuple[int | None, int | None]:
    """(output axis, input axis) a consumer implies (possibly negative; None: unknown)."""
    kind = site.op.type
    if kind == "conv_transpose":
        return 1, 0
    if kind == "matmul" and parameter in ("x", "y"):
        flag = _flag(fn, model, site, f"transpose_{parameter}")
        if flag is None:
            return None, None
        if parameter == "y":
            return (-2, -1) if flag else (-1, -2)
        return (-1, -2) if flag else (-2, -1)
    return 0, 1


def _agreed(axes: list[int | None], rank: int) -> int | None:
    normal = {None if a is None else a + rank if a < 0 else a for a in axes} or {None}
    if len(normal) != 1:
        return None
    (axis,) = normal
    return axis if axis is not None and 0 <= axis < rank else None


# -- the inventory ----------------------------------------------------------------------------------------


def _is_weight_type(tt) -> bool:
    return tt is not None and tt[0] in WEIGHT_DTYPES and tt[1] is not None and prod(tt[1]) >= MIN_WEIGHT_ELEMENTS


def _plain_storage(dtype: int) -> Storage:
    name = WEIGHT_DTYPES[dtype]
    return Storage(name, 8 if name in ("int8", "uint8") else 0)


@dataclass
class _Found:
    """A weight found at one site, before shared sites are merged."""

    site: OpSite
    output: int
    layer_type: str
    shape: tuple[int, ...]
    dtype: int
    storage: Storage
    stored: int
    key: tuple
    consumers: list[tuple[OpSite, str]]
    feeds_only_outputs: bool


def _only_constexpr(uses: list) -> bool:
    return bool(uses) and all(constexpr.is_constexpr(s.op.type) for s, _ in uses)


def _weights_of(fn: _Function, model) -> list[_Found]:
    found = []
    for site in fn.sites:
        op = site.op
        if op.type == "const":
            value = const_value(op)
            tt = tensor_type(value.type) if value is not None else None
            name = op.outputs[0].name if op.outputs else None
            if name is None or not _is_weight_type(tt) or _only_constexpr(fn.uses.get(name, [])):
                continue
            ref = value.blobFileValue
            key = (("blob", ref.fileName, int(ref.offset)),) if value.HasField("blobFileValue") else (("site", site.function, site.name),)
            found.append(_Found(site, 0, "const", tt[1], tt[0], _plain_storage(tt[0]), constexpr.stored_bytes(value), key,
                                fn.uses.get(name, []), name in fn.outputs and name not in fn.uses))
        elif constexpr.is_constexpr(op.type):
            entry = constexpr.lookup(op, constexpr.opset_of(model, site), f"{model.source}: op '{site.name}' ({op.type})")
            if len(op.outputs) != entry.outputs:
                continue  # reported by decode/describe when asked; not a weight we can name
            out = op.outputs[entry.value_output]
            uses = [u for o in op.outputs for u in fn.uses.get(o.name, [])]
            if _only_constexpr(uses):
                continue  # an inner op of a chain
            tt = tensor_type(out.type)
            if tt is None or tt[1] is None:
                raise ModelError(f"{model.source}: op '{site.name}' ({op.type}): its output has no fixed tensor shape; "
                                 "the model is damaged (re-export it)")
            chain = constexpr.chain_sites(model, fn.producers, site)
            refs = constexpr.blob_refs(model, fn.producers, site)
            found.append(_Found(site, entry.value_output, "+".join(s.op.type for s in chain), tt[1], tt[0],
                                constexpr.describe_chain(model, fn.producers, site),
                                constexpr.chain_nbytes(model, fn.producers, site),
                                tuple(("blob", *r) for r in refs) or (("site", site.function, site.name),),
                                fn.uses.get(out.name, []), out.name in fn.outputs and out.name not in fn.uses))
    return found


def inventory(model) -> list[MLWeightRecord]:
    """Every weight of the program (`model`: an MLProgram), in walk order, the default function first."""
    spec = model.spec
    default = default_function(spec)
    merged: dict[tuple, list[tuple[_Function, _Found]]] = {}
    for name, function in ordered_functions(spec):
        fn = _scan(spec, name, function, model.source)
        for f in _weights_of(fn, model):
            merged.setdefault(f.key, []).append((fn, f))
    return [_record(model, group, default) for group in merged.values()]


def _record(model, group: list[tuple[_Function, _Found]], default: str | None) -> MLWeightRecord:
    fn0, first = group[0]
    consumers: list[Consumer] = []
    outs: list[int | None] = []
    ins: list[int | None] = []
    groups: list[int] = []
    for fn, f in group:
        for site, param in f.consumers:
            c = Consumer(site.name, site.op.type, param)
            if c not in consumers:
                consumers.append(c)
            if site.op.type in ("conv", "conv_transpose") and param == "weight":
                groups.append(_int(fn, model, site, "groups", 1) or 1)
            o, i = channel_axes(fn, model, site, param)
            outs.append(o)
            ins.append(i)
    rank = len(first.shape)
    if not consumers:
        outs, ins = [0], [1]
    only_outputs = all(f.feeds_only_outputs for _, f in group)
    return MLWeightRecord(
        layer=first.site.name,
        layer_type=first.layer_type,
        field=consumers[0].parameter if consumers else ("output" if only_outputs else "unused"),
        network=network_of(first.site, default),
        shape=first.shape,
        dtype=mil_dtype_name(first.dtype),
        axis=_agreed(outs, rank),
        input_axis=_agreed(ins, rank),
        count=prod(first.shape),
        storage=first.storage,
        consumers=tuple(consumers),
        functions=tuple(dict.fromkeys(fn.name for fn, _ in group)),
        feeds_only_outputs=only_outputs,
        conv_groups=tuple(groups),
        stored=first.stored,
        handle=WeightHandle(model, tuple(f.site for _, f in group), first.output, fn0.producers),
    )


# -- parameters -------------------------------------------------------------------------------------------


def _summary(values) -> str:
    v = np.asarray(values)
    if v.dtype == object:
        items = [str(x) for x in v.reshape(-1)]
        return items[0] if v.ndim == 0 or len(items) == 1 else "[" + ", ".join(items) + "]"
    if v.ndim == 0:
        return str(v.item())
    flat = v.reshape(-1)
    shown = ", ".join(str(x) for x in flat[:8].tolist()) + (", ..." if flat.size > 8 else "")
    return f"[{shown}]"


def parameters(model) -> list[ParameterRecord]:
    """Every const of the program that is neither a weight nor part of a compressed weight."""
    spec = model.spec
    default = default_function(spec)
    out = []
    for name, function in ordered_functions(spec):
        fn = _scan(spec, name, function, model.source)
        for site in fn.sites:
            if site.op.type != "const" or not site.op.outputs:
                continue
            value = const_value(site.op)
            oname = site.op.outputs[0].name
            uses = fn.uses.get(oname, [])
            tt = tensor_type(value.type) if value is not None else None
            if _is_weight_type(tt) or _only_constexpr(uses):
                continue
            if tt is None:
                dtype, shape, summary = value.type.WhichOneof("type") if value is not None else "none", None, "(not a tensor)"
            else:
                dtype, shape = mil_dtype_name(tt[0]), tt[1]
                summary = _summary(constexpr.read_value(model, value, f"{model.source}: op '{site.name}' (const)"))
            out.append(ParameterRecord(site.name, network_of(site, default), name, dtype, shape, summary,
                                       tuple(Consumer(s.name, s.op.type, p) for s, p in uses)))
    return out
