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
