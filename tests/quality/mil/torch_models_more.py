"""More torch models, for the op families and settings torch_models.py leaves to value inference or to
numpy (test_families.py runs them): trigonometry, comparisons and logic, integer division, topk / argsort /
band_part / pixel (un)shuffle / one_hot / gather_nd, scatter_nd, prelu with per-channel slopes, 1-D and 3-D
convolutions with groups, dilations and 'same' padding, pooling with ceil_mode and padding, fractional and
downscaling resizes, matmul's transpose flags, TorchScript control flow (cond,
while_loop), flexible input shapes (shape, fill, fill_like, range_1d), a classifier (classify), fp16
inputs and outputs, and a small CNN for the compressed-weight forms.

Each model is `(module, {input: shape or (shape, dtype)})`, batch 1 per sample, and its outputs keep the
sample axis first. `EXPECTED` names the MIL op types the converted program must contain: the test asserts
them, so a converter that fuses an op away cannot silently take its coverage with it."""

from __future__ import annotations

import numpy as np


def _nn():
    import torch

    return torch, torch.nn, torch.nn.functional


def math_more():
    torch, nn, F = _nn()

    class M(nn.Module):
        def forward(self, x, y):
            u = x.clamp(-0.9, 0.9)
            return (torch.sin(x), torch.cos(x), torch.tan(u), torch.asin(u), torch.acos(u), torch.atan(x), torch.sinh(x),
                    torch.cosh(x), torch.atanh(u), torch.ceil(x * 3), torch.round(x * 3), torch.sign(x), torch.exp2(x),
                    ((x * 2).round() == (y * 2).round()).float(), (x != y).float(), (x < y).float(), (x >= y).float(),
                    torch.floor_divide(x * 4, y.abs() + 0.5), torch.remainder(x * 4, y.abs() + 0.5), x.argmin(1),
                    torch.logical_and(x > 0, y > 0).float(), torch.logical_xor(x > 0, y > 0).float(),
                    torch.logical_not(x > 0).float(), torch.logical_or(x > 0.5, y < 0).float(), x.var(2), x.std(1, keepdim=True))

    return M(), {"x": (1, 3, 4, 5), "y": (1, 1, 4, 1)}


def integers():
    """Integer arithmetic on int32 ids (floor and truncating division, remainder) feeding embeddings."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 4)

        def forward(self, ids):
            low = torch.div(ids, 3, rounding_mode="floor")
            rest = torch.remainder(ids - 5, 3)
            return self.e(low), self.e(rest), (ids * 2 + 1).float(), torch.div(ids - 5, 2, rounding_mode="trunc").float()

    return M(), {"ids": ((1, 5), np.int32)}


def activations_more():
    torch, nn, F = _nn()

    class M(nn.Module):
        def forward(self, x):
            return (F.elu(x), F.softplus(x, beta=2.0), F.threshold(x, 0.1, 0.0), F.hardtanh(x), F.relu6(x * 3),
                    F.glu(x, -1), F.log_softmax(x, 1), F.softmax(x, 1), F.tanhshrink(x))

    return M(), {"x": (1, 6, 8)}


def shapes_more():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("i1", torch.tensor([0, 2, 1, 2]))
            self.register_buffer("i2", torch.tensor([3, 0, 5, 1]))

        def forward(self, x):
            values, indices = torch.topk(x, 3, dim=-1)
            return (x[:, self.i1, :, self.i2].transpose(0, 1), values, indices, torch.argsort(x, dim=2), torch.tril(x),
                    torch.triu(x, 1), F.pixel_shuffle(x, 2), F.pixel_unshuffle(x, 2), F.one_hot(x.argmax(1), 6).float(),
                    x.narrow(3, 1, 4), F.normalize(x, dim=1), x.sort(dim=-1)[0], F.embedding(self.i1, x[0, 0])[None])

    return M(), {"x": (1, 4, 6, 8)}


def scatters_more():
    """index_put (accumulating: repeated rows sum; and replacing, distinct rows) is written as scatter_nd."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rows", torch.tensor([2, 0, 2]))
            self.register_buffer("distinct", torch.tensor([3, 1]))

        def forward(self, x, u):
            spread = u[0, 0, :, None, :].expand(3, 5, 6)
            add = torch.index_put(x[0], (self.rows,), spread, accumulate=True)
            put = torch.index_put(x[0], (self.distinct,), spread[:2] * 2)
            return add[None], put[None], x.masked_fill(x > 1, 0.5)

    return M(), {"x": (1, 4, 5, 6), "u": (1, 4, 3, 6)}


def prelu():
    """Per-channel slopes (coremltools writes a PReLU whose slopes are all equal as leaky_relu)."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.PReLU(4)
            self.p1 = nn.PReLU()
            with torch.no_grad():
                self.p.weight.uniform_(-0.5, 0.5)
                self.p1.weight.fill_(-0.3)

        def forward(self, x):
            return self.p(x), self.p1(x), self.p(x.flatten(2)[..., None])

    return M(), {"x": (1, 4, 5, 3)}


def conv1d_more():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2)
            self.t = nn.ConvTranspose1d(4, 6, 3, stride=3, dilation=2, groups=2, padding=2, output_padding=1)
            self.t2 = nn.ConvTranspose1d(4, 2, 2, bias=False)
            self.inorm = nn.InstanceNorm1d(4, affine=True)
            self.bn = nn.BatchNorm1d(4, affine=False)
            with torch.no_grad():
                self.inorm.weight.uniform_(0.5, 1.5)
                self.inorm.bias.uniform_(-0.5, 0.5)
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            return (self.c(x), self.t(x), self.t2(x), F.max_pool1d(x, 2, ceil_mode=True), F.avg_pool1d(x, 3, 2, ceil_mode=True),
                    self.inorm(x), self.bn(x), F.layer_norm(x, (4, 9)))

    return M(), {"x": (1, 4, 9)}


def conv3d_more():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv3d(4, 4, 3, padding="same", dilation=(1, 2, 1), groups=2)
            self.c2 = nn.Conv3d(4, 2, (1, 3, 2), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
            self.t = nn.ConvTranspose3d(4, 4, (2, 3, 3), stride=(1, 2, 2), groups=4, dilation=(1, 1, 2), padding=(0, 1, 1))
            self.t2 = nn.ConvTranspose3d(4, 2, 2, stride=2, groups=2)
            self.bn = nn.BatchNorm3d(4)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            return (self.c(x), self.c2(x), self.t(x), self.t2(x), F.max_pool3d(x, (1, 2, 3), padding=(0, 1, 1)),
                    F.avg_pool3d(x, 2, 1, ceil_mode=True), self.bn(x))

    return M(), {"x": (1, 4, 3, 5, 6)}


def pooling_more():
    """ceil_mode together with padding (a last window starting in the padding is dropped, as torch does), 1-D
    and 2-D, with and without the padding in the average; adaptive pooling (reduce ops over slices)."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def forward(self, x):
            return (F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True), F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True),
                    F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True, count_include_pad=False), F.max_pool2d(x, 2, 3, ceil_mode=True),
                    F.avg_pool2d(x, (2, 3), (3, 2), padding=(1, 1), ceil_mode=True),
                    F.max_pool1d(x[:, 0], 4, 3, padding=2, ceil_mode=True), F.avg_pool1d(x[:, 0], 4, 3, padding=2, ceil_mode=True),
                    F.adaptive_avg_pool2d(x, (2, 3)), F.adaptive_max_pool2d(x, (3, 2)))

    return M(), {"x": (1, 3, 8, 7)}


def resizing_more():
    """Fractional and downscaling factors, sizes that are not multiples, per-axis factors, 1-D linear."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def forward(self, x):
            line = x[:, :, 0]
            return (F.interpolate(x, scale_factor=1.5, mode="bilinear", align_corners=False),
                    F.interpolate(x, scale_factor=0.5, mode="nearest"), F.interpolate(x, size=(3, 4), mode="bilinear", align_corners=False),
                    F.interpolate(x, scale_factor=(2, 3), mode="nearest"), F.interpolate(x, size=(4, 5), mode="nearest"),
                    F.interpolate(line, scale_factor=2, mode="linear", align_corners=False), F.interpolate(line, scale_factor=2.5, mode="nearest"))

    return M(), {"x": (1, 2, 6, 8)}


def products_more():
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 3))

        def forward(self, x, y):
            return (x.transpose(1, 2) @ self.w, x.transpose(1, 2) @ y, torch.matmul(x.transpose(1, 2).unsqueeze(1), y.unsqueeze(1)),
                    F.linear(x, torch.ones(7, 8) * 0.5, torch.arange(7.0)))

    return M(), {"x": (1, 5, 8), "y": (1, 5, 6)}


MORE = {f.__name__: f for f in (math_more, integers, activations_more, shapes_more, scatters_more, prelu, conv1d_more, conv3d_more,
                                pooling_more, resizing_more, products_more)}

EXPECTED = {
    "math_more": {"sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "atanh", "ceil", "round", "sign", "exp2",
                  "equal", "not_equal", "less", "greater_equal", "floor_div", "reduce_argmin", "logical_and", "logical_or",
                  "logical_xor", "logical_not", "square", "reduce_mean"},
    "integers": {"floor_div", "gather", "cast", "sign", "floor"},
    "activations_more": {"elu", "softplus", "threshold", "linear_activation", "clip", "relu6", "softmax", "log", "sigmoid",
                         "tanh"},
    "shapes_more": {"topk", "argsort", "band_part", "pixel_shuffle", "pixel_unshuffle", "one_hot", "gather_nd", "gather",
                    "slice_by_index", "reduce_l2_norm"},
    "scatters_more": {"scatter_nd", "select"},
    "prelu": {"prelu", "leaky_relu"},
    "conv1d_more": {"conv", "conv_transpose", "max_pool", "avg_pool", "instance_norm", "layer_norm"},
    "conv3d_more": {"conv", "conv_transpose", "max_pool", "avg_pool", "batch_norm"},
    "pooling_more": {"max_pool", "avg_pool", "reduce_mean", "reduce_max"},
    "resizing_more": {"upsample_bilinear", "upsample_nearest_neighbor"},
    "products_more": {"matmul", "linear"},
}


def build_more(name: str, seed: int):
    """(module, {input name: (shape, dtype)}) of a model of MORE, its weights drawn from `seed`."""
    torch, _, _ = _nn()
    torch.manual_seed(seed)
    module, specs = MORE[name]()
    return module.eval(), {k: v if isinstance(v[0], tuple) else (v, np.float32) for k, v in specs.items()}


# --- models converted in a particular way (test_families.py) ------------------------------------------------


def control_flow():
    """A data-dependent branch, a counted loop and a loop until a condition on the data holds: torch.jit.script'ed,
    converted to cond and while_loops."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:
                y = self.fc(x)
            else:
                y = -x * 2
            for _ in range(3):
                y = torch.tanh(self.fc(y))
            z = x
            while bool(z.abs().sum() < 50.0):
                z = z * 1.5 + 0.1
            return y, z

    return M(), {"x": (1, 8)}


def dynamic():
    """Sizes read from the input (a flexible second axis): shape, fill, fill_like and range_1d stay in the
    program, and a dynamic shape is a concat of rank-0 sizes."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def forward(self, x):
            n = x.shape[1]
            ramp = torch.arange(n, dtype=torch.float32)
            return (x * ramp, x + torch.full_like(x, 0.25), torch.zeros_like(x) + 2.0, x[:, 1:] * 2,
                    torch.ones(1, n) * 3.0 + x, torch.full((2, n), 1.5).sum(0, keepdim=True) * x)

    return M(), {"x": (1, 6)}


def classifier():
    torch, nn, F = _nn()
    return nn.Sequential(nn.Linear(6, 4), nn.Softmax(-1)), {"x": (1, 6)}


def small_cnn():
    """fp16 input and output (no cast at either end) and the base of the compressed-weight forms: every weight
    has a rank >= 2 and its axes divide by the block and group sizes used."""
    torch, nn, F = _nn()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.fc1 = nn.Linear(128, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            h = F.avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
            return self.fc2(F.gelu(self.fc1(h)))

    return M(), {"x": (1, 4, 8, 8)}


SPECIAL_EXPECTED = {"control_flow": {"cond", "while_loop", "linear", "identity"},
                    "dynamic": {"shape", "fill", "fill_like", "range_1d", "concat"},
                    "classifier": {"classify", "softmax"}, "small_cnn": {"conv", "linear", "gelu", "avg_pool"}}


def build_special(name: str, seed: int):
    torch, _, _ = _nn()
    torch.manual_seed(seed)
    module, specs = {"control_flow": control_flow, "dynamic": dynamic, "classifier": classifier, "small_cnn": small_cnn}[name]()
    return module.eval(), {k: (v, np.float32) for k, v in specs.items()}
