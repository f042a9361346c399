"""Classic neural-network layers (the rank-5 [Seq, Batch, C, H, W] family), for the forward pass.

Each works on the last three axes as C, H, W and treats every axis before them as batch, which is Core ML's
meaning in classic networks (blob (N, S, C, H, W)) and in ND networks (blob (N, ..., C, H, W)) alike.
Convolution, deconvolution and innerProduct run as float32 matrix products (BLAS, one per kernel offset);
nothing here loops over values. A setting whose Core ML semantics are not documented (or not pinned down by
coremltools' own tests) raises `ctx.unsupported`; each function's docstring says which, and why.
"""

from __future__ import annotations

import functools

import numpy as np

from mlqpipe.quality.evaluate.context import Ctx


# --- helpers ---------------------------------------------------------------------------------------------


def _pair(values, default: int) -> tuple[int, int]:
    v = [int(x) for x in values]
    return (v + [default, default])[:2] if v else (default, default)


def _border(msg) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a BorderAmounts message ([H, W] edge sizes)."""
    b = list(msg.borderAmounts)
    h = b[0] if b else None
    w = b[1] if len(b) > 1 else None
    return (int(h.startEdgeSize) if h else 0, int(h.endEdgeSize) if h else 0,
            int(w.startEdgeSize) if w else 0, int(w.endEdgeSize) if w else 0)


def _pad_amounts(valid) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a ValidPadding message kept as bytes (paddingAmounts.borderAmounts)."""
    from mlqpipe.quality.evaluate.messages import ValidPadding

    return _border(ValidPadding.FromString(valid).paddingAmounts)


def same_pad(size: int, k: int, s: int, d: int, top_left_heavy: bool = False) -> tuple[int, int]:
    """Core ML's 'same' padding: output ceil(size / stride); the odd pixel goes bottom/right by default."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if top_left_heavy else (small, big)


def as_images(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(..., C, H, W) -> (B, C, H, W) and the leading shape to restore."""
    lead = x.shape[:-3]
    return x.reshape((-1,) + x.shape[-3:]), lead


def pad_hw(x, top, bottom, left, right, value=0.0):
    if top == bottom == left == right == 0:
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return np.pad(x, widths, constant_values=value)


def windows(x, kh, kw, sh, sw, dh=1, dw=1):
    """(B, C, H, W) -> (B, C, kh, kw, OH, OW) sliding windows (a view, no copy)."""
    b, c, h, w = x.shape
    oh = (h - ((kh - 1) * dh + 1)) // sh + 1
    ow = (w - ((kw - 1) * dw + 1)) // sw + 1
    if oh <= 0 or ow <= 0:
        from mlqpipe.quality.evaluate.context import Unsupported

        raise Unsupported("kernel larger than its padded input")
    st = x.strides
    return np.lib.stride_tricks.as_strided(
        x, (b, c, kh, kw, oh, ow), (st[0], st[1], st[2] * dh, st[3] * dw, st[2] * sh, st[3] * sw), writeable=False)


def conv2d(x: np.ndarray, weights: np.ndarray, groups: int, stride, dilation) -> np.ndarray:
    """Grouped 2-D convolution of padded images x (B, C, H, W) with weights (OC, C/groups, kh, kw), as one
    batched float32 matrix product per kernel offset: no im2col copy larger than the output."""
    b, c, h, w = x.shape
    oc, kc, kh, kw = weights.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh = (h - ((kh - 1) * dh + 1)) // sh + 1
    ow = (w - ((kw - 1) * dw + 1)) // sw + 1
    if oh <= 0 or ow <= 0:
        from mlqpipe.quality.evaluate.context import Unsupported

        raise Unsupported("kernel larger than its padded input")
    xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)  # B H W C: channels contiguous
    ocg = oc // groups
    wg = weights.reshape(groups, ocg, kc, kh, kw).astype(np.float32)
    out = np.zeros((groups, b * oh * ow, ocg), np.float32)
    for i in range(kh):
        for j in range(kw):
            win = xt[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw, :]
            cols = win.reshape(b * oh * ow, groups, kc).transpose(1, 0, 2)  # g, pixels, kc
            out += np.matmul(cols, wg[:, :, :, i, j].transpose(0, 2, 1))  # g, pixels, ocg
    return out.transpose(1, 0, 2).reshape(b, oh, ow, oc).transpose(0, 3, 1, 2)


def _channel_param(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A per-channel (or single) parameter shaped to broadcast over (..., C, H, W)."""
    return values.reshape(-1, 1, 1) if values.size > 1 else values.reshape(())


# --- layers ----------------------------------------------------------------------------------------------


def _kernel_geometry(p):
    """(kh, kw), (sh, sw), (dh, dw) with Core ML's defaults (kernel 3x3, stride and dilation 1)."""
    return _pair(p.kernelSize, 3), _pair(p.stride, 1), _pair(p.dilationFactor, 1)


def _same_heavy(raw: bytes) -> bool:
    """Whether a SamePadding kept as bytes asks for TOP_LEFT_HEAVY (the odd pixel at the top/left)."""
    from mlqpipe.quality.evaluate.messages import SamePadding

    return SamePadding.FromString(raw).asymmetryMode == 1


def convolution(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    if len(ins) > 1:
        raise ctx.unsupported("weights given as a second input")
    if p.isDeconvolution:
        return deconvolution(ctx, ins)
    oc, kc, g = int(p.outputChannels), int(p.kernelChannels), int(p.nGroups) or 1
    (kh, kw), (sh, sw), (dh, dw) = _kernel_geometry(p)
    imgs, lead = as_images(x)
    if p.WhichOneof("ConvolutionPaddingType") == "same":
        heavy = _same_heavy(p.same)
        t, b = same_pad(imgs.shape[2], kh, sh, dh, heavy)
        left, r = same_pad(imgs.shape[3], kw, sw, dw, heavy)
    else:
        t, b, left, r = _pad_amounts(p.valid) if p.HasField("valid") else (0, 0, 0, 0)
    if imgs.shape[1] != kc * g:
        raise ctx.unsupported(f"an input with {imgs.shape[1]} channels for kernelChannels {kc} x nGroups {g}")
    y = conv2d(pad_hw(imgs, t, b, left, r), ctx.weight("weights").reshape(oc, kc, kh, kw), g, (sh, sw), (dh, dw))
    if p.hasBias:
        y = y + ctx.weight("bias").reshape(1, oc, 1, 1)
    return y.reshape(lead + y.shape[1:])


def conv2d_transpose(x: np.ndarray, weights: np.ndarray, groups: int, stride, dilation) -> np.ndarray:
    """The full (uncropped) transposed convolution of x (B, C, H, W) with weights (C, OC/groups, kh, kw):
    output (B, OC, (H-1)*sh + (kh-1)*dh + 1, ...). One batched float32 matrix product per kernel offset,
    scattered into the output with the stride: the transpose of `conv2d`."""
    b, c, h, w = x.shape
    _, ocg, kh, kw = weights.shape
    (sh, sw), (dh, dw) = stride, dilation
    cg = c // groups
    oh, ow = (h - 1) * sh + (kh - 1) * dh + 1, (w - 1) * sw + (kw - 1) * dw + 1
    cols = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32).reshape(b * h * w, groups, cg).transpose(1, 0, 2)
    wg = weights.reshape(groups, cg, ocg, kh, kw).astype(np.float32)
    out = np.zeros((b, oh, ow, groups, ocg), np.float32)
    for i in range(kh):
        for j in range(kw):
            part = np.matmul(cols, wg[:, :, :, i, j])  # g, pixels, ocg
            out[:, i * dh : i * dh + (h - 1) * sh + 1 : sh, j * dw : j * dw + (w - 1) * sw + 1 : sw] += (
                part.transpose(1, 0, 2).reshape(b, h, w, groups, ocg))
    return out.reshape(b, oh, ow, groups * ocg).transpose(0, 3, 1, 2)


def deconvolution(ctx: Ctx, ins):
    """Transposed convolution, cropped to the output size. Valid padding crops its amounts off the full
    output (NeuralNetwork.proto: H_out = (H_in-1)*stride + kernel - (top+bottom)); 'same' gives H_in*stride,
    cropping floor(excess/2) at the top as TF/Keras 'same' does (coremltools' Keras tests compare the two).
    Dilation is honoured although the proto calls it ignored: Core ML's shape code and coremltools' tests
    against torch.nn.ConvTranspose2d (neuralnetwork backend) use it. An outputShape other than the one the
    padding gives is not evaluated (where Core ML pads or crops then is undocumented)."""
    p, x = ctx.params, ins[0]
    oc, kc, g = int(p.outputChannels), int(p.kernelChannels), int(p.nGroups) or 1
    (kh, kw), (sh, sw), (dh, dw) = _kernel_geometry(p)
    imgs, lead = as_images(x)
    if imgs.shape[1] != kc or kc % g or oc % g:
        raise ctx.unsupported(f"a deconvolution of {imgs.shape[1]} input channels with kernelChannels {kc}, "
                              f"outputChannels {oc}, nGroups {g}")
    full = conv2d_transpose(imgs, ctx.weight("weights").reshape(kc, oc // g, kh, kw), g, (sh, sw), (dh, dw))
    fh, fw = full.shape[2:]
    if p.WhichOneof("ConvolutionPaddingType") == "same":
        heavy = _same_heavy(p.same)
        crops = []
        for size, n, stride in ((fh, imgs.shape[2], sh), (fw, imgs.shape[3], sw)):
            excess = size - n * stride
            if excess < 0:
                raise ctx.unsupported("a 'same' deconvolution whose kernel is smaller than its stride")
            if heavy and excess % 2:
                raise ctx.unsupported("a TOP_LEFT_HEAVY 'same' deconvolution with an odd crop")
            crops.append((excess // 2, excess - excess // 2))
        (t, b), (left, r) = crops
    else:
        t, b, left, r = _pad_amounts(p.valid) if p.HasField("valid") else (0, 0, 0, 0)
    out = (fh - t - b, fw - left - r)
    if out[0] <= 0 or out[1] <= 0:
        raise ctx.unsupported(f"deconvolution padding larger than its output {fh}x{fw}")
    if len(p.outputShape) and tuple(int(v) for v in p.outputShape) != out:
        raise ctx.unsupported(f"outputShape {list(p.outputShape)} other than the {list(out)} its padding gives")
    y = full[:, :, t : fh - b, left : fw - r]
    if p.hasBias:
        y = y + ctx.weight("bias").reshape(1, oc, 1, 1)
    return y.reshape(lead + y.shape[1:])


_POOL_KINDS = ("MAX", "AVERAGE", "L2")


def _pool_windows(kind: str, imgs, k, s, pads, exclude_padding: bool):
    """Pooling of (B, C, H, W) over (kh, kw) windows of the padded input; pads (top, bottom, left, right).
    Max pooling ignores the padding (-inf); average and L2 count it as zeros."""
    (kh, kw), (sh, sw) = k, s
    t, b, left, r = pads
    win = windows(pad_hw(imgs, t, b, left, r, -np.inf if kind == "MAX" else 0.0), kh, kw, sh, sw)
    if kind == "MAX":
        return win.max(axis=(2, 3))
    if kind == "L2":
        return np.sqrt((win**2).sum(axis=(2, 3)))
    total = win.sum(axis=(2, 3))
    if exclude_padding and (t or b or left or r):
        ones = pad_hw(np.ones((1, 1) + imgs.shape[2:], np.float32), t, b, left, r)
        return total / windows(ones, kh, kw, sh, sw).sum(axis=(2, 3))
    return total / (kh * kw)


def _last_pixel_size(n: int, k: int, s: int, pad: int, padded: bool) -> int:
    """Output size of includeLastPixel pooling (PoolingLayerParams in NeuralNetwork.proto)."""
    out = -(-(n + 2 * pad - k) // s) + 1
    if padded and (out - 1) * s >= n + pad:
        out -= 1
    return out


def pooling(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    if int(p.type) >= len(_POOL_KINDS):
        raise ctx.unsupported(f"pooling type {int(p.type)}")
    kind = _POOL_KINDS[int(p.type)]
    imgs, lead = as_images(x)
    if p.globalPooling:
        reduce = {"MAX": lambda a: a.max(axis=(2, 3), keepdims=True), "AVERAGE": lambda a: a.mean(axis=(2, 3), keepdims=True),
                  "L2": lambda a: np.sqrt((a**2).sum(axis=(2, 3), keepdims=True))}[kind]
        y = reduce(imgs)
        return y.reshape(lead + y.shape[1:])
    (kh, kw), (sh, sw) = _pair(p.kernelSize, 3), _pair(p.stride, 1)
    pad = p.WhichOneof("PoolingPaddingType")
    if pad == "same":
        heavy = _same_heavy(p.same)
        pads = same_pad(imgs.shape[2], kh, sh, 1, heavy) + same_pad(imgs.shape[3], kw, sw, 1, heavy)
    elif pad == "valid":
        pads = _pad_amounts(p.valid)
    elif pad == "includeLastPixel":
        y = _pool_last_pixel(ctx, kind, imgs, (kh, kw), (sh, sw))
        return y.reshape(lead + y.shape[1:])
    else:
        raise ctx.unsupported(f"pooling padding {pad}")
    y = _pool_windows(kind, imgs, (kh, kw), (sh, sw), pads, p.avgPoolExcludePadding)
    return y.reshape(lead + y.shape[1:])


def _pool_last_pixel(ctx: Ctx, kind: str, imgs, k, s):
    """includeLastPixel (Caffe's ceil mode): symmetric padding, and the last window may run past the padded
    input. Max pooling ignores what lies outside; how average/L2 count those pixels is not documented, so
    they are evaluated only when no window leaves the padded input."""
    from mlqpipe.quality.evaluate.messages import ValidCompletePadding

    ph, pw = _pair(ValidCompletePadding.FromString(ctx.params.includeLastPixel).paddingAmounts, 0)
    h, w = imgs.shape[2:]
    padded = bool(ph or pw)
    if h + 2 * ph < k[0] or w + 2 * pw < k[1]:
        raise ctx.unsupported("a pooling kernel larger than its padded input")
    oh, ow = _last_pixel_size(h, k[0], s[0], ph, padded), _last_pixel_size(w, k[1], s[1], pw, padded)
    extra_h = (oh - 1) * s[0] + k[0] - (h + 2 * ph)
    extra_w = (ow - 1) * s[1] + k[1] - (w + 2 * pw)
    if kind != "MAX" and (extra_h > 0 or extra_w > 0):
        raise ctx.unsupported(f"{kind} pooling with includeLastPixel windows past the padded input")
    pads = (ph, ph + max(extra_h, 0), pw, pw + max(extra_w, 0))
    y = _pool_windows(kind, imgs, k, s, pads, ctx.params.avgPoolExcludePadding)[:, :, :oh, :ow]
    if kind == "MAX" and np.isneginf(y).any():
        raise ctx.unsupported("an includeLastPixel pooling window that covers padding only")
    return y


def padding(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    t, b, left, r = _border(p.paddingAmounts)
    kind = p.WhichOneof("PaddingType")
    widths = [(0, 0)] * (x.ndim - 2) + [(t, b), (left, r)]
    if kind == "constant":
        return np.pad(x, widths, constant_values=p.constant.value)
    if kind == "reflection":
        if max(t, b) >= x.shape[-2] or max(left, r) >= x.shape[-1]:
            raise ctx.unsupported("reflection padding as large as its input")
        return np.pad(x, widths, mode="reflect")  # the border pixel is not repeated (the proto's example)
    if kind == "replication":
        return np.pad(x, widths, mode="edge")
    raise ctx.unsupported(f"padding type {kind}")


def crop(ctx: Ctx, ins):
    """One input: crop its border amounts; two: the second input's H x W at `offset` (NeuralNetwork.proto)."""
    p, x = ctx.params, ins[0]
    h, w = x.shape[-2:]
    if len(ins) == 1:
        t, b, left, r = _border(p.cropAmounts)
        oy, ox, oh, ow = t, left, h - t - b, w - left - r
    else:
        (oy, ox), (oh, ow) = _pair(p.offset, 0), ins[1].shape[-2:]
    if oh <= 0 or ow <= 0 or oy + oh > h or ox + ow > w:
        raise ctx.unsupported(f"a crop of {oh}x{ow} at ({oy}, {ox}) from a {h}x{w} input")
    return x[..., oy : oy + oh, ox : ox + ow]


def _lerp(x: np.ndarray, grid: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of x along `axis` at positions `grid` (already within [0, size-1])."""
    size = x.shape[axis]
    lo = np.floor(grid).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = (grid - lo).astype(np.float32).reshape(shape)
    a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
    return a + (b - a) * frac


def _bilinear(x: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Separable bilinear sampling of the last two axes at row positions gy and column positions gx."""
    return _lerp(_lerp(x, gy, x.ndim - 2), gx, x.ndim - 1)


def _upsample_grid(ctx: Ctx, mode: int, size: int, out: int) -> np.ndarray:
    """Sample positions of UpsampleLayerParams.LinearUpsampleMode (DEFAULT, ALIGN_CORNERS_TRUE/FALSE)."""
    i = np.arange(out, dtype=np.float64)
    if mode == 2:
        spacing = size / out
        g = i * spacing + 0.5 * spacing - 0.5
    elif mode in (0, 1):
        if out == 1:
            if size != 1:
                raise ctx.unsupported("bilinear upsampling to a single row or column")
            return np.zeros(1)
        g = i * ((size - size / out) if mode == 0 else (size - 1)) / (out - 1)
    else:
        raise ctx.unsupported(f"linearUpsampleMode {mode}")
    return np.clip(g, 0, size - 1)


def upsample(ctx: Ctx, ins):
    """Nearest neighbour repeats each pixel; bilinear samples the grid of its LinearUpsampleMode. Fractional
    factors (bilinear with ALIGN_CORNERS_* only) give floor(size x factor), as coremltools' upsample_bilinear."""
    p, x = ctx.params, ins[0]
    mode, linear = int(p.mode), int(p.linearUpsampleMode)
    h, w = x.shape[-2:]
    if mode not in (0, 1):
        raise ctx.unsupported(f"upsample mode {mode}")
    if len(p.fractionalScalingFactor):
        if len(p.scalingFactor) or mode != 1 or linear not in (1, 2):
            raise ctx.unsupported("fractional upsampling outside bilinear ALIGN_CORNERS_TRUE/FALSE")
        fy, fx = (float(v) for v in (list(p.fractionalScalingFactor) + [1.0, 1.0])[:2])
        oh, ow = int(np.floor(h * np.float32(fy))), int(np.floor(w * np.float32(fx)))
        if oh < 1 or ow < 1:
            raise ctx.unsupported("fractional upsampling to an empty output")
    else:
        sy, sx = _pair(p.scalingFactor, 1)
        if mode == 0:
            return np.repeat(np.repeat(x, sy, axis=-2), sx, axis=-1)
        oh, ow = h * sy, w * sx
    return _bilinear(x, _upsample_grid(ctx, linear, h, oh), _upsample_grid(ctx, linear, w, ow))


def _sampling_grid(ctx: Ctx, method: int, size: int, n: int) -> np.ndarray:
    """Sample positions in [0, size-1] of SamplingMode.Method (NeuralNetwork.proto spells each as linspace)."""
    if method == 0:  # STRICT_ALIGN_ENDPOINTS_MODE
        return np.linspace(0, size - 1, n)
    if method == 1:  # ALIGN_ENDPOINTS_MODE
        return np.full(1, (size - 1) / 2) if n == 1 else np.linspace(0, size - 1, n)
    if method == 2:  # UPSAMPLE_MODE
        return np.minimum(size - 1, np.linspace(0, size - size / n, n))
    if method == 3:  # ROI_ALIGN_MODE
        spacing = max(1, size - 1) / n
        return np.minimum(size - 1, 0.5 * spacing + spacing * np.arange(n))
    raise ctx.unsupported(f"sampling mode {method}")


def resize_bilinear(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    th, tw = _pair(p.targetSize, 1)
    method = int(p.mode.samplingMethod)
    h, w = x.shape[-2:]
    return _bilinear(x, _sampling_grid(ctx, method, h, th), _sampling_grid(ctx, method, w, tw))


def _box_grid(ctx: Ctx, method: int, start: np.ndarray, end: np.ndarray, n: int) -> np.ndarray:
    """Sample positions (..., n) between box edges start and end (either may be larger). Only the two
    endpoint-aligned modes are evaluated: how UPSAMPLE_MODE and ROI_ALIGN_MODE map onto a box is not
    documented (their formulas are written for the whole axis [0, X-1])."""
    if method == 1 and n == 1:
        return ((start + end) / 2)[..., None]
    if method not in (0, 1):
        raise ctx.unsupported(f"cropResize sampling mode {method}")
    t = np.linspace(0.0, 1.0, n)
    return start[..., None] + (end - start)[..., None] * t


def crop_resize(ctx: Ctx, ins):
    """Bilinear crops of the feature map (N, 1, C, H, W) at each sample's boxes (N, R, 4 or 5, 1, 1), out
    (N, R, C, th, tw): Core ML's [R, Batch, C, th, tw] with its Batch the sample axis. A 5-value box's batch
    index must be 0 (each sample is one prediction of batch 1); corner box modes only (how a center-size box
    maps to edges is not documented); a sample position outside the map is not evaluated (Core ML's
    extrapolation is undocumented)."""
    p, x = ctx.params, ins[0]
    rois = ins[1] if len(ins) > 1 else None
    if (rois is None or x.ndim != 5 or x.shape[1] != 1 or rois.ndim != 5 or not rois.shape[1] or rois.shape[2] not in (4, 5)
            or rois.shape[3:] != (1, 1)):
        raise ctx.unsupported("cropResize inputs other than a [1, B, C, H, W] map and [R, 1, 4 or 5, 1, 1] boxes")
    boxes = rois[:, :, :, 0, 0].astype(np.float64)
    if boxes.shape[2] == 5:
        if np.any(boxes[..., 0] != 0):
            raise ctx.unsupported("a box batch index other than 0")
        boxes = boxes[..., 1:]
    mode = int(p.boxIndicesMode.boxMode)
    if mode == 0:  # CORNERS_HEIGHT_FIRST: [h_start, w_start, h_end, w_end]
        y0, x0, y1, x1 = np.moveaxis(boxes, -1, 0)
    elif mode == 1:  # CORNERS_WIDTH_FIRST
        x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
    else:
        raise ctx.unsupported(f"box coordinate mode {mode} (center and size)")
    if p.spatialScale == 0:
        raise ctx.unsupported("spatialScale 0")
    h, w = x.shape[-2:]
    sy = sx = float(p.spatialScale)
    if p.normalizedCoordinates:
        sy, sx = sy * (h - 1), sx * (w - 1)
    th, tw = _pair(p.targetSize, 1)
    method = int(p.mode.samplingMethod)
    gy, gx = _box_grid(ctx, method, y0 * sy, y1 * sy, th), _box_grid(ctx, method, x0 * sx, x1 * sx, tw)
    tol = 1e-6
    if gy.min() < -tol or gx.min() < -tol or gy.max() > h - 1 + tol or gx.max() > w - 1 + tol:
        raise ctx.unsupported("a cropResize box reaching outside its input")
    gy, gx = np.clip(gy, 0, h - 1), np.clip(gx, 0, w - 1)
    img = x[:, 0]  # N, C, H, W
    n = img.shape[0]
    lo = np.floor(gy).astype(np.intp)
    hi = np.minimum(lo + 1, h - 1)
    fy = (gy - lo).astype(np.float32)[..., None, None]
    samples = np.arange(n)[:, None, None]
    rows = img[samples, :, lo] * (1 - fy) + img[samples, :, hi] * fy  # N, R, th, C, W
    lo = np.floor(gx).astype(np.intp)
    hi = np.minimum(lo + 1, w - 1)
    fx = (gx - lo).astype(np.float32)[:, :, None, None, :]
    lo, hi = lo[:, :, None, None, :], hi[:, :, None, None, :]
    y = np.take_along_axis(rows, lo, -1) * (1 - fx) + np.take_along_axis(rows, hi, -1) * fx  # N, R, th, C, tw
    return y.transpose(0, 1, 3, 2, 4)


def lrn(ctx: Ctx, ins):
    """x / (k + alpha/localSize * sum of x^2 over a window of localSize channels)^beta, the window centred
    on the channel and zero outside. Even window sizes are not evaluated: which side gets the extra channel
    is not documented."""
    p, x = ctx.params, ins[0]
    size = int(p.localSize)
    if size < 1 or size % 2 == 0:
        raise ctx.unsupported(f"localSize {size} (only odd windows have a documented centre)")
    half = size // 2
    sq = np.square(x, dtype=np.float32)
    widths = [(0, 0)] * (x.ndim - 3) + [(half, half), (0, 0), (0, 0)]
    sums = np.lib.stride_tricks.sliding_window_view(np.pad(sq, widths), size, axis=-3).sum(axis=-1)
    return x / (float(p.k or 1.0) + float(p.alpha) / size * sums) ** float(p.beta)


def mvn(ctx: Ctx, ins):
    """Mean (and variance) normalisation over H, W (or C, H, W): (x - mean) / sqrt(var + epsilon), the
    epsilon inside the root as in coremltools' own lowering of layer_norm onto this layer."""
    p, x = ctx.params, ins[0]
    axes = (-3, -2, -1) if p.acrossChannels else (-2, -1)
    y = x - x.mean(axis=axes, keepdims=True)
    if p.normalizeVariance:
        y = y / np.sqrt(np.square(y).mean(axis=axes, keepdims=True) + float(p.epsilon or 1e-6))
    return y


def l2normalize(ctx: Ctx, ins):
    x = ins[0]
    return x / np.sqrt(np.square(x).sum(axis=(-3, -2, -1), keepdims=True) + float(ctx.params.epsilon or 1e-6))


def reorganize_data(ctx: Ctx, ins):
    """SPACE_TO_DEPTH / DEPTH_TO_SPACE (TF's order: the block offset is the slow part of the channel) and
    PIXEL_SHUFFLE (PyTorch's: the channel is the slow part), as the proto's examples show."""
    p, x = ctx.params, ins[0]
    mode, bs = int(p.mode), int(p.blockSize)
    imgs, lead = as_images(x)
    b, c, h, w = imgs.shape
    if bs < 2 or mode not in (0, 1, 2):
        raise ctx.unsupported(f"reorganizeData mode {mode} with blockSize {bs}")
    if mode == 0:
        if h % bs or w % bs:
            raise ctx.unsupported(f"SPACE_TO_DEPTH of {h}x{w} by blocks of {bs}")
        y = imgs.reshape(b, c, h // bs, bs, w // bs, bs).transpose(0, 3, 5, 1, 2, 4).reshape(b, c * bs * bs, h // bs, w // bs)
    else:
        if c % (bs * bs):
            raise ctx.unsupported(f"{c} channels into blocks of {bs}x{bs}")
        co = c // (bs * bs)
        blocks = imgs.reshape(b, bs, bs, co, h, w).transpose(0, 3, 4, 1, 5, 2) if mode == 1 else \
            imgs.reshape(b, co, bs, bs, h, w).transpose(0, 1, 4, 2, 5, 3)
        y = blocks.reshape(b, co, h * bs, w * bs)
    return y.reshape(lead + y.shape[1:])


def sequence_axis(ctx: Ctx, x: np.ndarray) -> int:
    """The numpy axis of Core ML's axis -5 (Seq): axis 1 of a classic blob (N, S, C, H, W), whose axis 0 is
    Core ML's Batch; axis -5 of an ND blob of rank >= 5."""
    if not ctx.nd and x.ndim == 5:
        return 1
    if x.ndim - 1 >= 5:
        return -5
    raise ctx.unsupported(f"axis -5 of a rank-{x.ndim - 1} input")


def sequence_repeat(ctx: Ctx, ins):
    """The whole sequence repeated nRepetitions times, copies one after another (a tile, as onnxmltools
    converts it; Keras' RepeatVector, its usual source, has a sequence of one)."""
    x = ins[0]
    return np.concatenate([x] * (int(ctx.params.nRepetitions) or 1), axis=sequence_axis(ctx, x))


def split(ctx: Ctx, ins):
    x, n = ins[0], len(ctx.layer.output)
    want = int(ctx.params.nOutputs)
    if (want and want != n) or x.shape[-3] % n:
        raise ctx.unsupported(f"a split of {x.shape[-3]} channels into {n} outputs (nOutputs {want})")
    return np.split(x, n, axis=-3)


def slice_layer(ctx: Ctx, ins):
    """numpy's x[start:end:stride] on the C, H or W axis; negative indices count from the end."""
    p, x = ctx.params, ins[0]
    axis = {0: -3, 1: -2, 2: -1}.get(int(p.axis))
    if axis is None or int(p.stride) < 1:
        raise ctx.unsupported(f"slice axis {int(p.axis)} with stride {int(p.stride)}")
    index = [slice(None)] * x.ndim
    index[axis] = slice(int(p.startIndex), int(p.endIndex), int(p.stride))
    y = x[tuple(index)]
    if y.size == 0:
        raise ctx.unsupported("a slice selecting nothing")
    return y


def _broadcast(ctx: Ctx, ins) -> list:
    """The inputs, once their shapes are known to broadcast (Core ML's [C, 1, 1] against [C, H, W] and so on)."""
    try:
        np.broadcast_shapes(*(a.shape for a in ins))
    except ValueError:
        raise ctx.unsupported(f"inputs of shapes {[a.shape[1:] for a in ins]} that do not broadcast") from None
    return ins


def average(ctx: Ctx, ins):
    ins = _broadcast(ctx, ins)
    y = ins[0]
    for other in ins[1:]:
        y = y + other
    return y / np.float32(len(ins))


def maximum(ctx: Ctx, ins):
    return functools.reduce(np.maximum, _broadcast(ctx, ins))


def minimum(ctx: Ctx, ins):
    return functools.reduce(np.minimum, _broadcast(ctx, ins))


def dot(ctx: Ctx, ins):
    """Dot product (or cosine) of two [..., C, 1, 1] vectors, out [..., 1, 1, 1]."""
    if len(ins) != 2 or ins[0].shape != ins[1].shape or ins[0].shape[-2:] != (1, 1):
        raise ctx.unsupported("dot of inputs other than two equal [C, 1, 1] vectors")
    a, b = ins[0][..., 0, 0], ins[1][..., 0, 0]
    d = (a * b).sum(axis=-1)
    if ctx.params.cosineSimilarity:
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        if not np.all(norms > 0):
            raise ctx.unsupported("the cosine of a zero vector")
        d = d / norms
    return d[..., None, None, None]


def unary(ctx: Ctx, ins):
    """f(scale*x + shift) for UnaryFunctionLayerParams' operations (scale 0 means 1, epsilon 0 means 1e-6).
    LOG adds epsilon too, log(x + epsilon): coremltools lowers its MIL `log`, documented so, onto this layer
    with that epsilon (and its builder writes 1e-45 for a plain log)."""
    p = ctx.params
    a, eps = np.float32(p.alpha), np.float32(p.epsilon or 1e-6)
    z = ins[0] * np.float32(p.scale or 1.0) + np.float32(p.shift)
    ops = {
        0: lambda v: np.sqrt(v),
        1: lambda v: 1 / np.sqrt(v + eps),
        2: lambda v: 1 / (v + eps),
        3: lambda v: np.power(v, a),
        4: lambda v: np.exp(v),
        5: lambda v: np.log(v + eps),
        6: lambda v: np.abs(v),
        7: lambda v: np.maximum(v, a),
    }
    fn = ops.get(int(p.type))
    if fn is None:
        raise ctx.unsupported(f"unary operation {int(p.type)}")
    with np.errstate(all="ignore"):  # sqrt/log of negatives give NaN, as the function does
        return fn(z)


_REDUCE_AXES = {0: (-3, -2, -1), 1: (-2, -1), 2: (-3,), 3: (-2,), 4: (-1,)}  # CHW, HW, C, H, W


def reduce(ctx: Ctx, ins):
    """ReduceLayerParams: the reduced axes stay, with size 1."""
    p, x = ctx.params, ins[0]
    axes, mode = _REDUCE_AXES.get(int(p.axis)), int(p.mode)
    if axes is None:
        raise ctx.unsupported(f"reduce axis {int(p.axis)}")
    eps = np.float32(p.epsilon or 1e-6)
    ops = {
        0: lambda v: v.sum(axis=axes, keepdims=True),
        1: lambda v: v.mean(axis=axes, keepdims=True),
        2: lambda v: v.prod(axis=axes, keepdims=True),
        3: lambda v: np.log(v + eps).sum(axis=axes, keepdims=True),
        4: lambda v: np.square(v).sum(axis=axes, keepdims=True),
        5: lambda v: np.abs(v).sum(axis=axes, keepdims=True),
        6: lambda v: np.sqrt(np.square(v).sum(axis=axes, keepdims=True)),
        7: lambda v: v.max(axis=axes, keepdims=True),
        8: lambda v: v.min(axis=axes, keepdims=True),
    }
    if mode == 9:  # ARGMAX: one axis only
        if len(axes) != 1:
            raise ctx.unsupported("ARGMAX over more than one axis")
        return np.argmax(x, axis=axes[0], keepdims=True).astype(np.float32)
    fn = ops.get(mode)
    if fn is None:
        raise ctx.unsupported(f"reduce mode {mode}")
    with np.errstate(all="ignore"):
        return fn(x)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# activation kind -> f(x, alpha, beta, weights); alpha/beta from the sub-message, weights for PReLU & co.
ACTIVATIONS = {
    "linear": lambda x, a, b, w: a * x + b,
    "ReLU": lambda x, a, b, w: np.maximum(x, 0),
    "leakyReLU": lambda x, a, b, w: np.where(x >= 0, x, a * x),
    "thresholdedReLU": lambda x, a, b, w: np.where(x >= a, x, 0.0),
    "tanh": lambda x, a, b, w: np.tanh(x),
    "scaledTanh": lambda x, a, b, w: a * np.tanh(b * x),
    "sigmoid": lambda x, a, b, w: _sigmoid(x),
    "sigmoidHard": lambda x, a, b, w: np.clip(a * x + b, 0, 1),
    "ELU": lambda x, a, b, w: np.where(x >= 0, x, a * (np.exp(np.minimum(x, 0)) - 1)),
    "softsign": lambda x, a, b, w: x / (1 + np.abs(x)),
    "softplus": lambda x, a, b, w: np.logaddexp(0, x),
    "PReLU": lambda x, a, b, w: np.where(x >= 0, x, _channel_param(w["PReLU.alpha"], x) * x),
    "parametricSoftplus": lambda x, a, b, w: _channel_param(w["parametricSoftplus.alpha"], x)
    * np.logaddexp(0, _channel_param(w["parametricSoftplus.beta"], x) * x),
}


def activation(ctx: Ctx, ins):
    from mlqpipe.quality.evaluate.messages import activation_params

    kind = ctx.params.WhichOneof("NonlinearityType")
    fn = ACTIVATIONS.get(kind)
    if fn is None:
        raise ctx.unsupported(f"activation {kind}")
    a = activation_params(ctx.params, kind)
    return fn(ins[0], a.get("alpha", 0.0), a.get("beta", 0.0), ctx.weights)


def inner_product(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    ic, oc = int(p.inputChannels), int(p.outputChannels)
    w = ctx.weight("weights").reshape(oc, ic)
    if x.ndim - 1 >= 3:  # [..., C, H, W] with C*H*W input values per position
        lead = x.shape[:-3]
        flat = x.reshape(lead + (-1,))
        tail = (1, 1)
    else:  # ND rank 1 or 2: on the last axis
        lead, flat, tail = x.shape[:-1], x, ()
    if flat.shape[-1] != ic:
        raise ctx.unsupported(f"an input of {flat.shape[-1]} values per position for inputChannels {ic}")
    y = flat @ w.T
    if p.hasBias:
        y = y + ctx.weight("bias")
    return y.reshape(lead + (oc,) + tail)


def batchnorm(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    if p.computeMeanVar or p.instanceNormalization:
        mean = x.mean(axis=(-2, -1), keepdims=True)
        var = x.var(axis=(-2, -1), keepdims=True)
    else:
        mean, var = _channel_param(ctx.weight("mean"), x), _channel_param(ctx.weight("variance"), x)
    return (x - mean) / np.sqrt(var + p.epsilon) * _channel_param(ctx.weight("gamma"), x) + _channel_param(ctx.weight("beta"), x)


def _shaped(values: np.ndarray, dims) -> np.ndarray:
    """A scale/bias parameter of shape [1], [C] or [C, H, W], aligned with the last three axes."""
    dims = [int(d) for d in dims]
    if dims in ([1], []):
        return values.reshape(())
    if len(dims) == 1:
        return values.reshape(dims[0], 1, 1)
    return values.reshape(dims)


def scale(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    y = x * _shaped(ctx.weight("scale"), p.shapeScale)
    if p.hasBias:
        y = y + _shaped(ctx.weight("bias"), p.shapeBias)
    return y


def bias(ctx: Ctx, ins):
    return ins[0] + _shaped(ctx.weight("bias"), ctx.params.shape)


def softmax(ctx: Ctx, ins):
    x = ins[0]
    e = np.exp(x - x.max(axis=-3, keepdims=True))
    return e / e.sum(axis=-3, keepdims=True)


def flatten(ctx: Ctx, ins):
    x = ins[0]
    lead = x.shape[:-3]
    if int(ctx.params.mode) == 1:  # CHANNEL_LAST
        x = np.moveaxis(x, -3, -1)
    return x.reshape(lead + (-1, 1, 1))


def reshape(ctx: Ctx, ins):
    x = ins[0]
    if ctx.nd or x.ndim != 5:
        raise ctx.unsupported("reshape outside a rank-5 network (use reshapeStatic)")
    n = x.shape[0]
    target = [int(d) for d in ctx.params.targetShape]
    if len(target) == 3:
        target = [x.shape[1]] + target
    if int(ctx.params.mode) == 1:  # CHANNEL_LAST
        flat = x.transpose(0, 1, 3, 4, 2).reshape(n, -1)
        s, c, h, w = target
        return flat.reshape(n, s, h, w, c).transpose(0, 1, 4, 2, 3)
    return x.reshape(n, *target)


def permute(ctx: Ctx, ins):
    x = ins[0]
    if x.ndim != 5:
        raise ctx.unsupported("permute of a tensor that is not rank 5 (use transpose)")
    axes = [int(a) for a in ctx.params.axis]  # a permutation of [Seq, C, H, W]
    return x.transpose(0, *[a + 1 for a in axes])


def concat(ctx: Ctx, ins):
    return np.concatenate(ins, axis=sequence_axis(ctx, ins[0]) if ctx.params.sequenceConcat else -3)


def add(ctx: Ctx, ins):
    y = ins[0]
    for other in ins[1:]:
        y = y + other
    return y + ctx.params.alpha if len(ins) == 1 else y


def multiply(ctx: Ctx, ins):
    y = ins[0]
    for other in ins[1:]:
        y = y * other
    return y * ctx.params.alpha if len(ins) == 1 else y


def embedding(ctx: Ctx, ins):
    p, x = ctx.params, ins[0]
    if x.shape[-3:] != (1, 1, 1):
        raise ctx.unsupported("an embedding input with more than one id per position")
    ids = x.reshape(x.shape[:-3])
    idx = ids.astype(np.int64)  # (..., 1, 1, 1) ids
    table = ctx.weight("weights").reshape(int(p.outputChannels), int(p.inputDim))
    if idx.size and (idx.min() < 0 or idx.max() >= table.shape[1]):
        raise ctx.unsupported("an index outside the embedding's inputDim")
    if np.any(idx != ids):
        raise ctx.unsupported("a non-integer embedding index (Core ML's rounding is undocumented)")
    y = table.T[idx]
    if p.hasBias:
        y = y + ctx.weight("bias")
    return y[..., None, None]


LAYERS = {
    "convolution": convolution,
    "pooling": pooling,
    "activation": activation,
    "innerProduct": inner_product,
    "batchnorm": batchnorm,
    "scale": scale,
    "bias": bias,
    "softmax": softmax,
    "flatten": flatten,
    "reshape": reshape,
    "permute": permute,
    "concat": concat,
    "add": add,
    "multiply": multiply,
    "embedding": embedding,
    "padding": padding,
    "crop": crop,
    "upsample": upsample,
    "resizeBilinear": resize_bilinear,
    "cropResize": crop_resize,
    "lrn": lrn,
    "mvn": mvn,
    "l2normalize": l2normalize,
    "reorganizeData": reorganize_data,
    "sequenceRepeat": sequence_repeat,
    "split": split,
    "slice": slice_layer,
    "average": average,
    "max": maximum,
    "min": minimum,
    "dot": dot,
    "unary": unary,
    "reduce": reduce,
}
