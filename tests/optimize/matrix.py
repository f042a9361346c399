"""Per-weight decoded parameters of an ML-program package, for comparing mlqpipe's output with coremltools'.

coremltools re-runs its graph passes after compressing (MLPROGRAM.md §8), so its packages cannot be compared
with ours file by file: ops get renamed, fused, reordered. What must be equal is each compressed weight:
the chain of constexpr ops that replaces a const (op types, upstream first) and every literal parameter of
each op, as decoded numbers (sub-byte data as codes), with its MIL dtype and shape. `weights(path)` reads
that with mlqpipe's own reader (both packages are ML programs); a parameter bound to another op of the
chain is recorded as a reference to that op's position, one bound to a plain const as the const's value.

Keys: every weight is keyed by the name of the const it came from in the *input*. coremltools names a
compressed weight `<const>_quantized` / `_palettized` / `_sparsified` (`_pcs` for a per-channel-scaled LUT;
joint compression appends another); an implementation may keep the const name; `key_of` strips those
suffixes one by one and otherwise falls back to the consumer ops (name + parameter), then
to consumer type + parameter + shape, so a key survives renames of either the weight or its readers.

`other_ops` gives every op that is not part of a compressed weight, serialized (weight-file offsets zeroed:
saving moves blobs, which is not a change), so a test can assert that compressing changed nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlqpipe.formats.mlprogram import constexpr, proto
from mlqpipe.formats.mlprogram.inventory import MLWeightRecord, inventory, mil_dtype_name
from mlqpipe.formats.mlprogram.model import load_package
from mlqpipe.formats.mlprogram.program import const_value, tensor_type, walk

_SUFFIX = re.compile(r"_(quantized|palettized|sparsified|pcs)$")


@dataclass(frozen=True)
class Param:
    """One parameter of one op of a chain: MIL dtype, shape and decoded numbers (`ref` = (op index in the
    chain, output index) when it is bound to another op of the chain; `values` is then None)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    values: np.ndarray | None = None
    ref: tuple[int, int] | None = None

    def same(self, other: "Param") -> bool:
        if (self.name, self.dtype, self.shape, self.ref) != (other.name, other.dtype, other.shape, other.ref):
            return False
        if self.values is None or other.values is None:
            return self.values is None and other.values is None
        a, b = np.asarray(self.values), np.asarray(other.values)
        if a.dtype == object or b.dtype == object:
            return a.tolist() == b.tolist()
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()  # bit for bit: NaN == NaN

    def __str__(self) -> str:
        if self.ref is not None:
            return f"{self.name}: -> op {self.ref[0]} output {self.ref[1]} ({self.dtype} {list(self.shape or ())})"
        return f"{self.name}: {self.dtype} {list(self.shape or ())}"


@dataclass(frozen=True)
class ChainOp:
    op_type: str
    params: tuple[Param, ...]  # sorted by name


@dataclass(frozen=True)
class Weight:
    """A weight as stored: its consumers, output dtype/shape, and the constexpr chain (empty: a plain const,
    whose value is then the single parameter `val` of `const`)."""

    key: str
    layer: str
    consumers: tuple[tuple[str, str, str], ...]  # (op name, op type, parameter)
    dtype: str
    shape: tuple[int, ...]
    chain: tuple[ChainOp, ...]
    record: MLWeightRecord
    op_names: tuple[str, ...]  # of the ops holding it: the const, or the chain's ops and the consts feeding them

    @property
    def compressed(self) -> bool:
        return bool(self.chain) and self.chain[-1].op_type != "const"

    def kinds(self) -> str:
        return "+".join(op.op_type for op in self.chain)

    def dense(self) -> np.ndarray:
        """The decoded value (float32), through mlqpipe's decoder."""
        return self.record.values()


def _array(model, value, where: str) -> tuple[str, tuple | None, np.ndarray]:
    tt = tensor_type(value.type)
    dtype, shape = (mil_dtype_name(tt[0]), tt[1]) if tt is not None else (value.type.WhichOneof("type") or "?", None)
    return dtype, shape, np.array(constexpr.read_value(model, value, where))


def _chain(model, rec: MLWeightRecord) -> tuple[ChainOp, ...]:
    handle = rec.handle
    site = handle.site
    if site.op.type == "const":
        dtype, shape, values = _array(model, const_value(site.op), site.name)
        return (ChainOp("const", (Param("val", dtype, shape, values),)),)
    sites = [s for s in constexpr.chain_sites(model, handle.producers, site) if s.op.type != "const"]
    position = {s.name: i for i, s in enumerate(sites)}
    ops = []
    for s in sites:
        params = []
        for name, v in sorted(constexpr.parameter_values(s.op).items()):
            if isinstance(v, str):
                up, index = handle.producers[v]
                if up.op.type == "const":  # a const feeding the chain: its value, as if inlined
                    params.append(Param(name, *_array(model, const_value(up.op), up.name)))
                else:
                    tt = tensor_type(up.op.outputs[index].type)
                    params.append(Param(name, mil_dtype_name(tt[0]), tt[1], None, (position[up.name], index)))
            elif v is not None:
                params.append(Param(name, *_array(model, v, f"{s.name}.{name}")))
        ops.append(ChainOp(s.op.type, tuple(params)))
    return tuple(ops)


def key_of(rec: MLWeightRecord, names: dict[str, MLWeightRecord]) -> str:
    """The input const this record came from (`names`: the input's records by layer name)."""
    stem = rec.layer
    while True:  # the name itself, then with coremltools' suffixes taken off one by one
        if stem in names:
            return stem
        shorter = _SUFFIX.sub("", stem)
        if shorter == stem:
            break
        stem = shorter
    readers = {(c.op, c.parameter) for c in rec.consumers}
    by_reader = [n for n, r in names.items() if readers & {(c.op, c.parameter) for c in r.consumers}]
    if len(by_reader) == 1:
        return by_reader[0]
    kinds = sorted({(c.op_type, c.parameter) for c in rec.consumers})
    by_kind = [n for n, r in names.items() if r.shape == rec.shape and sorted({(c.op_type, c.parameter) for c in r.consumers}) == kinds]
    if len(by_kind) == 1:
        return by_kind[0]
    raise AssertionError(f"cannot tell which input const {rec.layer} ({kinds}, {list(rec.shape)}) came from; "
                         f"candidates {by_reader or by_kind}")


def weights(path: Path, reference: Path | None = None) -> dict[str, Weight]:
    """key -> Weight for every weight of the package at `path`; keys are the const names of `reference`
    (the input package; default `path` itself)."""
    model = load_package(path)
    records = inventory(model)
    ref_records = records if reference is None else inventory(load_package(reference))
    names = {r.layer: r for r in ref_records}
    out: dict[str, Weight] = {}
    for rec in records:
        key = key_of(rec, names)
        if key in out:
            raise AssertionError(f"{path}: two weights ({out[key].layer}, {rec.layer}) map to input const {key}")
        sites = constexpr.chain_sites(model, rec.handle.producers, rec.handle.site) if rec.compressed else [rec.handle.site]
        out[key] = Weight(key, rec.layer, tuple(tuple(c) for c in rec.consumers), rec.dtype, tuple(rec.shape),
                          _chain(model, rec), rec, tuple(s.name for s in sites))
    return out


def differences(ours: Weight, theirs: Weight) -> list[str]:
    """What differs between two weights' storage (empty: exactly equal), one line per difference."""
    if ours.kinds() != theirs.kinds():
        return [f"ops {ours.kinds()} vs {theirs.kinds()}"]
    out = []
    if (ours.dtype, ours.shape) != (theirs.dtype, theirs.shape):
        out.append(f"output {ours.dtype} {list(ours.shape)} vs {theirs.dtype} {list(theirs.shape)}")
    for i, (a, b) in enumerate(zip(ours.chain, theirs.chain)):
        pa, pb = {p.name: p for p in a.params}, {p.name: p for p in b.params}
        if set(pa) != set(pb):
            out.append(f"op {i} {a.op_type}: parameters {sorted(pa)} vs {sorted(pb)}")
        for name in sorted(set(pa) & set(pb)):
            x, y = _resolved(pa[name], ours), _resolved(pb[name], theirs)
            if not x.same(y):
                out.append(f"op {i} {a.op_type}.{_describe(x, y)}")
    return out


# the first output of the two-output sparse constexprs is their mask input as it is (iOS18)
_MASK_OUTPUT = {"constexpr_sparse_blockwise_shift_scale": "data_mask", "constexpr_lut_to_sparse": "indices_mask"}


def _resolved(p: Param, weight: Weight) -> Param:
    """A parameter bound to an upstream op's mask output, as the literal mask it is (coremltools writes the
    mask of a joint sparse + int8 weight twice, as a literal; mlqpipe binds the upstream op's output 0, as
    coremltools itself does for lut_to_sparse). Anything else is returned as it is."""
    if p.ref is None or p.ref[1] != 0:
        return p
    upstream = weight.chain[p.ref[0]]
    source = _MASK_OUTPUT.get(upstream.op_type)
    found = next((q for q in upstream.params if q.name == source), None)
    if found is None or found.shape != p.shape:  # a vector LUT's mask is expanded: not the same array
        return p
    return Param(p.name, found.dtype, found.shape, found.values)


def _describe(a: Param, b: Param) -> str:
    if (a.dtype, a.shape, a.ref) != (b.dtype, b.shape, b.ref):
        return f"{a} vs {b}"
    x, y = np.asarray(a.values), np.asarray(b.values)
    if x.dtype == object or x.shape != y.shape:
        return f"{a.name}: {x.tolist()} vs {y.tolist()}"
    diff = np.flatnonzero((x != y) & ~(np.isnan(x.astype(float)) & np.isnan(y.astype(float))) if x.dtype.kind == "f" else x != y)
    if diff.size == 0:
        return f"{a.name}: numpy dtype {x.dtype} vs {y.dtype}"
    first = np.unravel_index(diff[0], x.shape) if x.ndim else ()
    return (f"{a.name}: {diff.size} of {x.size} values differ (first at {list(map(int, first))}: "
            f"{x[first]!r} vs {y[first]!r})")


# -- everything else ----------------------------------------------------------------------------------------


def _zero_offsets(op):
    op = type(op).FromString(op.SerializeToString())
    values = [e.value for e in op.attributes] + [b.value for e in op.inputs for b in e.value.arguments if b.HasField("value")]
    for v in values:
        if v.HasField("blobFileValue"):
            v.blobFileValue.offset = 0
    return op


def other_ops(path: Path, skip: set[str]) -> list[tuple[str, str, bytes]]:
    """(block, op name, serialized op) of every op in walk order except those named in `skip`; nested
    blocks are compared through their owner op (its bytes hold them)."""
    model = load_package(path)
    return [(s.block, s.name, _zero_offsets(s.op).SerializeToString(deterministic=True))
            for s in walk(model.spec.mlProgram, str(path)) if s.name not in skip]


def chain_op_names(path: Path) -> set[str]:
    """Names of every op that is part of a compressed weight (its constexprs and the consts feeding them)."""
    return {n for w in weights(path).values() if w.compressed for n in w.op_names}


def outside_program(path: Path) -> bytes:
    """The model without its functions' operations (description, spec version, function inputs, opsets,
    block outputs), deterministic bytes."""
    spec = proto.Model.FromString(load_package(path).spec.SerializeToString())
    for entry in spec.mlProgram.functions:
        for block in entry.value.block_specializations:
            del block.value.operations[:]
    return spec.SerializeToString(deterministic=True)
