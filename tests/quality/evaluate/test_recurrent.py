"""Recurrent layers (simpleRecurrent, gru, uniDirectionalLSTM, biDirectionalLSTM) built with coremltools'
NeuralNetworkBuilder, run by mlqpipe's evaluator, compared with recurrences written here per sample and per
step from NeuralNetwork.proto's equations (weights read back from the spec in its documented layout).

Ordering, as coremltools' references of Core ML have it: reverseInput processes x_S .. x_1 and emits the
outputs in that order (output k follows input S-1-k); biDirectionalLSTM aligns its backward half with the
input positions. Classic networks take rank-1 or rank-3 inputs only, so each model reshapes a rank-1 input of
S*I values into its [S, I, 1, 1] sequence."""

from __future__ import annotations

import numpy as np
import pytest

from mlqpipe.quality.evaluate.context import Unsupported
from tests.quality.evaluate import harness as H

N, S, I = 3, 5, 3  # samples, steps, input size

ACT = {
    "SIGMOID": lambda v: 1 / (1 + np.exp(-v)),
    "TANH": np.tanh,
    "RELU": lambda v: np.maximum(v, 0),
    "LINEAR": lambda v: v,
    "SIGMOID_HARD": lambda v: np.minimum(np.maximum(0.2 * v + 0.5, 0), 1),
}


def clip(v, t=50.0):
    return np.minimum(np.maximum(v, -t), t)


def _rng(seed):
    return np.random.default_rng(seed)


def _w(rng, *shape, scale=0.6):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _vec(wp, *shape):
    return np.array(wp.floatValue, np.float64).reshape(shape)


def _sequence_model(states: list[tuple[str, int]], outputs=("y",), fed: bool = True):
    """A classic builder with a rank-1 input x_flat (S*I) reshaped to the sequence x, and the state inputs.
    Core ML requires a recurrent layer's state inputs and outputs; `fed=False` makes the state inputs
    optional model inputs the tests leave out (Core ML then starts from zeros)."""
    b = H.builder([("x_flat", (S * I,))] + [(n, (o,)) for n, o in states], [(n, None) for n in outputs], nd=False)
    b.add_reshape("seq", "x_flat", "x", (S, I, 1, 1), 0)
    if not fed:
        for f in b.spec.description.input[1:]:
            f.type.isOptional = True
    return b


def _run(b, tmp_path, feeds):
    (tmp_path / "model.mlmodel").write_bytes(b.spec.SerializeToString())  # Core ML's validator judges it
    return H.run(b, feeds)


def _steps(reverse):
    return range(S - 1, -1, -1) if reverse else range(S)


def _check_sequence(ours, ref_steps, output_all):
    """ours (N, S or 1, O, 1, 1) against per-sample lists of step outputs in emission order."""
    ref = np.array([r if output_all else r[-1:] for r in ref_steps])
    assert ours.shape == ref.shape + (1, 1), (ours.shape, ref.shape)
    H.assert_close(ours, ref)


# --- simpleRecurrent ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", list(ACT))
@pytest.mark.parametrize("output_all, reverse, bias, state", [
    (True, False, True, True), (False, True, False, False), (True, True, True, True),
])
def test_simple_recurrent(tmp_path, activation, output_all, reverse, bias, state):
    o = 4
    rng = _rng(1)
    b = _sequence_model([("h0", o)], ("y", "h"), fed=state)
    b.add_simple_rnn("rnn", W_h=_w(rng, o, o), W_x=_w(rng, o, I), b=_w(rng, o) if bias else None, hidden_size=o, input_size=I,
                     activation=activation, input_names=["x", "h0"], output_names=["y", "h"],
                     output_all=output_all, reverse_input=reverse)
    p = b.spec.neuralNetwork.layers[-1].simpleRecurrent
    W, R = _vec(p.weightMatrix, o, I), _vec(p.recursionMatrix, o, o)
    bv = _vec(p.biasVector, o) if bias else np.zeros(o)
    x = _w(rng, N, S, I, scale=1.0)
    h0 = _w(rng, N, o, scale=1.0) if state else np.zeros((N, o), np.float32)
    ref, last = [], []
    for n in range(N):
        h, outs = h0[n].astype(np.float64), []
        for t in _steps(reverse):
            h = ACT[activation](clip(W @ x[n, t] + R @ h + bv))
            outs.append(h)
        ref.append(outs)
        last.append(h)
    feeds = {"x_flat": x.reshape(N, S * I)} | ({"h0": h0} if state else {})
    outs = _run(b, tmp_path, feeds)
    _check_sequence(outs["y"], ref, output_all)
    H.assert_close(outs["h"], np.array(last))


# --- gru ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner, activation", [("SIGMOID", "TANH"), ("SIGMOID_HARD", "TANH"), ("SIGMOID", "LINEAR"),
                                               ("TANH", "RELU")])
@pytest.mark.parametrize("output_all, reverse, bias, state", [
    (True, False, True, True), (False, True, True, False), (True, True, False, True),
])
def test_gru(tmp_path, inner, activation, output_all, reverse, bias, state):
    o = 4
    rng = _rng(2)
    b = _sequence_model([("h0", o)], ("y", "h"), fed=state)
    b.add_gru("gru", W_h=[_w(rng, o, o) for _ in range(3)], W_x=[_w(rng, o, I) for _ in range(3)],
              b=[_w(rng, o) for _ in range(3)] if bias else None, hidden_size=o, input_size=I,
              input_names=["x", "h0"], output_names=["y", "h"], activation=activation,
              inner_activation=inner, output_all=output_all, reverse_input=reverse)
    p = b.spec.neuralNetwork.layers[-1].gru
    Wz, Wr, Wo = (_vec(getattr(p, f"{g}GateWeightMatrix"), o, I) for g in ("update", "reset", "output"))
    Rz, Rr, Ro = (_vec(getattr(p, f"{g}GateRecursionMatrix"), o, o) for g in ("update", "reset", "output"))
    bz, br, bo = ((_vec(getattr(p, f"{g}GateBiasVector"), o) for g in ("update", "reset", "output")) if bias
                  else (np.zeros(o),) * 3)
    f, g = ACT[inner], ACT[activation]
    x = _w(rng, N, S, I, scale=1.0)
    h0 = _w(rng, N, o, scale=1.0) if state else np.zeros((N, o), np.float32)
    ref, last = [], []
    for n in range(N):
        y, outs = h0[n].astype(np.float64), []
        for t in _steps(reverse):
            z = f(clip(Wz @ x[n, t] + Rz @ y + bz))
            r = f(clip(Wr @ x[n, t] + Rr @ y + br))
            c = y * r
            out = g(clip(Wo @ x[n, t] + Ro @ c + bo))
            y = (1 - z) * out + z * y
            outs.append(y)
        ref.append(outs)
        last.append(y)
    outs = _run(b, tmp_path, {"x_flat": x.reshape(N, S * I)} | ({"h0": h0} if state else {}))
    _check_sequence(outs["y"], ref, output_all)
    H.assert_close(outs["h"], np.array(last))


# --- LSTMs -------------------------------------------------------------------------------------------------


def _lstm_weights(rng, o, peep, bias):
    """Builder arguments: W_h [R_i, R_f, R_o, R_z], W_x [W_i, W_f, W_o, W_z], b, peep [p_i, p_f, p_o]."""
    return dict(W_h=[_w(rng, o, o) for _ in range(4)], W_x=[_w(rng, o, I) for _ in range(4)],
                b=[_w(rng, o) for _ in range(4)] if bias else None), ([_w(rng, o) for _ in range(3)] if peep else None)


def _lstm_from_spec(wp, params, o):
    """The proto's LSTM weights by gate name, read back from an LSTMWeightParams."""
    w = {}
    for g in ("inputGate", "forgetGate", "blockInput", "outputGate"):
        w["W" + g] = _vec(getattr(wp, f"{g}WeightMatrix"), o, I)
        w["R" + g] = _vec(getattr(wp, f"{g}RecursionMatrix"), o, o)
        w["b" + g] = _vec(getattr(wp, f"{g}BiasVector"), o) if params.hasBiasVectors else np.zeros(o)
    for g in ("inputGate", "forgetGate", "outputGate"):
        w["p" + g] = _vec(getattr(wp, f"{g}PeepholeVector"), o) if params.hasPeepholeVectors else np.zeros(o)
    return w


def _lstm_ref(w, params, acts, xs, h, c, reverse):
    """NeuralNetwork.proto's LSTM equations for one sample: (outputs in emission order, h, c)."""
    f, g, hact = (ACT[a] for a in acts)
    cell_clip = params.cellClipThreshold or 50.0
    outs = []
    for t in _steps(reverse):
        x = xs[t]
        i = f(clip(w["WinputGate"] @ x + w["RinputGate"] @ h + w["pinputGate"] * c + w["binputGate"]))
        fg = f(clip(w["WforgetGate"] @ x + w["RforgetGate"] @ h + w["pforgetGate"] * c + w["bforgetGate"]))
        z = g(clip(w["WblockInput"] @ x + w["RblockInput"] @ h + w["bblockInput"]))
        c = c * (1 - i) + i * z if params.coupledInputAndForgetGate else c * fg + i * z
        c = clip(c, cell_clip)
        out = f(clip(w["WoutputGate"] @ x + w["RoutputGate"] @ h + w["poutputGate"] * c + w["boutputGate"]))
        h = hact(c) * out
        outs.append(h)
    return outs, h, c


_STD = ("SIGMOID", "TANH", "TANH")
LSTM_CASES = {
    "plain": dict(acts=_STD, output_all=True, reverse=False, peep=False, coupled=False, clip=50000.0),
    "reverse": dict(acts=_STD, output_all=True, reverse=True, peep=True, coupled=False, clip=50000.0),
    "last-only-reverse": dict(acts=_STD, output_all=False, reverse=True, peep=False, coupled=False, clip=50000.0),
    "peephole-coupled-clipped": dict(acts=("SIGMOID_HARD", "TANH", "RELU"), output_all=True, reverse=False, peep=True,
                                     coupled=True, clip=0.3),
    # forgetBias set: the reference adds nothing (the stored bias already holds the +1; see layers_recurrent.py)
    "linear-cell-forget-bias": dict(acts=("SIGMOID", "LINEAR", "TANH"), output_all=True, reverse=True, peep=False, coupled=False,
                                    clip=2.0, forget_bias=True),
}


@pytest.mark.parametrize("name", LSTM_CASES)
@pytest.mark.parametrize("state", [True, False])
def test_unidirectional_lstm(tmp_path, name, state):
    case, o = LSTM_CASES[name], 4
    rng = _rng(3)
    b = _sequence_model([("h0", o), ("c0", o)], ("y", "h", "c"), fed=state)
    weights, peep = _lstm_weights(rng, o, case["peep"], bias=True)
    b.add_unilstm("lstm", **weights, hidden_size=o, input_size=I, input_names=["x", "h0", "c0"],
                  output_names=["y", "h", "c"], inner_activation=case["acts"][0], cell_state_update_activation=case["acts"][1],
                  output_activation=case["acts"][2], peep=peep, output_all=case["output_all"],
                  forget_bias=case.get("forget_bias", False), coupled_input_forget_gate=case["coupled"],
                  cell_clip_threshold=case["clip"], reverse_input=case["reverse"])
    p = b.spec.neuralNetwork.layers[-1].uniDirectionalLSTM
    w = _lstm_from_spec(p.weightParams, p.params, o)
    x = _w(rng, N, S, I, scale=1.0)
    h0, c0 = (_w(rng, N, o, scale=1.0), _w(rng, N, o, scale=1.0)) if state else (np.zeros((N, o)), np.zeros((N, o)))
    runs = [_lstm_ref(w, p.params, case["acts"], x[n], h0[n], c0[n], case["reverse"]) for n in range(N)]
    feeds = {"x_flat": x.reshape(N, S * I)} | ({"h0": h0.astype(np.float32), "c0": c0.astype(np.float32)} if state else {})
    outs = _run(b, tmp_path, feeds)
    _check_sequence(outs["y"], [r[0] for r in runs], case["output_all"])
    H.assert_close(outs["h"], np.array([r[1] for r in runs]))
    H.assert_close(outs["c"], np.array([r[2] for r in runs]))


def _bilstm_model(rng, o, output_all, peep, acts=("SIGMOID", "TANH", "TANH"), clip_threshold=50000.0, extra_outputs=()):
    b = _sequence_model([("hf0", o), ("cf0", o), ("hb0", o), ("cb0", o)], ("y", "hf", "cf", "hb", "cb", *extra_outputs))
    fw, pf = _lstm_weights(rng, o, peep, bias=True)
    bw, pb = _lstm_weights(rng, o, peep, bias=True)
    b.add_bidirlstm("bilstm", **fw, W_h_back=bw["W_h"], W_x_back=bw["W_x"], b_back=bw["b"], hidden_size=o, input_size=I,
                    input_names=["x", "hf0", "cf0", "hb0", "cb0"], output_names=["y", "hf", "cf", "hb", "cb"],
                    inner_activation=acts[0], cell_state_update_activation=acts[1], output_activation=acts[2], peep=pf,
                    peep_back=pb, output_all=output_all, cell_clip_threshold=clip_threshold)
    return b


@pytest.mark.parametrize("output_all, peep", [(True, False), (False, True), (True, True)])
def test_bidirectional_lstm(tmp_path, output_all, peep):
    """y_t = [forward output after x_1..x_t, backward output after x_S..x_t] (the proto's example); states
    in and out: h and c of each direction."""
    o = 3
    rng = _rng(4)
    b = _bilstm_model(rng, o, output_all, peep)
    p = b.spec.neuralNetwork.layers[-1].biDirectionalLSTM
    wf, wb = (_lstm_from_spec(p.weightParams[k], p.params, o) for k in (0, 1))
    acts = ("SIGMOID", "TANH", "TANH")
    x = _w(rng, N, S, I, scale=1.0)
    states = {k: _w(rng, N, o, scale=1.0) for k in ("hf0", "cf0", "hb0", "cb0")}
    ref, finals = [], []
    for n in range(N):
        yf, hf, cf = _lstm_ref(wf, p.params, acts, x[n], states["hf0"][n], states["cf0"][n], reverse=False)
        yb, hb, cb = _lstm_ref(wb, p.params, acts, x[n], states["hb0"][n], states["cb0"][n], reverse=True)
        # yb[k] followed x_{S-1-k}: position t takes yb[S-1-t]
        steps = [np.concatenate([yf[t], yb[S - 1 - t]]) for t in range(S)]
        ref.append(steps if output_all else [np.concatenate([hf, hb])])
        finals.append((hf, cf, hb, cb))
    outs = _run(b, tmp_path, {"x_flat": x.reshape(N, S * I)} | states)
    _check_sequence(outs["y"], ref, True)
    for k, name in enumerate(("hf", "cf", "hb", "cb")):
        H.assert_close(outs[name], np.array([f[k] for f in finals]))


def test_bidirectional_backward_half_is_the_reversed_unidirectional_output(tmp_path):
    """The two orderings side by side: biDirectionalLSTM's backward half at position t equals a
    uniDirectionalLSTM with reverseInput (same weights) at output S-1-t."""
    o = 3
    rng = _rng(5)
    b = _bilstm_model(rng, o, output_all=True, peep=False, extra_outputs=("u", "uh", "uc"))
    wp = b.spec.neuralNetwork.layers[-1].biDirectionalLSTM.weightParams[1]
    gates = ("inputGate", "forgetGate", "outputGate", "blockInput")  # the builder's order
    b.add_unilstm("uni", W_h=[_vec(getattr(wp, f"{g}RecursionMatrix"), o, o) for g in gates],
                  W_x=[_vec(getattr(wp, f"{g}WeightMatrix"), o, I) for g in gates],
                  b=[_vec(getattr(wp, f"{g}BiasVector"), o) for g in gates], hidden_size=o, input_size=I,
                  input_names=["x", "hb0", "cb0"], output_names=["u", "uh", "uc"], output_all=True, reverse_input=True)
    x = _w(rng, N, S, I, scale=1.0)
    states = {k: _w(rng, N, o, scale=1.0) for k in ("hf0", "cf0", "hb0", "cb0")}
    outs = _run(b, tmp_path, {"x_flat": x.reshape(N, S * I)} | states)
    H.assert_close(outs["y"][:, :, o:], outs["u"][:, ::-1], 1e-6)


# --- settings that are not evaluated -----------------------------------------------------------------------


@pytest.mark.parametrize("edit, why", [
    (lambda p: p.activation.scaledTanh.SetInParent(), "scaledTanh"),  # documented 1.7159 tanh(2x/3), tested as tanh
    (lambda p: setattr(p.activation.linear, "alpha", 2.0), "alpha"),  # recurrent activations take no parameters
])
def test_recurrent_activations_with_undocumented_parameters_are_not_evaluated(tmp_path, edit, why):
    rng = _rng(6)
    b = _sequence_model([("h0", 2)], ("y", "h"), fed=False)
    b.add_simple_rnn("rnn", W_h=_w(rng, 2, 2), W_x=_w(rng, 2, I), b=None, hidden_size=2, input_size=I, activation="TANH",
                     input_names=["x", "h0"], output_names=["y", "h"])
    edit(b.spec.neuralNetwork.layers[-1].simpleRecurrent)
    with pytest.raises(Unsupported, match=why):
        _run(b, tmp_path, {"x_flat": np.zeros((1, S * I), np.float32)})


def test_sequence_data_for_a_rank1_input_reaches_an_lstm():
    """Sequence data (N, S, C) for a model input declared [C]: Core ML runs it as S steps."""
    import numpy as np

    from tests.quality.evaluate import harness

    b = harness.builder([("x", (4,))], [("y", None)], nd=False)
    rng = np.random.default_rng(3)
    W = [rng.standard_normal((5, 4)).astype(np.float32) * 0.3 for _ in range(4)]
    R = [rng.standard_normal((5, 5)).astype(np.float32) * 0.3 for _ in range(4)]
    b.add_unilstm("lstm", R, W, None, 5, 4, ["x", "h0", "c0"], ["y", "h1", "c1"], output_all=True)
    x = rng.standard_normal((2, 6, 4)).astype(np.float32)  # 2 samples of 6 steps
    out = harness.run(b, {"x": x})
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    ref = np.zeros((2, 6, 5), np.float32)
    for s in range(2):
        h = c = np.zeros(5, np.float32)
        for t in range(6):
            i, f, o, z = (W[g] @ x[s, t] + R[g] @ h for g in range(4))  # the builder's gate order
            c = sig(f) * c + sig(i) * np.tanh(z)
            h = sig(o) * np.tanh(c)
            ref[s, t] = h
    harness.assert_close(out["y"].reshape(2, 6, 5), ref)
