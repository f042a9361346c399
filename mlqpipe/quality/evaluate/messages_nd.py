"""Message definitions for the parameters of ND layers (specification 4 and later: reshapeStatic, gather,
reduceSum, ...) that our model I/O keeps opaque: pure definitions, no evaluation code.

The evaluator parses a copy of a layer's bytes when it runs the layer. Field numbers and types are Core ML's
(NeuralNetwork.proto); enums are int32. Layers whose parameters hold weights or sub-networks (batchedMatmul,
embeddingND, loadConstantND, layerNormalization, branch, loop) are real messages in coreml/proto.py already.
"""

from __future__ import annotations

from mlqpipe.formats.protoschema import build_messages

_SCHEMA = """
message NoParams

message Axis
  1 axis int64

message Axes
  1 axes int64 repeated

message Value
  1 value float

message AlphaAt1
  1 alpha float

message AlphaAt2
  2 alpha float

message TargetShape
  1 targetShape int64 repeated

message UnsignedTargetShape
  1 targetShape uint64 repeated

message TransposeLayerParams
  1 axes uint64 repeated

message ConcatNDLayerParams
  1 axis int64
  2 interleave bool

message ReverseLayerParams
  1 reverseDim bool repeated

message ReverseSeqLayerParams
  1 batchAxis int64
  2 sequenceAxis int64

message FillStaticLayerParams
  1 value float
  2 targetShape uint64 repeated

message ScatterLayerParams
  1 axis int64
  2 mode int32

message ScatterNDLayerParams
  1 mode int32

message ConstantPaddingLayerParams
  1 value float
  2 padAmounts uint64 repeated
  3 padToGivenOutputSizeMode bool

message ReduceParams
  1 axes int64 repeated
  2 keepDims bool
  3 reduceAll bool

message SqueezeLayerParams
  1 axes int64 repeated
  2 squeezeAll bool

message TopKLayerParams
  1 axis int64
  2 K uint64
  3 useBottomK bool

message ArgParams
  1 axis int64
  2 removeDim bool

message SplitNDLayerParams
  1 axis int64
  2 numSplits uint64
  3 splitSizes uint64 repeated

message ClipLayerParams
  1 minVal float
  2 maxVal float

message SliceStaticLayerParams
  1 beginIds int64 repeated
  2 beginMasks bool repeated
  3 endIds int64 repeated
  4 endMasks bool repeated
  5 strides int64 repeated
  6 squeezeMasks bool repeated

message SliceDynamicLayerParams
  2 beginMasks bool repeated
  3 endIds int64 repeated
  4 endMasks bool repeated
  5 strides int64 repeated
  6 squeezeMasks bool repeated

message TileLayerParams
  1 reps uint64 repeated

message GeluLayerParams
  1 mode int32

message RangeStaticLayerParams
  1 endValue float
  2 startValue float
  3 stepSizeValue float

message RangeDynamicLayerParams
  2 startValue float
  3 stepSizeValue float

message SlidingWindowsLayerParams
  1 axis int64
  2 windowSize uint64
  3 step uint64

message MatrixBandPartLayerParams
  1 numLower int64
  2 numUpper int64

message TriangularLayerParams
  1 k int64

message ClampedReLULayerParams
  1 alpha float
  2 beta float

message ArgSortLayerParams
  1 axis int64
  2 descending bool

message SliceBySizeLayerParams
  2 size int64
  3 axis int64

message OneHotLayerParams
  1 oneHotVectorSize uint64
  2 axis int64
  3 onValue float
  4 offValue float

message CumSumLayerParams
  1 axis int64
  2 excludeFinalSum bool
  3 reverse bool
"""

_C = build_messages(_SCHEMA, "mlqpipe.quality.evaluate.nd")

_PARAMETERLESS = """
whereBroadcastable whereNonZero getShape gatherND reshapeLike reshapeDynamic broadcastToLike broadcastToDynamic
addBroadcastable subtractBroadcastable multiplyBroadcastable divideBroadcastable maxBroadcastable minBroadcastable
powBroadcastable modBroadcastable floorDivBroadcastable logicalAnd logicalOr logicalXor logicalNot
ceil floor sign round exp2 sin cos tan asin acos atan sinh cosh tanh asinh acosh atanh erf
""".split()

LAYER_PARAMS = {kind: _C["NoParams"] for kind in _PARAMETERLESS} | {
    "transpose": _C["TransposeLayerParams"],
    "concatND": _C["ConcatNDLayerParams"],
    "softmaxND": _C["Axis"],
    "reverse": _C["ReverseLayerParams"],
    "reverseSeq": _C["ReverseSeqLayerParams"],
    "fillLike": _C["Value"],
    "fillStatic": _C["FillStaticLayerParams"],
    "fillDynamic": _C["Value"],
    "broadcastToStatic": _C["UnsignedTargetShape"],
    "gather": _C["Axis"],
    "gatherAlongAxis": _C["Axis"],
    "stack": _C["Axis"],
    "flattenTo2D": _C["Axis"],
    "scatter": _C["ScatterLayerParams"],
    "scatterAlongAxis": _C["ScatterLayerParams"],
    "scatterND": _C["ScatterNDLayerParams"],
    "reshapeStatic": _C["TargetShape"],
    "rankPreservingReshape": _C["TargetShape"],
    "constantPad": _C["ConstantPaddingLayerParams"],
    "expandDims": _C["Axes"],
    "squeeze": _C["SqueezeLayerParams"],
    "topK": _C["TopKLayerParams"],
    "argMax": _C["ArgParams"],
    "argMin": _C["ArgParams"],
    "splitND": _C["SplitNDLayerParams"],
    "clip": _C["ClipLayerParams"],
    "sliceStatic": _C["SliceStaticLayerParams"],
    "sliceDynamic": _C["SliceDynamicLayerParams"],
    "tile": _C["TileLayerParams"],
    "gelu": _C["GeluLayerParams"],
    "rangeStatic": _C["RangeStaticLayerParams"],
    "rangeDynamic": _C["RangeDynamicLayerParams"],
    "slidingWindows": _C["SlidingWindowsLayerParams"],
    "matrixBandPart": _C["MatrixBandPartLayerParams"],
    "lowerTriangular": _C["TriangularLayerParams"],
    "upperTriangular": _C["TriangularLayerParams"],
    "clampedReLU": _C["ClampedReLULayerParams"],
    "argSort": _C["ArgSortLayerParams"],
    "sliceBySize": _C["SliceBySizeLayerParams"],
    "oneHot": _C["OneHotLayerParams"],
    "cumSum": _C["CumSumLayerParams"],
    # comparisons: the scalar used with one input sits at field 1 or 2, as Core ML numbered them
    "equal": _C["AlphaAt1"],
    "notEqual": _C["AlphaAt1"],
    "lessThan": _C["AlphaAt2"],
    "lessEqual": _C["AlphaAt2"],
    "greaterThan": _C["AlphaAt2"],
    "greaterEqual": _C["AlphaAt2"],
}
for _kind in "reduceSum reduceMean reduceProd reduceMax reduceMin reduceL1 reduceL2 reduceLogSum reduceSumSquare reduceLogSumExp".split():
    LAYER_PARAMS[_kind] = _C["ReduceParams"]
