"""Small torch models, one per op family, whose outputs are the reference for the interpreter (torch is
test-only). Each returns several outputs so a failure names the op; parameters are random (seeded per
build: the rule must hold for any weights), running statistics of batch norms too."""

from __future__ import annotations

import numpy as np


def _nn():
    import torch

    return torch, torch.nn, torch.nn.functional


def _randomise_norms(module) -> None:
    torch, nn, _ = _nn()
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def activations():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 32)
            self.prelu = nn.PReLU(32, init=0.2)

        def forward(self, x):
            h = self.fc(x)
            return (torch.relu(h), F.leaky_relu(h, 0.1), F.gelu(h), F.gelu(h, approximate="tanh"), F.silu(h), torch.sigmoid(h),
                    torch.tanh(h), F.softplus(h), F.softsign(h), F.elu(h, 0.7), self.prelu(h), F.hardtanh(h, -0.5, 0.8),
                    F.hardsigmoid(h), F.hardswish(h), F.relu6(h * 4), F.selu(h), F.mish(h),
                    F.log_softmax(h, -1), F.softmax(h, -1))

    return M(), {"x": (1, 16)}


def arithmetic():
    torch, nn, F = _nn()

    class M(nn.Module):
        def forward(self, x, y):
            return (x + y, x - y, x * y, x / (y.abs() + 1), torch.maximum(x, y), torch.minimum(x, y),
                    torch.pow(x.abs() + 0.1, y), (x > y).float(), (x <= y).float(), torch.where(x > 0, x, y),
                    torch.exp(x), torch.log(x.abs() + 0.5), torch.sqrt(x.abs()), torch.rsqrt(x.abs() + 0.1),
                    torch.clamp(x, -0.3, 0.6), torch.floor(x * 3), torch.erf(x), torch.reciprocal(x.abs() + 1),
                    x.sum(dim=(1, 3)), x.mean(-1, keepdim=True), x.amax(1), x.amin(2), x.argmax(1),
                    torch.logsumexp(x, 1), x.norm(dim=2), x.abs().sum(-1), (x * x).sum(1))

    return M(), {"x": (1, 3, 4, 5), "y": (1, 1, 4, 1)}


def shapes():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("idx", torch.tensor([3, 0, 5, 1]))
            self.register_buffer("along", torch.randint(0, 8, (1, 4, 6, 3)))

        def forward(self, x):
            return (x.permute(0, 2, 3, 1), torch.cat([x, x * 2], 1), x.chunk(2, dim=3)[1], x[:, 1:3, ::2, -3:],
                    x.flatten(2), x.repeat(1, 2, 1, 1), F.pad(x, (1, 2, 0, 1)), F.pad(x, (2, 1, 1, 2), mode="reflect"),
                    F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.flatten(x, 1), x.transpose(1, 3), torch.gather(x, 3, self.along),
                    torch.index_select(x, 2, self.idx), x.unsqueeze(2) * x.unsqueeze(1), torch.stack([x, -x], dim=2),
                    x.split([1, 3], dim=1)[1], torch.flip(x, [2]), x.cumsum(3))

    return M(), {"x": (1, 4, 6, 8)}


def embedding():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, ids):
            e = self.embed(ids)
            return self.norm(e), e.mean(1)

    return M(), {"ids": ((1, 5), np.int32)}


def conv2d():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(4, 8, 3, padding=1)
            self.c2 = nn.Conv2d(4, 8, 3, stride=2, dilation=2, padding=2, groups=2)
            self.c3 = nn.Conv2d(4, 4, 3, groups=4, padding="same")
            self.c4 = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), bias=False)
            self.c5 = nn.Conv2d(4, 6, 4, padding="same", dilation=1)
            self.t1 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
            self.t2 = nn.ConvTranspose2d(4, 4, 4, stride=2, groups=2)
            self.t3 = nn.ConvTranspose2d(4, 3, 3, dilation=2, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.inorm = nn.InstanceNorm2d(4, affine=True)
            self.ln = nn.LayerNorm([12, 12])
            self.gn = nn.GroupNorm(2, 4)

        def forward(self, x):
            return (self.c1(x), self.c2(x), self.c3(x), self.c4(x), self.c5(x), self.t1(x), self.t2(x), self.t3(x),
                    self.bn(torch.relu(x)), self.inorm(x), self.ln(x), self.gn(x),
                    F.max_pool2d(x, 3, 2, padding=1), F.max_pool2d(x, 5, 3, ceil_mode=True),
                    F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False), F.avg_pool2d(x, 3, 2, padding=1),
                    F.avg_pool2d(x, 2), F.avg_pool2d(x, 5, 3, ceil_mode=True), F.adaptive_avg_pool2d(x, 1),
                    F.adaptive_max_pool2d(x, 1), F.lp_pool2d(x, 2, 3, 3))

    return M(), {"x": (1, 4, 12, 12)}


def conv1d():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(4, 6, 5, stride=2, padding=2)
            self.c2 = nn.Conv1d(4, 6, 3, dilation=2, groups=2)
            self.t1 = nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return (self.c1(x), self.c2(x), self.t1(x), self.bn(x * 2), F.max_pool1d(x, 3, 2), F.avg_pool1d(x, 4, 2, padding=1))

    return M(), {"x": (1, 4, 20)}


def products():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 7))
            self.fc = nn.Linear(8, 3)

        def forward(self, x, y):
            q = x.unflatten(2, (2, 4)).permute(0, 2, 1, 3)
            return (x @ y, torch.bmm(x, x.transpose(1, 2)), x @ self.w, self.fc(x), torch.einsum("bij,bjk->bik", x, y),
                    torch.einsum("bij,bkj->bik", x, x), torch.einsum("bhqd,bhkd->bhqk", q, q), y.transpose(1, 2) @ x.transpose(1, 2))

    return M(), {"x": (1, 5, 8), "y": (1, 8, 6)}


MODELS = {f.__name__: f for f in (activations, arithmetic, shapes, embedding, conv2d, conv1d, products)}


def build(name: str, seed: int):
    """(module, {input name: (shape, dtype)})."""
    torch, _, _ = _nn()
    torch.manual_seed(seed)
    module, specs = MODELS[name]()
    _randomise_norms(module)
    return module.eval(), {k: v if isinstance(v[0], tuple) else (v, np.float32) for k, v in specs.items()}


def example(specs: dict, n: int, rng) -> dict:
    """n samples for every input (integer inputs: ids below 10)."""
    out = {}
    for name, (shape, dtype) in specs.items():
        full = (n, *shape[1:])
        out[name] = rng.integers(0, 10, full).astype(dtype) if np.dtype(dtype).kind == "i" else rng.standard_normal(full).astype(dtype)
    return out


# --- part 2 (issue #18): recurrent layers, resizing, scatters, attention --------------------------------------


def recurrent():
    """Batch-first and sequence-first LSTMs (1-2 layers, bidirectional, given initial states), an RNN (relu)
    and a GRU (coremltools writes torch's GRU as a while_loop, nn.LSTM / nn.RNN as lstm / rnn ops). The
    sample axis is 0 (batch 1 per sample); sequence-first layers see the input transposed."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.deep = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
            self.first = nn.LSTM(5, 4, batch_first=True)
            self.bi = nn.LSTM(5, 3, batch_first=True, bidirectional=True)
            self.rnn = nn.RNN(5, 3, nonlinearity="relu")
            self.rnn_tanh = nn.RNN(5, 4, num_layers=2, batch_first=True)
            self.gru = nn.GRU(5, 4, batch_first=True)

        def forward(self, x, h0, c0):
            t = x.transpose(0, 1)  # [T, 1, I]
            a, (h, c) = self.deep(t, (h0.transpose(0, 1), c0.transpose(0, 1)))
            b, (hb, cb) = self.first(x)
            d, (hd, _) = self.bi(x)
            r, hr = self.rnn(t)
            s, _ = self.rnn_tanh(x)
            g, hg = self.gru(x)
            return (a.transpose(0, 1), h.transpose(0, 1), c.transpose(0, 1), b, hb.transpose(0, 1), cb.transpose(0, 1),
                    d, hd.transpose(0, 1), r.transpose(0, 1), hr.transpose(0, 1), s, g)

    return M(), {"x": (1, 7, 5), "h0": (1, 4, 6), "c0": (1, 4, 6)}


def resizing():
    torch, nn, F = _nn()

    class M(nn.Module):
        def forward(self, x):
            return (F.interpolate(x, scale_factor=2, mode="nearest"), F.interpolate(x, size=(7, 9), mode="nearest"),
                    F.interpolate(x, scale_factor=3, mode="nearest"), F.interpolate(x, scale_factor=1.5, mode="nearest"),
                    F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
                    F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
                    F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False),
                    F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
                    F.interpolate(x, size=(11, 4), mode="bilinear", align_corners=True),
                    F.upsample_nearest(x, size=(10, 12)))

    return M(), {"x": (1, 2, 5, 6)}


def scatters():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("along", torch.randint(0, 6, (1, 3, 4)))  # repeats: scatter_add sums them
            self.register_buffer("perm", torch.stack([torch.randperm(6)[:4] for _ in range(3)])[None])  # distinct per row
            self.register_buffer("rows", torch.randint(0, 3, (1, 5, 6)))

        def forward(self, x, u):
            spread = torch.cat([x, x[:, :2]], 1).exp()  # [1, 5, 6] updates for 5 x 6 indices along axis 1
            return x.scatter(2, self.perm, u), x.scatter_add(2, self.along, u), x.scatter_add(1, self.rows, spread) * 2

    return M(), {"x": (1, 3, 6), "u": (1, 3, 4)}


def attention():
    """F.scaled_dot_product_attention at iOS18 (one MIL op): no mask, a bool mask (every query keeps a key),
    a float mask, and is_causal (written as a band_part mask)."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("first", torch.arange(6) == 0)

        def forward(self, q, k, v, m):
            keep = torch.logical_or(m > 0, self.first)  # (a concat of bool tensors is converted to floats: avoided)
            return (F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                    F.scaled_dot_product_attention(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v, is_causal=True))

    return M(), {"q": (1, 2, 5, 8), "k": (1, 2, 6, 8), "v": (1, 2, 6, 3), "m": (1, 1, 5, 6)}


PART2 = {f.__name__: f for f in (recurrent, resizing, scatters, attention)}
PART2_IOS = {"recurrent": 16, "resizing": 16, "scatters": 16, "attention": 18}


def build_part2(name: str, seed: int):
    """(module, {input name: (shape, float32)}) of a part-2 model."""
    torch, _, _ = _nn()
    torch.manual_seed(seed)
    module, specs = PART2[name]()
    return module.eval(), {k: (v, np.float32) for k, v in specs.items()}


def conv3d():
    """3-D convolution, transposed convolution and pooling (evaluated once ops_nn.SPATIAL includes 3)."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv3d(2, 4, 3, padding=1)
            self.c2 = nn.Conv3d(2, 4, (2, 3, 3), stride=2, groups=2)
            self.t = nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1)

        def forward(self, x):
            return (self.c(x), self.c2(x), self.t(x), F.max_pool3d(x, 2), F.avg_pool3d(x, 3, 2, padding=1),
                    F.avg_pool3d(x, 3, 2, padding=1, count_include_pad=False), F.max_pool3d(x, 3, 2, ceil_mode=True))

    return M(), {"x": (1, 2, 6, 7, 8)}


# --- what each converted program must contain (asserted: converters fuse and rewrite) ----------------------

EXPECTED_OPS = {
    "activations": {"linear", "relu", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "softplus", "elu", "clip", "sigmoid_hard",
                    "thresholded_relu", "relu6", "softmax", "log"},
    "arithmetic": {"add", "sub", "mul", "real_div", "maximum", "minimum", "pow", "greater", "less_equal", "select", "exp", "log",
                   "sqrt", "rsqrt", "clip", "floor", "erf", "inverse", "reduce_sum", "reduce_mean", "reduce_max", "reduce_min",
                   "reduce_argmax", "reduce_log_sum_exp", "reduce_l2_norm", "cast", "tile", "abs"},
    "shapes": {"transpose", "concat", "split", "slice_by_index", "reshape", "tile", "pad", "gather_along_axis", "gather",
               "expand_dims", "stack", "reverse", "cumsum"},
    "embedding": {"gather", "layer_norm", "reduce_mean"},
    "conv2d": {"conv", "conv_transpose", "crop", "batch_norm", "instance_norm", "layer_norm", "max_pool", "avg_pool", "reduce_max"},
    "conv1d": {"conv", "conv_transpose", "batch_norm", "max_pool", "avg_pool"},
    "products": {"matmul", "linear", "transpose", "reshape"},
    "recurrent": {"lstm", "rnn", "while_loop", "linear", "scatter", "gather", "squeeze", "expand_dims", "split", "concat", "stack",
                  "less"},
    "resizing": {"upsample_nearest_neighbor", "upsample_bilinear"},
    "scatters": {"scatter_along_axis"},
    "attention": {"scaled_dot_product_attention", "logical_or"},
    "conv3d": {"conv", "conv_transpose", "max_pool", "avg_pool"},
}

# (op type, input, value) that must occur in the converted program: the settings the family is tested with
EXPECTED_SETTINGS = {
    "conv2d": [("conv", "pad_type", "same"), ("conv", "pad_type", "custom"), ("conv_transpose", "pad_type", "valid"),
               ("conv_transpose", "pad_type", "custom"), ("avg_pool", "exclude_padding_from_average", True),
               ("avg_pool", "exclude_padding_from_average", False), ("max_pool", "ceil_mode", True), ("avg_pool", "ceil_mode", True)],
    "conv1d": [("conv", "pad_type", "valid"), ("conv", "pad_type", "custom"), ("conv_transpose", "pad_type", "custom")],
    "products": [("matmul", "transpose_x", True), ("matmul", "transpose_y", True), ("matmul", "transpose_y", False)],
    "activations": [("gelu", "mode", "EXACT"), ("gelu", "mode", "TANH_APPROXIMATION")],
    "shapes": [("pad", "mode", "constant"), ("pad", "mode", "reflect"), ("pad", "mode", "replicate")],
    "resizing": [("upsample_bilinear", "align_corners", True), ("upsample_bilinear", "align_corners", False)],
}
