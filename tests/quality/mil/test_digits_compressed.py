"""The digits models (digits.py) as classifier ML programs, compressed by mlqpipe's coremltools-compatible API
(digits.COMPRESSIONS: int8, int4 per block, 4- and 2-bit k-means palettes, 75% pruning, 50% pruning jointly
palettized) and evaluated against the float program on the digits test split. The reference is independent
of mlqpipe: the trained torch module with each compressed parameter replaced by the package's weight as
coremltools decodes it (mlqpipe's decoding must equal it). The evaluator's float accuracy, accuracy after compression and top-1 agreement must
equal torch's (near-tie flips aside), and its relative L2 of the scores torch's.

Weights are matched to torch parameters by exact equality of the float package's values with the state
dict, up to the layouts the converter uses here: reshape, transpose and (LSTM) a reorder of the 4 gates."""

from __future__ import annotations

import copy
from itertools import permutations

import numpy as np
import pytest

import mlqpipe
from mlqpipe.quality.evaluate.compare import evaluate

from . import digits

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("coremltools")
pytestmark = [pytest.mark.filterwarnings("ignore:.*might cause the trace to be incorrect"),
              # coremltools renames the traced logits when classifier_config replaces the output
              pytest.mark.filterwarnings("ignore:Output, .* has been renamed to")]

NEAR_TIE = 1e-4  # as test_digits.py: a top-2 logit gap below this (relative to the logits' scale) may flip an argmax
SCORES = "classLabel_probs"
# weights the API leaves as they are, with a warning: per_block needs the input axis divisible by the block
INT4_SKIPPED = {"convnet": {"conv1_weight", "conv2_weight"}, "mlp": set(), "transformer": {"embed_weight"}, "lstm": {"concat_1"}}
OPS = {"int8 per-channel": "constexpr_affine_dequantize", "int4 per-block 32": "constexpr_blockwise_shift_scale",
       "palettize 4-bit k-means": "constexpr_lut_to_dense", "palettize 2-bit k-means": "constexpr_lut_to_dense",
       "prune 75%": "constexpr_sparse_to_dense",
       "prune 50% + palettize 4-bit (joint)": "constexpr_lut_to_sparse+constexpr_sparse_to_dense"}


# --- the independent reference -------------------------------------------------------------------------------


def coremltools_weights(path) -> dict[str, np.ndarray]:
    """Every const of the package's main function after coremltools' own constexpr decoding, by output name."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    prog = load(spec, spec.specificationVersion, mlmodel.weights_dir)
    WeightDecompressor(op_selector=lambda op: True).apply(prog)
    return {op.outputs[0].name: op.outputs[0].val for op in prog.functions["main"].operations if op.op_type == "const"}


def layouts(shape: tuple[int, ...], size: int) -> list[np.ndarray]:
    """Index arrays into a parameter's flat values (row-major), each laying the parameter out as a const of
    `shape`: the same order, transposed (2-D), or with 4 equal blocks on axis 0 permuted (LSTM gates)."""
    flat = np.arange(size)
    if int(np.prod(shape)) != size:
        return []
    out = [flat.reshape(shape)]
    if len(shape) == 2:
        out.append(flat.reshape(shape[::-1]).T)
        if shape[0] % 4 == 0:
            blocks = np.split(flat.reshape(shape), 4)
            out += [np.concatenate([blocks[i] for i in p]) for p in permutations(range(4)) if p != (0, 1, 2, 3)]
    return out


def locate(value: np.ndarray, params: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """(parameter name, index array) of the one parameter the float const `value` is a layout of, exactly."""
    found = [(k, idx) for k, p in params.items() for idx in layouts(value.shape, p.size) if np.array_equal(p.ravel()[idx], value)]
    assert len(found) == 1, f"a const of shape {value.shape} matches {[k for k, _ in found] or 'no'} torch parameter(s)"
    return found[0]


def with_weights(module, replaced: dict[str, tuple[np.ndarray, np.ndarray]]):
    """A copy of `module` whose parameters take `values` at `index` (name -> (index, values))."""
    import torch

    state = {k: v.clone() for k, v in module.state_dict().items()}
    for name, (index, values) in replaced.items():
        flat = state[name].numpy().ravel().copy()
        flat[index.ravel()] = values.ravel()
        state[name] = torch.from_numpy(flat.reshape(state[name].shape))
    twin = copy.deepcopy(module)
    twin.load_state_dict(state)
    return twin.eval()


def near_ties(logits: np.ndarray) -> int:
    """Samples whose top-2 logits are so close that float rounding may pick either."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return int(np.sum((top2[:, 1] - top2[:, 0]) / np.abs(logits).max() < NEAR_TIE))


def _relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- the cases -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split():
    _, _, x_test, y_test = digits.digits_split()
    return x_test, y_test


@pytest.fixture(scope="module")
def case(digits_cache, split):
    """`case(name, compression) -> dict`: the evaluation, the torch reference and what was compressed."""
    x_test, y_test = split
    done: dict = {}

    def get(name: str, compression: str) -> dict:
        if (name, compression) not in done:
            module = digits_cache.module(name)
            x = digits.as_input(name, x_test)
            float_path = digits_cache.package(name, classifier=True, target=digits.COMPRESSIONS[compression].target)
            path, said, _ = digits_cache.compressed(name, compression)
            float_model, model = mlqpipe.load_model(float_path), mlqpipe.load_model(path)
            try:
                float_values = {r.id: r.values() for r in mlqpipe.inventory(float_model)}
                compressed = {r.id: r for r in mlqpipe.inventory(model) if r.compressed}
                decoded = coremltools_weights(path)
                params = digits.weights(module)
                replaced = {}
                for rid, rec in compressed.items():
                    assert rid in decoded, f"{rid}: coremltools has no const of that name after decoding"
                    np.testing.assert_array_equal(rec.values(), decoded[rid], err_msg=f"{rid}: mlqpipe's decoding differs")
                    param, index = locate(float_values[rid], params)
                    assert param not in replaced, f"{rid}: torch parameter {param} is already replaced"
                    replaced[param] = (index, decoded[rid])
                evaluation = evaluate(float_model, model, {digits.INPUT: x}, labels=y_test)
            finally:
                float_model.close()
                model.close()
            done[name, compression] = dict(
                said=said, compressed=compressed, replaced=replaced, evaluation=evaluation,
                candidates={rid for rid, v in float_values.items() if v.ndim >= 2 and v.size > digits.WEIGHT_THRESHOLD},
                float_logits=digits.torch_logits(module, x), logits=digits.torch_logits(with_weights(module, replaced), x))
        return done[name, compression]

    return get


CASES = [(name, c) for name in digits.MODELS for c in digits.COMPRESSIONS]


@pytest.mark.parametrize("name,compression", CASES)
def test_every_matrix_is_compressed_and_found_in_torch(case, name, compression):
    """The weights compressed are the models' matrices (all but those per_block cannot split, which the API
    names in a warning), by the op of the compression, and each one replaced a torch parameter."""
    c = case(name, compression)
    skipped = INT4_SKIPPED[name] if compression == "int4 per-block 32" else set()
    assert set(c["compressed"]) == c["candidates"] - skipped
    assert {r.layer_type for r in c["compressed"].values()} == {OPS[compression]}
    assert sorted(s.split("'")[1] for s in c["said"] if "not compressed by" in s) == sorted(skipped), c["said"]
    assert len(c["replaced"]) == len(c["compressed"])


def assert_same_count(what: str, ours: float, theirs: float, n: int, slack: int) -> None:
    """Fractions of `n` samples equal, but for up to `slack` samples whose argmax is a near-tie."""
    assert abs(round(ours * n) - round(theirs * n)) <= slack, f"{what}: evaluator {ours:.4f} != torch {theirs:.4f} ({slack} near-ties)"


@pytest.mark.parametrize("name,compression", CASES)
def test_evaluator_accuracy_after_compression_equals_torch(case, split, name, compression):
    c = case(name, compression)
    e, ref, ours = c["evaluation"], c["float_logits"], c["logits"]
    labels = split[1]
    n = len(labels)
    assert e.evaluated, e.reason
    assert e.samples == n
    slack_f, slack_q = near_ties(ref), near_ties(ours)
    assert_same_count(f"{name}: float accuracy", e.accuracy_float, digits.accuracy(ref, labels), n, slack_f)
    assert_same_count(f"{name}, {compression}: accuracy", e.accuracy_quantized, digits.accuracy(ours, labels), n, slack_q)
    agreement = float(np.mean(ref.argmax(-1) == ours.argmax(-1)))
    assert_same_count(f"{name}, {compression}: top-1 agreement", e.top1_agreement, agreement, n, slack_f + slack_q)
    # a classifier's scores are its logits: their error is torch's up to float rounding (measured <= 1.4e-8)
    l2 = _relative_l2(ours, ref)
    assert abs(e.outputs[SCORES]["relative_l2"] - l2) <= 1e-6, f"{name}, {compression}: scores' relative L2 {e.outputs[SCORES]} vs torch {l2}"
