import numpy as np
import pytest

from mlqpipe import ModelError, load_model, quantize_weights
from mlqpipe.formats.nn import proto
from tests.builders import network, small_model


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.mlmodel: no such model file"):
        load_model(tmp_path / "nope.mlmodel")


@pytest.mark.invalid_models("empty.mlmodel", reason="an empty file: the input refused")
def test_empty_file(tmp_path):
    p = tmp_path / "empty.mlmodel"
    p.write_bytes(b"")
    with pytest.raises(ModelError, match="empty.mlmodel: empty file"):
        load_model(p)


@pytest.mark.invalid_models("lfs.mlmodel", reason="a Git LFS pointer, not a model: the input refused")
def test_git_lfs_pointer(tmp_path):
    p = tmp_path / "lfs.mlmodel"
    p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    with pytest.raises(ModelError, match="Git LFS pointer.*git lfs pull"):
        load_model(p)


@pytest.mark.invalid_models("bad.mlmodel", reason="bytes that are no protobuf: the input refused")
def test_corrupt_bytes(tmp_path):
    p = tmp_path / "bad.mlmodel"
    p.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(ModelError, match="bad.mlmodel: not a valid Core ML model"):
        load_model(p)


@pytest.mark.invalid_models("text.mlmodel", reason="a protobuf with no model type: the input refused")
def test_not_a_model_at_all(tmp_path):
    p = tmp_path / "text.mlmodel"
    p.write_bytes(b"\x08\x04")  # a valid protobuf: specificationVersion=4 and nothing else
    with pytest.raises(ModelError, match="no model type found"):
        load_model(p)


def test_mlprogram_refused():
    m = proto.Model(specificationVersion=7)
    m.mlProgram = b""
    with pytest.raises(ModelError, match=r"is an ML program's model.mlmodel on its own; load its .mlpackage directory"):
        load_model(m.SerializeToString())


@pytest.mark.invalid_models("m.mlpackage", reason="an empty .mlpackage directory (no manifest): the input refused")
def test_mlpackage_directory_refused(tmp_path):
    d = tmp_path / "m.mlpackage"
    d.mkdir()
    with pytest.raises(ModelError, match=r"m\.mlpackage: .*Manifest\.json"):
        load_model(d)


def test_weight_count_mismatch_names_the_layer():
    m = small_model()
    network(m).layers[2].innerProduct.weights.floatValue = np.zeros(7, "<f4").tobytes()
    with pytest.raises(ModelError, match=r"layer 'dense' \(innerProduct\) field weights: holds 7 values but .* imply 320"):
        quantize_weights(m, 8)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_weights_refused(bad):
    m = small_model()
    w = np.frombuffer(network(m).layers[0].convolution.weights.floatValue, "<f4").copy()
    w[3] = bad
    network(m).layers[0].convolution.weights.floatValue = w.tobytes()
    with pytest.raises(ModelError, match=r"layer 'conv1' \(convolution\) field weights: 1 NaN or Inf"):
        quantize_weights(m, 8)


def test_non_neural_network_model_refused():
    m = proto.Model(specificationVersion=1)
    m.glmClassifier = b""
    with pytest.raises(ModelError, match="glmClassifier model has no neural-network weights"):
        quantize_weights(m, 8)


def test_already_quantized_weights_are_left_with_a_warning():
    q = quantize_weights(small_model(), 8)
    with pytest.warns(UserWarning, match=r"4 weight\(s\) already quantized, left as they are: layer 'conv1'"):
        again = quantize_weights(q, 4)
    assert again.SerializeToString() == q.SerializeToString()  # nothing re-rounded
    again = quantize_weights(quantize_weights(q, 8, "dequantization"), 4)
    assert again.spec.neuralNetwork.layers[0].convolution.weights.quantization.numberOfBits == 4


@pytest.mark.parametrize(
    "nbits, mode, message",
    [
        (9, "linear", "nbits must be 1..8"),
        (0, "linear", "nbits must be 1..8"),
        (1, "linear_symmetric", "1-bit symmetric"),
        (4, "bogus", "Invalid quantization mode 'bogus'"),
    ],
)
def test_impossible_settings(nbits, mode, message):
    with pytest.raises(ModelError, match=message):
        quantize_weights(small_model(), nbits, mode)


def test_fp16_overflow_refused():
    m = small_model()
    w = np.frombuffer(network(m).layers[2].innerProduct.weights.floatValue, "<f4").copy()
    w[0] = 1e6
    network(m).layers[2].innerProduct.weights.floatValue = w.tobytes()
    with pytest.raises(ModelError, match=r"'dense'.*do not fit float16"):
        quantize_weights(m, 16)


def test_record_predicate_selector():
    """mlqpipe's own selector interface: a callable on weight records."""
    q = quantize_weights(small_model(), 4, selector=lambda rec: rec.layer == "dense" and rec.field == "weights")
    from mlqpipe import inventory

    stored = {r.id: str(r.storage) for r in inventory(q.spec)}
    assert stored == {"conv1:weights": "float32", "conv1:bias": "float32", "dense:weights": "linear4", "dense:bias": "float32"}
    with pytest.raises(TypeError, match="selector must have do_quantize"):
        quantize_weights(small_model(), 4, selector=42)
