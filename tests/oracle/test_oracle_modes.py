"""Byte equality with coremltools 9.0, model by model and mode by mode, with the default selector.

Combinations where coremltools 9.0 is known to be wrong are left out here and tested in
test_oracle_differences.py: grouped deconvolution with linear modes, conv -> batchnorm below 16 bits,
float16 weights below 16 bits.
"""

import contextlib
import io

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import mlqpipe  # noqa: E402
from coremltools.models.neural_network import quantization_utils as ctq  # noqa: E402
from coremltools.proto import Model_pb2  # noqa: E402

from tests.oracle import oracle_models as O  # noqa: E402

MODES = [(n, "linear") for n in range(1, 9)] + [
    (8, "linear_symmetric"),
    (16, "linear"),
    (2, "linear_lut"),
    (4, "linear_lut"),
    (8, "linear_lut"),
]
# (model, modes) left to test_oracle_differences.py
KNOWN_DIFFERENT = {
    "grouped_deconv": {"linear", "linear_symmetric"},
    "conv_batchnorm": {"linear", "linear_symmetric", "linear_lut"},
    "mixed_fp16": {"linear", "linear_symmetric", "linear_lut"},
}


def _cases():
    for name in O.ZOO:
        for nbits, mode in MODES:
            if nbits != 16 and mode in KNOWN_DIFFERENT.get(name, ()):
                continue
            yield pytest.param(name, nbits, mode, id=f"{name}-{mode}{nbits}")


@pytest.mark.parametrize("name, nbits, mode", list(_cases()))
def test_same_bytes_as_coremltools(name, nbits, mode):
    data = O.zoo_bytes(name)
    theirs = O.ct_quantize(data, nbits, mode)
    ours = O.ours_quantize(data, nbits, mode)
    O.assert_same(ours, theirs, f"{name} {mode} {nbits}")


def quantile_lut(nbits, weights):
    """A deterministic custom table: quantiles of the weights, nearest entry for each weight."""
    flat = np.asarray(weights, dtype=np.float64).ravel()
    k = 1 << nbits
    table = np.quantile(flat, (np.arange(k) + 0.5) / k)
    codes = np.abs(flat[:, None] - table[None, :]).argmin(axis=1)
    return table, codes


LUT_FUNCTIONS = {"ct_linear": ctq._get_linear_lookup_table_and_weight, "quantile": quantile_lut}
CUSTOM_MODELS = ["conv_family", "grouped_deconv", "dense", "folds", "embeddings_misc", "recurrent", "nested", "channels"]


@pytest.mark.parametrize("fn", sorted(LUT_FUNCTIONS))
@pytest.mark.parametrize("nbits", [1, 3, 4])
@pytest.mark.parametrize("name", CUSTOM_MODELS)
def test_custom_lut_same_bytes(name, nbits, fn):
    data = O.zoo_bytes(name)
    lut = LUT_FUNCTIONS[fn]
    theirs = O.ct_quantize(data, nbits, "custom_lut", lut_function=lut)
    ours = O.ours_quantize(data, nbits, "custom_lut", lut_function=lut)
    O.assert_same(ours, theirs, f"{name} custom_lut({fn}) {nbits}")
    assert not O.lut_size_ok(ours)


@pytest.mark.parametrize("nbits, mode", [(8, "linear"), (3, "linear"), (16, "linear"), (4, "linear_lut")])
def test_every_input_form_gives_the_same_model(tmp_path, nbits, mode):
    """bytes, a path (str and PathLike), a coremltools spec and an MLModel all work and are left unchanged."""
    data = O.zoo_bytes("folds")
    theirs = O.ct_quantize(data, nbits, mode)
    path = tmp_path / "model.mlmodel"
    path.write_bytes(data)
    spec = Model_pb2.Model.FromString(data)
    spec_before = spec.SerializeToString()
    mlmodel = ct.models.MLModel(Model_pb2.Model.FromString(data))
    for source in (data, bytearray(data), str(path), path, spec, mlmodel):
        ours = O.ours_quantize(source, nbits, mode)
        O.assert_same(ours, theirs, f"input {type(source).__name__}")
    assert spec.SerializeToString() == spec_before
    assert path.read_bytes() == data
    assert O.canon(mlmodel.get_spec()) == O.canon(Model_pb2.Model.FromString(data))


def test_result_type_and_spec():
    ours = mlqpipe.quantize_weights(O.zoo_bytes("dense"), 8)
    assert isinstance(ours, mlqpipe.CoreMLModel)
    assert ours.spec.SerializeToString() == ours.SerializeToString()
    assert O.canon(Model_pb2.Model.FromString(ours.SerializeToString())) == O.canon(
        O.ct_quantize(O.zoo_bytes("dense"), 8, "linear")
    )


def test_coremltools_needs_an_mlmodel_ours_takes_a_spec():
    """coremltools 9.0 raises AttributeError (get_spec) for a spec; mlqpipe accepts one."""
    spec = O.ZOO["dense"]()
    with pytest.raises(AttributeError), contextlib.redirect_stdout(io.StringIO()):
        ctq.quantize_weights(spec, 8)
    O.assert_same(O.ours_quantize(spec, 8), O.ct_quantize(spec.SerializeToString(), 8))


@pytest.mark.parametrize(
    "nbits, mode",
    [(0, "linear"), (9, "linear"), (12, "linear"), (1, "linear_symmetric"), (8, "no_such_mode"), (17, "linear_lut")],
)
def test_bad_settings_raise_model_error(nbits, mode):
    """coremltools raises a bare Exception for these; mlqpipe a ModelError (a ValueError)."""
    data = O.zoo_bytes("dense")
    with pytest.raises(Exception):
        O.ct_quantize(data, nbits, mode)
    with pytest.raises(mlqpipe.ModelError):
        mlqpipe.quantize_weights(data, nbits, mode)
    assert issubclass(mlqpipe.ModelError, ValueError)


@pytest.mark.parametrize("bad", [b"", b"not a model at all \x00\xff", b"version https://git-lfs.github.com/spec/v1\n"])
def test_unreadable_input_raises_model_error(bad):
    with pytest.raises(mlqpipe.ModelError):
        mlqpipe.quantize_weights(bad, 8)


def test_model_without_neural_network_raises_model_error():
    m = Model_pb2.Model(specificationVersion=1)
    m.glmRegressor.weights.add().value.extend([1.0, 2.0])
    m.glmRegressor.offset.append(0.5)
    with pytest.raises(mlqpipe.ModelError):
        mlqpipe.quantize_weights(m.SerializeToString(), 8)


@pytest.mark.parametrize("nbits", [2, 4, 7])
def test_linear_symmetric_below_8_bits_is_an_extension(nbits):
    """coremltools accepts linear_symmetric at 8 bits only; mlqpipe also quantizes at 2..7 bits.

    Not one of the listed coremltools bugs: an extension of the API. Checked here for sanity: one scale per
    output channel, scale = max|w| / (2**(n-1) - 1), bias = -2**(n-1) * scale, error <= scale / 2.
    """
    data = O.zoo_bytes("dense")
    with pytest.raises(Exception, match="Symmetric quantization is only applicable for 8 bit"):
        O.ct_quantize(data, nbits, "linear_symmetric")
    ours = mlqpipe.quantize_weights(data, nbits, "linear_symmetric")
    float_records = {(r.layer, r.field): r for r in mlqpipe.inventory(mlqpipe.load_model(data).spec)}
    for rec in mlqpipe.inventory(ours.spec):
        assert str(rec.storage) == f"linear{nbits}"
        w = float_records[(rec.layer, rec.field)].values()
        rows = w.reshape(w.shape[0], -1) if rec.field == "weights" else w.reshape(1, -1)
        half_step = np.abs(rows).max(axis=1) / ((1 << nbits) / 2 - 1) / 2
        err = np.abs(rec.values().reshape(rows.shape) - rows).max(axis=1)
        assert np.all(err <= half_step * (1 + 1e-5) + 1e-7), (rec.layer, rec.field)


def _declared_unused(kind):
    """A layer whose flags say a blob is unused (hasBias=False, ...) while the blob still holds numbers."""
    m = O.new_model()
    net = O.network(m)
    if kind == "innerProduct":
        O.inner(net, "layer", "x", "y", ic=16, oc=8, seed=401).innerProduct.hasBias = False
    elif kind == "convolution":
        O.conv(net, "layer", "x", "y", oc=8, kc=4, seed=402).convolution.hasBias = False
    elif kind == "embedding":
        O.embedding(net, "layer", "x", "y", vocab=10, size=8, seed=403).embedding.hasBias = False
    elif kind == "embeddingND":
        O.embedding_nd(net, "layer", "x", "y", vocab=10, size=8, seed=404).embeddingND.hasBias = False
    elif kind == "batchedMatmul":
        O.batched_matmul(net, "layer", "x", "y", first=8, second=4, seed=405).batchedMatmul.hasBias = False
    elif kind == "gru":
        O.gru(net, "layer", "x", "y", i=4, o=3, seed=406).gru.hasBiasVectors = False
    elif kind == "simpleRecurrent":
        O.simple_rnn(net, "layer", "x", "y", i=4, o=3, seed=407).simpleRecurrent.hasBiasVector = False
    elif kind == "lstm_peepholes":
        O.lstm(net, "layer", "x", "y", i=3, o=2, seed=408).uniDirectionalLSTM.params.hasPeepholeVectors = False
    elif kind == "lstm_bias":  # coremltools quantizes LSTM bias vectors whatever hasBiasVectors says
        O.lstm(net, "layer", "x", "y", i=3, o=2, seed=409).uniDirectionalLSTM.params.hasBiasVectors = False
    return m.SerializeToString()


@pytest.mark.parametrize(
    "kind, nbits",
    [(k, 8) for k in ("innerProduct", "convolution", "embedding", "embeddingND", "batchedMatmul", "gru", "simpleRecurrent", "lstm_peepholes", "lstm_bias")]
    + [("innerProduct", 16), ("lstm_bias", 16)],
)
def test_blobs_declared_unused_are_treated_like_coremltools(kind, nbits):
    """coremltools reads the layer's flags (hasBias, hasBiasVector(s), hasPeepholeVectors) and leaves a blob
    they declare unused as it is, even when it holds numbers (LSTM bias vectors excepted: it quantizes
    those whatever hasBiasVectors says)."""
    data = _declared_unused(kind)
    O.assert_same(O.ours_quantize(data, nbits, "linear"), O.ct_quantize(data, nbits, "linear"), f"{kind} declared-unused blob")
