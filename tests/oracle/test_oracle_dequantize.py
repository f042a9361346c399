"""quantization_mode="dequantization": quantize with coremltools, dequantize with both, compare bytes.

Expected difference (asserted): coremltools 9.0 raises IndexError on a model holding float16 weights;
mlqpipe writes them as float32.
"""

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import mlqpipe  # noqa: E402
from coremltools.models.neural_network import quantization_utils as ctq  # noqa: E402
from coremltools.proto import Model_pb2  # noqa: E402

from tests.oracle import oracle_models as O  # noqa: E402


def quantile_lut(nbits, weights):
    flat = np.asarray(weights, dtype=np.float64).ravel()
    k = 1 << nbits
    table = np.quantile(flat, (np.arange(k) + 0.5) / k)
    return table, np.abs(flat[:, None] - table[None, :]).argmin(axis=1)


QUANTIZED_BY = {
    "linear8": (8, "linear", {}),
    "linear3": (3, "linear", {}),
    "linear1": (1, "linear", {}),
    "symmetric8": (8, "linear_symmetric", {}),
    "lut4": (4, "linear_lut", {}),
    "lut8": (8, "linear_lut", {}),
    "custom2": (2, "custom_lut", {"lut_function": quantile_lut}),
    "linear5_advanced": (5, "linear", {"selector": ctq.AdvancedQuantizedLayerSelector()}),
}
MODELS = ["conv_family", "grouped_deconv", "dense", "folds", "embeddings_misc", "recurrent", "nested", "channels"]


@pytest.mark.parametrize("how", sorted(QUANTIZED_BY))
@pytest.mark.parametrize("name", MODELS)
def test_dequantize_coremltools_output_same_bytes(name, how):
    nbits, mode, kwargs = QUANTIZED_BY[how]
    quantized = O.ct_quantize(O.zoo_bytes(name), nbits, mode, **kwargs).SerializeToString()
    theirs = O.ct_quantize(quantized, 8, "dequantization")
    ours = O.ours_quantize(quantized, 8, "dequantization")
    O.assert_same(ours, theirs, f"dequantize {name} quantized {how}")
    assert all(O.storage_fields(wp) in (["floatValue"], []) for wp in O.all_weight_params(ours))


@pytest.mark.parametrize("nbits", [8, 4, 1])
@pytest.mark.parametrize("name", ["conv_family", "grouped_deconv", "recurrent", "nested"])
def test_dequantize_own_output_equals_coremltools_round_trip(name, nbits):
    """mlqpipe's quantize -> dequantize gives coremltools' quantize -> dequantize bytes, also for grouped
    deconvolutions, where mlqpipe writes one scale per output channel and coremltools one per group slot."""
    data = O.zoo_bytes(name)
    theirs = O.ct_quantize(O.ct_quantize(data, nbits, "linear").SerializeToString(), 8, "dequantization")
    ours = O.ours_quantize(mlqpipe.quantize_weights(data, nbits, "linear").SerializeToString(), 8, "dequantization")
    O.assert_same(ours, theirs, f"round trip {name} linear {nbits}")


@pytest.mark.parametrize("nbits", [8, 4, None, 16])
def test_dequantize_float32_model_is_a_no_op_apart_from_version(nbits):
    """The nbits argument only decides the specificationVersion floor in coremltools (2 for 16, else 3)."""
    data = O.zoo_bytes("dense")
    theirs = O.ct_quantize(data, nbits, "dequantization")
    ours = O.ours_quantize(data, nbits, "dequantization")
    O.assert_same(ours, theirs, "dequantize float model")
    original = Model_pb2.Model.FromString(data)
    original.specificationVersion = ours.specificationVersion
    assert O.canon(original) == O.canon(ours)


@pytest.mark.parametrize("source", ["fp16_quantized", "mixed_fp16", "fp16_and_linear"])
def test_dequantize_float16_weights_where_coremltools_raises(source):
    """Expected difference 8: coremltools raises IndexError; mlqpipe writes float16 weights as float32."""
    if source == "fp16_quantized":
        data = O.ct_quantize(O.zoo_bytes("conv_family"), 16, "linear").SerializeToString()
    elif source == "mixed_fp16":
        data = O.zoo_bytes("mixed_fp16")
    else:  # float16 layers plus layers coremltools quantized to 4 bits
        data = O.ct_quantize(O.zoo_bytes("mixed_fp16"), 4, "linear").SerializeToString()
    with pytest.raises(IndexError):
        O.ct_quantize(data, 8, "dequantization")
    ours = O.ours_quantize(data, 8, "dequantization")
    before = Model_pb2.Model.FromString(data)
    before_wps = list(O.all_weight_params(before))
    after_wps = list(O.all_weight_params(ours))
    assert len(before_wps) == len(after_wps)
    for b, a in zip(before_wps, after_wps):
        if not O.storage_fields(b):
            continue
        assert O.storage_fields(a) == ["floatValue"]
        if O.storage_fields(b) == ["float16Value"]:
            np.testing.assert_array_equal(np.asarray(a.floatValue, np.float32), O.wp_values(b))
    # the quantized blobs come back exactly as coremltools dequantizes them: compare against coremltools
    # on the same model with its float16 blobs written as float32 first
    theirs = O.ct_quantize(O.widened(data), 8, "dequantization")
    O.assert_same(ours, theirs, f"dequantize {source}")


REQUANTIZE_MODES = [(8, "linear"), (4, "linear"), (8, "linear_symmetric"), (4, "linear_lut"), (16, "linear")]


@pytest.mark.parametrize("nbits, mode", REQUANTIZE_MODES, ids=[f"{m}{n}" for n, m in REQUANTIZE_MODES])
@pytest.mark.parametrize("name", ["dense", "conv_family", "recurrent"])
def test_quantize_again_after_dequantization_same_bytes(name, nbits, mode):
    """The route mlqpipe advises for already-quantized weights: dequantize, then quantize.

    The dequantized blobs carry the empty `quantization {}` message coremltools leaves behind (mlqpipe
    reproduces it); quantizing again must give coremltools' bytes, including in fp16 mode, where
    coremltools only swaps floatValue for float16Value and keeps that empty message.
    """
    partly = O.ct_quantize(O.zoo_bytes(name), 6, "linear")
    dequantized = O.ct_quantize(partly.SerializeToString(), 8, "dequantization").SerializeToString()
    assert O.canon(O.ours_quantize(partly.SerializeToString(), 8, "dequantization")) == O.canon(
        Model_pb2.Model.FromString(dequantized)
    )
    theirs = O.ct_quantize(dequantized, nbits, mode)
    ours = O.ours_quantize(dequantized, nbits, mode)
    O.assert_same(ours, theirs, f"{name}: quantize {mode}{nbits} after dequantization")
