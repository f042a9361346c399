"""The second part of the interpreter's op table (issue #18): recurrent layers, resizing, scatters and
scaled_dot_product_attention. Torch models converted by coremltools 9.0 are compared with torch
(||ours - torch||_2 / ||torch||_2 <= 1e-4 per output); ops torch does not produce (gru, reverse
recurrences, resize_*, scatter / scatter_nd) are built with the MIL builder and compared with torch run
on the same weights, or with a loop over the op's definition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlqpipe
from mlqpipe.quality.mil import Interpreter, Unsupported, ops_nn, run
from mlqpipe.quality.mil.base import Refuse
from mlqpipe.quality.mil.ops_attention import OPS as ATTENTION
from mlqpipe.quality.mil.ops_recurrent import OPS as RECURRENT
from mlqpipe.quality.mil.ops_resize import OPS as RESIZE
from mlqpipe.quality.mil.ops_resize import grid
from mlqpipe.quality.mil.ops_scatter import OPS as SCATTER

from .oracle import assert_close, convert_program, convert_torch, torch_outputs
from .torch_models import PART2, PART2_IOS, build_part2, conv3d, example

SEED = int(np.random.default_rng().integers(1 << 30))  # fresh weights every session


# --- torch models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PART2))
def test_torch_model_outputs(converted, name):
    module, specs = build_part2(name, SEED)
    zeros = {k: np.zeros(shape, dtype) for k, (shape, dtype) in specs.items()}
    path = converted(f"part2_{name}", lambda p: convert_torch(module, zeros, p, ios=PART2_IOS[name]), torch=True)
    interpreter = Interpreter(mlqpipe.load_model(path))
    ops = {op.type for op in interpreter.block.operations}
    assert ops & {"lstm", "rnn", "upsample_bilinear", "scatter_along_axis", "scaled_dot_product_attention"}, ops
    inputs = example(specs, 3, np.random.default_rng())
    ours = list(interpreter.run(inputs).values())
    ref = torch_outputs(module, inputs)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"{name} output {i}")


@pytest.mark.skipif(3 not in ops_nn.SPATIAL,
                    reason="3-D conv / pooling wait for ops_nn.SPATIAL = (1, 2, 3) (ops_nn.py, not this part's file)")
def test_torch_conv3d_outputs(converted):
    import torch

    torch.manual_seed(SEED)
    module, specs = conv3d()
    module.eval()
    path = converted("part2_conv3d", lambda p: convert_torch(module, {"x": np.zeros(specs["x"], np.float32)}, p), torch=True)
    inputs = {"x": np.random.default_rng().standard_normal((2, *specs["x"][1:])).astype(np.float32)}
    ours = list(Interpreter(mlqpipe.load_model(path)).run(inputs).values())
    for i, (a, b) in enumerate(zip(ours, torch_outputs(module, inputs))):
        assert_close(a, b, f"conv3d output {i}")


# --- MIL-builder programs: ops torch does not produce ---------------------------------------------------------

T, B, I, H = 6, 2, 5, 4
_rng = np.random.default_rng()  # fresh values every session
SEQ = _rng.standard_normal((T, B, I)).astype(np.float32)
IMG = _rng.standard_normal((1, 2, 5, 6)).astype(np.float32)
DATA = _rng.standard_normal((4, 5, 3)).astype(np.float32)
UPD = _rng.uniform(0.5, 2.0, (4, 5, 3)).astype(np.float32)
ALONG = _rng.integers(0, 5, (4, 5, 3)).astype(np.int32)  # repeats along axis 1
ROWS = np.array([3, 0, 3, 1], dtype=np.int32)  # scatter along axis 0, a repeat
ND = np.array([[1, 2], [0, 4], [1, 2], [3, 3]], dtype=np.int32)  # index pairs into [4, 5], a repeat
SCATTER_MODES = ("add", "sub", "mul", "div", "max", "min")


def _torch_layers(seed: int):
    import torch

    torch.manual_seed(seed)
    gru, lstm, rnn = torch.nn.GRU(I, H), torch.nn.LSTM(I, H), torch.nn.RNN(I, H)
    with torch.no_grad():
        gru.bias_hh_l0[2 * H:] = 0  # MIL's gru adds the candidate's recurrent bias outside the reset gate
    return gru.eval(), lstm.eval(), rnn.eval()


def _mil_weights(layer, order):
    """torch's stacked gates reordered to MIL's (`order`: torch gate index of each MIL gate) and its one bias."""
    def gates(w):
        return np.concatenate([np.split(w.detach().numpy(), len(order))[k] for k in order])

    bias = gates(layer.bias_ih_l0[:, None]).reshape(-1) + gates(layer.bias_hh_l0[:, None]).reshape(-1)
    return gates(layer.weight_ih_l0), gates(layer.weight_hh_l0), bias.astype(np.float32)


def _scatter_loop(data, rows, upd, mode):
    """The definition, one index at a time (repeats folded in order)."""
    out = data.copy()
    for n, i in enumerate(rows):
        out[tuple(i) if np.ndim(i) else i] = _combine(out[tuple(i) if np.ndim(i) else i], upd[n], mode)
    return out


def _combine(a, b, mode):
    return {"update": lambda: b, "add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b,
            "max": lambda: np.maximum(a, b), "min": lambda: np.minimum(a, b)}[mode]()


def _along_loop(data, idx, upd, mode):
    out = data.copy()
    for p in np.ndindex(idx.shape):
        q = (p[0], idx[p], p[2])
        out[q] = _combine(out[q], upd[p], mode)
    return out


@pytest.fixture(scope="module")
def builder_program(converted):
    """(package, references in output order, output labels)."""
    pytest.importorskip("torch")
    import torch
    from coremltools.converters.mil.mil import Builder as mb

    from .oracle import ct

    seed = int(_rng.integers(1 << 30))
    gru, lstm, rnn = _torch_layers(seed)
    h0 = _rng.standard_normal((B, H)).astype(np.float32)
    c0 = _rng.standard_normal((B, H)).astype(np.float32)
    gw, lw, rw = _mil_weights(gru, (0, 2, 1)), _mil_weights(lstm, (0, 1, 3, 2)), _mil_weights(rnn, (0,))
    labels, refs = [], []
    with torch.no_grad():
        x, xr = torch.from_numpy(SEQ), torch.from_numpy(SEQ[::-1].copy())
        th, tc = torch.from_numpy(h0)[None], torch.from_numpy(c0)[None]
        seq, last = gru(x, th)
        refs += [seq.numpy(), last[0].numpy(), gru(xr, th)[1][0].numpy()]
        labels += ["gru sequence", "gru final", "gru reverse final"]
        refs += [lstm(xr, (th, tc))[1][0][0].numpy(), lstm(xr, (th, tc))[1][1][0].numpy(), rnn(xr, th)[1][0].numpy()]
        labels += ["lstm reverse final h", "lstm reverse final c", "rnn reverse final"]
        img = torch.from_numpy(IMG)
        for mode, corners in (("STRICT_ALIGN_CORNERS", True), ("UNALIGN_CORNERS", False)):
            for size in ((9, 13), (3, 4), (5, 6)):
                refs.append(torch.nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=corners).numpy())
                labels.append(f"resize_bilinear {mode} {size}")
    refs += [np.repeat(np.repeat(IMG, 2, -2), 3, -1), _scatter_loop(DATA, ROWS[[0, 1, 3]], UPD[:3], "update"),
             *(_scatter_loop(DATA, ROWS, UPD, m) for m in SCATTER_MODES),
             *(_along_loop(DATA, ALONG, UPD, m) for m in SCATTER_MODES),
             _scatter_loop(DATA, ND[[0, 1, 3]], UPD[:3, 0], "update"),
             *(_scatter_loop(DATA, ND, UPD[:4, 0], m) for m in SCATTER_MODES)]
    labels += ["resize_nearest_neighbor", "scatter update", *(f"scatter {m}" for m in SCATTER_MODES),
               *(f"scatter_along_axis {m}" for m in SCATTER_MODES), "scatter_nd update", *(f"scatter_nd {m}" for m in SCATTER_MODES)]

    @mb.program(input_specs=[mb.TensorSpec(shape=SEQ.shape), mb.TensorSpec(shape=IMG.shape), mb.TensorSpec(shape=DATA.shape)],
                opset_version=ct().target.iOS17)
    def prog(seq, img, data):
        out = list(mb.gru(x=seq, initial_h=h0, weight_ih=gw[0], weight_hh=gw[1], bias=gw[2], output_sequence=True))
        out.append(mb.gru(x=seq, initial_h=h0, weight_ih=gw[0], weight_hh=gw[1], bias=gw[2], direction="reverse")[1])
        out += list(mb.lstm(x=seq, initial_h=h0, initial_c=c0, weight_ih=lw[0], weight_hh=lw[1], bias=lw[2], direction="reverse")[1:])
        out.append(mb.rnn(x=seq, initial_h=h0, weight_ih=rw[0], weight_hh=rw[1], bias=rw[2], direction="reverse")[1])
        for mode in ("STRICT_ALIGN_CORNERS", "UNALIGN_CORNERS"):
            for size in ((9, 13), (3, 4), (5, 6)):
                out.append(mb.resize_bilinear(x=img, target_size_height=size[0], target_size_width=size[1], sampling_mode=mode))
        out.append(mb.resize_nearest_neighbor(x=img, target_size_height=10, target_size_width=18))
        out.append(mb.scatter(data=data, indices=ROWS[[0, 1, 3]], updates=UPD[:3], mode="update"))
        out += [mb.scatter(data=data, indices=ROWS, updates=UPD, axis=0, mode=m) for m in SCATTER_MODES]
        out += [mb.scatter_along_axis(data=data, indices=ALONG, updates=UPD, axis=1, mode=m) for m in SCATTER_MODES]
        out.append(mb.scatter_nd(data=data, indices=ND[[0, 1, 3]], updates=UPD[:3, 0], mode="update"))
        out += [mb.scatter_nd(data=data, indices=ND, updates=UPD[:4, 0], mode=m) for m in SCATTER_MODES]
        return tuple(out)

    return converted("part2_builder", lambda p: convert_program(prog, 17, p)), refs, labels


def test_builder_ops_match_torch_and_definitions(builder_program):
    path, refs, labels = builder_program
    got = list(run(mlqpipe.load_model(path), {"seq": SEQ, "img": IMG, "data": DATA}).values())
    assert len(got) == len(refs)
    for label, a, b in zip(labels, got, refs):
        assert_close(a, b, label)


# --- grids, invariants and refusals -------------------------------------------------------------------------

# resize_bilinear's documented grid points for Xin = 2
DOCUMENTED_GRIDS = {
    ("UNALIGN_CORNERS", 5): [0.0, 0.1, 0.5, 0.9, 1.0], ("STRICT_ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
    ("ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0], ("DEFAULT", 5): [0.0, 0.4, 0.8, 1.0, 1.0],
    ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9], ("UNALIGN_CORNERS", 6): [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0],
    ("STRICT_ALIGN_CORNERS", 6): [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], ("DEFAULT", 6): [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0],
    ("OFFSET_CORNERS", 6): [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12],
}


@pytest.mark.parametrize("mode, n_out", sorted(DOCUMENTED_GRIDS))
def test_grid_matches_the_documented_points(mode, n_out):
    np.testing.assert_allclose(grid(2, n_out, mode), DOCUMENTED_GRIDS[mode, n_out], atol=1e-12)


def test_single_output_align_corners_samples_the_centre():
    assert grid(5, 1, "ALIGN_CORNERS").tolist() == [2.0]
    assert grid(5, 1, "STRICT_ALIGN_CORNERS").tolist() == [0.0]


@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from(["DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS", "ALIGN_CORNERS"]))
def test_grid_stays_inside_the_input_and_is_monotone(n_in, n_out, mode):
    g = grid(n_in, n_out, mode)
    assert g.shape == (n_out,) and g.min() >= 0 and g.max() <= n_in - 1 and np.all(np.diff(g) >= 0)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_whole_scale_nearest_and_same_size_bilinear(h, w, sh, sw, seed):
    x = np.random.default_rng(seed).standard_normal((1, 2, h, w)).astype(np.float32)
    up = RESIZE["upsample_nearest_neighbor"].fn(x, np.int32(sh), np.int32(sw))
    assert np.array_equal(up, np.repeat(np.repeat(x, sh, -2), sw, -1))
    for corners in (True, False):  # resizing to the input's own size changes nothing
        assert np.allclose(RESIZE["upsample_bilinear"].fn(x, np.int32(1), np.int32(1), np.bool_(corners)), x, atol=1e-6)


@given(st.integers(1, 5), st.integers(1, 6), st.sampled_from(("add", "max", "mul")), st.integers(0, 2**32 - 1))
def test_scatter_along_axis_folds_in_every_repeat(rows, count, mode, seed):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((2, rows, 3)).astype(np.float32)
    idx = rng.integers(0, rows, (2, count, 3)).astype(np.int32)
    upd = rng.standard_normal((2, count, 3)).astype(np.float32)
    got = SCATTER["scatter_along_axis"].fn(data, idx, upd, np.int32(1), mode)
    assert_close(got, _along_loop(data, idx, upd, mode), mode)


def _lstm_args(**extra):
    x = np.zeros((3, 1, 2), np.float32)
    w = np.zeros((8, 2), np.float32), np.zeros((8, 2), np.float32)
    return dict(x=x, initial_h=np.zeros((1, 4), np.float32), initial_c=np.zeros((1, 4), np.float32),
                weight_ih=w[0], weight_hh=w[1], weight_ih_back=w[0], weight_hh_back=w[1], **extra)


ONES = np.ones((1, 2, 3), np.float32)
REFUSED = [
    ("lstm", lambda: _lstm_args(direction="bidirectional"), "last-step output of a bidirectional lstm"),
    ("lstm", lambda: dict(_lstm_args(), initial_h=np.zeros((1, 2), np.float32), initial_c=np.zeros((1, 2), np.float32),
                          direction="reverse", output_sequence=True), "time order of a reverse sequence"),
    ("lstm", lambda: dict(_lstm_args(), peephole=np.ones(6, np.float32)), "non-zero peephole"),
    ("lstm", lambda: dict(_lstm_args(), clip=np.float32(1)), "clip"),
    ("lstm", lambda: dict(_lstm_args(), recurrent_activation="scaled_tanh"), "recurrent_activation 'scaled_tanh'"),
    ("gru", lambda: dict(x=np.zeros((2, 1, 2), np.float32), initial_h=np.zeros((1, 2), np.float32),
                         weight_ih=np.zeros((6, 2), np.float32), weight_hh=np.zeros((6, 2), np.float32), reset_after=True),
     "reset_after"),
    ("resize_nearest_neighbor", lambda: dict(x=IMG, target_size_height=7, target_size_width=12), "not a whole multiple"),
    ("scatter", lambda: dict(data=DATA, indices=ROWS, updates=UPD, mode="update"), "repeated indices"),
    ("scatter", lambda: dict(data=DATA, indices=-ROWS, updates=UPD), "negative indices"),
    ("scatter_nd", lambda: dict(data=DATA, indices=ND + 3, updates=UPD[:4, 0]), "outside axes of sizes [4, 5]"),
    ("scaled_dot_product_attention", lambda: dict(query=ONES, key=ONES, value=ONES, attn_mask=np.array([[True, True], [False, False]])),
     "every key is masked out"),
]


@pytest.mark.parametrize("op, args, reason", REFUSED, ids=[f"{op}: {reason}" for op, _, reason in REFUSED])
def test_undefined_settings_are_refused(op, args, reason):
    table = {**RECURRENT, **RESIZE, **SCATTER, **ATTENTION}
    with pytest.raises(Refuse, match=reason.replace("[", r"\[").replace("]", r"\]")):
        table[op].fn(**args())


def test_a_refusal_reaches_the_caller_as_unsupported(converted):
    """Through the interpreter: the op's name and type and the reason, never a number."""
    from coremltools.converters.mil.mil import Builder as mb

    from .oracle import ct

    @mb.program(input_specs=[mb.TensorSpec(shape=IMG.shape)], opset_version=ct().target.iOS16)
    def prog(img):
        return mb.resize_nearest_neighbor(x=img, target_size_height=7, target_size_width=12, name="odd")

    path = converted("part2_refused", lambda p: convert_program(prog, 16, p))
    with pytest.raises(Unsupported, match=r"^not evaluated: op odd of type resize_nearest_neighbor \(resizing 5x6 to 7x12"):
        run(mlqpipe.load_model(path), {"img": IMG})


STRING_INPUTS = {"direction", "mode", "sampling_mode", "activation", "recurrent_activation", "cell_activation"}
_arrays = st.one_of(
    st.lists(st.integers(0, 3), max_size=3).map(lambda s: np.random.default_rng(len(s)).standard_normal(s).astype(np.float32)),
    st.lists(st.integers(1, 3), max_size=3).map(lambda s: np.random.default_rng(7).integers(-1, 4, s).astype(np.int32)),
    st.integers(-3, 5), st.booleans(), st.none())
_words = st.one_of(st.none(), st.text(max_size=4), st.sampled_from(["add", "update", "div", "reverse", "bidirectional", "DEFAULT", "relu"]))


@pytest.mark.parametrize("op", sorted({**RECURRENT, **RESIZE, **SCATTER, **ATTENTION}))
@given(data=st.data())
def test_bad_inputs_are_refused_never_crash(op, data):
    """Whatever the inputs, a row returns arrays or refuses (TypeError: a missing input, named by the interpreter)."""
    import inspect

    fn = {**RECURRENT, **RESIZE, **SCATTER, **ATTENTION}[op].fn
    args = {p: data.draw(_words if p in STRING_INPUTS else _arrays, label=p) for p in inspect.signature(fn).parameters}
    try:
        with np.errstate(all="ignore"):
            fn(**args)
    except (Refuse, TypeError):
        pass
