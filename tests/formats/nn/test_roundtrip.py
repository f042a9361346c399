from hypothesis import given, settings, strategies as st

from mlqpipe import load_model
from tests.builders import add_inner_product, model, network, small_model


def test_real_models_round_trip_byte_for_byte(real_model):
    data = real_model.read_bytes()
    assert load_model(real_model).SerializeToString() == data


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _metadata_description(entries):
    # ModelDescription.metadata (100) -> Metadata.userDefined (100) map<string,string>
    user = b"".join(_field(100, _field(1, k.encode()) + _field(2, v.encode())) for k, v in entries)
    return _field(100, user)


def test_user_defined_metadata_keeps_its_order():
    m = small_model()
    entries = [("zeta", "1"), ("alpha", "2"), ("mid", "3"), ("beta", "4")]
    m.description = _metadata_description(entries)
    data = m.SerializeToString()
    assert load_model(data).SerializeToString() == data


def test_unknown_fields_and_empty_present_messages_survive():
    m = small_model()
    layer = network(m).layers[0]
    layer.convolution.valid = b""  # empty-but-present sub-message
    data = m.SerializeToString()
    # inject an unknown field (number 9999) into the WeightParams of the first layer and at top level
    extra = _field(9999, b"future")
    wp = layer.convolution.weights
    data = data + extra
    reparsed = load_model(data)
    assert reparsed.SerializeToString() == data
    assert reparsed.spec.neuralNetwork.layers[0].convolution.HasField("valid")
    assert wp.floatValue  # untouched


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.booleans(),
    st.sampled_from(["<f4", "<f2"]),
    st.integers(0, 2**31),
)
def test_round_trip_generated(ic, oc, bias, dtype, seed):
    m = model("neuralNetworkClassifier", version=4)
    add_inner_product(network(m), "ip", "x", "y", ic, oc, bias=bias, dtype=dtype, seed=seed)
    data = m.SerializeToString()
    again = load_model(data)
    assert again.SerializeToString() == data
    assert load_model(again).SerializeToString() == data


def test_accepts_foreign_spec_objects_without_modifying_them():
    m = small_model()
    before = m.SerializeToString()

    class FakeMLModel:
        def get_spec(self):
            return m

    for obj in (m, FakeMLModel(), before, bytearray(before)):
        loaded = load_model(obj)
        loaded.spec.specificationVersion = 99
        assert m.SerializeToString() == before
        assert loaded.SerializeToString() != before
