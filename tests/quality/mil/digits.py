"""Four small real-world-shaped models trained on scikit-learn's bundled digits (8x8 images, 10 classes), so
an accuracy means something: a convnet, an MLP, a transformer encoder block and an LSTM.

For each model: a torch module, deterministic training (fixed split, seeds, one thread, Adam), conversion
with coremltools 9.0 to a float32 ML program with a batch-1 input (what a converter user writes), and the
same forward pass written directly with numpy from the trained weights (batched, float32, BLAS matmuls),
which the evaluator is timed against (bench/evaluator.py) and checked against (test_digits.py).

torch, scikit-learn and coremltools are test-only; they are imported inside the functions that need them.
`Cache(directory)` trains and converts each model once per process and keeps state dicts and packages in
`directory` (a temp dir the caller owns; nothing is written into the repository).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

MODELS = ("convnet", "mlp", "transformer", "lstm")
INPUT = "x"
OUTPUT = "logits"
TRAIN = 1500  # first 1500 images train, the other 297 test (the classic split of this dataset)
SEED = 0
TARGET = "iOS16"  # the packages' default minimum deployment target

# per model: the batch-1 input shape, epochs, learning rate (tuned for >= 0.9 / >= 0.85 test accuracy in a few seconds)
SHAPES = {"convnet": (1, 1, 8, 8), "mlp": (1, 64), "transformer": (1, 8, 8), "lstm": (1, 8, 8)}
EPOCHS = {"convnet": 10, "mlp": 30, "transformer": 15, "lstm": 20}
LR = {"convnet": 3e-3, "mlp": 1e-2, "transformer": 5e-3, "lstm": 1e-2}
BATCH = 32
D_MODEL, HEADS, D_FF, HIDDEN = 32, 4, 64, 32


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images as float32 [N, 8, 8] scaled to [0, 1], labels int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def as_input(name: str, images: np.ndarray) -> np.ndarray:
    """Images [N, 8, 8] shaped as model `name`'s input with N samples on axis 0 ([N, ...] for a [1, ...] input)."""
    return np.ascontiguousarray(images.reshape((len(images),) + SHAPES[name][1:]), dtype=np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


# --- torch modules -------------------------------------------------------------------------------------------


def build(name: str):
    """A freshly initialised torch module for `name` (seeded: the same weights every call)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.manual_seed(SEED)

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x):
            h = F.relu(self.conv2(F.relu(self.conv1(x))))
            return self.fc(F.max_pool2d(h, 2).flatten(1))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    class Transformer(nn.Module):
        """Rows as tokens: embed, one pre-norm encoder block (4-head self-attention, tanh-GELU MLP), mean pool."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, D_MODEL)
            self.pos = nn.Parameter(torch.randn(8, D_MODEL) * 0.1)
            self.ln1, self.ln2, self.ln_f = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.qkv, self.proj = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)
            self.ff1, self.ff2 = nn.Linear(D_MODEL, D_FF), nn.Linear(D_FF, D_MODEL)
            self.head = nn.Linear(D_MODEL, 10)

        def forward(self, x):
            h = self.embed(x) + self.pos  # no shape arithmetic below: the trace stays free of shape ops
            qkv = self.qkv(self.ln1(h)).unflatten(-1, (3, HEADS, D_MODEL // HEADS)).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # each [n, heads, tokens, head dim]
            att = torch.softmax(q @ k.transpose(-1, -2) * (D_MODEL // HEADS) ** -0.5, dim=-1)
            h = h + self.proj((att @ v).transpose(1, 2).flatten(2))
            h = h + self.ff2(F.gelu(self.ff1(self.ln2(h)), approximate="tanh"))
            return self.head(self.ln_f(h).mean(dim=1))

    class LSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, HIDDEN, batch_first=True)
            self.fc = nn.Linear(HIDDEN, 10)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

    return {"convnet": ConvNet, "mlp": MLP, "transformer": Transformer, "lstm": LSTM}[name]()


def train(name: str):
    """The module for `name` trained on the digits train split: fixed seeds, one thread, Adam, fixed epochs,
    so the weights are the same on every run on this machine. Returned in eval mode."""
    import torch
    import torch.nn.functional as F

    x_train, y_train, _, _ = digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = build(name)
        x, y = torch.from_numpy(as_input(name, x_train)), torch.from_numpy(y_train)
        opt = torch.optim.Adam(module.parameters(), lr=LR[name])
        order = torch.Generator().manual_seed(SEED)
        module.train()
        for _ in range(EPOCHS[name]):
            for idx in torch.randperm(len(x), generator=order).split(BATCH):
                opt.zero_grad()
                F.cross_entropy(module(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return module.eval()


def torch_logits(module, x: np.ndarray) -> np.ndarray:
    """torch's logits for the [N, ...] batch `x` at once (every model here is batch-independent)."""
    import torch

    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def convert(module, name: str, path, classifier: bool = False, target: str = TARGET) -> None:
    """Save `module` as coremltools 9.0 does for a user: traced on a batch-1 example, float32 ML program for
    `target` (iOS16 by default), input `x`, output `logits`, the default pass pipeline. `classifier`: with coremltools'
    classifier_config (classes 0..9; outputs `classLabel` and its scores `classLabel_probs`, the logits).
    `target`: "iOS18" for the compressions that need it (int4, per_block, joint)."""
    import torch
    import coremltools as ct

    example = torch.zeros(SHAPES[name])
    traced = torch.jit.trace(module.eval(), example)
    labels = dict(classifier_config=ct.ClassifierConfig(list(range(10)))) if classifier else dict(outputs=[ct.TensorType(name=OUTPUT)])
    model = ct.convert(traced, inputs=[ct.TensorType(name=INPUT, shape=SHAPES[name], dtype=np.float32)], convert_to="mlprogram",
                       minimum_deployment_target=getattr(ct.target, target), compute_precision=ct.precision.FLOAT32,
                       skip_model_load=True, **labels)
    model.save(str(path))


# --- the numpy forward passes ----------------------------------------------------------------------------------


def weights(module) -> dict[str, np.ndarray]:
    """The module's parameters as contiguous float32 numpy arrays, by state-dict name."""
    return {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32) for k, v in module.state_dict().items()}


def _relu(x):
    return np.maximum(x, 0, out=x)


def _conv3x3_same(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, C, H, W] * [O, C, 3, 3], stride 1, padding 1: im2col by a strided view, one matmul."""
    n, c, h, wd = x.shape
    cols = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, c * 9)  # n h w | c kh kw
    y = cols @ w.reshape(len(w), -1).T + b
    return y.reshape(n, h, wd, -1).transpose(0, 3, 1, 2)


def _convnet(p):
    def forward(x):
        h = _relu(_conv3x3_same(_relu(_conv3x3_same(x, p["conv1.weight"], p["conv1.bias"])), p["conv2.weight"], p["conv2.bias"]))
        n, c, hh, ww = h.shape
        pooled = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
        return pooled.reshape(n, -1) @ p["fc.weight"].T + p["fc.bias"]

    return forward


def _mlp(p):
    def forward(x):
        h = _relu(x @ p["fc1.weight"].T + p["fc1.bias"])
        h = _relu(h @ p["fc2.weight"].T + p["fc2.bias"])
        return h @ p["fc3.weight"].T + p["fc3.bias"]

    return forward


def _layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    return d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + eps) * g + b


def _gelu_tanh(x):
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _transformer(p):
    hd = D_MODEL // HEADS

    def forward(x):
        n, t, _ = x.shape
        h = x.reshape(n * t, -1) @ p["embed.weight"].T + p["embed.bias"]
        h = h.reshape(n, t, D_MODEL) + p["pos"]
        qkv = _layer_norm(h, p["ln1.weight"], p["ln1.bias"]).reshape(n * t, D_MODEL) @ p["qkv.weight"].T + p["qkv.bias"]
        q, k, v = qkv.reshape(n, t, 3, HEADS, hd).transpose(2, 0, 3, 1, 4)  # each [n, heads, t, hd]
        att = _softmax(q @ k.transpose(0, 1, 3, 2) * np.float32(hd ** -0.5))
        mixed = (att @ v).transpose(0, 2, 1, 3).reshape(n * t, D_MODEL)
        h = h + (mixed @ p["proj.weight"].T + p["proj.bias"]).reshape(n, t, D_MODEL)
        f = _layer_norm(h, p["ln2.weight"], p["ln2.bias"]).reshape(n * t, D_MODEL)
        f = _gelu_tanh(f @ p["ff1.weight"].T + p["ff1.bias"]) @ p["ff2.weight"].T + p["ff2.bias"]
        h = h + f.reshape(n, t, D_MODEL)
        return _layer_norm(h, p["ln_f.weight"], p["ln_f.bias"]).mean(axis=1) @ p["head.weight"].T + p["head.bias"]

    return forward


def _sigmoid(x):
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def _lstm(p):
    w_hh = p["lstm.weight_hh_l0"].T.copy()

    def forward(x):
        n, t, _ = x.shape
        xs = (x.reshape(n * t, -1) @ p["lstm.weight_ih_l0"].T + (p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"])).reshape(n, t, -1)
        h = np.zeros((n, HIDDEN), np.float32)
        c = np.zeros((n, HIDDEN), np.float32)
        for step in range(t):  # the recurrence: one matmul per time step, gates in torch's order i f g o
            i, f, g, o = np.split(xs[:, step] + h @ w_hh, 4, axis=1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
        return h @ p["fc.weight"].T + p["fc.bias"]

    return forward


def numpy_forward(name: str, module_or_weights) -> Callable[[np.ndarray], np.ndarray]:
    """`forward(x)`: model `name`'s logits [N, 10] for x [N, ...] (as_input's layout), written directly with
    numpy from the trained weights (a torch module or weights() of one)."""
    p = module_or_weights if isinstance(module_or_weights, dict) else weights(module_or_weights)
    return {"convnet": _convnet, "mlp": _mlp, "transformer": _transformer, "lstm": _lstm}[name](p)


# --- compressions a user would try (mlqpipe's coremltools-compatible API) ----------------------------------------

# more than 64 values: every matrix of the four models (144 to 8192 values; biases and layer norms are rank 1,
# which is never compressed), but not the LSTM's all-zero initial states (1 x 32)
WEIGHT_THRESHOLD = 64


@dataclass(frozen=True)
class Compression:
    """One compression as API calls: (mlqpipe function, op config keyword arguments, joint_compression) applied
    in order with that config as the global config. `target`: the deployment target the settings need (the
    API refuses int4, per_block and joint compression on an iOS16 program)."""

    name: str
    target: str
    steps: tuple[tuple[str, str, dict, bool], ...]  # (function, config class, its arguments, joint_compression)

    def apply(self, path) -> tuple[object, list[str]]:
        """(the compressed MLProgram, the API's warnings: weights it left as they are, and why)."""
        import warnings

        import mlqpipe
        from mlqpipe import optimize

        model = path
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            for function, config, arguments, joint in self.steps:
                op_config = getattr(optimize, config)(weight_threshold=WEIGHT_THRESHOLD, **arguments)
                model = getattr(mlqpipe, function)(model, optimize.OptimizationConfig(global_config=op_config),
                                                   joint_compression=joint)
        return model, [str(w.message) for w in said if issubclass(w.category, UserWarning)]


def _step(function: str, config: str, joint: bool = False, **arguments) -> tuple[str, str, dict, bool]:
    return function, config, arguments, joint


_PRUNE_HALF = _step("prune_weights", "OpMagnitudePrunerConfig", target_sparsity=0.5)
COMPRESSIONS = {c.name: c for c in (
    Compression("int8 per-channel", "iOS16", (_step("linear_quantize_weights", "OpLinearQuantizerConfig"),)),
    Compression("int4 per-block 32", "iOS18", (_step("linear_quantize_weights", "OpLinearQuantizerConfig", dtype="int4",
                                                     granularity="per_block", block_size=32),)),
    Compression("palettize 4-bit k-means", "iOS16", (_step("palettize_weights", "OpPalettizerConfig", mode="kmeans", nbits=4),)),
    Compression("palettize 2-bit k-means", "iOS16", (_step("palettize_weights", "OpPalettizerConfig", mode="kmeans", nbits=2),)),
    Compression("prune 75%", "iOS16", (_step("prune_weights", "OpMagnitudePrunerConfig", target_sparsity=0.75),)),
    Compression("prune 50% + palettize 4-bit (joint)", "iOS18",
                (_PRUNE_HALF, _step("palettize_weights", "OpPalettizerConfig", True, mode="kmeans", nbits=4))),
)}


def package_bytes(path) -> int:
    """Bytes of a package on disk (every file in it)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- once per process ------------------------------------------------------------------------------------------


def source_key() -> str:
    """A digest of this file: a cache directory keyed by it never serves models of an older definition."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@dataclass
class Cache:
    """Trained modules and their packages, made once per process; state dicts (`<name>.pt`) and packages
    (`<name>[.ios18][.classifier].mlpackage`) are kept in `directory`, so a later process with the same
    directory reuses them. Compressed packages (`compressed`) are remade by every process."""

    directory: Path
    seconds: dict[str, float] = field(default_factory=dict)  # training seconds per model trained here
    convert_seconds: dict[str, float] = field(default_factory=dict)  # conversion seconds per package made here
    _modules: dict = field(default_factory=dict)
    _compressed: dict = field(default_factory=dict)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def module(self, name: str):
        if name not in self._modules:
            import torch

            saved = self.directory / f"{name}.pt"
            if saved.exists():
                module = build(name)
                module.load_state_dict(torch.load(saved))
                module.eval()
            else:
                t = time.perf_counter()
                module = train(name)
                self.seconds[name] = time.perf_counter() - t
                torch.save(module.state_dict(), self.directory / f"{name}.pt.tmp")
                (self.directory / f"{name}.pt.tmp").replace(saved)
            self._modules[name] = module
        return self._modules[name]

    def package(self, name: str, classifier: bool = False, target: str = TARGET) -> Path:
        suffix = ("" if target == TARGET else f".{target.lower()}") + (".classifier" if classifier else "")
        path = self.directory / f"{name}{suffix}.mlpackage"
        if not (path / "Manifest.json").exists():
            module = self.module(name)
            t = time.perf_counter()
            convert(module, name, path, classifier, target)
            self.convert_seconds[path.stem] = time.perf_counter() - t
        return path

    def compressed(self, name: str, compression: str) -> tuple[Path, list[str], float]:
        """(path, API warnings, seconds) of the classifier package of `name` compressed by
        COMPRESSIONS[compression], saved under `directory`/compressed; made anew once per process (the
        compressor may have changed since another process saved it)."""
        key = (name, compression)
        if key not in self._compressed:
            import shutil

            c = COMPRESSIONS[compression]
            source = self.package(name, classifier=True, target=c.target)
            t = time.perf_counter()
            program, said = c.apply(source)
            seconds = time.perf_counter() - t
            path = self.directory / "compressed" / f"{name}.{re.sub('[^a-z0-9]+', '-', c.name.lower()).strip('-')}.mlpackage"
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(exist_ok=True)
            program.save(path)
            program.close()
            self._compressed[key] = (path, said, seconds)
        return self._compressed[key]
