"""A catalog of small .mlpackage test models, made with coremltools 9.0 (a test-only oracle).

Why generated and not stored: no small public .mlpackage could be fetched, and generating covers every
opset and compressed-weight form coremltools can write. Each entry saves one package; `conftest.py` builds
them lazily, once per session. Weights come from fixed numpy seeds, so weight.bin is the same every run
(model.mlmodel is not: coremltools writes protobuf maps in random order, and Manifest.json gets new UUIDs).

The plain programs are built with the MIL builder and converted with the EMPTY pass pipeline, so the
program is exactly as written here (op names below are stable); the compressed forms run coremltools'
default pipeline afterwards (it may rename or fuse ops, see MLPROGRAM.md §8).

What is in each package:
- mlp_ios15_fp32 / mlp_ios16_fp32 / mlp_ios18_fp32: input x [1, 64] fp32 -> linear "fc1" [128, 64] + relu
  -> linear "fc2" [64, 128] + relu -> linear "fc3" [4, 64] (bias of 4 elements: inline); fp32 weights.
- mlp_ios17_fp16: the same with fp16 consts, between a cast to fp16 ("x_fp16") and a cast back to fp32.
- conv_ios16: x [1, 8, 16, 16] -> conv "conv" [16, 8, 3, 3] (+ bias 16) -> relu -> conv_transpose "deconv"
  [16, 8, 3, 3] -> matmul "mm" with y [16, 12] const.
- control_flow_ios17: linear weights inside both branches of a `cond` and inside a `while_loop` body.
- shared_const_ios16: one const "w_shared" [32, 32] feeding linears "fc_a" and "fc_b".
- multifunction_ios18: functions "main_a" (default) and "main_b" sharing the weight of "fc1".
- no_weights_ios16: x [1, 4] + a 4-element const, relu: no blob values at all. coremltools 9.0 still
  lists the "weights" item in Manifest.json and writes an empty weights/ directory, but no weight.bin.
- conv_ios16_affine: conv_ios16 with int8 per-channel linear quantization of every rank >= 2 weight.
- ios16_* / ios18_*: the MLP of that opset compressed with coremltools.optimize.coreml (see CATALOG); fc3
  (256 elements, under the default weight_threshold of 2048) stays uncompressed.
- torch_cnn: a tiny torch CNN (conv, relu, flatten -> reshape, linear) converted from TorchScript with
  coremltools' defaults for iOS16: fp16 weights and fp16 input "image" [1, 3, 8, 8], default pass pipeline,
  metadata with the conversion date. Needs torch; skipped without it.
- mx_* (MATRIX, built by `build_matrix`; not in CATALOG): the per-weight equality matrix's models
  (tests/optimize/test_matrix.py), every weight > 2048
  elements (the default weight_threshold), from fixed seeds, plain programs (EMPTY pass pipeline):
  mx_dense_ios16/17/18: x [50, 64] -> matmul "mm_y" (const y [64, 72]) -> "mm_yt" (y [80, 72],
  transpose_y) -> "mm_x" (const x [60, 50]) -> "mm_xt" (x [60, 56], transpose_x) -> linear "fc" [48, 80] +
  bias 48. mx_conv_ios16/18: x [1, 16, 6, 6] -> conv "conv" [32, 16, 3, 3] + bias -> depthwise "dwconv"
  [32, 1, 9, 9] (groups 32) -> grouped "gconv" [32, 8, 3, 3] (groups 4) -> conv_transpose "deconv"
  [32, 16, 3, 3] -> grouped conv_transpose "gdeconv" [16, 8, 5, 5] (groups 2). mx_misc_ios17/18: ids
  int32 [1, 8] -> gather "embed" [100, 32] -> lstm "lstm" (weight_ih, weight_hh [128, 32]) -> const
  "w_shared" [72, 32] read by linears "fc_a" and "fc_b" -> const "w_conflict" [72, 72] read by linear
  "fc_c" (axes 0/1) and matmul "mm_c" (y: axes 1/0; coremltools skips it). mx_fp16_ios16/18: fp16 consts
  between casts, linear "fc" [128, 96] (12,288 elements) + bias, matmul "mm" y [128, 84] (10,752): the
  k-means of both runs coremltools' exact kmeans1d. mx_unique_ios16/18: linears with few distinct values
  (fc1 [64, 48]: 4 on iOS16, 5 on iOS18; fc2 [80, 64]: 16; fc3 [40, 80]: 50) for unique palettization.
  mx_torch_ios18: a torch Conv2d(8, 32, 3) + Embedding(64, 40) + Linear(72, 40) model converted with
  coremltools' defaults for iOS18 (fp16 weights; needs torch).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

# -- helpers ------------------------------------------------------------------------------------------------


def _ct():
    import coremltools as ct

    return ct


def _target(ios: int):
    ct = _ct()
    return {15: ct.target.iOS15, 16: ct.target.iOS16, 17: ct.target.iOS17, 18: ct.target.iOS18}[ios]


def _convert(prog, ios: int):
    """An MLModel of a MIL program, kept exactly as written (no MIL passes)."""
    ct = _ct()
    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=_target(ios),
        compute_precision=ct.precision.FLOAT32,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )


def _weights(seed: int, *shapes, dtype=np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 0.1).astype(dtype) for s in shapes]


_MLP_SHAPES = ((128, 64), (128,), (64, 128), (64,), (4, 64), (4,))


def _mlp_program(ios: int, dtype=np.float32, seed: int = 0, extra_names: str = ""):
    """The catalog's MLP: 64 -> 128 -> 64 -> 4, relu between; fp16 consts get casts at input and output."""
    from coremltools.converters.mil.mil import Builder as mb

    w1, b1, w2, b2, w3, b3 = _weights(seed, *_MLP_SHAPES, dtype=dtype)
    fp16 = dtype == np.float16

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=_target(ios))
    def prog(x):
        if fp16:
            x = mb.cast(x=x, dtype="fp16", name="x_fp16")
        x = mb.relu(x=mb.linear(x=x, weight=w1, bias=b1, name="fc1"), name="relu1")
        x = mb.relu(x=mb.linear(x=x, weight=w2, bias=b2, name="fc2"), name="relu2")
        x = mb.linear(x=x, weight=w3, bias=b3, name="fc3")
        if fp16:
            x = mb.cast(x=x, dtype="fp32", name="y")
        return x

    return prog


@functools.cache
def _mlp_model(ios: int, dtype_name: str = "float32"):
    """The MLP as an in-memory MLModel (cached: the compressed forms all start from it; never modified)."""
    return _convert(_mlp_program(ios, np.dtype(dtype_name).type), ios)


def _conv_program():
    from coremltools.converters.mil.mil import Builder as mb

    w_conv, b_conv, w_deconv, y_mm = _weights(1, (16, 8, 3, 3), (16,), (16, 8, 3, 3), (16, 12))

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 16, 16))], opset_version=_target(16))
    def prog(x):
        x = mb.conv(x=x, weight=w_conv, bias=b_conv, pad_type="same", name="conv")
        x = mb.relu(x=x, name="relu")
        x = mb.conv_transpose(x=x, weight=w_deconv, pad_type="same", name="deconv")  # [1, 8, 16, 16]
        return mb.matmul(x=x, y=y_mm, name="mm")  # [1, 8, 16, 12]

    return prog


@functools.cache
def _conv_model():
    return _convert(_conv_program(), 16)


def _save(model, path: Path) -> None:
    model.save(str(path))


# -- plain programs -------------------------------------------------------------------------------------------


def _mlp(ios: int, dtype=np.float32) -> Callable[[Path], None]:
    return lambda path: _save(_mlp_model(ios, np.dtype(dtype).name), path)


def _conv_ios16(path: Path) -> None:
    _save(_conv_model(), path)


def _control_flow_ios17(path: Path) -> None:
    from coremltools.converters.mil.mil import Builder as mb

    w_true, w_false, w_body, b_body = _weights(2, (32, 64), (32, 64), (32, 32), (32,))

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=_target(17))
    def prog(x):
        positive = mb.greater(x=mb.reduce_sum(x=x, name="total"), y=np.float32(0.0), name="positive")
        h = mb.cond(
            pred=positive,
            _true_fn=lambda: mb.linear(x=x, weight=w_true, name="fc_true"),
            _false_fn=lambda: mb.linear(x=x, weight=w_false, name="fc_false"),
            name="branch",
        )

        def keep_going(i, v):
            return mb.less(x=i, y=np.int32(3), name="keep_going")

        def body(i, v):
            step = mb.add(x=i, y=np.int32(1), name="step")
            return step, mb.relu(x=mb.linear(x=v, weight=w_body, bias=b_body, name="fc_body"), name="relu_body")

        _, out = mb.while_loop(_cond=keep_going, _body=body, loop_vars=(np.int32(0), h), name="loop")
        return out

    _save(_convert(prog, 17), path)


def _shared_const_ios16(path: Path) -> None:
    from coremltools.converters.mil.mil import Builder as mb

    (w,) = _weights(3, (32, 32))

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 32))], opset_version=_target(16))
    def prog(x):
        shared = mb.const(val=w, name="w_shared")
        a = mb.linear(x=x, weight=shared, name="fc_a")
        b = mb.linear(x=mb.relu(x=a, name="relu_a"), weight=shared, name="fc_b")
        return mb.add(x=a, y=b, name="sum")

    _save(_convert(prog, 16), path)


def _no_weights_ios16(path: Path) -> None:
    from coremltools.converters.mil.mil import Builder as mb

    offset = np.array([1.0, -2.0, 0.5, 0.25], dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=_target(16))
    def prog(x):
        return mb.relu(x=mb.add(x=x, y=offset, name="shift"), name="relu")

    _save(_convert(prog, 16), path)


def _multifunction_ios18(path: Path) -> None:
    """Two MLPs with the same fc1 weight (and different later weights), merged; coremltools deduplicates
    the shared weight into one blob."""
    ct = _ct()
    from coremltools.converters.mil.mil import Builder as mb

    w1, b1 = _weights(0, (128, 64), (128,))
    w2a, w2b = _weights(4, (8, 128), (8, 128))

    def program(w2):
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=_target(18))
        def prog(x):
            x = mb.relu(x=mb.linear(x=x, weight=w1, bias=b1, name="fc1"), name="relu1")
            return mb.linear(x=x, weight=w2, name="fc2")

        return prog

    with tempfile.TemporaryDirectory(prefix="mlqpipe-multifunction-") as tmp:
        sources = []
        for tag, w2 in (("a", w2a), ("b", w2b)):
            source = Path(tmp, f"{tag}.mlpackage")
            _save(_convert(program(w2), 18), source)
            sources.append((tag, source))
        desc = ct.utils.MultiFunctionDescriptor()
        for tag, source in sources:
            desc.add_function(str(source), src_function_name="main", target_function_name=f"main_{tag}")
        desc.default_function_name = "main_a"
        ct.utils.save_multifunction(desc, str(path))


# -- compressed forms ----------------------------------------------------------------------------------------


def _cto():
    import coremltools.optimize.coreml as cto

    return cto


def _compressed(base: Callable, *steps: Callable) -> Callable[[Path], None]:
    """Save `base()` after applying each step (model -> model) in turn."""

    def make(path: Path) -> None:
        model = base()
        for step in steps:
            model = step(model)
        _save(model, path)

    return make


def _quantize(**op_config) -> Callable:
    def step(model):
        cto = _cto()
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(**op_config))
        return cto.linear_quantize_weights(model, config)

    return step


def _palettize(joint_compression: bool = False, **op_config) -> Callable:
    def step(model):
        cto = _cto()
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(**op_config))
        return cto.palettize_weights(model, config, joint_compression=joint_compression)

    return step


def _prune(**op_config) -> Callable:
    def step(model):
        cto = _cto()
        config = cto.OptimizationConfig(global_config=cto.OpMagnitudePrunerConfig(**op_config))
        return cto.prune_weights(model, config)

    return step


def _joint_quantize(**op_config) -> Callable:
    def step(model):
        cto = _cto()
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(**op_config))
        return cto.linear_quantize_weights(model, config, joint_compression=True)

    return step


def _mlp16():
    return _mlp_model(16)


def _mlp18():
    return _mlp_model(18)


# -- torch ---------------------------------------------------------------------------------------------------


def _torch_cnn(path: Path) -> None:
    """A tiny CNN traced with torch and converted (torch.flatten: coremltools 9.0 fails on x.reshape with
    torch 2.13, MLPROGRAM.md §9.13)."""
    import torch

    ct = _ct()
    torch.manual_seed(0)

    class TinyCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    model = TinyCNN().eval()
    example = torch.rand(1, 3, 8, 8)
    traced = torch.jit.trace(model, example)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="image", shape=example.shape)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        skip_model_load=True,
    )
    _save(mlmodel, path)


# -- matrix models (tests/optimize/test_matrix.py) -----------------------------------------------------------


def _mx_dense(ios: int) -> Callable[[Path], None]:
    """matmuls with a const y / x under every transpose flag, and a linear with bias."""

    def make(path: Path) -> None:
        from coremltools.converters.mil.mil import Builder as mb

        wy, wyt, wx, wxt, wfc, bfc = _weights(10, (64, 72), (80, 72), (60, 50), (60, 56), (48, 80), (48,))

        @mb.program(input_specs=[mb.TensorSpec(shape=(50, 64))], opset_version=_target(ios))
        def prog(x):
            h = mb.matmul(x=x, y=wy, name="mm_y")  # [50, 72]
            h = mb.matmul(x=h, y=wyt, transpose_y=True, name="mm_yt")  # [50, 80]
            h = mb.matmul(x=wx, y=h, name="mm_x")  # [60, 80]
            h = mb.matmul(x=wxt, y=h, transpose_x=True, name="mm_xt")  # [56, 80]
            return mb.linear(x=h, weight=wfc, bias=bfc, name="fc")  # [56, 48]

        _save(_convert(prog, ios), path)

    return make


def _mx_conv(ios: int) -> Callable[[Path], None]:
    """conv (groups 1, depthwise, grouped) and conv_transpose (groups 1 and 2)."""

    def make(path: Path) -> None:
        from coremltools.converters.mil.mil import Builder as mb

        w, b, wd, wg, wt, wtg = _weights(11, (32, 16, 3, 3), (32,), (32, 1, 9, 9), (32, 8, 3, 3), (32, 16, 3, 3), (16, 8, 5, 5))

        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 16, 6, 6))], opset_version=_target(ios))
        def prog(x):
            x = mb.relu(x=mb.conv(x=x, weight=w, bias=b, pad_type="same", name="conv"), name="relu")
            x = mb.conv(x=x, weight=wd, groups=32, pad_type="same", name="dwconv")
            x = mb.conv(x=x, weight=wg, groups=4, pad_type="same", name="gconv")  # [1, 32, 6, 6]
            x = mb.conv_transpose(x=x, weight=wt, pad_type="same", name="deconv")  # [1, 16, 6, 6]
            return mb.conv_transpose(x=x, weight=wtg, groups=2, pad_type="same", name="gdeconv")  # [1, 16, 6, 6]

        _save(_convert(prog, ios), path)

    return make


def _mx_misc(ios: int) -> Callable[[Path], None]:
    """gather (embedding), lstm, a const shared by two linears, a const read with conflicting axes."""

    def make(path: Path) -> None:
        from coremltools.converters.mil.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        emb, w_ih, w_hh, w_shared, w_conflict = _weights(12, (100, 32), (128, 32), (128, 32), (72, 32), (72, 72))
        h0 = np.zeros((1, 32), np.float32)

        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8), dtype=types.int32)], opset_version=_target(ios))
        def prog(ids):
            e = mb.gather(x=emb, indices=ids, axis=0, name="embed")  # [1, 8, 32]
            seq = mb.transpose(x=e, perm=[1, 0, 2], name="time_major")  # [8, 1, 32]
            _, h, _ = mb.lstm(x=seq, initial_h=h0, initial_c=h0, weight_ih=w_ih, weight_hh=w_hh, name="lstm")
            shared = mb.const(val=w_shared, name="w_shared")
            a = mb.linear(x=h, weight=shared, name="fc_a")  # [1, 72]
            b = mb.linear(x=mb.relu(x=h, name="relu_h"), weight=shared, name="fc_b")
            conflict = mb.const(val=w_conflict, name="w_conflict")
            c = mb.linear(x=a, weight=conflict, name="fc_c")
            d = mb.matmul(x=b, y=conflict, name="mm_c")
            return mb.add(x=c, y=d, name="sum")

        _save(_convert(prog, ios), path)

    return make


def _mx_fp16(ios: int) -> Callable[[Path], None]:
    """fp16 weights of >= 10,000 elements (coremltools' k-means is the exact kmeans1d for them)."""

    def make(path: Path) -> None:
        from coremltools.converters.mil.mil import Builder as mb

        w, b, y = _weights(13, (128, 96), (128,), (128, 84), dtype=np.float16)

        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 96))], opset_version=_target(ios))
        def prog(x):
            x = mb.cast(x=x, dtype="fp16", name="x_fp16")
            x = mb.relu(x=mb.linear(x=x, weight=w, bias=b, name="fc"), name="relu")  # [1, 128]
            return mb.cast(x=mb.matmul(x=x, y=y, name="mm"), dtype="fp32", name="y")

        _save(_convert(prog, ios), path)

    return make


def _few_values(rng, shape, count: int) -> np.ndarray:
    """A weight holding exactly `count` distinct values (unique palettization)."""
    table = np.sort(rng.standard_normal(count) * 0.1).astype(np.float32)
    picks = np.concatenate([np.arange(count), rng.integers(0, count, int(np.prod(shape)) - count)])
    return table[rng.permutation(picks)].reshape(shape)


def _mx_unique(ios: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        from coremltools.converters.mil.mil import Builder as mb

        rng = np.random.default_rng(14)
        w1 = _few_values(rng, (64, 48), 4 if ios < 18 else 5)
        w2 = _few_values(rng, (80, 64), 16)
        w3 = _few_values(rng, (40, 80), 50)

        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 48))], opset_version=_target(ios))
        def prog(x):
            x = mb.relu(x=mb.linear(x=x, weight=w1, name="fc1"), name="relu1")
            x = mb.relu(x=mb.linear(x=x, weight=w2, name="fc2"), name="relu2")
            return mb.linear(x=x, weight=w3, name="fc3")

        _save(_convert(prog, ios), path)

    return make


def _mx_torch_ios18(path: Path) -> None:
    """A torch conv + embedding + linear, converted with coremltools' defaults (fp16, default passes)."""
    import torch

    ct = _ct()
    torch.manual_seed(1)

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 32, kernel_size=3, padding=1)
            self.embed = torch.nn.Embedding(64, 40)
            self.fc = torch.nn.Linear(72, 40)

        def forward(self, image, ids):
            a = torch.relu(self.conv(image)).mean(dim=(2, 3))
            return self.fc(torch.cat([a, self.embed(ids).mean(dim=1)], dim=1))

    image, ids = torch.rand(1, 8, 6, 6), torch.randint(0, 64, (1, 5))
    traced = torch.jit.trace(Mixed().eval(), (image, ids))
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="image", shape=image.shape), ct.TensorType(name="ids", shape=ids.shape, dtype=np.int32)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    _save(mlmodel, path)


MATRIX: dict[str, Callable[[Path], None]] = {
    **{f"mx_dense_ios{ios}": _mx_dense(ios) for ios in (16, 17, 18)},
    **{f"mx_conv_ios{ios}": _mx_conv(ios) for ios in (16, 18)},
    **{f"mx_misc_ios{ios}": _mx_misc(ios) for ios in (17, 18)},
    **{f"mx_fp16_ios{ios}": _mx_fp16(ios) for ios in (16, 18)},
    **{f"mx_unique_ios{ios}": _mx_unique(ios) for ios in (16, 18)},
    "mx_torch_ios18": _mx_torch_ios18,
}
MATRIX_NEEDS_TORCH = frozenset({"mx_torch_ios18"})


# -- the catalog ---------------------------------------------------------------------------------------------

CATALOG: dict[str, Callable[[Path], None]] = {
    "mlp_ios15_fp32": _mlp(15),
    "mlp_ios16_fp32": _mlp(16),
    "mlp_ios17_fp16": _mlp(17, np.float16),
    "mlp_ios18_fp32": _mlp(18),
    "conv_ios16": _conv_ios16,
    "control_flow_ios17": _control_flow_ios17,
    "shared_const_ios16": _shared_const_ios16,
    "multifunction_ios18": _multifunction_ios18,
    "no_weights_ios16": _no_weights_ios16,
    "conv_ios16_affine": _compressed(
        _conv_model, _quantize(dtype="int8", granularity="per_channel", weight_threshold=100)
    ),
    "ios16_affine": _compressed(_mlp16, _quantize(dtype="int8", granularity="per_channel")),
    "ios16_lut": _compressed(_mlp16, _palettize(mode="kmeans", nbits=4)),
    "ios16_sparse": _compressed(_mlp16, _prune(target_sparsity=0.5)),
    "ios18_int4_block": _compressed(_mlp18, _quantize(dtype="int4", granularity="per_block", block_size=32)),
    "ios18_lut_grouped": _compressed(
        _mlp18, _palettize(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16)
    ),
    "ios18_lut_3bit": _compressed(_mlp18, _palettize(mode="kmeans", nbits=3)),
    "ios18_lut_vector": _compressed(_mlp18, _palettize(mode="kmeans", nbits=4, cluster_dim=2)),
    "ios18_lut_channel_scale": _compressed(_mlp18, _palettize(mode="kmeans", nbits=4, enable_per_channel_scale=True)),
    "ios18_sparse": _compressed(_mlp18, _prune(target_sparsity=0.5)),
    "ios18_joint_sparse_lut": _compressed(
        _mlp18, _prune(target_sparsity=0.5), _palettize(mode="kmeans", nbits=4, joint_compression=True)
    ),
    "ios18_joint_sparse_int8": _compressed(
        _mlp18, _prune(target_sparsity=0.5), _joint_quantize(dtype="int8", granularity="per_channel")
    ),
    "torch_cnn": _torch_cnn,
}

NEEDS_TORCH = frozenset({"torch_cnn"})


def build(name: str, directory: Path) -> Path:
    """Save catalog package `name` as `directory/<name>.mlpackage` (replacing a partial earlier attempt)."""
    path = Path(directory) / f"{name}.mlpackage"
    if path.exists():
        shutil.rmtree(path)
    CATALOG[name](path)
    return path


def build_matrix(name: str, directory: Path) -> Path:
    """`build` for the matrix models (MATRIX: kept out of CATALOG, whose every package the format tests
    walk)."""
    path = Path(directory) / f"{name}.mlpackage"
    if path.exists():
        shutil.rmtree(path)
    MATRIX[name](path)
    return path


def varint(n: int) -> bytes:
    """A protobuf varint (tests hand-craft wire bytes with it)."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
