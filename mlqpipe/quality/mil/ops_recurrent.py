"""MIL's recurrent layers (iOS15+ definitions): lstm, gru and rnn over an input [T, B, I].

The input products of every step are one matrix product up front; the steps then run in order (each needs
the previous hidden state), one [B, H] x [H, G·H] product per step. Gate layouts follow MIL: lstm's weights
and bias stack the gates as [input, forget, output, cell], gru's as [reset, output (candidate), update];
the bias is the sum of the input and the recurrent bias.

What the definitions leave open is refused rather than guessed: peepholes and `clip` (their place in the
equations is not given), the parameterised activations (hard_sigmoid, scaled_tanh: their alpha/beta are not
inputs), the time order of a reverse or bidirectional sequence output where only the final step is asked
for (`output_sequence` false with two directions), and gru's iOS18 `reset_after` / `input_bias`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlqpipe.quality.mil.base import Refuse, flag, floats, row, text


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # stable for large |x|


ACTIVATIONS = {"sigmoid": _sigmoid, "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0), "linear": lambda x: x}


def _activation(v, default: str, what: str):
    name = default if v is None else text(v, what)
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise Refuse(f"{what} {name!r} (its parameters are not inputs of the op)")
    return fn


@dataclass(frozen=True)
class _Weights:
    """One direction's weights: input [G·H, I], recurrent [G·H, H], bias [G·H]."""

    ih: np.ndarray
    hh: np.ndarray
    bias: np.ndarray


def _weights(ih, hh, bias, gates: int, inputs: int, what: str = "") -> _Weights:
    ih, hh = floats(ih), floats(hh)
    h = hh.shape[-1] if hh.ndim == 2 else 0
    if ih.shape != (gates * h, inputs) or hh.shape != (gates * h, h):
        raise Refuse(f"weight_ih{what} of shape {list(ih.shape)} and weight_hh{what} of shape {list(hh.shape)} for "
                     f"{gates} gates and an input of size {inputs}")
    b = np.zeros(gates * h, np.float32) if bias is None else floats(bias).reshape(-1)
    if b.shape != (gates * h,):
        raise Refuse(f"bias{what} of {b.size} values for {gates} gates of size {h}")
    return _Weights(ih, hh, b)


def _sequence(x):
    x = floats(x)
    if x.ndim != 3:
        raise Refuse(f"an input of shape {list(x.shape)} (expected [T, B, I])")
    if x.shape[0] == 0:
        raise Refuse("an empty sequence")
    return x


def _state(v, batch: int, size: int, what: str):
    s = floats(v)
    if s.size != batch * size:
        raise Refuse(f"{what} of shape {list(s.shape)} for a batch of {batch} and {size} units")
    return s.reshape(batch, size)


def _direction(v, allowed: tuple[str, ...]) -> str:
    d = "forward" if v is None else text(v, "direction")
    if d not in allowed:
        raise Refuse(f"direction {d!r}")
    return d


def _run(step, x, w: _Weights, states: tuple, reverse: bool):
    """Run `step(gates_x_t, states, w) -> states` over time; (every step's h in input time order, final states)."""
    xs = x @ w.ih.T + w.bias  # [T, B, G·H]
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    hs = [None] * x.shape[0]
    for t in order:
        states = step(xs[t], states, w)
        hs[t] = states[0]
    return np.stack(hs), states


def _out(seq, final_h, output_sequence, reverse: bool):
    if flag(output_sequence):
        if reverse:
            raise Refuse("the time order of a reverse sequence output is not defined by the op")
        return seq
    return final_h[None]


# --- lstm ---------------------------------------------------------------------------------------------------


def _lstm_step(acts):
    rec, cell, out = acts

    def step(gx, states, w):
        h, c = states
        g = gx + h @ w.hh.T
        i, f, o, z = np.split(g, 4, axis=-1)
        c = rec(f) * c + rec(i) * cell(z)
        return out(c) * rec(o), c

    return step


def _lstm(x, initial_h, initial_c, weight_ih, weight_hh, bias=None, peephole=None, weight_ih_back=None,
          weight_hh_back=None, bias_back=None, peephole_back=None, direction=None, output_sequence=None,
          recurrent_activation=None, cell_activation=None, activation=None, clip=None):
    x = _sequence(x)
    d = _direction(direction, ("forward", "reverse", "bidirectional"))
    for name, p in (("peephole", peephole), ("peephole_back", peephole_back)):
        if p is not None and np.any(floats(p) != 0):
            raise Refuse(f"a non-zero {name} (its place in the gate equations is not defined by the op)")
    if clip is not None:
        raise Refuse("clip (whether it bounds the cell gate or the cell state is not defined by the op)")
    acts = (_activation(recurrent_activation, "sigmoid", "recurrent_activation"),
            _activation(cell_activation, "tanh", "cell_activation"), _activation(activation, "tanh", "activation"))
    step = _lstm_step(acts)
    fwd = _weights(weight_ih, weight_hh, bias, 4, x.shape[2])
    hsize, batch = fwd.hh.shape[1], x.shape[1]
    dirs = 2 if d == "bidirectional" else 1
    h0 = _state(initial_h, batch, dirs * hsize, "initial_h")
    c0 = _state(initial_c, batch, dirs * hsize, "initial_c")
    if d != "bidirectional":
        seq, (h, c) = _run(step, x, fwd, (h0, c0), d == "reverse")
        return _out(seq, h, output_sequence, d == "reverse"), h, c
    if not flag(output_sequence):
        raise Refuse("the last-step output of a bidirectional lstm is not defined by the op")
    if weight_ih_back is None or weight_hh_back is None:
        raise Refuse("a bidirectional lstm without weight_ih_back / weight_hh_back")
    back = _weights(weight_ih_back, weight_hh_back, bias_back, 4, x.shape[2], "_back")
    if back.hh.shape[1] != hsize:
        raise Refuse(f"backward hidden size {back.hh.shape[1]} differs from the forward {hsize}")
    seq_f, (hf, cf) = _run(step, x, fwd, (h0[:, :hsize], c0[:, :hsize]), False)
    seq_b, (hb, cb) = _run(step, x, back, (h0[:, hsize:], c0[:, hsize:]), True)
    return np.concatenate([seq_f, seq_b], -1), np.concatenate([hf, hb], -1), np.concatenate([cf, cb], -1)


# --- gru and rnn --------------------------------------------------------------------------------------------


def _gru(x, initial_h, weight_ih, weight_hh, bias=None, direction=None, output_sequence=None,
         recurrent_activation=None, activation=None, reset_after=None, input_bias=None):
    """o_t = activation(W_io x_t + r_t * (W_ho h_{t-1}) + b_o), h_t = (1 - z_t) * o_t + z_t * h_{t-1}."""
    x = _sequence(x)
    if flag(reset_after):
        raise Refuse("reset_after (where its biases go is not defined by the op)")
    if input_bias is not None and np.any(floats(input_bias) != 0):
        raise Refuse("a non-zero input_bias")
    d = _direction(direction, ("forward", "reverse"))
    rec = _activation(recurrent_activation, "sigmoid", "recurrent_activation")
    act = _activation(activation, "tanh", "activation")
    w = _weights(weight_ih, weight_hh, bias, 3, x.shape[2])
    hsize = w.hh.shape[1]

    def step(gx, states, w):
        (h,) = states
        gh = h @ w.hh.T
        r = rec(gx[:, :hsize] + gh[:, :hsize])
        z = rec(gx[:, 2 * hsize:] + gh[:, 2 * hsize:])
        o = act(gx[:, hsize:2 * hsize] + r * gh[:, hsize:2 * hsize])
        return ((1 - z) * o + z * h,)

    seq, (h,) = _run(step, x, w, (_state(initial_h, x.shape[1], hsize, "initial_h"),), d == "reverse")
    return _out(seq, h, output_sequence, d == "reverse"), h


def _rnn(x, initial_h, weight_ih, weight_hh, bias=None, direction=None, output_sequence=None, activation=None):
    x = _sequence(x)
    d = _direction(direction, ("forward", "reverse"))
    act = _activation(activation, "tanh", "activation")
    w = _weights(weight_ih, weight_hh, bias, 1, x.shape[2])

    def step(gx, states, w):
        return (act(gx + states[0] @ w.hh.T),)

    seq, (h,) = _run(step, x, w, (_state(initial_h, x.shape[1], w.hh.shape[1], "initial_h"),), d == "reverse")
    return _out(seq, h, output_sequence, d == "reverse"), h


OPS = {"lstm": row(_lstm), "gru": row(_gru), "rnn": row(_rnn)}
