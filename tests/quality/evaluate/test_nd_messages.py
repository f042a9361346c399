"""Our ND layer-parameter messages against coremltools' generated descriptors (field numbers, names and types
must be Core ML's), and the ND layer table against them."""

import pytest

from mlqpipe.quality.evaluate import forward
from mlqpipe.quality.evaluate.layers_nd import LAYERS
from mlqpipe.quality.evaluate.messages_nd import LAYER_PARAMS

from .harness import coremltools

ENUM, INT32 = 14, 5  # FieldDescriptor types: our definitions write enums as int32 (same wire format)


def _layer_field(kind):
    coremltools()
    from coremltools.proto import NeuralNetwork_pb2

    return NeuralNetwork_pb2.NeuralNetworkLayer.DESCRIPTOR.fields_by_name[kind]


@pytest.mark.parametrize("kind", sorted(LAYER_PARAMS))
def test_fields_match_core_ml(kind):
    theirs = _layer_field(kind).message_type
    ours = LAYER_PARAMS[kind].DESCRIPTOR
    assert {f.number: f.name for f in ours.fields} == {f.number: f.name for f in theirs.fields}, kind
    for f in theirs.fields:
        mine = ours.fields_by_number[f.number]
        assert mine.type == f.type or (f.type == ENUM and mine.type == INT32), (kind, f.name)
        assert mine.is_repeated == f.is_repeated, (kind, f.name)


def test_every_nd_layer_has_its_parameters_and_a_core_ml_layer_number():
    real_messages = {"batchedMatmul", "embeddingND", "loadConstantND", "layerNormalization"}  # parsed by coreml/proto.py
    assert set(LAYERS) - set(LAYER_PARAMS) == real_messages
    assert set(LAYER_PARAMS) <= set(LAYERS)
    for kind in LAYERS:
        assert _layer_field(kind).number > 0


def test_nd_layers_are_in_the_runner_and_control_flow_stays_there():
    assert set(LAYERS) <= set(forward.LAYERS)
    assert {"branch", "loop", "loopBreak", "loopContinue", "copy"} <= set(forward.LAYERS) - set(LAYERS)
