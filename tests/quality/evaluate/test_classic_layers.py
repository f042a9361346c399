"""Classic (rank-5) layers: models built with coremltools' NeuralNetworkBuilder, run by mlqpipe's evaluator,
compared with plain loop-based numpy written here from NeuralNetwork.proto's formulas (tiny inputs, so the
references stay independent of the vectorised code). Fixed examples are the ones the proto and coremltools'
own tests give. Every model is also written to tmp_path, so Core ML's validator (conftest) judges it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mlqpipe.quality.evaluate.context import Unsupported
from tests.quality.evaluate import harness as H

N = 3  # samples per test


def _rng(seed: int = 0):
    return np.random.default_rng(seed)


def _run(b, tmp_path, feeds: dict, out: str = "y"):
    (tmp_path / "model.mlmodel").write_bytes(b.spec.SerializeToString())
    return H.run(b, feeds)[out]


def _check(ours, ref, tol: float = H.TOLERANCE):
    """Same Core ML shape (without the sample axis and the Seq axis when ref has none) and values."""
    ref = np.asarray(ref)
    assert tuple(ours.shape[-(ref.ndim - 1):]) == tuple(ref.shape[1:]), (ours.shape, ref.shape)
    H.assert_close(ours, ref, tol)


def _sequence_input(b, name: str, seq: int, c: int):
    """A [Seq, C, 1, 1] blob `name` from a rank-1 model input `name`_flat of seq*c values: classic networks
    take only rank-1 or rank-3 array inputs, so sequences are made in the network (reshape with a 4-D target)."""
    b.add_reshape(f"{name}_seq", f"{name}_flat", name, (seq, c, 1, 1), 0)


def _params(b):
    return b.spec.neuralNetwork.layers[-1]


def _floats(wp, *shape):
    return np.array(wp.floatValue, np.float64).reshape(shape)


# --- convolution and deconvolution ---------------------------------------------------------------------------


def _conv_ref(x, w, bias, stride, dilation, pads, groups):
    """Plain convolution of one sample x (C, H, W), weights (OC, C/g, kh, kw), pads (t, b, l, r)."""
    t, b, left, r = pads
    xp = np.pad(x, [(0, 0), (t, b), (left, r)])
    oc, kc, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    y = np.zeros((oc, oh, ow))
    for o in range(oc):
        g = o // (oc // groups)
        for i in range(oh):
            for j in range(ow):
                acc = bias[o]
                for c in range(kc):
                    for a in range(kh):
                        for e in range(kw):
                            acc += w[o, c, a, e] * xp[g * kc + c, i * sh + a * dh, j * sw + e * dw]
                y[o, i, j] = acc
    return y


def _same_pads(size, k, s, d, heavy_top):
    """NeuralNetwork.proto's SamePadding: output ceil(size/stride), the odd pixel bottom (or top)."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    small = total // 2
    return (total - small, small) if heavy_top else (small, total - small)


@pytest.mark.parametrize("mode", ["BOTTOM_RIGHT_HEAVY", "TOP_LEFT_HEAVY"])
@pytest.mark.parametrize("k, s, d, groups", [((3, 2), (2, 2), (1, 1), 1), ((2, 3), (1, 2), (2, 1), 2)])
def test_convolution_same_padding(tmp_path, mode, k, s, d, groups):
    c, h, w, oc = 4, 5, 6, 4
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    rng = _rng(1)
    b.add_convolution("conv", kernel_channels=c // groups, output_channels=oc, height=k[0], width=k[1], stride_height=s[0],
                      stride_width=s[1], border_mode="same", groups=groups, W=rng.standard_normal((k[0], k[1], c // groups, oc)),
                      b=rng.standard_normal(oc), has_bias=True, input_name="x", output_name="y", dilation_factors=list(d),
                      same_padding_asymmetry_mode=mode)
    p = _params(b).convolution
    wts, bias = _floats(p.weights, oc, c // groups, *k), _floats(p.bias, oc)
    x = rng.standard_normal((N, c, h, w)).astype(np.float32)
    heavy = mode == "TOP_LEFT_HEAVY"
    pads = _same_pads(h, k[0], s[0], d[0], heavy) + _same_pads(w, k[1], s[1], d[1], heavy)
    ref = np.stack([_conv_ref(xi, wts, bias, s, d, pads, groups) for xi in x])
    _check(_run(b, tmp_path, {"x": x}), ref)


def _deconv_ref(x, w, bias, stride, dilation, groups, crop):
    """Transposed convolution of one sample by scattering every input pixel through the kernel (weights
    [C_in, OC/g, kh, kw] as the proto stores them), then cropping (t, b, l, r) off the full output."""
    c, h, wd = x.shape
    _, ocg, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    full = np.zeros((ocg * groups, (h - 1) * sh + (kh - 1) * dh + 1, (wd - 1) * sw + (kw - 1) * dw + 1))
    cg = c // groups
    for ci, i, j, o, a, e in itertools.product(range(c), range(h), range(wd), range(ocg), range(kh), range(kw)):
        full[(ci // cg) * ocg + o, i * sh + a * dh, j * sw + e * dw] += x[ci, i, j] * w[ci, o, a, e]
    t, bottom, left, r = crop
    return full[:, t : full.shape[1] - bottom, left : full.shape[2] - r] + bias[:, None, None]


DECONV_CASES = {
    "valid": dict(k=(3, 3), s=(2, 2), groups=1, border="valid", pads=(0, 0, 0, 0)),
    "valid-padded-groups": dict(k=(3, 2), s=(2, 1), groups=2, border="valid", pads=(1, 0, 0, 1)),
    "valid-output-shape": dict(k=(2, 3), s=(2, 2), groups=1, border="valid", pads=(1, 1, 0, 1), output_shape=True),
    "same-odd": dict(k=(3, 3), s=(2, 2), groups=1, border="same"),
    "same-even-groups": dict(k=(4, 4), s=(2, 2), groups=2, border="same"),
    "same-top-left-even": dict(k=(4, 3), s=(2, 3), groups=1, border="same", heavy=True),
    "same-output-shape": dict(k=(3, 3), s=(2, 2), groups=1, border="same", output_shape=True),
    "dilated": dict(k=(3, 2), s=(1, 2), groups=1, border="valid", pads=(0, 0, 0, 0), d=(2, 1)),
}


def _deconv_model(case, c=4, h=3, w=4, oc=6, seed=2, output_shape=None):
    k, s, groups = case["k"], case["s"], case["groups"]
    t, bottom, left, r = case.get("pads", (0, 0, 0, 0))
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    rng = _rng(seed)
    b.add_convolution("up", kernel_channels=c, output_channels=oc, height=k[0], width=k[1], stride_height=s[0], stride_width=s[1],
                      border_mode=case["border"], groups=groups, W=rng.standard_normal((k[0], k[1], c, oc // groups)),
                      b=rng.standard_normal(oc), has_bias=True, is_deconv=True, output_shape=output_shape, input_name="x",
                      output_name="y", dilation_factors=list(case.get("d", (1, 1))), padding_top=t, padding_bottom=bottom,
                      padding_left=left, padding_right=r,
                      same_padding_asymmetry_mode="TOP_LEFT_HEAVY" if case.get("heavy") else "BOTTOM_RIGHT_HEAVY")
    return b


@pytest.mark.parametrize("name", DECONV_CASES)
def test_deconvolution(tmp_path, name):
    case = DECONV_CASES[name]
    c, h, w, oc = 4, 3, 4, 6
    k, s, d, groups = case["k"], case["s"], case.get("d", (1, 1)), case["groups"]
    full = ((h - 1) * s[0] + (k[0] - 1) * d[0] + 1, (w - 1) * s[1] + (k[1] - 1) * d[1] + 1)
    if case["border"] == "same":  # H_in * stride; TF's 'same': floor(excess / 2) off the top/left
        ex = (full[0] - h * s[0], full[1] - w * s[1])
        top, left = [(e - e // 2) if case.get("heavy") else e // 2 for e in ex]
        crop = (top, ex[0] - top, left, ex[1] - left)
    else:
        crop = case["pads"]
    out = (full[0] - crop[0] - crop[1], full[1] - crop[2] - crop[3])
    b = _deconv_model(case, output_shape=out if case.get("output_shape") else None)
    p = _params(b).convolution
    assert p.isDeconvolution and list(p.outputShape) == (list(out) if case.get("output_shape") else [])
    wts, bias = _floats(p.weights, c, oc // groups, *k), _floats(p.bias, oc)
    x = _rng(3).standard_normal((N, c, h, w)).astype(np.float32)
    ref = np.stack([_deconv_ref(xi, wts, bias, s, d, groups, crop) for xi in x])
    _check(_run(b, tmp_path, {"x": x}), ref)


@pytest.mark.parametrize("case, output_shape, why", [
    (dict(k=(3, 3), s=(2, 2), groups=1, border="same", heavy=True), None, "TOP_LEFT_HEAVY"),  # odd crop: which side?
    (dict(k=(3, 3), s=(2, 2), groups=1, border="valid"), (8, 10), "outputShape"),  # larger than the kernel gives
    (dict(k=(1, 1), s=(2, 2), groups=1, border="same"), None, "smaller than its stride"),
])
def test_deconvolution_undocumented_settings_are_not_evaluated(tmp_path, case, output_shape, why):
    b = _deconv_model(case, output_shape=output_shape)
    with pytest.raises(Unsupported, match=why):
        _run(b, tmp_path, {"x": np.ones((N, 4, 3, 4), np.float32)})


# --- pooling ---------------------------------------------------------------------------------------------------


def _pool_ref(x, kind, k, s, rows, cols, top_left, exclude):
    """Pool one sample x (C, H, W): out[i, j] over rows [i*s - top, +k) x cols [j*s - left, +k); max ignores
    what lies outside the input; average counts it as 0 and divides by k*k, or by the input pixels only
    (avgPoolExcludePadding)."""
    c, h, w = x.shape
    t, left = top_left
    y = np.zeros((c, rows, cols))
    for ch, i, j in itertools.product(range(c), range(rows), range(cols)):
        vals = [x[ch, r, q] for r in range(i * s[0] - t, i * s[0] - t + k[0]) for q in range(j * s[1] - left, j * s[1] - left + k[1])
                if 0 <= r < h and 0 <= q < w]
        if kind == "MAX":
            y[ch, i, j] = max(vals)
        else:
            y[ch, i, j] = sum(vals) / (len(vals) if exclude else k[0] * k[1])
    return y


@pytest.mark.parametrize("kind, exclude", [("MAX", True), ("AVERAGE", True), ("AVERAGE", False)])
@pytest.mark.parametrize("mode", ["BOTTOM_RIGHT_HEAVY", "TOP_LEFT_HEAVY"])
def test_pooling_same(tmp_path, kind, exclude, mode):
    c, h, w, k, s = 2, 5, 6, (2, 3), (2, 2)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_pooling("pool", height=k[0], width=k[1], stride_height=s[0], stride_width=s[1], layer_type=kind, padding_type="SAME",
                  input_name="x", output_name="y", exclude_pad_area=exclude, same_padding_asymmetry_mode=mode)
    x = _rng(4).standard_normal((N, c, h, w)).astype(np.float32)
    heavy = mode == "TOP_LEFT_HEAVY"
    pads = _same_pads(h, k[0], s[0], 1, heavy) + _same_pads(w, k[1], s[1], 1, heavy)
    ref = np.stack([_pool_ref(xi, kind, k, s, math.ceil(h / s[0]), math.ceil(w / s[1]), (pads[0], pads[2]), exclude) for xi in x])
    _check(_run(b, tmp_path, {"x": x}), ref)


def _last_pixel_out(n, k, s, pad, padded):
    """The proto's includeLastPixel output size."""
    out = math.ceil((n + 2 * pad - k) / s) + 1
    if padded and (out - 1) * s >= n + pad:
        out -= 1
    return out


@pytest.mark.parametrize("kind, h, w, pad", [
    ("MAX", 6, 7, (1, 1)),  # the last windows run past the padded input
    ("MAX", 6, 5, (0, 0)),
    ("MAX", 8, 5, (2, 0)),
    ("AVERAGE", 5, 7, (1, 1)),  # every window inside the padded input: as valid padding
])
def test_pooling_include_last_pixel(tmp_path, kind, h, w, pad):
    c, k, s = 2, (3, 3), (2, 2)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_pooling("pool", height=k[0], width=k[1], stride_height=s[0], stride_width=s[1], layer_type=kind,
                  padding_type="INCLUDE_LAST_PIXEL", input_name="x", output_name="y", padding_top=pad[0], padding_bottom=pad[0],
                  padding_left=pad[1], padding_right=pad[1])
    x = _rng(5).standard_normal((N, c, h, w)).astype(np.float32)
    padded = any(pad)
    rows, cols = _last_pixel_out(h, k[0], s[0], pad[0], padded), _last_pixel_out(w, k[1], s[1], pad[1], padded)
    ref = np.stack([_pool_ref(xi, kind, k, s, rows, cols, pad, True) for xi in x])
    _check(_run(b, tmp_path, {"x": x}), ref)


def test_average_pooling_past_the_padded_input_is_not_evaluated(tmp_path):
    b = H.builder([("x", (1, 6, 6))], [("y", None)], nd=False)
    b.add_pooling("pool", 3, 3, 2, 2, "AVERAGE", "INCLUDE_LAST_PIXEL", "x", "y", padding_top=1, padding_bottom=1,
                  padding_left=1, padding_right=1)
    with pytest.raises(Unsupported, match="includeLastPixel"):
        _run(b, tmp_path, {"x": np.ones((N, 1, 6, 6), np.float32)})


# --- padding and cropping -------------------------------------------------------------------------------------


def _pad_index(i, n, mode):
    if 0 <= i < n:
        return i
    if mode == "reflection":
        return -i if i < 0 else 2 * (n - 1) - i
    return min(max(i, 0), n - 1)  # replication


@pytest.mark.parametrize("mode", ["constant", "reflection", "replication"])
def test_padding(tmp_path, mode):
    c, h, w, (t, bottom, left, r) = 2, 3, 4, (2, 1, 0, 3)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_padding("pad", left=left, right=r, top=t, bottom=bottom, value=1.5, input_name="x", output_name="y", padding_type=mode)
    x = _rng(6).standard_normal((N, c, h, w)).astype(np.float32)
    ref = np.zeros((N, c, h + t + bottom, w + left + r))
    for n, ch, i, j in itertools.product(range(N), range(c), range(ref.shape[2]), range(ref.shape[3])):
        si, sj = i - t, j - left
        if mode == "constant":
            ref[n, ch, i, j] = x[n, ch, si, sj] if 0 <= si < h and 0 <= sj < w else 1.5
        else:
            ref[n, ch, i, j] = x[n, ch, _pad_index(si, h, mode), _pad_index(sj, w, mode)]
    _check(_run(b, tmp_path, {"x": x}), ref)


def test_padding_matches_the_proto_examples(tmp_path):
    x = np.arange(1, 13, dtype=np.float32).reshape(1, 1, 3, 4)
    expected = {
        "reflection": [[11, 10, 9, 10, 11, 12], [7, 6, 5, 6, 7, 8], [3, 2, 1, 2, 3, 4], [7, 6, 5, 6, 7, 8], [11, 10, 9, 10, 11, 12]],
        "replication": [[1, 1, 1, 2, 3, 4], [1, 1, 1, 2, 3, 4], [1, 1, 1, 2, 3, 4], [5, 5, 5, 6, 7, 8], [9, 9, 9, 10, 11, 12]],
    }
    for mode, want in expected.items():
        b = H.builder([("x", (1, 3, 4))], [("y", None)], nd=False)
        b.add_padding("pad", left=2, top=2, input_name="x", output_name="y", padding_type=mode)
        assert np.array_equal(_run(b, tmp_path, {"x": x}).reshape(5, 6), np.array(want, np.float32)), mode


def test_crop_one_and_two_inputs(tmp_path):
    c, h, w = 2, 5, 6
    x = _rng(7).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_crop("crop", left=1, right=2, top=0, bottom=3, offset=[0, 0], input_names=["x"], output_name="y")
    _check(_run(b, tmp_path, {"x": x}), np.array([[[[x[n, ch, i, j] for j in range(1, w - 2)] for i in range(0, h - 3)]
                                                   for ch in range(c)] for n in range(N)]))
    b = H.builder([("x", (c, h, w)), ("ref", (c, 2, 3))], [("y", None)], nd=False)
    b.add_crop("crop", left=0, right=0, top=0, bottom=0, offset=[2, 1], input_names=["x", "ref"], output_name="y")
    ref = np.array([[[[x[n, ch, 2 + i, 1 + j] for j in range(3)] for i in range(2)] for ch in range(c)] for n in range(N)])
    _check(_run(b, tmp_path, {"x": x, "ref": np.zeros((N, c, 2, 3), np.float32)}), ref)


# --- upsampling and resizing --------------------------------------------------------------------------------


def _interp_ref(x, grid_y, grid_x):
    """Bilinear interpolation of one sample x (C, H, W) at the given sample positions, plainly."""
    c, h, w = x.shape
    y = np.zeros((c, len(grid_y), len(grid_x)))
    for ch, i, j in itertools.product(range(c), range(len(grid_y)), range(len(grid_x))):
        gy, gx = grid_y[i], grid_x[j]
        y0, x0 = int(math.floor(gy)), int(math.floor(gx))
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        fy, fx = gy - y0, gx - x0
        top = x[ch, y0, x0] * (1 - fx) + x[ch, y0, x1] * fx
        bot = x[ch, y1, x0] * (1 - fx) + x[ch, y1, x1] * fx
        y[ch, i, j] = top * (1 - fy) + bot * fy
    return y


def _upsample_grid(mode, size, out):
    """UpsampleLayerParams.LinearUpsampleMode, as the proto spells it."""
    g = []
    for i in range(out):
        if mode == "DEFAULT":
            v = i * (size - size / out) / (out - 1) if out > 1 else 0.0
        elif mode == "ALIGN_CORNERS_TRUE":
            v = i * (size - 1) / (out - 1) if out > 1 else 0.0
        else:
            spacing = size / out
            v = i * spacing + 0.5 * spacing - 0.5
        g.append(min(size - 1, max(0.0, v)))
    return g


def test_upsample_nearest(tmp_path):
    c, h, w = 2, 2, 3
    x = _rng(8).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_upsample("up", 2, 3, "x", "y", mode="NN")
    ref = np.array([[[[x[n, ch, i // 2, j // 3] for j in range(w * 3)] for i in range(h * 2)] for ch in range(c)] for n in range(N)])
    _check(_run(b, tmp_path, {"x": x}), ref)


@pytest.mark.parametrize("mode, factors", [
    ("DEFAULT", (2, 3)), ("ALIGN_CORNERS_TRUE", (3, 2)), ("ALIGN_CORNERS_FALSE", (2, 2)),
    ("ALIGN_CORNERS_TRUE", (1.5, 2.5)), ("ALIGN_CORNERS_FALSE", (2.6, 1.4)),
])
def test_upsample_bilinear(tmp_path, mode, factors):
    c, h, w = 2, 3, 4
    x = _rng(9).standard_normal((N, c, h, w)).astype(np.float32)
    # ALIGN_CORNERS_* came with iOS 14, which Core ML accepts in ND networks only; the layer works on the last
    # three axes in both
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=mode != "DEFAULT")
    b.add_upsample("up", factors[0], factors[1], "x", "y", mode="BILINEAR", linear_upsample_mode=mode)
    oh, ow = math.floor(h * np.float32(factors[0])), math.floor(w * np.float32(factors[1]))  # floor(size x factor)
    ref = np.stack([_interp_ref(xi, _upsample_grid(mode, h, oh), _upsample_grid(mode, w, ow)) for xi in x])
    _check(_run(b, tmp_path, {"x": x}), ref)


@pytest.mark.parametrize("factor, mode, expected", [
    # coremltools' own tests of Core ML (neural_network test_numpy_nn_layers, MIL upsample_bilinear)
    (3, "DEFAULT", None),
    (3, "ALIGN_CORNERS_TRUE", [0, 0.2, 0.4, 0.6, 0.8, 1]),
    (2.6, "ALIGN_CORNERS_FALSE", [0, 0.1, 0.5, 0.9, 1]),
])
def test_upsample_bilinear_known_values(tmp_path, factor, mode, expected):
    if expected is None:  # [1, 2, 3] upsampled (2, 3) in DEFAULT mode
        b = H.builder([("x", (1, 1, 3))], [("y", None)], nd=False)
        b.add_upsample("up", 2, 3, "x", "y", mode="BILINEAR", linear_upsample_mode=mode)
        row = [1, 1.333333, 1.666667, 2, 2.333333, 2.666667, 3, 3, 3]
        H.assert_close(_run(b, tmp_path, {"x": np.array([[[[1, 2, 3]]]], np.float32)}), np.array([row, row]), 1e-6)
        return
    b = H.builder([("x", (1, 1, 2))], [("y", None)], nd=True)  # iOS 14 modes: ND networks only
    b.add_upsample("up", 1, factor, "x", "y", mode="BILINEAR", linear_upsample_mode=mode)
    H.assert_close(_run(b, tmp_path, {"x": np.array([[[[0, 1]]]], np.float32)}), np.array(expected), 1e-6)


def _sampling_grid(method, size, n):
    """SamplingMode.Method, as the proto spells each with linspace."""
    if method == "STRICT_ALIGN_ENDPOINTS_MODE":
        return list(np.linspace(0, size - 1, n))
    if method == "ALIGN_ENDPOINTS_MODE":
        return [(size - 1) / 2] if n == 1 else list(np.linspace(0, size - 1, n))
    if method == "UPSAMPLE_MODE":
        return [min(size - 1, v) for v in np.linspace(0, size - size / n, n)]
    spacing = max(1, size - 1) / n
    return [min(size - 1, 0.5 * spacing + i * spacing) for i in range(n)]


@pytest.mark.parametrize("method", ["STRICT_ALIGN_ENDPOINTS_MODE", "ALIGN_ENDPOINTS_MODE", "UPSAMPLE_MODE", "ROI_ALIGN_MODE"])
@pytest.mark.parametrize("target", [(5, 7), (1, 2), (2, 3)])
def test_resize_bilinear(tmp_path, method, target):
    c, h, w = 2, 3, 4
    x = _rng(10).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_resize_bilinear("resize", "x", "y", target_height=target[0], target_width=target[1], mode=method)
    ref = np.stack([_interp_ref(xi, _sampling_grid(method, h, target[0]), _sampling_grid(method, w, target[1])) for xi in x])
    _check(_run(b, tmp_path, {"x": x}), ref)


@pytest.mark.parametrize("method, expected", [  # coremltools' MIL resize_bilinear test, [0, 1] to width 5
    ("STRICT_ALIGN_ENDPOINTS_MODE", [0, 0.25, 0.5, 0.75, 1]),
    ("UPSAMPLE_MODE", [0, 0.4, 0.8, 1, 1]),
    ("ROI_ALIGN_MODE", [0.1, 0.3, 0.5, 0.7, 0.9]),
])
def test_resize_bilinear_known_values(tmp_path, method, expected):
    b = H.builder([("x", (1, 1, 2))], [("y", None)], nd=False)
    b.add_resize_bilinear("resize", "x", "y", target_height=1, target_width=5, mode=method)
    H.assert_close(_run(b, tmp_path, {"x": np.array([[[[0, 1]]]], np.float32)}), np.array(expected), 1e-6)


# --- cropResize ------------------------------------------------------------------------------------------------

_IMAGE = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)


@pytest.mark.parametrize("box, target, normalized, expected", [
    # coremltools' MIL crop_resize test (ALIGN_ENDPOINTS_MODE, CORNERS_HEIGHT_FIRST)
    ([1, 1, 2, 2], (2, 2), False, [6, 7, 10, 11]),
    ([1, 1, 2, 2], (4, 4), False, [6, 6.333333, 6.666667, 7, 7.333333, 7.666667, 8, 8.333333,
                                   8.666667, 9, 9.333333, 9.666667, 10, 10.333333, 10.666667, 11]),
    ([1, 1, 2, 2], (1, 1), False, [8.5]),
    ([0, 0, 0, 1 / 3, 1 / 3], (2, 2), True, [1, 2, 5, 6]),
    ([2, 2, 1, 1], (2, 2), False, [11, 10, 7, 6]),
])
def test_crop_resize_known_values(tmp_path, box, target, normalized, expected):
    b = H.builder([("x", (1, 4, 4)), ("roi_flat", (len(box),))], [("y", None)], nd=False)
    _sequence_input(b, "roi", 1, len(box))
    b.add_crop_resize("cr", ["x", "roi"], "y", target_height=target[0], target_width=target[1], mode="ALIGN_ENDPOINTS_MODE",
                      normalized_roi=normalized)
    y = _run(b, tmp_path, {"x": _IMAGE, "roi_flat": np.array([box], np.float32)})
    assert y.shape == (1, 1, 1) + tuple(target)
    H.assert_close(y, np.array(expected), 1e-6)


@pytest.mark.parametrize("method", ["STRICT_ALIGN_ENDPOINTS_MODE", "ALIGN_ENDPOINTS_MODE"])
@pytest.mark.parametrize("box_mode, normalized, scale, with_index", [
    ("CORNERS_HEIGHT_FIRST", False, 1.0, False),
    ("CORNERS_WIDTH_FIRST", True, 1.0, True),
    ("CORNERS_HEIGHT_FIRST", False, 0.5, True),
])
def test_crop_resize(tmp_path, method, box_mode, normalized, scale, with_index):
    c, h, w, r, target = 2, 5, 6, 3, (3, 2)
    rng = _rng(11)
    x = rng.standard_normal((N, c, h, w)).astype(np.float32)
    span = np.array([h - 1, w - 1]) / scale  # boxes stay inside the map after scaling
    starts = rng.uniform(0, 0.5, (N, r, 2)) * span
    ends = rng.uniform(0.5, 1, (N, r, 2)) * span
    if normalized:
        starts, ends = starts / span / (1 / scale), ends / span / (1 / scale)
    boxes = np.concatenate([starts, ends], axis=2)  # h_start, w_start, h_end, w_end
    if box_mode == "CORNERS_WIDTH_FIRST":
        boxes = boxes[:, :, [1, 0, 3, 2]]
    if with_index:
        boxes = np.concatenate([np.zeros((N, r, 1)), boxes], axis=2)
    k = boxes.shape[2]
    b = H.builder([("x", (c, h, w)), ("roi_flat", (r * k,))], [("y", None)], nd=False)
    _sequence_input(b, "roi", r, k)
    b.add_crop_resize("cr", ["x", "roi"], "y", target_height=target[0], target_width=target[1], mode=method,
                      normalized_roi=normalized, box_indices_mode=box_mode, spatial_scale=scale)
    ref = np.zeros((N, r, c) + target)
    for n, i in itertools.product(range(N), range(r)):
        v = boxes[n, i, 1:] if with_index else boxes[n, i]
        y0, x0, y1, x1 = (v[[1, 0, 3, 2]] if box_mode == "CORNERS_WIDTH_FIRST" else v) * scale
        if normalized:
            y0, y1, x0, x1 = y0 * (h - 1), y1 * (h - 1), x0 * (w - 1), x1 * (w - 1)

        def grid(a, e, m):
            if method == "ALIGN_ENDPOINTS_MODE" and m == 1:
                return [(a + e) / 2]
            return [a + (e - a) * t / (m - 1) for t in range(m)] if m > 1 else [a]

        ref[n, i] = _interp_ref(x[n], grid(y0, y1, target[0]), grid(x0, x1, target[1]))
    y = _run(b, tmp_path, {"x": x, "roi_flat": boxes.reshape(N, r * k).astype(np.float32)})
    assert y.shape == (N, r, c) + target
    H.assert_close(y, ref)


@pytest.mark.parametrize("change, why", [
    (dict(mode="ROI_ALIGN_MODE"), "sampling mode"),
    (dict(box_indices_mode="CENTER_SIZE_HEIGHT_FIRST"), "center and size"),
    (dict(box=[0, 0, 3, 5]), "outside"),
    (dict(box=[1, 0, 0, 1, 1]), "batch index"),
])
def test_crop_resize_undocumented_settings_are_not_evaluated(tmp_path, change, why):
    box = change.pop("box", [0, 0, 2, 2])
    b = H.builder([("x", (1, 4, 4)), ("roi_flat", (len(box),))], [("y", None)], nd=False)
    _sequence_input(b, "roi", 1, len(box))
    b.add_crop_resize("cr", ["x", "roi"], "y", target_height=2, target_width=2, **change)
    with pytest.raises(Unsupported, match=why):
        _run(b, tmp_path, {"x": _IMAGE, "roi_flat": np.array([box], np.float32)})


# --- normalisation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, alpha, beta, k", [(1, 2.0, 3.0, 8.0), (3, 0.5, 0.75, 1.0), (5, 1e-2, 1.5, 2.0)])
def test_lrn(tmp_path, size, alpha, beta, k):
    c, h, w = 6, 2, 3
    x = _rng(12).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_lrn("lrn", "x", "y", alpha=alpha, beta=beta, local_size=size, k=k)
    ref = np.zeros(x.shape)
    for n, ch, i, j in itertools.product(range(N), range(c), range(h), range(w)):
        window = [x[n, q, i, j] ** 2 for q in range(ch - size // 2, ch + size // 2 + 1) if 0 <= q < c]
        ref[n, ch, i, j] = x[n, ch, i, j] / (k + alpha / size * sum(window)) ** beta
    _check(_run(b, tmp_path, {"x": x}), ref)


def test_lrn_known_value_and_even_window(tmp_path):
    b = H.builder([("x", (1, 3, 3))], [("y", None)], nd=False)
    b.add_lrn("lrn", "x", "y", alpha=2, beta=3, local_size=1, k=8)  # coremltools' test: 1 / (8 + 2)^3
    H.assert_close(_run(b, tmp_path, {"x": np.ones((1, 1, 3, 3), np.float32)}), np.full((1, 1, 3, 3), 1e-3))
    b = H.builder([("x", (4, 1, 1))], [("y", None)], nd=False)
    b.add_lrn("lrn", "x", "y", alpha=1, beta=1, local_size=2)
    with pytest.raises(Unsupported, match="localSize 2"):
        _run(b, tmp_path, {"x": np.ones((1, 4, 1, 1), np.float32)})


@pytest.mark.parametrize("across, variance", [(True, True), (True, False), (False, True), (False, False)])
def test_mvn(tmp_path, across, variance):
    c, h, w, eps = 3, 2, 4, 1e-2
    x = (_rng(13).standard_normal((N, c, h, w)) * 0.3).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_mvn("mvn", "x", "y", across_channels=across, normalize_variance=variance, epsilon=eps)
    ref = np.zeros(x.shape)
    for n in range(N):
        groups = [list(range(c))] if across else [[ch] for ch in range(c)]
        for chans in groups:
            vals = [x[n, ch, i, j] for ch in chans for i in range(h) for j in range(w)]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)
            for ch in chans:
                ref[n, ch] = (x[n, ch] - mean) / (math.sqrt(var + eps) if variance else 1.0)
    _check(_run(b, tmp_path, {"x": x}), ref)


def test_mvn_and_l2_normalize_known_values(tmp_path):
    b = H.builder([("x", (2, 2, 2))], [("y", None)], nd=False)
    b.add_mvn("mvn", "x", "y", across_channels=False, normalize_variance=False)  # coremltools' test
    want = np.arange(8) - np.array([1.5, 1.5, 1.5, 1.5, 5.5, 5.5, 5.5, 5.5])
    H.assert_close(_run(b, tmp_path, {"x": np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)}), want)
    b = H.builder([("x", (1, 2, 2))], [("y", None)], nd=False)
    b.add_l2_normalize("l2", "x", "y")
    H.assert_close(_run(b, tmp_path, {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)}), np.arange(4) / np.sqrt(14))


def test_l2_normalize(tmp_path):
    c, h, w, eps = 3, 2, 2, 0.5
    x = _rng(14).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_l2_normalize("l2", "x", "y", epsilon=eps)
    ref = np.array([xi / math.sqrt(sum(float(v) ** 2 for v in xi.ravel()) + eps) for xi in x])
    _check(_run(b, tmp_path, {"x": x}), ref)


# --- data reorganisation ---------------------------------------------------------------------------------------

_EIGHT = np.arange(1, 17, dtype=np.float32).reshape(8, 1, 2)  # the proto's example, [C = 8, H = 1, W = 2]


@pytest.mark.parametrize("mode, expected", [
    ("DEPTH_TO_SPACE", [[[1, 5, 2, 6], [9, 13, 10, 14]], [[3, 7, 4, 8], [11, 15, 12, 16]]]),
    ("PIXEL_SHUFFLE", [[[1, 3, 2, 4], [5, 7, 6, 8]], [[9, 11, 10, 12], [13, 15, 14, 16]]]),
])
def test_reorganize_data_matches_the_proto_examples(tmp_path, mode, expected):
    b = H.builder([("x", (8, 1, 2))], [("y", None)], nd=mode == "PIXEL_SHUFFLE")  # iOS 14: ND networks only
    b.add_reorganize_data("r", "x", "y", mode=mode, block_size=2)
    y = _run(b, tmp_path, {"x": _EIGHT[None]})
    assert y.shape[-3:] == (2, 2, 4) and np.array_equal(y.reshape(2, 2, 4), np.array(expected, np.float32))
    if mode == "DEPTH_TO_SPACE":  # SPACE_TO_DEPTH: "the same with the input and output swapped"
        b = H.builder([("x", (2, 2, 4))], [("y", None)], nd=False)
        b.add_reorganize_data("r", "x", "y", mode="SPACE_TO_DEPTH", block_size=2)
        assert np.array_equal(_run(b, tmp_path, {"x": np.array(expected, np.float32)[None]})[0, 0], _EIGHT)


@pytest.mark.parametrize("mode", ["SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "PIXEL_SHUFFLE"])
def test_reorganize_data(tmp_path, mode):
    bs = 3
    c, h, w = (2, 3, 6) if mode == "SPACE_TO_DEPTH" else (18, 2, 1)
    x = _rng(15).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=mode == "PIXEL_SHUFFLE")  # iOS 14: ND networks only
    b.add_reorganize_data("r", "x", "y", mode=mode, block_size=bs)
    if mode == "SPACE_TO_DEPTH":  # out[(i*bs + j)*C + ch, y, x] = in[ch, y*bs + i, x*bs + j]
        ref = np.zeros((N, c * bs * bs, h // bs, w // bs))
        for n, ch, yy, xx, i, j in itertools.product(range(N), range(c), range(h // bs), range(w // bs), range(bs), range(bs)):
            ref[n, (i * bs + j) * c + ch, yy, xx] = x[n, ch, yy * bs + i, xx * bs + j]
    else:
        co = c // (bs * bs)
        ref = np.zeros((N, co, h * bs, w * bs))
        for n, ch, yy, xx, i, j in itertools.product(range(N), range(co), range(h), range(w), range(bs), range(bs)):
            src = (i * bs + j) * co + ch if mode == "DEPTH_TO_SPACE" else ch * bs * bs + i * bs + j
            ref[n, ch, yy * bs + i, xx * bs + j] = x[n, src, yy, xx]
    _check(_run(b, tmp_path, {"x": x}), ref)


def test_sequence_repeat_and_sequence_concat(tmp_path):
    s, c = 2, 3
    x = _rng(16).standard_normal((N, s, c)).astype(np.float32)
    b = H.builder([("x_flat", (s * c,))], [("y", None)], nd=False)
    _sequence_input(b, "x", s, c)
    b.add_sequence_repeat("rep", 3, "x", "y")
    y = _run(b, tmp_path, {"x_flat": x.reshape(N, s * c)})
    assert y.shape == (N, 3 * s, c, 1, 1)
    H.assert_close(y, np.array([[x[n, t % s] for t in range(3 * s)] for n in range(N)]))
    z = _rng(17).standard_normal((N, c)).astype(np.float32)
    b = H.builder([("x_flat", (s * c,)), ("z", (c,))], [("y", None)], nd=False)
    _sequence_input(b, "x", s, c)
    b.add_elementwise("cat", ["x", "z"], "y", mode="SEQUENCE_CONCAT")
    y = _run(b, tmp_path, {"x_flat": x.reshape(N, s * c), "z": z})
    assert y.shape == (N, s + 1, c, 1, 1)
    H.assert_close(y, np.array([[x[n, 0], x[n, 1], z[n]] for n in range(N)]))


def test_split(tmp_path):
    c, h, w = 6, 2, 2
    x = _rng(18).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("a", None), ("b", None), ("c", None)], nd=False)
    b.add_split("split", "x", ["a", "b", "c"])
    outs = H.run(b, {"x": x})
    (tmp_path / "model.mlmodel").write_bytes(b.spec.SerializeToString())
    for k, name in enumerate("abc"):
        _check(outs[name], np.array([[x[n, 2 * k + q] for q in range(2)] for n in range(N)]))


@pytest.mark.parametrize("axis, start, end, stride", [
    ("channel", 1, 5, 2), ("height", 0, -1, 1), ("width", 2, 7, 3), ("width", 1, -2, 2), ("channel", 3, 100, 1),
])
def test_slice(tmp_path, axis, start, end, stride):
    c, h, w = 6, 4, 7
    x = _rng(19).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_slice("slice", "x", "y", axis, start_index=start, end_index=end, stride=stride)
    size = {"channel": c, "height": h, "width": w}[axis]
    stop = min(end + size if end < 0 else end, size)
    picked = list(range(start, stop, stride))  # [start, end) every stride; -1 is size - 1
    ax = {"channel": 1, "height": 2, "width": 3}[axis]
    _check(_run(b, tmp_path, {"x": x}), np.take(x, picked, axis=ax))


# --- elementwise ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["AVE", "MAX", "MIN"])
def test_average_max_min(tmp_path, mode):
    shapes = [(3, 2, 4), (3, 1, 1), (3, 2, 4)]  # [C, 1, 1] broadcasts over H, W
    rng = _rng(20)
    xs = [rng.standard_normal((N, *s)).astype(np.float32) for s in shapes]
    b = H.builder([(f"x{i}", s) for i, s in enumerate(shapes)], [("y", None)], nd=False)
    b.add_elementwise("e", [f"x{i}" for i in range(3)], "y", mode=mode)
    ref = np.zeros((N, 3, 2, 4))
    for n, ch, i, j in itertools.product(range(N), range(3), range(2), range(4)):
        vals = [xs[0][n, ch, i, j], xs[1][n, ch, 0, 0], xs[2][n, ch, i, j]]
        ref[n, ch, i, j] = {"AVE": sum(vals) / 3, "MAX": max(vals), "MIN": min(vals)}[mode]
    _check(_run(b, tmp_path, {f"x{i}": x for i, x in enumerate(xs)}), ref)


@pytest.mark.parametrize("mode", ["DOT", "COS"])
def test_dot(tmp_path, mode):
    c = 5
    rng = _rng(21)
    a, v = rng.standard_normal((N, c)).astype(np.float32), rng.standard_normal((N, c)).astype(np.float32)
    b = H.builder([("a", (c,)), ("v", (c,))], [("y", None)], nd=False)
    b.add_elementwise("dot", ["a", "v"], "y", mode=mode)
    ref = []
    for n in range(N):
        d = sum(float(a[n, i]) * float(v[n, i]) for i in range(c))
        if mode == "COS":
            d /= math.sqrt(sum(float(q) ** 2 for q in a[n])) * math.sqrt(sum(float(q) ** 2 for q in v[n]))
        ref.append([[[d]]])
    _check(_run(b, tmp_path, {"a": a, "v": v}), np.array(ref))


UNARY = {  # the proto's functions of z = scale * x + shift
    "sqrt": lambda z, a, e: math.sqrt(z),
    "rsqrt": lambda z, a, e: 1 / math.sqrt(z + e),
    "inverse": lambda z, a, e: 1 / (z + e),
    "power": lambda z, a, e: z**a,
    "exp": lambda z, a, e: math.exp(z),
    "log": lambda z, a, e: math.log(z + e),
    "abs": lambda z, a, e: abs(z),
    "threshold": lambda z, a, e: max(a, z),
}


@pytest.mark.parametrize("mode", UNARY)
@pytest.mark.parametrize("alpha, shift, scale, eps", [(2.5, 0.0, 1.0, 1e-4), (0.7, 0.5, 2.0, 0.25)])
def test_unary(tmp_path, mode, alpha, shift, scale, eps):
    shape = (2, 3, 2)
    x = _rng(22).uniform(0.1, 2.0, (N, *shape)).astype(np.float32)
    if mode in ("abs", "threshold"):
        x = x - 1.0
    b = H.builder([("x", shape)], [("y", None)], nd=False)
    b.add_unary("u", "x", "y", mode, alpha=alpha, shift=shift, scale=scale, epsilon=eps)
    ref = np.vectorize(lambda v: UNARY[mode](scale * float(v) + shift, alpha, eps))(x)
    _check(_run(b, tmp_path, {"x": x}), ref)


REDUCE = {
    "sum": sum, "avg": lambda v: sum(v) / len(v), "prod": math.prod, "logsum": lambda v: sum(math.log(q + 1e-3) for q in v),
    "sumsquare": lambda v: sum(q * q for q in v), "l1": lambda v: sum(abs(q) for q in v),
    "l2": lambda v: math.sqrt(sum(q * q for q in v)), "max": max, "min": min,
}


@pytest.mark.parametrize("mode, axis", [*itertools.product(REDUCE, ["CHW", "HW", "C", "H", "W"]),
                                        *itertools.product(["argmax"], ["C", "H", "W"])])  # ARGMAX: one axis
def test_reduce(tmp_path, mode, axis):
    c, h, w = 3, 2, 4
    x = _rng(23).uniform(0.2, 1.5, (N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_reduce("r", "x", "y", axis, mode, epsilon=1e-3)
    keep = [1 if a in axis else n for a, n in zip("CHW", (c, h, w))]
    ref = np.zeros((N, *keep))
    for n, ch, i, j in itertools.product(range(N), range(keep[0]), range(keep[1]), range(keep[2])):
        pos = [range(c) if "C" in axis else [ch], range(h) if "H" in axis else [i], range(w) if "W" in axis else [j]]
        vals = [float(x[n, p, q, r]) for p, q, r in itertools.product(*pos)]
        ref[n, ch, i, j] = vals.index(max(vals)) if mode == "argmax" else REDUCE[mode](vals)
    _check(_run(b, tmp_path, {"x": x}), ref)


def test_reduce_argmax_of_several_axes(tmp_path):
    b = H.builder([("x", (2, 2, 2))], [("y", None)], nd=False)
    b.add_reduce("r", "x", "y", "HW", "argmax")
    with pytest.raises(Unsupported, match="ARGMAX"):
        _run(b, tmp_path, {"x": np.ones((1, 2, 2, 2), np.float32)})


# --- embedding, permute, reshape, flatten ---------------------------------------------------------------------


def test_embedding_over_a_sequence(tmp_path):
    s, vocab, dim = 4, 5, 3
    rng = _rng(24)
    b = H.builder([("x_flat", (s,))], [("y", None)], nd=False)
    _sequence_input(b, "x", s, 1)
    b.add_embedding("emb", W=rng.standard_normal((dim, vocab)), b=rng.standard_normal(dim), input_dim=vocab,
                    output_channels=dim, has_bias=True, input_name="x", output_name="y")
    p = _params(b).embedding
    table, bias = _floats(p.weights, dim, vocab), _floats(p.bias, dim)
    ids = rng.integers(0, vocab, (N, s)).astype(np.float32)
    y = _run(b, tmp_path, {"x_flat": ids})
    assert y.shape == (N, s, dim, 1, 1)
    H.assert_close(y, np.array([[[table[o, int(ids[n, t])] + bias[o] for o in range(dim)] for t in range(s)] for n in range(N)]))
    with pytest.raises(Unsupported, match="non-integer"):
        _run(b, tmp_path, {"x_flat": np.full((1, s), 1.5, np.float32)})


def test_permute_reshape_flatten(tmp_path):
    c, h, w = 2, 3, 4
    x = _rng(25).standard_normal((N, c, h, w)).astype(np.float32)
    b = H.builder([("x", (c, h, w))], [("y", None)], nd=False)
    b.add_permute("perm", (0, 3, 1, 2), "x", "p")  # [Seq, C, H, W] -> [Seq, W, C, H]
    b.add_flatten("flat", 0, "p", "f")
    b.add_reshape("resh", "f", "y", (4, 6, 1), 0)
    y = _run(b, tmp_path, {"x": x})
    assert y.shape == (N, 1, 4, 6, 1)
    flat = [[x[n, ch, i, j] for j in range(w) for ch in range(c) for i in range(h)] for n in range(N)]
    H.assert_close(y, np.array(flat).reshape(N, 4, 6, 1))
