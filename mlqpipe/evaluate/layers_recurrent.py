"""Recurrent layers for the forward pass. Time steps run in order (a recurrence cannot be vectorised over
time); each step is one matrix product over the whole batch of samples.

Blobs: the sequence input is (N, S, I, 1, 1) (classic) — S time steps of I values; the optional state inputs
and the state outputs are (N, 1, O, 1, 1).
"""

from __future__ import annotations

import numpy as np

from .context import Ctx
from .layers_classic import ACTIVATIONS


def gate_functions(ctx: Ctx, raw_list, defaults: list[str]):
    """The activation functions a recurrent layer names (ActivationParams kept as bytes)."""
    from .messages import activation_params, activation_kind

    kinds = [activation_kind(r) for r in raw_list] or defaults
    fns = []
    for raw, kind in zip(list(raw_list) or [None] * len(kinds), kinds):
        fn = ACTIVATIONS.get(kind)
        if fn is None or kind in ("PReLU", "parametricSoftplus"):
            raise ctx.unsupported(f"recurrent activation {kind}")
        a = activation_params(raw, kind) if raw is not None else {}
        fns.append(lambda x, fn=fn, a=a: fn(x, a.get("alpha", 0.0), a.get("beta", 0.0), {}))
    if len(fns) != len(defaults):
        raise ctx.unsupported(f"{len(fns)} activations (expects {len(defaults)})")
    return fns


def _sequence(ctx: Ctx, x: np.ndarray, size: int) -> np.ndarray:
    """(N, S, I, 1, 1) -> (N, S, I)."""
    if x.ndim != 5:
        raise ctx.unsupported(f"a rank-{x.ndim - 1} sequence input (rank 5 [Seq, Batch, I, 1, 1] expected)")
    xs = x.reshape(x.shape[0], x.shape[1], -1)
    if xs.shape[2] != size:
        raise ctx.unsupported(f"an input of {xs.shape[2]} values per step for inputVectorSize {size}")
    return xs


def _state(ins, i: int, n: int, size: int) -> np.ndarray:
    return ins[i].reshape(n, size).astype(np.float32) if len(ins) > i and ins[i] is not None else np.zeros((n, size), np.float32)


def uni_lstm(ctx: Ctx, ins):
    p = ctx.params
    i_size, o = int(p.inputVectorSize), int(p.outputVectorSize)
    xs = _sequence(ctx, ins[0], i_size)
    n, s = xs.shape[:2]
    h, c = _state(ins, 1, n, o), _state(ins, 2, n, o)
    gates = gate_functions(ctx, p.activations, ["sigmoid", "tanh", "tanh"])
    w = {k.removeprefix("weightParams."): v for k, v in ctx.weights.items()}
    seq, h, c = lstm_direction(p.params, w, xs, h, c, gates, reverse=p.reverseInput)
    y = seq if p.params.sequenceOutput else h[:, None]
    return [y[..., None, None], h[:, None, :, None, None], c[:, None, :, None, None]]


def lstm_direction(params, w: dict, xs, h, c, gates, reverse: bool):
    """One LSTM direction over the whole sequence: (outputs (N, S, O), last h, last c). `w` holds
    inputGateWeightMatrix and the other blobs by field name."""
    f_gate, g_act, h_act = gates
    o = h.shape[1]
    i_size = xs.shape[2]
    names = ("inputGate", "forgetGate", "blockInput", "outputGate")
    W = np.concatenate([w[f"{g}WeightMatrix"].reshape(o, i_size) for g in names])  # 4O x I: one product per step
    R = np.concatenate([w[f"{g}RecursionMatrix"].reshape(o, o) for g in names])
    b = np.concatenate([w[f"{g}BiasVector"] if params.hasBiasVectors else np.zeros(o, np.float32) for g in names])
    peep = params.hasPeepholeVectors
    clip = params.cellClipThreshold or 50000.0
    xw = xs @ W.T + b  # the input part of every step at once: N S 4O
    order = range(xs.shape[1] - 1, -1, -1) if reverse else range(xs.shape[1])
    seq = np.zeros((xs.shape[0], xs.shape[1], o), np.float32)
    for t in order:
        z = xw[:, t] + h @ R.T
        i_t, f_t, g_t, o_t = z[:, :o], z[:, o : 2 * o], z[:, 2 * o : 3 * o], z[:, 3 * o :]
        if peep:
            i_t = i_t + c * w["inputGatePeepholeVector"]
            f_t = f_t + c * w["forgetGatePeepholeVector"]
        i_t, f_t = f_gate(i_t), f_gate(f_t)
        if params.coupledInputAndForgetGate:
            f_t = 1 - i_t
        c = np.clip(f_t * c + i_t * g_act(g_t), -clip, clip)
        if peep:
            o_t = o_t + c * w["outputGatePeepholeVector"]
        h = f_gate(o_t) * h_act(c)
        seq[:, t] = h
    return seq, h, c


LAYERS = {
    "uniDirectionalLSTM": uni_lstm,
}
