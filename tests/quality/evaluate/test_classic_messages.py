"""Our message definitions for classic layer parameters (mlqpipe/quality/evaluate/messages.py) against coremltools'
generated descriptors of NeuralNetwork.proto: same field numbers, names and repetition, every field
declared (a sub-message may be kept as bytes: the wire format is the same), and coremltools' bytes read back
to the same values."""

from __future__ import annotations

import pytest

from mlqpipe.quality.evaluate import messages
from tests.quality.evaluate import harness as H

CLASSIC = ["pooling", "flatten", "reshape", "permute", "concat", "add", "multiply", "softmax", "padding", "crop", "upsample",
           "resizeBilinear", "cropResize", "lrn", "mvn", "l2normalize", "reorganizeData", "sequenceRepeat", "split", "slice",
           "dot", "unary", "reduce", "average", "max", "min"]
OURS_ONLY = {"Empty": {1}, "SoftmaxLayerParams": {1}}  # placeholder fields of parameterless messages


def _theirs(kind):
    nn = pytest.importorskip("coremltools.proto.NeuralNetwork_pb2")
    return nn.NeuralNetworkLayer.DESCRIPTOR.fields_by_name[kind].message_type


def _compare(ours, theirs, seen):
    if (ours.full_name, theirs.full_name) in seen:
        return
    seen.add((ours.full_name, theirs.full_name))
    mine = {f.number: f for f in ours.fields if f.number not in OURS_ONLY.get(ours.name, set())}
    assert set(mine) == {f.number for f in theirs.fields}, (ours.name, theirs.name)
    for f in theirs.fields:
        m = mine[f.number]
        assert (m.name, m.is_repeated) == (f.name, f.is_repeated), (ours.name, f.name)
        if f.message_type is not None and m.message_type is not None:
            _compare(m.message_type, f.message_type, seen)
        elif f.message_type is None:
            assert m.message_type is None and (m.type == f.type or f.enum_type is not None), (ours.name, f.name)


@pytest.mark.parametrize("kind", CLASSIC)
def test_definitions_match_coremltools(kind):
    H.coremltools()
    _compare(messages.LAYER_PARAMS[kind].DESCRIPTOR, _theirs(kind), set())


def test_coremltools_bytes_read_back():
    H.coremltools()
    from coremltools.proto import NeuralNetwork_pb2 as nn

    p = nn.CropResizeLayerParams(targetSize=[3, 4], normalizedCoordinates=True, spatialScale=0.5)
    p.mode.samplingMethod = 1
    p.boxIndicesMode.boxMode = 1
    ours = messages.LAYER_PARAMS["cropResize"].FromString(p.SerializeToString())
    assert (list(ours.targetSize), ours.normalizedCoordinates, ours.spatialScale, ours.mode.samplingMethod,
            ours.boxIndicesMode.boxMode) == ([3, 4], True, 0.5, 1, 1)
    s = nn.SliceLayerParams(startIndex=-3, endIndex=-1, stride=2, axis=2)
    ours = messages.LAYER_PARAMS["slice"].FromString(s.SerializeToString())
    assert (ours.startIndex, ours.endIndex, ours.stride, ours.axis) == (-3, -1, 2, 2)
    u = nn.UpsampleLayerParams(fractionalScalingFactor=[1.5, 2.5], mode=1, linearUpsampleMode=2)
    ours = messages.LAYER_PARAMS["upsample"].FromString(u.SerializeToString())
    assert (list(ours.fractionalScalingFactor), ours.mode, ours.linearUpsampleMode) == ([1.5, 2.5], 1, 2)
