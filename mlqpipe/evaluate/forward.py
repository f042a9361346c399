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

from ..coreml.inventory import layer_records
from ..coreml.weights import holds_values
from .context import Ctx, Unsupported
from .layers_classic import LAYERS as CLASSIC
from .layers_recurrent import LAYERS as RECURRENT
from .messages import LAYER_PARAMS

ND_LAYOUT = 1  # NeuralNetwork.arrayInputShapeMapping / imageInputShapeMapping: EXACT_ARRAY / RANK4_IMAGE


def _control_layers() -> dict:
    return {"branch": _branch, "loop": _loop, "loopBreak": _loop_break, "loopContinue": _loop_continue, "copy": _copy}


def _families() -> dict:
    """Every family's table, merged; a type claimed twice is a programming error."""
    tables = [CLASSIC, RECURRENT, _control_layers()]
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
        cls = LAYER_PARAMS.get(kind)
        if cls is None:
            raise Unsupported(f"layer '{layer.name}' of type {kind} is not implemented by mlqpipe's evaluator")
        params = cls.FromString(params)
    return params


def _reads(network) -> set[str]:
    """Every blob name the network's layers read, nested networks included."""
    names = set()
    for layer in network.layers:
        names.update(layer.input)
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
    last_read = {}
    for i, layer in enumerate(layers):
        for name in _reads_of(layer):
            last_read[name] = i
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
            for name in set(layer.input) | _nested_reads(layer):
                if last_read.get(name) == i and name not in keep:
                    blobs.pop(name, None)
    return blobs if keep is None else {k: v for k, v in blobs.items() if k in keep}


OPTIONAL_INPUTS = {"uniDirectionalLSTM", "biDirectionalLSTM", "gru", "simpleRecurrent"}  # initial states may be absent


def _nested_reads(layer) -> set[str]:
    kind = layer.WhichOneof("layer")
    if kind not in ("branch", "loop"):
        return set()
    p = getattr(layer, kind)
    subs = (p.ifBranch, p.elseBranch) if kind == "branch" else (p.conditionNetwork, p.bodyNetwork)
    names = set().union(*(_reads(s) for s in subs))
    return names | ({p.conditionVar} if kind == "loop" and p.conditionVar else set())


def _reads_of(layer) -> set[str]:
    return set(layer.input) | _nested_reads(layer)


# --- control flow: sub-networks see the enclosing blobs and write into them; samples may take different
# paths, so they run one at a time (control flow is rare in converted models; correctness first) ---------


def _samples(scope: dict) -> int:
    return next(iter(scope.values())).shape[0] if scope else 1


def _per_sample(ctx: Ctx, step) -> dict:
    """Run `step(sample_scope) -> dict of new blobs` for each sample alone; stack what every sample wrote."""
    n = _samples(ctx.scope)
    results = []
    for s in range(n):
        one = {k: v[s : s + 1] for k, v in ctx.scope.items()}
        results.append(step(one))
    names = set(results[0]) if results else set()
    for r in results[1:]:
        names &= set(r)
    out = {}
    for name in names:
        parts = [r[name] for r in results]
        if len({p.shape for p in parts}) != 1:
            raise ctx.unsupported(f"blob '{name}' whose shape differs between samples after control flow")
        out[name] = np.concatenate(parts, axis=0)
    return out


def _condition(ctx: Ctx, value) -> bool:
    if value is None:
        raise Unsupported(f"layer '{ctx.name}': condition blob is not available")
    return bool(np.asarray(value).reshape(-1)[0] != 0)


def _branch(ctx: Ctx, ins):
    p = ctx.params

    def step(scope):
        taken = p.ifBranch if _condition(ctx, scope.get(ctx.layer.input[0])) else p.elseBranch
        before = set(scope)
        blobs = ctx.run_network(taken, scope, f"{ctx.net_path}{ctx.name}.{'ifBranch' if taken is p.ifBranch else 'elseBranch'}/")
        return {k: v for k, v in blobs.items() if k not in before or v is not scope.get(k)}

    return _per_sample(ctx, step)


MAX_LOOP_ITERATIONS = 100_000


class _LoopControl(Exception):
    """loopBreak / loopContinue inside a loop body: ends the body early, keeping what it computed."""

    def __init__(self, kind: str, blobs: dict):
        super().__init__(kind)
        self.kind, self.blobs = kind, blobs


def _loop_break(ctx: Ctx, ins):
    raise _LoopControl("break", dict(ctx.scope))


def _loop_continue(ctx: Ctx, ins):
    raise _LoopControl("continue", dict(ctx.scope))


def _loop(ctx: Ctx, ins):
    p = ctx.params

    def step(scope):
        scope = dict(scope)
        before = set(scope)
        limit = int(p.maxLoopIterations) or MAX_LOOP_ITERATIONS
        if ctx.layer.input:  # an input gives the iteration count
            limit = min(limit, int(np.asarray(scope[ctx.layer.input[0]]).reshape(-1)[0]))
        for _ in range(limit):
            if p.conditionNetwork.layers:
                scope.update(ctx.run_network(p.conditionNetwork, scope, f"{ctx.net_path}{ctx.name}.conditionNetwork/"))
                if not _condition(ctx, scope.get(p.conditionVar)):
                    break
            elif p.conditionVar and not _condition(ctx, scope.get(p.conditionVar)):
                break
            try:
                scope.update(ctx.run_network(p.bodyNetwork, scope, f"{ctx.net_path}{ctx.name}.bodyNetwork/"))
            except _LoopControl as c:
                scope.update(c.blobs)
                if c.kind == "break":
                    break
        else:
            if not ctx.layer.input and not p.maxLoopIterations:
                raise ctx.unsupported(f"a loop still running after {MAX_LOOP_ITERATIONS} iterations")
        return {k: v for k, v in scope.items() if k not in before or v is not ctx.scope.get(k)}

    return _per_sample(ctx, step)


def _copy(ctx: Ctx, ins):
    return ins[0].copy()


LAYERS = _families()  # after the control-flow functions it names
