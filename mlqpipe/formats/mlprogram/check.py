"""What Core ML enforces on an ML program, checked without Core ML (MLPROGRAM.md §11).

Core ML's open-source validator stops at the model description; the program itself is judged by Apple's
closed MIL compiler on the device. The next best proof that a package loads is to apply the rules we know:
MIL.proto's (SSA names, identifiers, the opset block, equal specializations), the specification versions
Core ML derives from the opsets, the description matching the default function, every blob read as Core ML's
blob reader reads it, and the constraints of every constexpr op (§4) that coremltools' loader enforces
through its type inference. Every package mlqpipe writes goes through `raise_on_errors` first.

The rules are a table (`RULES`) of small functions with one signature: `rule(program) -> hits`, where
`program` is a `_Program` view (functions, active blocks, op sites and value types, built once) and a hit is
(severity, where, message); the table adds the rule name. `where` names the function, the block path or the
op: "main", "main/fc1_weight_0_palettized", "main/loop.blocks[1]/fc_body". Rules marked `weights=False` read
no weight data: `structure_findings` runs only those, cheaply, on an input before compressing it.

Decisions:
- NaN or Inf in a compressed parameter (scale, LUT, float zero point / offset, nonzero data, fp16 source
  of a cast) is an error: coremltools writes such LUTs silently (uniform palettization of a weight with
  inf, MLPROGRAM.md §9.3) and the decompressed weight is garbage. In a plain float const of >= 10 elements
  it is a warning: that is the user's model, and Core ML accepts it.
- Names: a value may be defined once in a scope and in none of its enclosing scopes; sibling blocks are
  separate scopes, so the two blocks of coremltools' while_loop may declare the same inputs (MIL.proto
  allows it; Core ML's mil-check in coreml-validate refuses it).
- Parameter form: iOS18 (opset CoreML8 and later) redefines constexpr_lut_to_dense, _sparse_to_dense and
  _cast and adds the blockwise / sparse-LUT ops, whose parameters are inputs; earlier opsets, and
  constexpr_affine_dequantize in every opset (coremltools writes it so in CoreML8 too: its only definition
  is iOS16's), take them as attributes.
- Spec versions are checked for every function's opset (Core ML's validator looks at `main` only).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from math import prod

import numpy as np

from mlqpipe.errors import CheckError, ModelError
from mlqpipe.formats.base import Finding
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.blob import BLOB_CODE_OF_MIL
from mlqpipe.formats.mlprogram.packing import padding_is_zero
from mlqpipe.formats.mlprogram.program import op_name, tensor_type

# MLMODEL_SPECIFICATION_VERSION_NEWEST of Core ML's validator in coremltools 9.0 (iOS 26)
NEWEST_SPEC_VERSION = 10
# opset -> the specificationVersion it needs (mlmodel/src/Utils.cpp; coremltools' _OPSET)
OPSET_SPEC_VERSION = {"CoreML5": 6, "CoreML6": 7, "CoreML7": 8, "CoreML8": 9, "CoreML9": 10}
OPSET_OS = {"CoreML5": "iOS15", "CoreML6": "iOS16", "CoreML7": "iOS17", "CoreML8": "iOS18", "CoreML9": "iOS26"}
MULTIFUNCTION_SPEC_VERSION = 9
IOS18 = "CoreML8"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_@]*")
FINITE_CONST_MIN = 10  # float consts from this many elements are looked at (what coremltools puts in blobs)

# constexpr op types by the opset that first defines them; iOS18 redefines three iOS16 ones with inputs
IOS16_CONSTEXPR = frozenset({"constexpr_affine_dequantize", "constexpr_cast", "constexpr_lut_to_dense",
                             "constexpr_sparse_to_dense"})
IOS18_CONSTEXPR = frozenset({"constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_sparse_to_dense",
                             "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale", "constexpr_cast"})
IOS18_ONLY = IOS18_CONSTEXPR - IOS16_CONSTEXPR
IOS16_LUT_SIZES = (2, 4, 16, 64, 256)

_D = proto
_INT_SUB = {_D.INT4, _D.UINT4}
_INDICES = (_D.UINT1, _D.UINT2, _D.UINT3, _D.UINT4, _D.UINT6, _D.UINT8)
_NBITS = {_D.UINT1: 1, _D.UINT2: 2, _D.UINT3: 3, _D.UINT4: 4, _D.UINT6: 6, _D.UINT8: 8, _D.INT4: 4}
_FLOATS = (_D.FLOAT16, _D.FLOAT32)
_LUT_T = (_D.INT8, _D.UINT8, _D.FLOAT16, _D.FLOAT32)
_SRC18 = (_D.INT4, _D.UINT4, _D.INT8, _D.UINT8, _D.FLOAT16, _D.FLOAT32)
_SUB_BYTE = (_D.INT4, _D.UINT4, _D.UINT1, _D.UINT2, _D.UINT3, _D.UINT6)
IOS16_OPSETS = ("CoreML6", "CoreML7")  # opsets whose constexpr ops are the iOS16 definitions


def dtype_text(code) -> str:
    """MIL dtype as coremltools spells it: fp16, fp32, int4, uint1 ..."""
    name = proto.DATA_TYPE_NAMES.get(code)
    if name is None:
        return f"dtype {code}"
    return name.lower().replace("bfloat", "bf").replace("float", "fp")


def _domain(codes) -> str:
    return "/".join(dtype_text(c) for c in codes)


def _shape_text(shape) -> str:
    return "?" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


# -- the program view ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One op: its function and that function's opset, its block path, and `where` for findings."""

    function: str
    opset: str
    block: str
    op: object

    @property
    def where(self) -> str:
        return f"{self.block}/{op_name(self.op)}"


@dataclass(frozen=True)
class Param:
    """One constexpr parameter: declared type, and either a literal Value or the name of a bound variable."""

    name: str
    form: str  # "attribute" or "input"
    dtype: int | None
    shape: tuple[int, ...] | None
    value: object = None  # proto.Value of a literal
    bound: str | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


@dataclass
class _Program:
    """What the rules look at, built once per check (no weight data is read here)."""

    model: object
    spec: object
    functions: list  # (name, Function, active Block or None)
    sites: list[Site]
    types: dict  # function -> {value name: (dtype, shape) or None}
    _constexprs: list | None = None  # (site, _Op, expected outputs), checked once for both constexpr rules

    def value(self, param: Param):
        """The literal's numbers (None: bound, or unreadable — the `blob` / `immediate-value` rules say why).
        Weight-file values are views into the mapping: reading one again costs nothing."""
        if param.value is None:
            return None
        return self.array(param.value, param.name)

    def array(self, value, name: str):
        try:
            return self.model.value_array(value, name)
        except ModelError:
            return None


def _strings(value):
    """An inline string tensor's strings, flat, or None when it holds something else (the immediate-value
    rule names what it holds; model.value_array reads string parameters)."""
    if not value.HasField("immediateValue") or value.immediateValue.tensor.WhichOneof("value") != "strings":
        return None
    return np.array(list(value.immediateValue.tensor.strings.values), dtype=object)


def _view(model) -> _Program:
    spec = model.spec
    functions, sites, types = [], [], {}
    for entry in spec.mlProgram.functions:
        fn = entry.value
        block = proto.find_entry(fn.block_specializations, fn.opset)
        functions.append((entry.key, fn, block))
        known = {i.name: tensor_type(i.type) for i in fn.inputs}
        if block is not None:
            for site in _walk(block, entry.key, fn.opset, entry.key):
                sites.append(site)
                known.update((o.name, tensor_type(o.type)) for o in site.op.outputs)
        types[entry.key] = known
    return _Program(model, spec, functions, sites, types)


def _walk(block, function: str, opset: str, path: str) -> Iterator[Site]:
    for op in block.operations:
        yield Site(function, opset, path, op)
        for i, inner in enumerate(op.blocks):
            yield from _walk(inner, function, opset, f"{path}/{op_name(op)}.blocks[{i}]")


def _params(site: Site, types: dict) -> dict[str, Param]:
    """Every parameter of a constexpr op, attributes and inputs alike (the `op-opset` rule judges the form)."""
    out = {}
    for e in site.op.attributes:
        if e.key != "name":
            out[e.key] = _literal(e.key, "attribute", e.value)
    for e in site.op.inputs:
        args = list(e.value.arguments)
        if len(args) != 1:
            out[e.key] = Param(e.key, "input", None, None)
        elif args[0].WhichOneof("binding") == "name":
            dtype, shape = types.get(args[0].name) or (None, None)
            out[e.key] = Param(e.key, "input", dtype, shape, bound=args[0].name)
        else:
            out[e.key] = _literal(e.key, "input", args[0].value)
    return out


def _literal(name: str, form: str, value) -> Param:
    dtype, shape = tensor_type(value.type) or (None, None)
    return Param(name, form, dtype, shape, value=value)


def _is_constexpr(op) -> bool:
    return op.type.startswith("constexpr_")


# -- structure rules (no weight data) -----------------------------------------------------------------------


def _spec_version_known(p: _Program):
    v = p.spec.specificationVersion
    if not 1 <= v <= NEWEST_SPEC_VERSION:
        why = "is missing (0)" if v == 0 else f"is {v}, newer than any Core ML release knows"
        yield "error", "model", f"specificationVersion {why}; Core ML loads 1..{NEWEST_SPEC_VERSION}"


def _opset_block(p: _Program):
    for name, fn, block in p.functions:
        if block is None:
            keys = ", ".join(repr(e.key) for e in fn.block_specializations) or "none"
            yield "error", name, f"opset {fn.opset!r} names none of the function's blocks ({keys})"
        elif fn.opset not in OPSET_SPEC_VERSION:
            yield "error", name, f"opset {fn.opset!r} is not one Core ML knows ({', '.join(OPSET_SPEC_VERSION)})"


def _specialization_outputs(p: _Program):
    for name, fn, block in p.functions:
        if block is None:
            continue
        for e in fn.block_specializations:
            if list(e.value.outputs) != list(block.outputs):
                yield "error", name, (f"block {e.key!r} returns {list(e.value.outputs)}, block {fn.opset!r} returns "
                                      f"{list(block.outputs)}; all specializations must have the same outputs")


def _identifiers(p: _Program):
    def bad(kind: str, name: str, where: str):
        if not IDENTIFIER.fullmatch(name):
            yield "error", where, f"{kind} {name!r} is not a MIL identifier ([A-Za-z_][A-Za-z0-9_@]*)"

    for name, fn, block in p.functions:
        yield from bad("function name", name, name)
        for i in fn.inputs:
            yield from bad("function input", i.name, name)
    for site in p.sites:
        for o in site.op.outputs:
            yield from bad("output", o.name, site.where)
        for i, inner in enumerate(site.op.blocks):
            for b in inner.inputs:
                yield from bad(f"input of block {i}", b.name, site.where)


def _scopes(p: _Program) -> Iterator[tuple[str, str, str]]:
    """SSA in stored order: ("undefined" | "twice", where, message) for every name used before it is defined
    in its scope or an enclosing one, and every name defined again where it is already visible."""
    for name, fn, block in p.functions:
        if block is None:
            continue
        visible: set[str] = set()
        for i in fn.inputs:
            if i.name in visible:
                yield "twice", name, f"function input {i.name!r} is declared twice"
            visible.add(i.name)
        yield from _block_scope(block, name, visible, name)


def _block_scope(block, path: str, visible: set[str], where: str):
    for op in block.operations:
        here = f"{path}/{op_name(op)}"
        for e in op.inputs:
            for b in e.value.arguments:
                if b.WhichOneof("binding") == "name" and b.name not in visible:
                    yield "undefined", here, f"parameter {e.key!r} reads {b.name!r}, which is defined nowhere before it in its scope"
        for i, inner in enumerate(op.blocks):
            local = set(visible)  # a block sees what is defined before its op; what it defines stays inside
            for b in inner.inputs:
                if b.name in local:
                    yield "twice", here, f"input {b.name!r} of block {i} is already defined in an enclosing scope"
                local.add(b.name)
            yield from _block_scope(inner, f"{here}.blocks[{i}]", local, f"{here}.blocks[{i}]")
        for o in op.outputs:
            if o.name in visible:
                yield "twice", here, f"output {o.name!r} is already defined in this scope"
            visible.add(o.name)
    for out in block.outputs:
        if out not in visible:
            yield "undefined", where, f"block output {out!r} is not defined in the block or an enclosing scope"


def _undefined_values(p: _Program):
    for kind, where, message in _scopes(p):
        if kind == "undefined":
            yield "error", where, message


def _duplicate_values(p: _Program):
    for kind, where, message in _scopes(p):
        if kind == "twice":
            yield "error", where, message


def required_spec_version(p: _Program) -> tuple[int, str]:
    """The lowest specificationVersion the opsets allow, and why."""
    need, why = 1, ""
    for name, fn, _ in p.functions:
        v = OPSET_SPEC_VERSION.get(fn.opset, 1)
        if v > need:
            need, why = v, f"function {name!r} uses opset {fn.opset} ({OPSET_OS[fn.opset]})"
    if len(p.functions) > 1 and MULTIFUNCTION_SPEC_VERSION > need:
        need, why = MULTIFUNCTION_SPEC_VERSION, f"{len(p.functions)} functions (multifunction models need iOS18)"
    return need, why


def _spec_version(p: _Program):
    need, why = required_spec_version(p)
    v = p.spec.specificationVersion
    if v < need:
        yield "error", "model", f"specificationVersion {v} is too low: {why}, which needs >= {need}"


def _op_opset(p: _Program):
    """Constexpr ops exist from iOS16, the blockwise / sparse-LUT ones from iOS18; each opset has its form."""
    for site in p.sites:
        op = site.op
        if not _is_constexpr(op):
            continue
        opset = site.opset
        ios18 = opset in OPSET_SPEC_VERSION and OPSET_SPEC_VERSION[opset] >= OPSET_SPEC_VERSION[IOS18]
        if op.type not in IOS16_CONSTEXPR | IOS18_CONSTEXPR:
            yield "error", site.where, f"{op.type} is not a constexpr op Core ML knows"
            continue
        if opset == "CoreML5":
            yield "error", site.where, f"{op.type} needs opset CoreML6 (iOS16) or later; function {site.function!r} is CoreML5 (iOS15)"
            continue
        if op.type in IOS18_ONLY and not ios18:
            yield "error", site.where, (f"{op.type} needs opset CoreML8 (iOS18) or later; function {site.function!r} is "
                                        f"{opset}")
            continue
        wrong, form = _misplaced(op, ios18)
        if wrong:
            inputs_form = form == "attributes"
            expected = "inputs (the iOS18 form)" if inputs_form else "attributes (the iOS16 form)"
            yield "error", site.where, (f"{op.type} in a {opset} function takes its parameters as {expected}, but "
                                        f"{', '.join(map(repr, wrong))} {'is' if len(wrong) == 1 else 'are'} {form}")


def _misplaced(op, ios18: bool) -> tuple[list[str], str]:
    """The parameters in the wrong place for the op's definition in its opset, and where they are."""
    if ios18 and op.type in IOS18_CONSTEXPR:
        return sorted(e.key for e in op.attributes if e.key != "name"), "attributes"
    return sorted(e.key for e in op.inputs), "inputs"


def _wrong_form(site: Site, ios18: bool) -> bool:
    return bool(_misplaced(site.op, ios18)[0])


def _description(p: _Program):
    """The model's declared inputs and outputs are the default function's (per function when described)."""
    try:
        desc = proto.read_description(p.spec)
    except Exception as e:  # noqa: BLE001 - a damaged ModelDescription: protobuf raises DecodeError
        yield "error", "model", f"the model description cannot be parsed ({e})"
        return
    by_name = {name: (fn, block) for name, fn, block in p.functions}
    default = desc.defaultFunctionName or "main"
    if default not in by_name:
        yield "error", "model", f"the default function {default!r} is not in the program (functions: {', '.join(sorted(by_name)) or 'none'})"
    if desc.input or desc.output or not desc.functions:
        if default in by_name:
            yield from _io_match("the description", desc.input, desc.output, default, *by_name[default])
    for fd in desc.functions:
        if fd.name not in by_name:
            yield "error", "model", f"the description describes function {fd.name!r}, which is not in the program"
        else:
            yield from _io_match(f"the description of function {fd.name!r}", fd.input, fd.output, fd.name, *by_name[fd.name])


def _io_match(what: str, inputs, outputs, name: str, fn, block):
    declared = [i.name for i in fn.inputs]
    described = [f.name for f in inputs]
    if sorted(described) != sorted(declared):
        yield "error", name, f"{what} lists inputs {described}, function {name!r} takes {declared}"
    if block is not None:
        returned = list(block.outputs)
        described = [f.name for f in outputs]
        if sorted(described) != sorted(returned):
            yield "error", name, f"{what} lists outputs {described}, function {name!r} returns {returned}"


# -- weight rules ---------------------------------------------------------------------------------------------


def _values_of(p: _Program) -> Iterator[tuple[Site, str, object]]:
    """(site, parameter name, Value) of every literal tensor of const and constexpr ops."""
    for site in p.sites:
        op = site.op
        if op.type != "const" and not _is_constexpr(op):
            continue
        for e in op.attributes:
            if e.key != "name":
                yield site, e.key, e.value
        for e in op.inputs:
            for b in e.value.arguments:
                if b.WhichOneof("binding") == "value":
                    yield site, e.key, b.value


def _strip(message: str, source: str) -> str:
    return message[len(source) + 2:] if message.startswith(f"{source}: ") else message


def _blobs(p: _Program):
    """Every weight-file value as Core ML's blob reader reads it: a tensor type whose dtype a blob can hold,
    a record at the offset (sentinel, dtype, bounds, padding) of that dtype and element count."""
    for site, key, value in _values_of(p):
        if not value.HasField("blobFileValue"):
            continue
        tt = tensor_type(value.type)
        if tt is None:
            yield "error", site.where, f"parameter {key!r} is stored in a weight file but its type is not a tensor"
            continue
        dtype, shape = tt
        code = BLOB_CODE_OF_MIL.get(dtype)
        if code is None:
            yield "error", site.where, f"parameter {key!r}: {dtype_text(dtype)} cannot be stored in a weight file"
            continue
        ref = value.blobFileValue
        try:
            p.model.blob_file(ref.fileName).checked(ref.offset, code, None if shape is None else prod(shape))
        except ModelError as e:
            yield "error", site.where, f"parameter {key!r}: {_strip(str(e), p.model.source)}"


def _immediates(p: _Program):
    """Inline values hold as many values as their type says, of a dtype they can hold."""
    for site, key, value in _values_of(p):
        tt = tensor_type(value.type)
        if not value.HasField("immediateValue") or tt is None:
            continue
        if tt[0] == proto.STRING:
            found = _strings(value)
            count = None if tt[1] is None else prod(tt[1])
            if found is None or (count is not None and found.size != count):
                held = "no strings" if found is None else f"{found.size} string(s)"
                yield "error", site.where, f"parameter {key!r}: immediate value holds {held}, its type says {count}"
            continue
        try:
            p.model.value_array(value, f"parameter {key!r}")
        except ModelError as e:
            yield "error", site.where, str(e)


def _padding_bits(p: _Program):
    """Unused bits after packed data are zero: sub-byte values (blob or inline) and iOS16's packed uint8
    indices and masks (Core ML's reader and coremltools' loader require clean padding)."""
    for site, key, value in _values_of(p):
        tt = tensor_type(value.type)
        if tt is None or tt[1] is None:
            continue
        dtype, shape = tt
        if dtype in _NBITS and _NBITS[dtype] < 8:
            raw = _raw(p, value)
            if raw is not None and not padding_is_zero(raw, _NBITS[dtype], prod(shape)):
                yield "error", site.where, f"parameter {key!r}: the unused bits after its {prod(shape)} {dtype_text(dtype)} values are not zero"
    for site in p.sites:
        if site.op.type in ("constexpr_lut_to_dense", "constexpr_sparse_to_dense") and site.opset in IOS16_OPSETS:
            params = _params(site, p.types[site.function])
            packed, lut, shape = params.get("indices") or params.get("mask"), params.get("lut"), params.get("shape")
            shape_v = p.value(shape) if shape is not None else None
            data = p.value(packed) if packed is not None else None
            if data is None or shape_v is None or packed.dtype != _D.UINT8:
                continue
            if site.op.type == "constexpr_lut_to_dense":
                size = lut.shape[0] if lut is not None and lut.shape and lut.rank == 1 else 0
                if size not in IOS16_LUT_SIZES:
                    continue
                nbits = size.bit_length() - 1
            else:
                nbits = 1
            count = int(np.prod(shape_v, dtype=np.int64))
            if data.size * 8 >= count * nbits and not padding_is_zero(np.ascontiguousarray(data).tobytes(), 1, count * nbits):
                yield "error", site.where, (f"parameter {packed.name!r}: the unused bits after its {count} packed "
                                            f"{nbits}-bit values are not zero")



def _raw(p: _Program, value):
    """The stored bytes of a sub-byte value (None when unreadable: the blob rule says why)."""
    if value.HasField("blobFileValue"):
        ref = value.blobFileValue
        try:
            return p.model.blob_file(ref.fileName).raw(ref.offset)
        except ModelError:
            return None
    tensor = value.immediateValue.tensor
    return tensor.bytes.values if tensor.WhichOneof("value") == "bytes" else None


def _non_finite(values: np.ndarray) -> int:
    # one reduction first: a sum is finite only if every value is (NaN and Inf propagate; an overflow
    # just means counting exactly), and it allocates nothing — the common, clean case costs one pass
    if values.size and np.isfinite(np.add.reduce(values.ravel(), dtype=np.float32)):
        return 0
    if values.dtype == np.float16:  # exponent bits: numpy's float16 isfinite is emulated and slow
        exponent = values.view(np.uint16) & np.uint16(0x7C00)
        return int(np.count_nonzero(exponent == 0x7C00))
    return int(values.size - np.count_nonzero(np.isfinite(values)))


_FLOAT_PARAMS = {"scale", "lut", "zero_point", "offset", "nonzero_data", "data", "source_val", "quantized_data"}


def _finite(p: _Program):
    for site, key, value in _values_of(p):
        tt = tensor_type(value.type)
        if tt is None or tt[0] not in _FLOATS:
            continue
        constexpr = _is_constexpr(site.op)
        if not constexpr and (tt[1] is None or prod(tt[1]) < FINITE_CONST_MIN):
            continue
        values = p.array(value, key)
        if values is None:
            continue
        bad = _non_finite(np.asarray(values))
        del values
        if value.HasField("blobFileValue"):  # drop the pages just read: a check of a 2 GB package stays small
            p.model.blob_file(value.blobFileValue.fileName).release(value.blobFileValue.offset)
        if not bad:
            continue
        if constexpr:
            yield "error", site.where, f"parameter {key!r}: {bad} NaN or Inf value(s) in a compressed weight's parameters"
        else:
            yield "warning", site.where, f"{bad} NaN or Inf weight value(s)"


# -- constexpr constraints (MLPROGRAM.md §4) -----------------------------------------------------------------


class _Op:
    """One constexpr op being checked: its parameters, the problems found, the output types they imply."""

    def __init__(self, p: _Program, site: Site):
        self.p = p
        self.site = site
        self.params = _params(site, p.types[site.function])
        self.problems: list[str] = []

    def need(self, name: str, domain, ranks=None, optional: bool = False) -> Param | None:
        """The parameter, if present with a fixed shape, a dtype in `domain` and a rank in `ranks` (else a
        problem is noted and None returned, so dependent checks are skipped)."""
        prm = self.params.get(name)
        if prm is None:
            if not optional:
                self.problems.append(f"parameter {name!r} is missing")
            return None
        if prm.dtype is None or prm.shape is None:
            self.problems.append(f"parameter {name!r} has no tensor type of fixed shape")
            return None
        ok = True
        if prm.dtype not in domain:
            ios16 = self.site.opset in IOS16_OPSETS
            hint = f" ({dtype_text(prm.dtype)} data need iOS18: opset CoreML8)" if ios16 and prm.dtype in _SUB_BYTE else ""
            self.problems.append(f"parameter {name!r} is {dtype_text(prm.dtype)}; {self.site.op.type} takes {_domain(domain)} "
                                 f"in {self.site.opset}{hint}")
            ok = False
        if ranks is not None and prm.rank not in ranks:
            want = "at least 1" if ranks is ANY_RANK else " or ".join(map(str, ranks))
            self.problems.append(f"parameter {name!r} has rank {prm.rank}; {self.site.op.type} needs rank {want}")
            ok = False
        return prm if ok else None

    def scalar(self, prm: Param | None):
        v = self.p.value(prm) if prm is not None else None
        return None if v is None or np.size(v) != 1 else np.asarray(v).reshape(-1)[0]

    def unknown(self, known: Iterable[str]) -> None:
        extra = sorted(k for k in self.params if k not in known)
        if extra:
            self.problems.append(f"unexpected parameter(s) {', '.join(map(repr, extra))}")

    def popcount(self, mask: Param, count: int | None = None) -> int | None:
        """Set bits of a mask: uint1 values, or (iOS16) the first `count` bits of packed bytes (dirty padding
        bits are the padding-bits rule's finding, not a count mismatch)."""
        v = self.p.value(mask)
        if v is None:
            return None
        v = np.asarray(v).reshape(-1)
        if count is None:
            return int(np.count_nonzero(v))
        return int(np.count_nonzero(np.unpackbits(v.astype(np.uint8), bitorder="little")[:count]))


RANK1 = (1,)
RANKS01 = (0, 1)
ANY_RANK = range(1, 1 << 16)  # rank >= 1 (MIL tensors of constexpr ops are never scalars)


def _affine_dequantize(c: _Op):
    c.unknown(("quantized_data", "zero_point", "scale", "axis"))
    data = c.need("quantized_data", (_D.INT8, _D.UINT8), ANY_RANK)
    zp = c.need("zero_point", (_D.INT8, _D.UINT8, _D.FLOAT32), RANKS01)
    scale = c.need("scale", _FLOATS, RANKS01)
    axis = c.need("axis", (_D.INT32,), (0,))
    a = c.scalar(axis)
    if data is not None and a is not None:
        if not -data.rank <= a < data.rank:
            c.problems.append(f"axis {a} is outside -{data.rank}..{data.rank - 1} (quantized_data has rank {data.rank})")
        else:
            for prm in (scale, zp):
                if prm is not None and prm.rank == 1 and prm.shape[0] != data.shape[a]:
                    c.problems.append(f"{prm.name} has {prm.shape[0]} values; axis {a} of quantized_data has {data.shape[a]}")
    if data is not None and scale is not None:
        return [(scale.dtype, data.shape)]
    return None


def _cast(c: _Op):
    c.unknown(("source_val", "output_dtype"))
    src = c.need("source_val", (_D.FLOAT16,))
    out = c.need("output_dtype", (_D.STRING,), (0,))
    v = c.scalar(out)
    if out is not None and v is not None and v != "fp32":
        c.problems.append(f"output_dtype is {v!r}; only 'fp32' is supported")
    return [(_D.FLOAT32, src.shape)] if src is not None else None


def _lut_to_dense_16(c: _Op):
    c.unknown(("indices", "lut", "shape"))
    indices = c.need("indices", (_D.UINT8,), RANK1)
    lut = c.need("lut", _LUT_T, RANK1)
    shape = c.need("shape", (_D.UINT32,), RANK1)
    shape_v = c.p.value(shape) if shape is not None else None
    out_shape = tuple(int(d) for d in shape_v) if shape_v is not None else None
    if lut is not None and lut.shape[0] not in IOS16_LUT_SIZES:
        hint = " (3-bit LUTs need iOS18: opset CoreML8)" if lut.shape[0] == 8 else ""
        c.problems.append(f"lut has {lut.shape[0]} entries; {c.site.opset} allows {', '.join(map(str, IOS16_LUT_SIZES))}{hint}")
    elif lut is not None and indices is not None and out_shape is not None:
        nbits = lut.shape[0].bit_length() - 1
        need = -(-nbits * prod(out_shape) // 8)
        if indices.shape[0] != need:
            c.problems.append(f"indices has {indices.shape[0]} bytes; {prod(out_shape)} values of {nbits} bits need {need}")
    return [(lut.dtype, out_shape)] if lut is not None and out_shape is not None else None


def _sparse_to_dense_16(c: _Op):
    c.unknown(("nonzero_data", "mask", "shape"))
    data = c.need("nonzero_data", _LUT_T, RANK1)
    mask = c.need("mask", (_D.UINT8,), RANK1)
    shape = c.need("shape", (_D.UINT32,), RANK1)
    shape_v = c.p.value(shape) if shape is not None else None
    out_shape = tuple(int(d) for d in shape_v) if shape_v is not None else None
    if mask is not None and out_shape is not None and mask.shape[0] != -(-prod(out_shape) // 8):
        c.problems.append(f"mask has {mask.shape[0]} bytes; {prod(out_shape)} values need {-(-prod(out_shape) // 8)}")
    elif mask is not None and data is not None:
        ones = c.popcount(mask, prod(out_shape)) if out_shape is not None else None
        if ones is not None and ones != data.shape[0]:
            c.problems.append(f"mask has {ones} bits set; nonzero_data holds {data.shape[0]} values")
    return [(data.dtype, out_shape)] if data is not None and out_shape is not None else None


def _shift_scale_checks(c: _Op, data_shape, data_dtype, scale: Param | None, offset: Param | None) -> None:
    if scale is None or data_shape is None:
        return
    if len(data_shape) != scale.rank:
        c.problems.append(f"scale has rank {scale.rank}; the data have rank {len(data_shape)}")
        return
    for i, (d, s) in enumerate(zip(data_shape, scale.shape)):
        if s == 0 or d % s:
            c.problems.append(f"dimension {i}: {d} data values are not a whole number of blocks of the {s} scales")
    if offset is not None:
        if offset.shape != scale.shape:
            c.problems.append(f"offset has shape {_shape_text(offset.shape)}; scale has {_shape_text(scale.shape)}")
        if offset.dtype not in _FLOATS and data_dtype is not None and offset.dtype != data_dtype:
            c.problems.append(f"offset is {dtype_text(offset.dtype)}; an integer offset must have the data's dtype ({dtype_text(data_dtype)})")


def _blockwise_shift_scale(c: _Op):
    c.unknown(("data", "scale", "offset"))
    data = c.need("data", _SRC18, ANY_RANK)
    scale = c.need("scale", _FLOATS, ANY_RANK)
    offset = c.need("offset", _SRC18, ANY_RANK, optional=True)
    if data is not None:
        _shift_scale_checks(c, data.shape, data.dtype, scale, offset)
    return [(scale.dtype, data.shape)] if data is not None and scale is not None else None


def _lut_checks(c: _Op, indices_shape, indices_dtype, lut: Param | None, vector_axis: Param | None):
    """Shared by lut_to_dense and lut_to_sparse (iOS18); returns the vector size and axis (None: unknown)."""
    if lut is None or indices_shape is None:
        return None
    rank = len(indices_shape)
    if lut.rank != rank + 2:
        c.problems.append(f"lut has rank {lut.rank}; indices of rank {rank} need a lut of rank {rank + 2}")
        return None
    for i, (d, k) in enumerate(zip(indices_shape, lut.shape)):
        if k == 0 or d % k:
            c.problems.append(f"dimension {i}: {d} indices are not a whole number of blocks of the {k} LUTs")
    entries, vector = lut.shape[-2], lut.shape[-1]
    nbits = _NBITS.get(indices_dtype)
    if nbits is not None and entries != 1 << nbits:
        c.problems.append(f"lut has {entries} entries per palette; {dtype_text(indices_dtype)} indices need {1 << nbits}")
    axis = c.scalar(vector_axis)
    if vector_axis is not None and axis is not None and not -rank <= axis < rank:
        c.problems.append(f"vector_axis {axis} is outside -{rank}..{rank - 1}")
        return None
    if vector > 1 and vector_axis is None:
        c.problems.append(f"lut holds vectors of {vector} values; vector_axis is missing")
        return None
    return vector, (None if axis is None else int(axis) % rank)


def _expand(shape, vector_axis):
    vector, axis = vector_axis
    if vector == 1:
        return tuple(shape)
    if axis is None:
        return None
    out = list(shape)
    out[axis] *= vector
    return tuple(out)


def _lut_to_dense_18(c: _Op):
    c.unknown(("indices", "lut", "vector_axis"))
    indices = c.need("indices", _INDICES, ANY_RANK)
    lut = c.need("lut", _LUT_T)
    vector_axis = c.need("vector_axis", (_D.INT32,), (0,), optional=True)
    if indices is None:
        return None
    va = _lut_checks(c, indices.shape, indices.dtype, lut, vector_axis)
    if va is None:
        return None
    shape = _expand(indices.shape, va)
    return [(lut.dtype, shape)] if shape is not None else None


def _sparse_to_dense_18(c: _Op):
    c.unknown(("nonzero_data", "mask"))
    data = c.need("nonzero_data", _SRC18, RANK1)
    mask = c.need("mask", (_D.UINT1,), ANY_RANK)
    if data is not None and mask is not None:
        ones = c.popcount(mask)
        if ones is not None and ones != data.shape[0]:
            c.problems.append(f"mask has {ones} bits set; nonzero_data holds {data.shape[0]} values")
    return [(data.dtype, mask.shape)] if data is not None and mask is not None else None


def _lut_to_sparse(c: _Op):
    c.unknown(("indices_mask", "indices_nonzero_data", "lut", "vector_axis"))
    mask = c.need("indices_mask", (_D.UINT1,), ANY_RANK)
    nonzero = c.need("indices_nonzero_data", _INDICES, RANK1)
    lut = c.need("lut", _LUT_T)
    vector_axis = c.need("vector_axis", (_D.INT32,), (0,), optional=True)
    if mask is None or nonzero is None:
        return None
    ones = c.popcount(mask)
    if ones is not None and ones != nonzero.shape[0]:
        c.problems.append(f"indices_mask has {ones} bits set; indices_nonzero_data holds {nonzero.shape[0]} values")
    va = _lut_checks(c, mask.shape, nonzero.dtype, lut, vector_axis)
    if va is None:
        return None
    shape = _expand(mask.shape, va)
    return [(_D.UINT1, shape), (lut.dtype, (nonzero.shape[0] * va[0],))] if shape is not None else None


def _sparse_blockwise_shift_scale(c: _Op):
    c.unknown(("data_mask", "nonzero_data", "scale", "offset"))
    mask = c.need("data_mask", (_D.UINT1,), ANY_RANK)
    data = c.need("nonzero_data", _SRC18, RANK1)
    scale = c.need("scale", _FLOATS, ANY_RANK)
    offset = c.need("offset", _SRC18, ANY_RANK, optional=True)
    if mask is None or data is None:
        return None
    ones = c.popcount(mask)
    if ones is not None and ones != data.shape[0]:
        c.problems.append(f"data_mask has {ones} bits set; nonzero_data holds {data.shape[0]} values")
    _shift_scale_checks(c, mask.shape, data.dtype, scale, offset)
    return [(_D.UINT1, mask.shape), (scale.dtype, data.shape)] if scale is not None else None


# (op type, iOS18 definition?) -> checker
CONSTEXPR_CHECKS: dict[tuple[str, bool], Callable[[_Op], list | None]] = {
    ("constexpr_affine_dequantize", False): _affine_dequantize,
    ("constexpr_affine_dequantize", True): _affine_dequantize,
    ("constexpr_cast", False): _cast,
    ("constexpr_cast", True): _cast,
    ("constexpr_lut_to_dense", False): _lut_to_dense_16,
    ("constexpr_lut_to_dense", True): _lut_to_dense_18,
    ("constexpr_sparse_to_dense", False): _sparse_to_dense_16,
    ("constexpr_sparse_to_dense", True): _sparse_to_dense_18,
    ("constexpr_blockwise_shift_scale", True): _blockwise_shift_scale,
    ("constexpr_lut_to_sparse", True): _lut_to_sparse,
    ("constexpr_sparse_blockwise_shift_scale", True): _sparse_blockwise_shift_scale,
}


def _checked_constexprs(p: _Program) -> Iterator[tuple[Site, _Op, list | None]]:
    """Every constexpr op with a definition in its function's opset, checked once per program view."""
    if p._constexprs is None:
        p._constexprs = []
        for site in p.sites:
            if not _is_constexpr(site.op) or site.opset not in OPSET_SPEC_VERSION or site.opset == "CoreML5":
                continue
            ios18 = OPSET_SPEC_VERSION[site.opset] >= OPSET_SPEC_VERSION[IOS18]
            check = CONSTEXPR_CHECKS.get((site.op.type, ios18))
            if check is None or _wrong_form(site, ios18):  # the op-opset rule says so: one cause, one finding
                continue
            c = _Op(p, site)
            p._constexprs.append((site, c, check(c)))
    yield from p._constexprs


def _constexpr(p: _Program):
    for site, c, _ in _checked_constexprs(p):
        for problem in c.problems:
            yield "error", site.where, problem


def _constexpr_output(p: _Program):
    """A constexpr op's declared outputs are what its parameters produce (dtype and shape)."""
    for site, c, expected in _checked_constexprs(p):
        if expected is None:
            continue
        declared = [tensor_type(o.type) for o in site.op.outputs]
        if len(declared) != len(expected):
            yield "error", site.where, f"{site.op.type} has {len(declared)} output(s); it produces {len(expected)}"
            continue
        for o, got, want in zip(site.op.outputs, declared, expected):
            if want[1] is None:
                continue
            if got != (want[0], tuple(want[1])):
                shown = "not a tensor" if got is None else f"{dtype_text(got[0])}{_shape_text(got[1])}"
                yield "error", site.where, (f"output {o.name!r} is declared {shown}; its parameters give "
                                            f"{dtype_text(want[0])}{_shape_text(want[1])}")


# -- the table ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[_Program], Iterable[tuple[str, str, str]]]
    weights: bool  # reads weight data (structure_findings skips it)


RULES: tuple[Rule, ...] = (
    Rule("spec-version-unknown", _spec_version_known, False),
    Rule("opset-block", _opset_block, False),
    Rule("specialization-outputs", _specialization_outputs, False),
    Rule("identifier", _identifiers, False),
    Rule("undefined-value", _undefined_values, False),
    Rule("duplicate-value", _duplicate_values, False),
    Rule("spec-version", _spec_version, False),
    Rule("op-opset", _op_opset, False),
    Rule("description", _description, False),
    Rule("blob", _blobs, True),
    Rule("immediate-value", _immediates, True),
    Rule("padding-bits", _padding_bits, True),
    Rule("constexpr", _constexpr, True),
    Rule("constexpr-output", _constexpr_output, True),
    Rule("finite-values", _finite, True),
)
RULE_NAMES = tuple(r.name for r in RULES)


def _run(model, rules) -> list[Finding]:
    p = _view(model)
    return [Finding(severity, rule.name, where, message) for rule in rules for severity, where, message in rule.check(p)]


def check_program(model) -> list[Finding]:
    """Every rule broken anywhere in the program (an MLProgram: spec plus the package its weights are in)."""
    return _run(model, RULES)


def structure_findings(model) -> list[Finding]:
    """The rules that read no weight data (SSA, identifiers, opsets and versions, description): cheap enough
    to run on an input before compressing it."""
    return _run(model, [r for r in RULES if not r.weights])


def raise_on_errors(model, where: str = "", inherited=()) -> None:
    """Raise CheckError listing every error-level finding; warnings pass, and so do the `inherited` findings
    (and the model's `inherited_findings`: what the input already broke is the user's)."""
    known = set(inherited) | set(getattr(model, "inherited_findings", ()) or ())
    errors = [f for f in check_program(model) if f.severity == "error" and f not in known]
    if errors:
        lines = "\n".join(f"  {f}" for f in errors)
        raise CheckError(
            f"{where}: refusing to write a model Core ML would reject ({len(errors)} problem(s)):\n{lines}", errors
        )
