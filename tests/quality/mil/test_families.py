"""Every op family of issue #18 against an independent reference, where torch_models.py / the value-inference
tests leave a gap: more torch models (torch_models_more.py), TorchScript control flow, flexible shapes, a
classifier, fp16 inputs and outputs, every compressed-weight form written by coremltools.optimize.coreml on a
torch-converted CNN, and MIL-builder programs with numpy references for ops torch never produces
(clamped_relu, softsign, gelu's sigmoid approximation, l2_pool, 'same' / 'same_lower' padding, constexpr_cast).

Every converted program is checked to contain the op types it is meant to test (converters fuse and
rewrite). Tolerances: ||ours - ref||_2 / ||ref||_2 <= 1e-4 per output for float32 programs; fp16 programs
FP16_TOLERANCE (test_torch_models.py: every op's output is rounded to float16, whose unit roundoff is
4.9e-4, and a few ops compound it); compressed weights: 1e-4 against torch run with the weights coremltools'
own decompress_weights decodes, and a per-form bound against the float model (the compression's error)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import mlqpipe
from mlqpipe.formats.mlprogram.program import walk
from mlqpipe.quality.mil import Interpreter, run

from .oracle import assert_close, convert_program, ct, relative_error, target, torch_outputs
from .test_conv_kernels import _reference_conv
from .test_torch_models import FP16_TOLERANCE, assert_contains, assert_reproduces_torch, op_types
from .torch_models import EXPECTED_OPS, EXPECTED_SETTINGS, PART2, PART2_IOS, build_part2, conv3d
from .torch_models_more import EXPECTED, MORE, SPECIAL_EXPECTED, build_more, build_special

SEED = int(np.random.default_rng().integers(1 << 30))  # fresh weights every session
_rng = np.random.default_rng()


def _convert(module, specs: dict, path, *, ios: int = 16, script: bool = False, flexible: bool = False,
             classes: list[str] | None = None, fp16_io: bool = False) -> None:
    """Convert a torch module as users do (default pass pipeline); float32 compute unless fp16_io, where the
    inputs and outputs are declared fp16 too (so the converter inserts no cast at either end)."""
    import torch

    c = ct()
    examples = tuple(torch.from_numpy(np.zeros(shape, dtype)) for shape, dtype in specs.values())
    graph = torch.jit.script(module) if script else torch.jit.trace(module, examples)

    def shape(s):
        return (s[0], c.RangeDim(2, 16, s[1])) if flexible else s

    inputs = [c.TensorType(name=n, shape=shape(s), dtype=np.float16 if fp16_io else dt) for n, (s, dt) in specs.items()]
    kwargs = dict(outputs=[c.TensorType(name="y", dtype=np.float16)]) if fp16_io else {}
    if classes:
        kwargs["classifier_config"] = c.ClassifierConfig(classes)
    precision = c.precision.FLOAT16 if fp16_io else c.precision.FLOAT32
    model = c.convert(graph, inputs=inputs, convert_to="mlprogram", minimum_deployment_target=target(ios),
                      compute_precision=precision, skip_model_load=True, **kwargs)
    model.save(str(path))


# --- torch models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_torch_models(converted, name):
    module, specs = build_more(name, SEED)
    path = converted(f"more_{name}", lambda p: _convert(module, specs, p), torch=True)
    assert_contains(path, EXPECTED[name])
    assert_reproduces_torch(path, module, specs, name)


@pytest.mark.parametrize("name", sorted(PART2) + ["conv3d"])
def test_part2_programs_contain_their_families(converted, name):
    """test_ops_part2.py's torch models (the same packages: its seed, its cache names) hold the op types and
    settings they are meant to test."""
    from . import test_ops_part2 as part2

    if name == "conv3d":
        import torch

        torch.manual_seed(part2.SEED)
        module, shapes = conv3d()
        zeros = {"x": np.zeros(shapes["x"], np.float32)}
        path = converted("part2_conv3d", lambda p: part2.convert_torch(module.eval(), zeros, p), torch=True)
    else:
        module, specs = build_part2(name, part2.SEED)
        zeros = {k: np.zeros(shape, dtype) for k, (shape, dtype) in specs.items()}
        path = converted(f"part2_{name}", lambda p: part2.convert_torch(module, zeros, p, ios=PART2_IOS[name]), torch=True)
    assert_contains(path, EXPECTED_OPS[name], EXPECTED_SETTINGS.get(name, ()))


def test_scripted_control_flow_is_cond_and_while_loop(converted):
    module, specs = build_special("control_flow", SEED)
    path = converted("more_control_flow", lambda p: _convert(module, specs, p, script=True), torch=True)
    assert_contains(path, SPECIAL_EXPECTED["control_flow"])
    x = _rng.standard_normal((4, 8)).astype(np.float32) * np.float32([[0.01], [0.3], [1], [10]])  # loops of 0 to ~16 turns
    x[0], x[1] = np.abs(x[0]), -np.abs(x[1])  # both branches are taken
    ours = list(run(mlqpipe.load_model(path), {"x": x}).values())
    for i, (a, b) in enumerate(zip(ours, torch_outputs(module, {"x": x}), strict=True)):
        assert_close(a, b, f"control flow output {i}")


@pytest.mark.parametrize("size", [6, 11])
def test_flexible_shapes_evaluate_shape_fill_and_range(converted, size):
    module, specs = build_special("dynamic", SEED)
    path = converted("more_dynamic", lambda p: _convert(module, specs, p, flexible=True), torch=True)
    assert_contains(path, SPECIAL_EXPECTED["dynamic"])
    x = _rng.standard_normal((1, size)).astype(np.float32)
    ours = list(run(mlqpipe.load_model(path), {"x": x}).values())
    ref = torch_outputs(module, {"x": x})
    assert [a.shape for a in ours] == [b.shape for b in ref]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"dynamic output {i}")


def test_classifier_labels_and_probabilities(converted):
    module, specs = build_special("classifier", SEED)
    classes = ["ant", "bee", "cat", "dog"]
    path = converted("more_classifier", lambda p: _convert(module, specs, p, classes=classes), torch=True)
    assert_contains(path, SPECIAL_EXPECTED["classifier"])
    x = _rng.standard_normal((5, 6)).astype(np.float32)
    label, probs = run(mlqpipe.load_model(path), {"x": x}).values()
    ref = torch_outputs(module, {"x": x})[0]
    assert_close(probs, ref, "probabilities")
    assert list(label) == [classes[i] for i in ref.argmax(1)]


def test_fp16_inputs_and_outputs(converted):
    """fp16 declared at both ends: no cast is inserted, the outputs are float16, within FP16_TOLERANCE."""
    module, specs = build_special("small_cnn", SEED)
    path = converted("more_fp16_io", lambda p: _convert(module, specs, p, fp16_io=True), torch=True)
    interpreter = Interpreter(mlqpipe.load_model(path))
    assert_contains(path, SPECIAL_EXPECTED["small_cnn"])
    assert "cast" not in op_types(path)
    assert [d.dtype for _, d in interpreter.inputs] == [np.float16]
    x = _rng.standard_normal((3, 4, 8, 8)).astype(np.float16)
    (ours,) = interpreter.run({"x": x}).values()
    assert ours.dtype == np.float16
    assert_close(ours, torch_outputs(module, {"x": x.astype(np.float32)})[0], "fp16 in/out", FP16_TOLERANCE)


def test_fp16_compute_between_fp32_casts(converted):
    """fp32 inputs, fp16 compute: the converter casts the input to fp16 (the output stays fp16 at iOS16)."""
    module, specs = build_special("small_cnn", SEED)

    def make(p):
        from .oracle import convert_torch

        convert_torch(module, {"x": np.zeros(specs["x"][0], np.float32)}, p, precision="fp16")

    path = converted("more_fp16_compute", make, torch=True)
    assert_contains(path, {"cast"} | SPECIAL_EXPECTED["small_cnn"])
    x = _rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    (ours,) = run(mlqpipe.load_model(path), {"x": x}).values()
    assert_close(ours, torch_outputs(module, {"x": x})[0], "fp16 compute", FP16_TOLERANCE)


# --- compressed weights -------------------------------------------------------------------------------------


def _quantize(joint: bool = False, **config):
    def step(model):
        import coremltools.optimize.coreml as cto

        c = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(weight_threshold=100, **config))
        return cto.linear_quantize_weights(model, c, joint_compression=joint)

    return step


def _palettize(joint: bool = False, **config):
    def step(model):
        import coremltools.optimize.coreml as cto

        c = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(weight_threshold=100, **config))
        return cto.palettize_weights(model, c, joint_compression=joint)

    return step


def _prune(**config):
    def step(model):
        import coremltools.optimize.coreml as cto

        c = cto.OptimizationConfig(global_config=cto.OpMagnitudePrunerConfig(weight_threshold=100, **config))
        return cto.prune_weights(model, c)

    return step


A16, BSS = "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"
LUT, SP = "constexpr_lut_to_dense", "constexpr_sparse_to_dense"  # both forms: iOS16 attributes, iOS18 inputs
# name -> (opset, compression steps, constexpr op types the program must hold, bound of the error against the float model)
COMPRESSIONS = {
    "ios16_int8_per_channel": (16, [_quantize(dtype="int8")], {A16}, 0.02),
    "ios16_uint8_per_tensor": (16, [_quantize(mode="linear", dtype="uint8", granularity="per_tensor")], {A16}, 0.02),
    "ios16_lut4": (16, [_palettize(mode="kmeans", nbits=4)], {LUT}, 0.15),
    "ios16_lut2_uniform": (16, [_palettize(mode="uniform", nbits=2)], {LUT}, 0.7),
    "ios16_sparse": (16, [_prune(target_sparsity=0.5)], {SP}, 0.6),
    "ios18_int4_per_block": (18, [_quantize(dtype="int4", granularity="per_block", block_size=4)], {BSS}, 0.15),
    "ios18_int8_per_tensor": (18, [_quantize(dtype="int8", granularity="per_tensor")], {BSS}, 0.02),
    "ios18_lut_grouped": (18, [_palettize(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=2)], {LUT}, 0.15),
    "ios18_lut3": (18, [_palettize(mode="kmeans", nbits=3)], {LUT}, 0.3),
    "ios18_lut_vector": (18, [_palettize(mode="kmeans", nbits=4, cluster_dim=2)], {LUT}, 0.5),
    "ios18_lut_channel_scale": (18, [_palettize(mode="kmeans", nbits=4, enable_per_channel_scale=True)], {LUT, BSS}, 0.15),
    "ios18_lut_int8": (18, [_palettize(mode="kmeans", nbits=4), _quantize(joint=True, dtype="int8", granularity="per_tensor")],
                       {LUT, BSS}, 0.15),
    "ios18_sparse": (18, [_prune(target_sparsity=0.5)], {SP}, 0.6),
    "ios18_sparse_lut": (18, [_prune(target_sparsity=0.5), _palettize(joint=True, mode="kmeans", nbits=4)],
                         {"constexpr_lut_to_sparse", SP}, 0.6),
    "ios18_sparse_int8": (18, [_prune(target_sparsity=0.5), _quantize(joint=True, dtype="int8")],
                          {"constexpr_sparse_blockwise_shift_scale", SP}, 0.6),
}  # fmt: skip


def _float_cnn(ios: int):
    """(torch module, coremltools MLModel of it): the small CNN in float32 at `ios`."""
    import torch

    c = ct()
    module, specs = build_special("small_cnn", SEED)
    traced = torch.jit.trace(module, torch.zeros(specs["x"][0]))
    model = c.convert(traced, inputs=[c.TensorType(name="x", shape=specs["x"][0])], convert_to="mlprogram",
                      minimum_deployment_target=target(ios), compute_precision=c.precision.FLOAT32, skip_model_load=True)
    return module, model


def _decompressed_weights(model) -> dict[tuple, np.ndarray]:
    """shape -> the weight of that shape after coremltools' decompress_weights (the CNN's weight shapes differ)."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.frontend.milproto.load import load

    dense = cto.decompress_weights(model)
    spec = dense.get_spec()
    prog = load(spec, spec.specificationVersion, dense.weights_dir)
    return {tuple(op.outputs[0].shape): np.array(op.outputs[0].val) for op in prog.functions["main"].operations
            if op.op_type == "const" and op.outputs[0].val is not None and np.ndim(op.outputs[0].val) >= 2}


def _constexpr_forms(path) -> set[str]:
    """How the program's constexpr ops carry their parameters: "attributes" (iOS16 / iOS17) or "inputs" (iOS18)."""
    sites = walk(mlqpipe.load_model(path).spec.mlProgram, str(path))
    return {"inputs" if s.op.inputs else "attributes" for s in sites if s.op.type.startswith("constexpr_")}


@pytest.fixture(scope="module")
def compressed(converted):
    """name -> (package, torch module, torch module holding coremltools' decoded weights, those weights by shape)."""
    pytest.importorskip("torch")
    made, floats = {}, {}

    def get(name):
        if name not in made:
            ios, steps, _, _ = COMPRESSIONS[name]
            if ios not in floats:
                floats[ios] = _float_cnn(ios)  # the compression APIs return new models, the float one is kept
            module, model = floats[ios]
            for step in steps:
                model = step(model)
            path = converted(f"compressed_{name}", lambda p: model.save(str(p)), torch=True)
            decoded = copy.deepcopy(module)
            weights = _decompressed_weights(model)
            import torch

            with torch.no_grad():
                for layer in (decoded.conv, decoded.fc1, decoded.fc2):
                    layer.weight.copy_(torch.from_numpy(weights[tuple(layer.weight.shape)].astype(np.float32)))
            made[name] = path, module, decoded, weights
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_compressed_weights(compressed, name):
    ios, _, kinds, bound = COMPRESSIONS[name]
    path, module, decoded, weights = compressed(name)
    assert_contains(path, kinds)
    assert _constexpr_forms(path) == {"attributes" if ios == 16 else "inputs"}
    records = [r for r in mlqpipe.inventory(mlqpipe.load_model(path)) if r.compressed]
    assert sorted(r.shape for r in records) == sorted(weights)  # the three weights, each compressed
    for r in records:  # the constexpr chains the interpreter decodes give coremltools' values exactly
        assert np.array_equal(r.values(), weights[r.shape].astype(np.float32)), f"{name}: {r.where}"
    x = _rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    (ours,) = run(mlqpipe.load_model(path), {"x": x}).values()
    assert_close(ours, torch_outputs(decoded, {"x": x})[0], f"{name} against torch with coremltools' decoded weights")
    err = relative_error(ours, torch_outputs(module, {"x": x})[0])
    assert 0 < err <= bound, f"{name}: error {err:.3g} against the float model, bound {bound}"


# --- MIL-builder programs: ops and settings torch does not produce, numpy references ----------------------------

IMG = _rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
SIG = _rng.standard_normal((2, 3, 10)).astype(np.float32)
WC = _rng.standard_normal((4, 3, 3, 4)).astype(np.float32)
W16 = (_rng.standard_normal((6, 10)) * 0.5).astype(np.float16)
VEC = _rng.standard_normal((2, 10)).astype(np.float32)


def _windows_reference(x, kernel, strides, pads, reduce, fill):
    """Pooling by its definition: pad with `fill`, then reduce every window (a loop over output positions)."""
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *pads], constant_values=fill)
    sizes = [(xp.shape[2 + i] - k) // s + 1 for i, (k, s) in enumerate(zip(kernel, strides))]
    out = np.empty((*x.shape[:2], *sizes))
    for pos in np.ndindex(*sizes):
        window = xp[(slice(None), slice(None), *(slice(p * s, p * s + k) for p, s, k in zip(pos, strides, kernel)))]
        out[(slice(None), slice(None), *pos)] = reduce(window.reshape(*x.shape[:2], -1))
    return out


def _same(size, k, s):
    """'same' padding (begin, end): ceil(size / s) outputs, the odd pixel at the end."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _references():
    l2 = lambda w: np.sqrt((w**2).sum(-1))  # noqa: E731
    same_h, same_w = _same(9, 3, 2), _same(8, 4, 3)
    lower_h, lower_w = _same(9, 3, 1)[::-1], _same(8, 4, 1)[::-1]
    x = IMG.astype(np.float64)
    return {
        "clamped_relu": np.where(x >= 0, np.minimum(x, 0.8), np.minimum(0.3 * x, 0.8)),
        "softsign": x / (1 + np.abs(x)),
        "gelu_sigmoid": x / (1 + np.exp(-1.702 * x)),
        "l2_pool_1d": _windows_reference(SIG, [3], [2], [(0, 0)], l2, 0.0),
        "l2_pool_same": _windows_reference(IMG, [3, 2], [2, 2], [_same(9, 3, 2), _same(8, 2, 2)], l2, 0.0),
        "l2_pool_custom": _windows_reference(IMG, [3, 3], [1, 2], [(1, 0), (2, 1)], l2, 0.0),
        "max_pool_same": _windows_reference(IMG, [3, 4], [2, 3], [same_h, same_w], lambda w: w.max(-1), -np.inf),
        "avg_pool_same": _windows_reference(IMG, [3, 4], [2, 3], [same_h, same_w], lambda w: np.nanmean(w, -1), np.nan),
        "conv_same": _reference_conv(IMG, WC, 1, (2, 3), (1, 1), [*same_h, *_same(8, 4, 3)]),
        "conv_same_lower": _reference_conv(IMG, WC, 1, (1, 1), (1, 1), [*lower_h, *lower_w]),
        "constexpr_cast": VEC @ W16.astype(np.float32).T,
        "identity": SIG,
    }


def _builder_outputs(mb, img, sig, vec):
    f32 = np.float32
    return {
        "clamped_relu": mb.clamped_relu(x=img, alpha=f32(0.3), beta=f32(0.8)),
        "softsign": mb.softsign(x=img),
        "gelu_sigmoid": mb.gelu(x=img, mode="SIGMOID_APPROXIMATION"),
        "l2_pool_1d": mb.l2_pool(x=sig, kernel_sizes=[3], strides=[2], pad_type="valid"),
        "l2_pool_same": mb.l2_pool(x=img, kernel_sizes=[3, 2], strides=[2, 2], pad_type="same"),
        "l2_pool_custom": mb.l2_pool(x=img, kernel_sizes=[3, 3], strides=[1, 2], pad_type="custom", pad=[1, 0, 2, 1]),
        "max_pool_same": mb.max_pool(x=img, kernel_sizes=[3, 4], strides=[2, 3], pad_type="same"),
        "avg_pool_same": mb.avg_pool(x=img, kernel_sizes=[3, 4], strides=[2, 3], pad_type="same", exclude_padding_from_average=True),
        "conv_same": mb.conv(x=img, weight=WC, strides=[2, 3], pad_type="same"),
        "conv_same_lower": mb.conv(x=img, weight=WC, pad_type="same_lower"),
        "constexpr_cast": mb.linear(x=vec, weight=mb.constexpr_cast(source_val=W16, output_dtype="fp32")),
        "identity": mb.identity(x=sig),
    }


BUILDER_EXPECTED = {"clamped_relu", "softsign", "gelu", "l2_pool", "max_pool", "avg_pool", "conv", "constexpr_cast", "linear", "identity"}


@pytest.mark.parametrize("ios", [16, 18])
def test_builder_ops_match_numpy(converted, ios):
    from coremltools.converters.mil.mil import Builder as mb

    specs = [mb.TensorSpec(shape=IMG.shape), mb.TensorSpec(shape=SIG.shape), mb.TensorSpec(shape=VEC.shape)]

    @mb.program(input_specs=specs, opset_version=target(ios))
    def prog(img, sig, vec):
        return tuple(_builder_outputs(mb, img, sig, vec).values())

    path = converted(f"families_builder_ios{ios}", lambda p: convert_program(prog, ios, p))
    assert_contains(path, BUILDER_EXPECTED)
    got = list(run(mlqpipe.load_model(path), {"img": IMG, "sig": SIG, "vec": VEC}).values())
    refs = _references()
    assert len(got) == len(refs)
    for (name, ref), ours in zip(refs.items(), got):
        assert_close(ours, ref, name)


# --- rows fixed or added by this audit ----------------------------------------------------------------------


def test_concat_of_scalars_is_a_vector():
    """coremltools writes a dynamic shape as concat([1, n]) of rank-0 sizes and types it as a vector."""
    from mlqpipe.quality.mil import OPS

    got = OPS["concat"].fn([np.int32(1), np.array(7, np.int32), np.int32(3)], np.int32(0))
    assert got.tolist() == [1, 7, 3] and got.dtype == np.int32


def test_pixel_unshuffle_inverts_pixel_shuffle():
    from mlqpipe.quality.mil import OPS

    x = _rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    down = OPS["pixel_unshuffle"].fn(x, np.int32(2))
    assert down.shape == (2, 12, 2, 3) and np.array_equal(OPS["pixel_shuffle"].fn(down, np.int32(2)), x)
