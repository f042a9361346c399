"""The convolution kernels against their definitions (a sum over kernel offsets for conv, a scatter of every
input pixel for conv_transpose), for any shapes, strides, dilations, groups, paddings, and im2col chunk
sizes (the chunked path included)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mlqpipe.quality.mil import ops_nn

from .oracle import assert_close


@st.composite
def settings_2d(draw):
    return dict(n=draw(st.integers(1, 2)), groups=draw(st.integers(1, 2)), cg=draw(st.integers(1, 3)), og=draw(st.integers(1, 3)),
                h=draw(st.integers(3, 7)), w=draw(st.integers(3, 7)), k=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                s=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), d=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                pad=[draw(st.integers(0, 2)) for _ in range(4)], chunk=draw(st.sampled_from([1 << 24, 5])),
                seed=draw(st.integers(0, 2**32 - 1)))


def _reference_conv(x, w, groups, s, d, pad):
    xp = np.pad(x, [(0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])]).astype(np.float64)
    oc, cg, kh, kw = w.shape
    oh = (xp.shape[2] - (kh - 1) * d[0] - 1) // s[0] + 1
    ow = (xp.shape[3] - (kw - 1) * d[1] - 1) // s[1] + 1
    out = np.zeros((x.shape[0], oc, oh, ow))
    og = oc // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * d[0]:i * d[0] + (oh - 1) * s[0] + 1:s[0], j * d[1]:j * d[1] + (ow - 1) * s[1] + 1:s[1]]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out


def _reference_conv_transpose(x, w, groups, s, d, pad):
    n, cin, h, wd = x.shape
    _, og, kh, kw = w.shape
    cg = cin // groups
    full = np.zeros((n, og * groups, (h - 1) * s[0] + (kh - 1) * d[0] + 1, (wd - 1) * s[1] + (kw - 1) * d[1] + 1))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", x[:, g * cg:(g + 1) * cg].astype(np.float64), w[g * cg:(g + 1) * cg, :, i, j])
                full[:, g * og:(g + 1) * og, i * d[0]:i * d[0] + (h - 1) * s[0] + 1:s[0], j * d[1]:j * d[1] + (wd - 1) * s[1] + 1:s[1]] += contrib
    return full[:, :, pad[0]:full.shape[2] - pad[1], pad[2]:full.shape[3] - pad[3]]


def _with_chunk(chunk, fn):
    old, ops_nn._CHUNK = ops_nn._CHUNK, chunk
    try:
        return fn()
    finally:
        ops_nn._CHUNK = old


@settings(max_examples=60, deadline=None)
@given(settings_2d())
def test_conv_is_the_sum_over_kernel_offsets(c):
    rng = np.random.default_rng(c["seed"])
    x = rng.standard_normal((c["n"], c["cg"] * c["groups"], c["h"], c["w"])).astype(np.float32)
    w = rng.standard_normal((c["og"] * c["groups"], c["cg"], *c["k"])).astype(np.float32)
    assume(all((k - 1) * d + 1 <= size + c["pad"][2 * a] + c["pad"][2 * a + 1]
               for a, (k, d, size) in enumerate(zip(c["k"], c["d"], (c["h"], c["w"])))))
    got = _with_chunk(c["chunk"], lambda: ops_nn._conv(x, w, strides=list(c["s"]), pad_type="custom", pad=c["pad"],
                                                       dilations=list(c["d"]), groups=c["groups"]))
    assert_close(got, _reference_conv(x, w, c["groups"], c["s"], c["d"], c["pad"]), "conv", 1e-5)


@settings(max_examples=60, deadline=None)
@given(settings_2d())
def test_conv_transpose_scatters_every_input_pixel(c):
    rng = np.random.default_rng(c["seed"])
    x = rng.standard_normal((c["n"], c["cg"] * c["groups"], c["h"], c["w"])).astype(np.float32)
    w = rng.standard_normal((c["cg"] * c["groups"], c["og"], *c["k"])).astype(np.float32)
    full = [(size - 1) * s + (k - 1) * d + 1 for size, s, k, d in zip((c["h"], c["w"]), c["s"], c["k"], c["d"])]
    assume(c["pad"][0] + c["pad"][1] < full[0] and c["pad"][2] + c["pad"][3] < full[1])
    got = _with_chunk(c["chunk"], lambda: ops_nn._conv_transpose(x, w, strides=list(c["s"]), pad_type="custom", pad=c["pad"],
                                                                 dilations=list(c["d"]), groups=c["groups"]))
    assert_close(got, _reference_conv_transpose(x, w, c["groups"], c["s"], c["d"], c["pad"]), "conv_transpose", 1e-5)
