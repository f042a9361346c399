"""Recurrent layers for the forward pass. Time steps run in order (a recurrence cannot be vectorised over
time); the input part of every step is one matrix product up front, and each step one more over the whole
batch of samples.

Blobs (classic networks): the sequence input is (N, S, I, 1, 1) — S time steps of I values; the optional
state inputs and the state outputs are (N, 1, O, 1, 1).

Semantics, from NeuralNetwork.proto and the references coremltools tests Core ML against:
- every gate's pre-activation is clipped to [-50, 50] (the proto's `clip()`); an LSTM cell to
  ±cellClipThreshold (0 means 50.0);
- reverseInput runs the recurrence from the last step to the first and emits the outputs in that processing
  order, output k after input S-1-k: coremltools' references reverse the input and keep the outputs as they
  come (torch.flip then torch's LSTM/GRU/RNN in its MIL recurrent tests; Keras' go_backwards, which returns the
  reversed sequence, in its Keras stress tests);
- biDirectionalLSTM instead aligns the backward outputs with the input positions: step t is
  [forward output after x_1..x_t, backward output after x_S..x_t] (the proto's example, torch's
  bidirectional LSTM in coremltools' tests);
- LSTMParams.forgetBias is a note, not an addition: coremltools' Keras converter sets it from
  `unit_forget_bias` while passing the trained bias (already holding the +1), its numeric tests match Keras,
  and onnxmltools' converter ignores the flag for that reason;
- recurrent activations take no parameters: coremltools writes linear and sigmoidHard with alpha = beta = 0 and
  its references compute x and min(max(0.2x + 0.5, 0), 1). Those exact settings (or the explicit 1, 0 and
  0.2, 0.5) are evaluated; scaledTanh (documented as 1.7159·tanh(2x/3), tested as tanh) and other values are
  not.
"""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.evaluate.context import Ctx
from mlqpipe.quality.evaluate.layers_classic import _sigmoid

CLIP = 50.0  # the proto's clip() on every gate pre-activation


def _hard_sigmoid(x):
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


# kind -> (function, the (alpha, beta) settings it is evaluated with; None: no parameters)
_GATES = {
    "sigmoid": (_sigmoid, None),
    "tanh": (np.tanh, None),
    "ReLU": (lambda x: np.maximum(x, 0), None),
    "linear": (lambda x: x, {(0.0, 0.0), (1.0, 0.0)}),
    "sigmoidHard": (_hard_sigmoid, {(0.0, 0.0), (float(np.float32(0.2)), 0.5)}),
}


def gate_functions(ctx: Ctx, raw_list, count: int) -> list:
    """The `count` activations a recurrent layer lists (ActivationParams kept as bytes)."""
    from mlqpipe.quality.evaluate.messages import activation_kind, activation_params

    raws = list(raw_list)
    if len(raws) != count:
        raise ctx.unsupported(f"{len(raws)} activations (expects {count})")
    fns = []
    for raw in raws:
        kind = activation_kind(raw)
        fn, allowed = _GATES.get(kind, (None, None))
        if fn is None:
            raise ctx.unsupported(f"recurrent activation {kind}")
        if allowed is not None:
            a = activation_params(raw, kind)
            setting = (float(a.get("alpha", 0.0)), float(a.get("beta", 0.0)))
            if setting not in allowed:
                raise ctx.unsupported(f"recurrent activation {kind} with alpha, beta = {setting}")
        fns.append(fn)
    return fns


def _sequence(ctx: Ctx, x: np.ndarray, size: int) -> np.ndarray:
    """(N, S, I, 1, 1) -> (N, S, I)."""
    if x is None or x.ndim != 5 or x.shape[3:] != (1, 1):
        raise ctx.unsupported("a sequence input other than a rank-5 [Seq, Batch, I, 1, 1] blob")
    xs = x.reshape(x.shape[0], x.shape[1], -1)
    if xs.shape[2] != size:
        raise ctx.unsupported(f"an input of {xs.shape[2]} values per step for inputVectorSize {size}")
    return xs


def _state(ctx: Ctx, ins, i: int, n: int, size: int) -> np.ndarray:
    """State input i as (N, size); zeros when the layer has none."""
    if len(ins) <= i or ins[i] is None:
        return np.zeros((n, size), np.float32)
    s = ins[i]
    if s.shape[0] != n or s[0].size != size:
        raise ctx.unsupported(f"a state input of shape {s.shape[1:]} for {size} values")
    return s.reshape(n, size).astype(np.float32)


def _vec(h: np.ndarray) -> np.ndarray:
    """(N, O) -> the (N, 1, O, 1, 1) blob of one step."""
    return h[:, None, :, None, None]


def _output(seq: np.ndarray, last: np.ndarray, sequence_output: bool) -> np.ndarray:
    return seq[..., None, None] if sequence_output else _vec(last)


def _matrices(ctx: Ctx, prefix: str, gates, i_size: int, o: int, has_bias: bool):
    """Stacked input weights (G*O, I), recursion (G*O, O) and bias (G*O,) of the named gates."""
    W = np.concatenate([ctx.weight(f"{prefix}{g}WeightMatrix").reshape(o, i_size) for g in gates])
    R = np.concatenate([ctx.weight(f"{prefix}{g}RecursionMatrix").reshape(o, o) for g in gates])
    b = (np.concatenate([ctx.weight(f"{prefix}{g}BiasVector").reshape(o) for g in gates]) if has_bias
         else np.zeros(len(gates) * o, np.float32))
    return W, R, b


def _steps(s: int, reverse: bool) -> range:
    return range(s - 1, -1, -1) if reverse else range(s)


def simple_recurrent(ctx: Ctx, ins):
    """y_t = f(clip(W x_t + R y_{t-1} + b))."""
    p = ctx.params
    i_size, o = int(p.inputVectorSize), int(p.outputVectorSize)
    xs = _sequence(ctx, ins[0], i_size)
    n, s = xs.shape[:2]
    (f,) = gate_functions(ctx, [p.activation] if p.HasField("activation") else [], 1)
    W = ctx.weight("weightMatrix").reshape(o, i_size)
    R = ctx.weight("recursionMatrix").reshape(o, o)
    b = ctx.weight("biasVector").reshape(o) if p.hasBiasVector else np.zeros(o, np.float32)
    xw = xs @ W.T + b
    h = _state(ctx, ins, 1, n, o)
    seq = np.zeros((n, s, o), np.float32)
    for k, t in enumerate(_steps(s, p.reverseInput)):
        h = f(np.clip(xw[:, t] + h @ R.T, -CLIP, CLIP))
        seq[:, k] = h
    return [_output(seq, h, p.sequenceOutput), _vec(h)]


def gru(ctx: Ctx, ins):
    """z = f(Wz x + Rz y + bz), r = f(Wr x + Rr y + br), o = g(Wo x + Ro (y ⊙ r) + bo),
    y_t = (1 - z) ⊙ o + z ⊙ y_{t-1} (pre-activations clipped)."""
    p = ctx.params
    i_size, o = int(p.inputVectorSize), int(p.outputVectorSize)
    xs = _sequence(ctx, ins[0], i_size)
    n, s = xs.shape[:2]
    f, g = gate_functions(ctx, p.activations, 2)
    W, R, b = _matrices(ctx, "", ("updateGate", "resetGate", "outputGate"), i_size, o, p.hasBiasVectors)
    xw = xs @ W.T + b  # N S 3O
    Rzr, Ro = R[: 2 * o], R[2 * o :]
    h = _state(ctx, ins, 1, n, o)
    seq = np.zeros((n, s, o), np.float32)
    for k, t in enumerate(_steps(s, p.reverseInput)):
        zr = f(np.clip(xw[:, t, : 2 * o] + h @ Rzr.T, -CLIP, CLIP))
        z, r = zr[:, :o], zr[:, o:]
        out = g(np.clip(xw[:, t, 2 * o :] + (h * r) @ Ro.T, -CLIP, CLIP))
        h = (1 - z) * out + z * h
        seq[:, k] = h
    return [_output(seq, h, p.sequenceOutput), _vec(h)]


_LSTM_GATES = ("inputGate", "forgetGate", "blockInput", "outputGate")


def _lstm_weights(ctx: Ctx, prefix: str, params, i_size: int, o: int) -> dict:
    W, R, b = _matrices(ctx, prefix, _LSTM_GATES, i_size, o, params.hasBiasVectors)
    w = {"W": W, "R": R, "b": b}
    if params.hasPeepholeVectors:
        for gate in ("inputGate", "forgetGate", "outputGate"):
            w[gate] = ctx.weight(f"{prefix}{gate}PeepholeVector").reshape(o)
    return w


def lstm_direction(params, w: dict, xs, h, c, gates, reverse: bool):
    """One LSTM direction over the whole sequence: (outputs (N, S, O) in processing order, last h, last c).
    `w`: stacked W (4O, I), R (4O, O), b (4O,) in input/forget/block/output order, peepholes by gate."""
    f_act, g_act, h_act = gates
    o = h.shape[1]
    peep = params.hasPeepholeVectors
    clip = float(params.cellClipThreshold) or 50.0
    xw = xs @ w["W"].T + w["b"]  # the input part of every step at once: N S 4O
    seq = np.zeros((xs.shape[0], xs.shape[1], o), np.float32)
    for k, t in enumerate(_steps(xs.shape[1], reverse)):
        z = xw[:, t] + h @ w["R"].T
        i_t, f_t, g_t, o_t = z[:, :o], z[:, o : 2 * o], z[:, 2 * o : 3 * o], z[:, 3 * o :]
        if peep:
            i_t = i_t + c * w["inputGate"]
            f_t = f_t + c * w["forgetGate"]
        i_t = f_act(np.clip(i_t, -CLIP, CLIP))
        f_t = 1 - i_t if params.coupledInputAndForgetGate else f_act(np.clip(f_t, -CLIP, CLIP))
        c = np.clip(f_t * c + i_t * g_act(np.clip(g_t, -CLIP, CLIP)), -clip, clip)
        if peep:
            o_t = o_t + c * w["outputGate"]
        h = f_act(np.clip(o_t, -CLIP, CLIP)) * h_act(c)
        seq[:, k] = h
    return seq, h, c


def uni_lstm(ctx: Ctx, ins):
    p = ctx.params
    i_size, o = int(p.inputVectorSize), int(p.outputVectorSize)
    xs = _sequence(ctx, ins[0], i_size)
    n = xs.shape[0]
    h, c = _state(ctx, ins, 1, n, o), _state(ctx, ins, 2, n, o)
    gates = gate_functions(ctx, p.activations, 3)
    w = _lstm_weights(ctx, "weightParams.", p.params, i_size, o)
    seq, h, c = lstm_direction(p.params, w, xs, h, c, gates, reverse=p.reverseInput)
    return [_output(seq, h, p.params.sequenceOutput), _vec(h), _vec(c)]


def bi_lstm(ctx: Ctx, ins):
    """Inputs x, h_f, c_f, h_b, c_b; outputs y (forward and backward concatenated per step, the backward
    half aligned with the input positions), h_f, c_f, h_b, c_b."""
    p = ctx.params
    i_size, o = int(p.inputVectorSize), int(p.outputVectorSize)
    xs = _sequence(ctx, ins[0], i_size)
    n = xs.shape[0]
    if len(p.weightParams) != 2:
        raise ctx.unsupported(f"{len(p.weightParams)} weight sets (expects 2)")
    forward = gate_functions(ctx, p.activationsForwardLSTM, 3)
    if list(p.activationsBackwardLSTM) != list(p.activationsForwardLSTM):
        raise ctx.unsupported("backward activations other than the forward ones (Core ML requires them equal)")
    hf, cf = _state(ctx, ins, 1, n, o), _state(ctx, ins, 2, n, o)
    yf, hf, cf = lstm_direction(p.params, _lstm_weights(ctx, "weightParams[0].", p.params, i_size, o), xs, hf, cf,
                                forward, reverse=False)
    hb, cb = _state(ctx, ins, 3, n, o), _state(ctx, ins, 4, n, o)
    yb, hb, cb = lstm_direction(p.params, _lstm_weights(ctx, "weightParams[1].", p.params, i_size, o), xs, hb, cb,
                                forward, reverse=True)
    if p.params.sequenceOutput:
        y = np.concatenate([yf, yb[:, ::-1]], axis=2)[..., None, None]
    else:
        y = _vec(np.concatenate([hf, hb], axis=1))
    return [y, _vec(hf), _vec(cf), _vec(hb), _vec(cb)]


LAYERS = {
    "simpleRecurrent": simple_recurrent,
    "gru": gru,
    "uniDirectionalLSTM": uni_lstm,
    "biDirectionalLSTM": bi_lstm,
}
