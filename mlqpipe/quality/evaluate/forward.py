"""The numpy forward pass of a Core ML neural network: walks the layers, feeds each its inputs, and keeps
only the blobs still to be read, so quantized models can be tested on Linux.

Blob layout and the layer-function contract are in context.py. Which layer types are evaluated is one table,
`LAYERS`, merged from the layer families (classic, ND, recurrent; control flow lives here because it runs
sub-networks). A layer type or setting outside it raises `Unsupported` naming the layer: the caller reports
the model as "not evaluated", never a wrong number. Weights are read through the inventory (dequantized when
stored quantized), so the same code evaluates the float and the quantized model.
"""

from __future__ import annotations

import numpy as np

from mlqpipe.formats.nn.inventory import layer_records
from mlqpipe.formats.nn.weights import holds_values
from mlqpipe.quality.evaluate.context import Ctx, Unsupported
from mlqpipe.quality.evaluate.layers_classic import LAYERS as CLASSIC
from mlqpipe.quality.evaluate.layers_nd import LAYERS as ND
from mlqpipe.quality.evaluate.layers_recurrent import LAYERS as RECURRENT
from mlqpipe.quality.evaluate.messages import LAYER_PARAMS
from mlqpipe.quality.evaluate.messages_nd import LAYER_PARAMS as ND_PARAMS

ND_LAYOUT = 1  # NeuralNetwork.arrayInputShapeMapping / imageInputShapeMapping: EXACT_ARRAY / RANK4_IMAGE


def _control_layers() -> dict:
    return {"branch": _branch, "loop": _loop, "loopBreak": _loop_break, "loopContinue": _loop_continue, "copy": _copy}


def _families() -> dict:
    """Every family's table, merged; a type claimed twice is a programming error."""
    tables = [CLASSIC, RECURRENT, ND, _control_layers()]
    merged: dict = {}
    for table in tables:
        twice = set(merged) & set(table)
        assert not twice, f"layer types in two families: {twice}"
        merged.update(table)
    return merged



def is_nd(nn) -> bool:
    return int(nn.arrayInputShapeMapping) == ND_LAYOUT or int(nn.imageInputShapeMapping) == ND_LAYOUT


class Weights:
    """Layer weights as float32, read once per layer and kept across sample batches."""

    def __init__(self, model_spec, model_path: str = ""):
        self.model_spec = model_spec
        self.model_path = model_path
        self._cache: dict = {}

    def of(self, net_path, network, layer, channels: int | None) -> dict:
        key = (net_path, layer.name, channels)
        if key not in self._cache:
            self._cache[key] = _read_weights(self.model_path, net_path, network, layer, self.model_spec, channels)
        return self._cache[key]


def _read_weights(model_path, net_path, network, layer, model_spec, channels: int | None) -> dict:
    """The layer's blobs by slot path. A quantized blob whose size the layer does not say (PReLU and
    parametricSoftplus take 1 or C values, C the input's channels) is read as C values when its bytes hold
    that many, else as one."""
    out = {}
    for r in layer_records(model_path, net_path, network, layer, model_spec):
        count = None
        if not r.count and r.storage.is_quantized and channels:
            count = channels if holds_values(r.wp, r.storage, channels) else 1
        out[r.slot_path] = r.values(count=count)
    return out


def _params(layer, kind):
    params = getattr(layer, kind)
    if isinstance(params, bytes):
        cls = LAYER_PARAMS.get(kind) or ND_PARAMS.get(kind)
        if cls is None:
            raise Unsupported(f"layer '{layer.name}' of type {kind} is not implemented by mlqpipe's evaluator")
        params = cls.FromString(params)
    return params


def _reads(network) -> set[str]:
    """Every blob name the network's layers read, nested networks included."""
    return set().union(*(_reads_of(layer) for layer in network.layers))


def _reads_of(layer) -> set[str]:
    """The blobs one layer reads: its inputs, and for branch / loop everything its sub-networks read."""
    names = set(layer.input)
    kind = layer.WhichOneof("layer")
    if kind in ("branch", "loop"):
        p = getattr(layer, kind)
        for sub in ((p.ifBranch, p.elseBranch) if kind == "branch" else (p.conditionNetwork, p.bodyNetwork)):
            names |= _reads(sub)
        if kind == "loop" and p.conditionVar:
            names.add(p.conditionVar)
    return names


def run_network(nn, model_spec, feeds: dict[str, np.ndarray], model_path: str = "", *, nd: bool | None = None,
                keep: set[str] | None = None, weights: Weights | None = None, net_path: str = "") -> dict[str, np.ndarray]:
    """Run every layer of `nn` in order on a batch of samples; returns the blobs in `keep` (all blobs when
    None). Blobs nothing reads any more are dropped as soon as possible, which bounds memory to what is
    live."""
    nd = is_nd(nn) if nd is None else nd
    weights = weights or Weights(model_spec, model_path)
    blobs = dict(feeds)
    layers = list(nn.layers)
    reads = [_reads_of(layer) for layer in layers]
    last_read = {name: i for i, names in enumerate(reads) for name in names}
    for i, layer in enumerate(layers):
        kind = layer.WhichOneof("layer")
        fn = LAYERS.get(kind)
        if fn is None:
            raise Unsupported(f"layer '{layer.name}' of type {kind} is not implemented by mlqpipe's evaluator")
        missing = [name for name in layer.input if name not in blobs]
        if missing and kind not in OPTIONAL_INPUTS:
            raise Unsupported(f"layer '{layer.name}': input blob {missing[0]!r} is not available")
        first = blobs.get(layer.input[0]) if layer.input else None
        channels = int(first.shape[-3]) if getattr(first, "ndim", 0) >= 4 else None
        ctx = Ctx(layer, _params(layer, kind), weights.of(net_path, nn, layer, channels), nd,
                  run_network=lambda sub, sub_feeds, path, w=weights: run_network(
                      sub, model_spec, sub_feeds, model_path, nd=nd, keep=None, weights=w, net_path=path),
                  scope=blobs, net_path=net_path)
        outs = fn(ctx, [blobs.get(name) for name in layer.input])
        if isinstance(outs, dict):  # control flow: blobs its sub-networks wrote into this scope
            blobs.update(outs)
        else:
            for name, value in zip(layer.output, outs if isinstance(outs, (list, tuple)) else [outs]):
                blobs[name] = np.asarray(value, dtype=np.float32)
        if keep is not None:
            for name in reads[i]:
                if last_read.get(name) == i and name not in keep:
                    blobs.pop(name, None)
    return blobs if keep is None else {k: v for k, v in blobs.items() if k in keep}


OPTIONAL_INPUTS = {"uniDirectionalLSTM", "biDirectionalLSTM", "gru", "simpleRecurrent"}  # initial states may be absent


# --- control flow (NeuralNetwork.proto): sub-networks see the enclosing blobs and write into them. Samples may
# take different paths, so each runs alone (control flow is rare in converted models; correctness first) ---------


def _samples(scope: dict) -> int:
    return next(iter(scope.values())).shape[0] if scope else 1


def _written(before: dict, after: dict) -> dict:
    """The blobs of `after` that are new or rewritten (copy) relative to `before`."""
    return {k: v for k, v in after.items() if before.get(k) is not v}


def _per_sample(ctx: Ctx, step) -> dict:
    """Run `step(sample_scope) -> blobs written` for each sample alone and stack the results. An enclosing blob
    that only some samples rewrote keeps its old value in the others; a new blob that only some samples wrote
    (a branch taken by some) stays undefined, as Core ML's validator allows no later reader for it."""
    n = _samples(ctx.scope)
    scopes = [{k: v[s : s + 1] for k, v in ctx.scope.items()} for s in range(n)]
    results = [step(one) for one in scopes]
    out = {}
    for name in set().union(*results):
        if name in ctx.scope:
            parts = [r.get(name, one[name]) for r, one in zip(results, scopes)]
        elif all(name in r for r in results):
            parts = [r[name] for r in results]
        else:
            continue
        if len({p.shape for p in parts}) != 1:
            raise ctx.unsupported(f"blob '{name}' whose shape differs between samples after control flow")
        out[name] = np.concatenate(parts, axis=0)
    return out


CONDITION_EPSILON = 1e-6  # branch: |condition| > 1e-6 runs ifBranch, below it elseBranch


def _scalar(ctx: Ctx, value, what: str) -> float:
    if value is None:
        raise ctx.unsupported(f"{what} blob that is not available")
    v = np.asarray(value).reshape(-1)
    if v.size != 1:
        raise ctx.unsupported(f"a {what} with {v.size} values (Core ML requires a scalar)")
    if not np.isfinite(v[0]):
        raise ctx.unsupported(f"a {what} of {v[0]}")
    return float(v[0])


def _condition(ctx: Ctx, value, *, loop: bool) -> bool:
    """A branch condition is true above 1e-6 in magnitude (documented). For loops the proto only says a value
    close to 0 is false: 0 is false, above 1e-6 true, and anything in between is refused rather than guessed."""
    c = abs(_scalar(ctx, value, "condition"))
    if c > CONDITION_EPSILON or not loop or c == 0:
        return c > CONDITION_EPSILON
    raise ctx.unsupported(f"a loop condition of {c:g}, between 0 and 1e-6 (whether it counts as 0 is not documented)")


def _branch(ctx: Ctx, ins):
    p = ctx.params
    if len(ctx.layer.input) != 1:
        raise ctx.unsupported(f"a branch with {len(ctx.layer.input)} inputs (Core ML requires the condition)")

    def step(scope):
        taken = "ifBranch" if _condition(ctx, scope.get(ctx.layer.input[0]), loop=False) else "elseBranch"
        network = getattr(p, taken)
        if not network.layers:  # no elseBranch: nothing runs
            return {}
        return _written(scope, ctx.run_network(network, scope, f"{ctx.net_path}{ctx.name}.{taken}/"))

    return _per_sample(ctx, step)


MAX_LOOP_ITERATIONS = 100_000  # a loop still running after this many iterations is refused, not run for hours


class _LoopControl(Exception):
    """loopBreak / loopContinue inside a loop body: ends the body early, keeping what it computed."""

    def __init__(self, kind: str, blobs: dict):
        super().__init__(kind)
        self.kind, self.blobs = kind, blobs


def _loop_control(kind: str):
    def layer(ctx: Ctx, ins):
        if ".bodyNetwork/" not in ctx.net_path:  # Core ML's validator requires a loop body around it
            raise ctx.unsupported(f"loop{kind.title()} outside a loop body")
        raise _LoopControl(kind, dict(ctx.scope))

    return layer


_loop_break = _loop_control("break")
_loop_continue = _loop_control("continue")


def _loop_count(ctx: Ctx, scope: dict) -> int | None:
    """The iteration limit: the input when present (maxLoopIterations is then ignored), else
    maxLoopIterations; None for a pure while loop (a condition network, no input, maxLoopIterations 0)."""
    p = ctx.params
    if ctx.layer.input:
        n = _scalar(ctx, scope.get(ctx.layer.input[0]), "loop count")
        if n != int(n) or n < 0:
            raise ctx.unsupported(f"a loop count of {n:g} (not a whole number >= 0)")
        return int(n)
    if p.maxLoopIterations or not p.conditionVar:
        return int(p.maxLoopIterations)
    return None


def _loop(ctx: Ctx, ins):
    """for i < count: body, or (with a condition network) cond = condition(); while cond [and i < count]:
    body; cond = condition(). The condition network runs once more after the last body, so its blobs
    describe the final state; loopBreak skips that."""
    p = ctx.params
    path = f"{ctx.net_path}{ctx.name}."

    def step(scope):
        blobs = dict(scope)
        limit = _loop_count(ctx, blobs)

        def go() -> bool:
            if not p.conditionVar:
                return True
            if p.conditionNetwork.layers:
                blobs.update(ctx.run_network(p.conditionNetwork, blobs, f"{path}conditionNetwork/"))
            return _condition(ctx, blobs.get(p.conditionVar), loop=True)

        done = 0
        running = go()
        while running and (limit is None or done < limit):
            if done >= MAX_LOOP_ITERATIONS:
                raise ctx.unsupported(f"a loop still running after {MAX_LOOP_ITERATIONS} iterations")
            try:
                blobs.update(ctx.run_network(p.bodyNetwork, blobs, f"{path}bodyNetwork/"))
            except _LoopControl as control:
                blobs.update(control.blobs)
                if control.kind == "break":
                    break
            done += 1
            running = go()
        return _written(scope, blobs)

    return _per_sample(ctx, step)


def _copy(ctx: Ctx, ins):
    """The one layer allowed to rewrite an existing blob (loop bodies and branches update enclosing blobs with
    it); a real copy, so the two names never share a buffer."""
    if len(ins) != 1 or len(ctx.layer.output) != 1:
        raise ctx.unsupported("a copy without exactly one input and one output")
    return np.array(ins[0], dtype=np.float32)


LAYERS = _families()  # after the control-flow functions it names
