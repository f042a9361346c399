"""Running one function of an ML program on numpy arrays.

The interpreter walks the function's active block in order; each op's inputs are resolved from the names
defined so far (a nested block of `cond` / `while_loop` sees the enclosing names plus its own inputs, and its
own names stay local to it), the op's row of `OPS` computes its outputs, and these are cast to the dtypes
the program declares for them (and their shapes checked against the declared ones: a mismatch means this
interpreter misread the op, which is refused rather than carried on). A value is dropped after its last
reader, so memory holds what is live.

Precision: float math runs in float32 (BLAS); values the program types as fp16 are stored as float16, i.e.
rounded to float16 after every op, which emulates fp16 programs at op boundaries (the device's own fp16
accumulation is not emulated, so fp16 results agree to about fp16 precision, not bit for bit).

Weights: `const` values and constexpr chains (compressed weights, formats/mlprogram/constexpr.py) are read
or decoded once per `Interpreter` and kept, so repeated runs (sample by sample, or several batches) decode
nothing again.

Batching: converters fix the input shapes, usually with a batch of 1. Inputs are given with N samples on
axis 0; where an input's declared shape is [1, ...] and the arrays are [N, ...], the result is by definition
the program run once per sample, each output the samples' outputs concatenated on axis 0 (outputs without
a leading 1 are stacked on a new axis 0). Running all N at once is much faster, and most programs allow it:
every value then carries the batch where its declared shape has a 1 (a reshape's target shape is widened
the same way, see `_batch_shape`). Whether a program allows it is not assumed but tested, once per
Interpreter: the batched run of up to three distinct samples must give the per-sample outputs (same shapes,
integers equal, floats within a rounding margin); if it fails or differs, every run goes sample by sample.
A program that mixes samples (a reduction over the batch axis) fails the test, so batching never changes a
number beyond float rounding. Inputs that match the declared shapes exactly, or programs with flexible
dimensions, run once on the arrays as given.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import constexpr, proto
from mlqpipe.formats.mlprogram.inventory import default_function
from mlqpipe.formats.mlprogram.program import DTYPES, OpSite, active_block, const_value, op_name, walk_block
from mlqpipe.quality.mil.base import Refuse, Unsupported
from mlqpipe.quality.mil.table import OPS

MAX_LOOP_ITERATIONS = 1_000_000


@dataclass(frozen=True)
class Declared:
    """A tensor's declared numpy dtype and dimensions (None for an unknown one)."""

    dtype: np.dtype | None
    dims: tuple[int | None, ...] | None  # None: not a tensor (a list, tuple, state)

    @property
    def fixed(self) -> bool:
        return self.dims is not None and None not in self.dims


def declared(value_type) -> Declared:
    if value_type.WhichOneof("type") != "tensorType":
        return Declared(None, None)
    t = value_type.tensorType
    dims = tuple(int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions)
    np_type = DTYPES.get(t.dataType, (None, 0))[0] if t.dataType not in (proto.INT4, proto.UINT4, proto.BFLOAT16) else None
    return Declared(np.dtype(np_type) if np_type is not None else None, dims)


@dataclass(frozen=True)
class _Step:
    """One op of a block and the local names nobody reads after it."""

    op: object
    name: str
    free: tuple[str, ...]


def _not_evaluated(name: str, kind: str, reason: str | None = None) -> Unsupported:
    return Unsupported(f"not evaluated: op {name} of type {kind}" + (f" ({reason})" if reason else ""))


def _reads(op) -> set[str]:
    """Every name an op reads, the reads of its nested blocks included."""
    names = {b.name for e in op.inputs for b in e.value.arguments if b.WhichOneof("binding") == "name"}
    for block in op.blocks:
        names |= set(block.outputs)
        for inner in block.operations:
            names |= _reads(inner)
    return names


def _plan(block) -> list[_Step]:
    ops = list(block.operations)
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in _reads(op):
            last[name] = i
    keep = set(block.outputs)
    free: dict[int, list[str]] = {}
    for i, op in enumerate(ops):
        for o in op.outputs:
            if o.name not in keep:
                free.setdefault(last.get(o.name, i), []).append(o.name)
    return [_Step(op, op_name(op), tuple(free.get(i, ()))) for i, op in enumerate(ops)]


class Interpreter:
    """Evaluates one function of an MLProgram (the default one when `function` is None); holds the decoded
    weights between runs."""

    def __init__(self, model, function: str | None = None):
        self.model = model
        spec = model.spec
        name = function if function is not None else default_function(spec)
        found = proto.find_entry(spec.mlProgram.functions, name) if name is not None else None
        if found is None:
            names = ", ".join(e.key for e in spec.mlProgram.functions) or "none"
            raise ModelError(f"{model.source}: the program has no function {name!r} (functions: {names}); "
                             "name one of them")
        self.function = name
        self.block = active_block(name, found, model.source)
        self.inputs = [(nv.name, declared(nv.type)) for nv in found.inputs]
        self.outputs = list(self.block.outputs)
        self._producers = constexpr.producers(list(walk_block(self.block, name, name)))
        self._plans: dict[str, list[_Step]] = {}
        self._consts: dict[tuple[str, str], tuple] = {}
        self._types: dict[str, Declared] | None = None  # declared type by value name (read when batching)
        self._batch: int | None = None  # while a batched run is under way: its number of samples
        self.batched: bool | None = None  # whether N samples run at once (None: not tested yet)

    # --- public ---------------------------------------------------------------------------------------------

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The function's outputs (by name) for `inputs` (by the function's input names), N samples on axis 0."""
        feeds, per_sample = self._feeds(inputs)
        if not per_sample:
            return dict(zip(self.outputs, self._run_block(self.block, self.function, {}, feeds)))
        if self.batched is None:
            self.batched = self._batch_gives_per_sample(feeds)
        if self.batched:
            try:
                return self._run_batched(feeds)
            except Exception:  # noqa: BLE001 - these samples do not batch after all: the definition decides
                self.batched = False
        return self._run_per_sample(feeds)

    # --- samples: one by one, or all at once ----------------------------------------------------------------

    def _run_per_sample(self, feeds: dict) -> dict:
        n = next(iter(feeds.values())).shape[0]
        runs = [self._run_block(self.block, self.function, {}, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
        out = {}
        for j, name in enumerate(self.outputs):
            values = [np.asarray(r[j]) for r in runs]
            batched = all(v.ndim and v.shape[0] == 1 for v in values)
            out[name] = np.concatenate(values, axis=0) if batched else np.stack(values, axis=0)
        return out

    def _run_batched(self, feeds: dict) -> dict:
        n = next(iter(feeds.values())).shape[0]
        if n == 1:
            return self._run_per_sample(feeds)
        self._batch = n
        try:
            return dict(zip(self.outputs, self._run_block(self.block, self.function, {}, feeds)))
        finally:
            self._batch = None

    def _batch_gives_per_sample(self, feeds: dict) -> bool:
        """Does the batched run of a few distinct samples give their per-sample outputs? (See the module
        docstring.) A per-sample failure is the program's own and surfaces in the real run."""
        probe = _distinct_samples(feeds)
        if len(next(iter(probe.values()))) < 2:
            return False  # nothing to tell the two ways apart (all samples are equal): one by one is exact
        try:
            want = self._run_per_sample(probe)
        except (Unsupported, ModelError):
            return False
        try:
            got = self._run_batched(probe)
        except Exception:  # noqa: BLE001 - any failure of the batched run only means: run sample by sample
            return False
        return all(_same_outputs(got[k], want[k]) for k in self.outputs)

    # --- inputs ---------------------------------------------------------------------------------------------

    def _feeds(self, inputs: dict) -> tuple[dict, bool]:
        names = [n for n, _ in self.inputs]
        extra = sorted(set(inputs) - set(names))
        if extra:
            raise Unsupported(f"not evaluated: input(s) {', '.join(map(repr, extra))} are not inputs of function "
                              f"{self.function!r} (its inputs: {', '.join(names) or 'none'})")
        feeds, modes = {}, []
        for name, want in self.inputs:
            if name not in inputs:
                raise Unsupported(f"not evaluated: no array for input {name!r} of function {self.function!r}")
            if want.dims is None or want.dtype is None:
                raise Unsupported(f"not evaluated: input {name!r} is not a tensor of a known dtype")
            a = np.asarray(inputs[name])
            modes.append(self._mode(name, a, want))
            feeds[name] = _as_dtype(a, want.dtype, f"input {name!r}")
        per_sample = any(m == "per_sample" for m in modes)
        if per_sample:
            sizes = {v.shape[0] for v in feeds.values()}
            if len(sizes) > 1:  # every input must carry the same N samples
                raise Unsupported(f"not evaluated: the inputs of function {self.function!r} hold different numbers of samples "
                                  f"({', '.join(f'{n}: {feeds[n].shape[0]}' for n, _ in self.inputs)})")
        return feeds, per_sample

    @staticmethod
    def _mode(name: str, a: np.ndarray, want: Declared) -> str:
        dims = want.dims
        fits = a.ndim == len(dims) and all(d is None or d == s for d, s in zip(dims, a.shape))
        if fits:
            return "whole"
        if a.ndim == len(dims) and dims and dims[0] == 1 and all(d is None or d == s for d, s in zip(dims[1:], a.shape[1:])):
            return "per_sample"
        shown = [("?" if d is None else d) for d in dims]
        raise Unsupported(f"not evaluated: input {name!r} has shape {list(a.shape)}, the function declares {shown} "
                          "(samples go on axis 0 of a [1, ...] input)")

    # --- blocks ---------------------------------------------------------------------------------------------

    def _run_block(self, block, path: str, outer, bound: dict) -> list:
        """Run a block whose inputs are `bound` (name -> value), reading enclosing names from `outer`."""
        local = dict(bound)
        env = ChainMap(local, outer) if outer else local
        plan = self._plans.get(path)
        if plan is None:
            plan = self._plans[path] = _plan(block)
        for step in plan:
            values = self._eval(step, path, env)
            for o, v in zip(step.op.outputs, values):
                local[o.name] = v
            for name in step.free:
                local.pop(name, None)
        missing = [n for n in block.outputs if n not in env]
        if missing:
            raise ModelError(f"{self.model.source}: block {path} returns {missing[0]!r}, which no op defines; "
                             "the model is damaged (re-export it)")
        return [env[n] for n in block.outputs]

    def _eval(self, step: _Step, path: str, env) -> tuple:
        op, kind = step.op, step.op.type
        if kind == "const" or constexpr.is_constexpr(kind):
            key = (path, op.outputs[0].name if op.outputs else step.name)
            if key not in self._consts:
                self._consts[key] = self._constant(op, path, step.name)
            return self._consts[key]
        if kind == "cond":
            return self._typed(step, self._cond(step, path, env))
        if kind == "while_loop":
            return self._typed(step, self._while(step, path, env))
        entry = OPS.get(kind)
        if entry is None:
            raise _not_evaluated(step.name, kind)
        extra = [e.key for e in op.attributes if e.key != "name"]
        if extra:
            raise _not_evaluated(step.name, kind, f"attribute {extra[0]!r}")
        args = {e.key: self._argument(e.key, e.value, entry.tuples, step, env) for e in op.inputs}
        if self._batch is not None and kind in _BATCH_ARGUMENTS:
            args = _BATCH_ARGUMENTS[kind](self, op, args)
        try:
            with np.errstate(all="ignore"):
                got = entry.fn(**args)
        except Refuse as e:
            raise _not_evaluated(step.name, kind, str(e)) from None
        except TypeError as e:  # an input the row does not take, or a required one missing
            raise _not_evaluated(step.name, kind, f"inputs {sorted(args)}: {e}") from None
        return self._typed(step, got if isinstance(got, tuple) else (got,))

    def _argument(self, key: str, arg, tuples, step: _Step, env):
        values = []
        for b in arg.arguments:
            if b.WhichOneof("binding") == "name":
                if b.name not in env:
                    raise ModelError(f"{self.model.source}: op {step.name!r} ({step.op.type}) reads {b.name!r}, which "
                                     "is not defined before it; the model is damaged (re-export it)")
                v = env[b.name]
            else:
                v = _literal(self.model, b.value, f"{self.model.source}: op {step.name!r} input {key}")
            values.append(_for_op(v))
        if key in tuples:
            return values
        if len(values) != 1:
            raise _not_evaluated(step.name, step.op.type, f"input {key} binds {len(values)} values")
        return values[0]

    def _typed(self, step: _Step, got: tuple) -> tuple:
        """The op's outputs cast to their declared dtypes; a count, rank or fixed dimension that differs
        from the declaration is refused."""
        op = step.op
        if len(got) != len(op.outputs):
            raise _not_evaluated(step.name, op.type, f"computed {len(got)} outputs, the program declares {len(op.outputs)}")
        out = []
        for o, v in zip(op.outputs, got):
            want = declared(o.type)
            if want.dims is None or want.dtype is None:
                out.append(v)
                continue
            a = np.asarray(v)
            if self._batch is not None and not want.dims and a.shape == (self._batch,):
                pass  # a scalar per sample (classify's label) in a batched run
            elif a.ndim != len(want.dims) or any(not _dim_fits(d, s, self._batch) for d, s in zip(want.dims, a.shape)):
                shown = [("?" if d is None else d) for d in want.dims]
                raise _not_evaluated(step.name, op.type, f"computed shape {list(a.shape)} for {o.name}, the program declares {shown}")
            if a.dtype.kind == "f" and want.dtype.kind in "iub":
                raise _not_evaluated(step.name, op.type, f"computed floats for {o.name}, declared {want.dtype}")
            out.append(a.astype(want.dtype, copy=False))
        return tuple(out)

    def _declared_dims(self, op, key: str):
        """The declared dims of the value bound to an op's input `key` (None when not a named tensor)."""
        if self._types is None:
            self._types = {**dict(self.inputs), **_declared_types(self.block)}
        arg = proto.find_entry(op.inputs, key)
        if arg is None or len(arg.arguments) != 1 or arg.arguments[0].WhichOneof("binding") != "name":
            return None
        found = self._types.get(arg.arguments[0].name)
        return found.dims if found is not None else None

    # --- weights and control flow ---------------------------------------------------------------------------

    def _constant(self, op, path: str, name: str) -> tuple:
        where = f"{self.model.source}: op {name!r} ({op.type})"
        if op.type == "const":
            value = const_value(op)
            if value is None:
                raise ModelError(f"{where}: a const without a value; the model is damaged (re-export it)")
            return (_constant_value(constexpr.read_value(self.model, value, where)),)
        got = constexpr.decode_chain(self.model, self._producers, OpSite(self.function, path, op))
        return got if isinstance(got, tuple) else (got,)

    def _cond(self, step: _Step, path: str, env) -> tuple:
        op = step.op
        if len(op.blocks) != 2:
            raise _not_evaluated(step.name, op.type, f"{len(op.blocks)} blocks")
        pred = np.asarray(self._argument("pred", proto.find_entry(op.inputs, "pred"), (), step, env))
        if pred.size != 1:
            raise _not_evaluated(step.name, op.type, f"a predicate of {pred.size} values")
        i = 0 if bool(pred.reshape(-1)[0]) else 1
        return tuple(self._run_block(op.blocks[i], f"{path}/{step.name}.blocks[{i}]", env, {}))

    def _while(self, step: _Step, path: str, env) -> tuple:
        op = step.op
        if len(op.blocks) != 2:
            raise _not_evaluated(step.name, op.type, f"{len(op.blocks)} blocks")
        state = self._argument("loop_vars", proto.find_entry(op.inputs, "loop_vars"), ("loop_vars",), step, env)
        cond, body = op.blocks
        for count in range(MAX_LOOP_ITERATIONS + 1):
            go = self._run_block(cond, f"{path}/{step.name}.blocks[0]", env, _bind(cond, state, step))
            flag = np.asarray(go[0]) if go else np.zeros(())
            if flag.size != 1:
                raise _not_evaluated(step.name, op.type, f"a loop condition of {flag.size} values")
            if not bool(flag.reshape(-1)[0]):
                return tuple(state)
            if count == MAX_LOOP_ITERATIONS:
                break
            state = [_for_op(v) for v in self._run_block(body, f"{path}/{step.name}.blocks[1]", env, _bind(body, state, step))]
        raise _not_evaluated(step.name, op.type, f"more than {MAX_LOOP_ITERATIONS} iterations")


def _widen_reshape(it: "Interpreter", op, args: dict) -> dict:
    if "shape" in args:
        args["shape"] = _batch_shape(args["shape"], np.shape(args.get("x")), it._declared_dims(op, "x"), it._batch)
    return args


def _widen_states(it: "Interpreter", op, args: dict) -> dict:
    """A recurrent layer's initial states declared for one sample ([1, H], converters' zero consts) given to
    every sample of the batch (its input x [T, B, I] carries the batch on axis 1)."""
    batch = np.shape(args.get("x"))[1:2]
    for key in ("initial_h", "initial_c"):
        v = args.get(key)
        if v is not None and batch and np.ndim(v) == 2 and np.shape(v)[0] == 1 and batch[0] == it._batch:
            args[key] = np.broadcast_to(v, (it._batch, np.shape(v)[1]))
    return args


# op type -> how its arguments change in a batched run (the values it reads carry the batch; these
# say where a literal sized for one sample must follow)
_BATCH_ARGUMENTS = {"reshape": _widen_reshape, "lstm": _widen_states, "gru": _widen_states, "rnn": _widen_states}


def _declared_types(block) -> dict[str, Declared]:
    """name -> declared type of every value an op defines in a block and its nested blocks."""
    out: dict[str, Declared] = {}
    for op in block.operations:
        for o in op.outputs:
            out[o.name] = declared(o.type)
        for inner in op.blocks:
            out.update(_declared_types(inner))
    return out


def _dim_fits(want: int | None, got: int, batch: int | None) -> bool:
    """A computed dimension against the declared one; in a batched run a declared 1 may carry the batch."""
    return want is None or want == got or (batch is not None and want == 1 and got == batch)


def _batch_shape(shape, x_shape: tuple, x_dims, batch: int):
    """A reshape's per-sample target shape, widened to carry the batch where the input carries it: the
    input's batch axis is where its declared 1 became `batch`; the target's is the 1 after the same number
    of values (C order keeps the samples apart only there). Unchanged when there is no such 1 (the
    reshape then fails or mismatches its declared shape, and the program runs sample by sample)."""
    target = [int(d) for d in np.asarray(shape).reshape(-1)]
    if x_dims is None or len(x_dims) != len(x_shape) or -1 in target:
        return shape
    axes = [i for i, (d, s) in enumerate(zip(x_dims, x_shape)) if d == 1 and s == batch]
    if len(axes) != 1:
        return shape
    before = int(np.prod(x_shape[: axes[0]], dtype=np.int64))
    for j, d in enumerate(target):
        if d == 1 and int(np.prod(target[:j], dtype=np.int64)) == before:
            target[j] = batch
            return np.asarray(target, dtype=np.int64)
    return shape


def _distinct_samples(feeds: dict, count: int = 3) -> dict:
    """Up to `count` samples of the feeds that differ from each other (in any input), as a small batch."""
    n = next(iter(feeds.values())).shape[0]
    chosen = [0]
    for i in range(1, n):
        if len(chosen) == count:
            break
        if all(any(not np.array_equal(v[i], v[j]) for v in feeds.values()) for j in chosen):
            chosen.append(i)
        if i >= 64 and len(chosen) == 1:
            break  # the first 64 samples are all equal: test no further (one by one then)
    return {k: v[chosen] for k, v in feeds.items()}


def _same_outputs(got, want) -> bool:
    """Batched against per-sample outputs: same shape and dtype; integers, strings and booleans equal;
    floats within a few units of rounding (BLAS sums a batch in another order than a single sample)."""
    a, b = np.asarray(got), np.asarray(want)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    if not np.array_equal(np.isfinite(a), np.isfinite(b)) or not np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)]):
        return False
    fa, fb = a[np.isfinite(a)].astype(np.float64), b[np.isfinite(b)].astype(np.float64)
    scale = float(np.abs(fb).max()) if fb.size else 0.0
    margin = (1e-2 if a.dtype == np.float16 else 1e-4) * scale  # one fp16 rounding may flip and carry on
    return bool(np.all(np.abs(fa - fb) <= margin))


def _literal(model, value, where: str):
    """A value bound in place: a tensor's numbers, or a list (classify's classes) as a Python list."""
    if value.type.WhichOneof("type") == "listType" and value.HasField("immediateValue") and value.immediateValue.HasField("list"):
        return [_constant_value(_literal(model, v, where)) for v in value.immediateValue.list.values]
    return constexpr.read_value(model, value, where)


def literal_input(model, op, key: str) -> list:
    """The values bound in place to an op's input `key` (a list literal as one Python list); [] when absent."""
    arg = proto.find_entry(op.inputs, key)
    if arg is None:
        return []
    return [_literal(model, b.value, f"{model.source}: op {op_name(op)!r} input {key}") for b in arg.arguments
            if b.WhichOneof("binding") == "value"]


def _bind(block, values: list, step: _Step) -> dict:
    names = [nv.name for nv in block.inputs]
    if len(names) != len(values):
        raise _not_evaluated(step.name, step.op.type, f"a block with {len(names)} inputs for {len(values)} loop variables")
    return dict(zip(names, values))


def _constant_value(v):
    """A const's value as the ops take it: a rank-0 string as str, arrays as they are (read-only views)."""
    a = np.asarray(v)
    return a.reshape(()).item() if a.dtype == object and a.size == 1 and a.ndim == 0 else a


def _for_op(v):
    """float16 values widened to float32 for computing (the result is rounded back by its declared dtype)."""
    if isinstance(v, np.ndarray) and v.dtype == np.float16:
        return v.astype(np.float32)
    return v


def _as_dtype(a: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    if dtype.kind in "iub" and a.dtype.kind == "f":
        if a.size and not np.all(a == np.round(a)):
            raise Unsupported(f"not evaluated: {what} holds fractions, the function declares {dtype}")
    return a.astype(dtype, copy=False)


def run(model, inputs: dict[str, np.ndarray], function: str | None = None) -> dict[str, np.ndarray]:
    """Evaluate `function` (the default one when None) of an MLProgram on `inputs`; see the module docstring."""
    return Interpreter(model, function).run(inputs)
