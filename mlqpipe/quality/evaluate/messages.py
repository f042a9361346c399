"""Message definitions for the layer parameters our model I/O keeps opaque (pooling, flatten, ...): pure
definitions, no evaluation code.

The model spec stores these sub-messages as bytes (we never rewrite them); the evaluator parses a copy when it
needs a kernel size or a padding amount. Field numbers are Core ML's (NeuralNetwork.proto).
"""

from __future__ import annotations

from mlqpipe.formats.protoschema import build_messages

_SCHEMA = """
message EdgeSizes
  1 startEdgeSize uint64
  2 endEdgeSize uint64

message BorderAmounts
  10 borderAmounts EdgeSizes repeated

message ValidPadding
  1 paddingAmounts BorderAmounts

message SamePadding
  1 asymmetryMode int32

message PoolingLayerParams
  1 type int32
  10 kernelSize uint64 repeated
  20 stride uint64 repeated
  oneof PoolingPaddingType
    30 valid bytes
    31 same bytes
    32 includeLastPixel bytes
  50 avgPoolExcludePadding bool
  60 globalPooling bool

message FlattenLayerParams
  1 mode int32

message ReshapeLayerParams
  1 targetShape int64 repeated
  2 mode int32

message PermuteLayerParams
  1 axis uint64 repeated

message ConcatLayerParams
  100 sequenceConcat bool

message AddLayerParams
  1 alpha float

message MultiplyLayerParams
  1 alpha float

message SoftmaxLayerParams
  1 unused bool

message AlphaBeta
  1 alpha float
  2 beta float

message ActivationKinds
  oneof NonlinearityType
    5 linear AlphaBeta
    10 ReLU bytes
    15 leakyReLU AlphaBeta
    20 thresholdedReLU AlphaBeta
    25 PReLU bytes
    30 tanh bytes
    31 scaledTanh AlphaBeta
    40 sigmoid bytes
    41 sigmoidHard AlphaBeta
    50 ELU AlphaBeta
    60 softsign bytes
    70 softplus bytes
    71 parametricSoftplus bytes

message ImageScaler
  10 channelScale float
  20 blueBias float
  21 greenBias float
  22 redBias float
  30 grayBias float

message Preprocessing
  1 featureName string
  10 scaler ImageScaler
  11 meanImage bytes

message StringVector
  1 vector string repeated

message Int64Vector
  1 vector int64 repeated

message Empty
  1 unused bool

message ValidCompletePadding
  10 paddingAmounts uint64 repeated

message PaddingConstant
  1 value float

message PaddingLayerParams
  oneof PaddingType
    1 constant PaddingConstant
    2 reflection bytes
    3 replication bytes
  10 paddingAmounts BorderAmounts

message CropLayerParams
  1 cropAmounts BorderAmounts
  5 offset uint64 repeated

message SamplingMode
  1 samplingMethod int32

message BoxCoordinatesMode
  1 boxMode int32

message UpsampleLayerParams
  1 scalingFactor uint64 repeated
  5 mode int32
  6 linearUpsampleMode int32
  7 fractionalScalingFactor float repeated

message ResizeBilinearLayerParams
  1 targetSize uint64 repeated
  2 mode SamplingMode

message CropResizeLayerParams
  1 targetSize uint64 repeated
  2 normalizedCoordinates bool
  3 mode SamplingMode
  4 boxIndicesMode BoxCoordinatesMode
  5 spatialScale float

message LRNLayerParams
  1 alpha float
  2 beta float
  3 localSize uint64
  4 k float

message MeanVarianceNormalizeLayerParams
  1 acrossChannels bool
  2 normalizeVariance bool
  3 epsilon float

message L2NormalizeLayerParams
  1 epsilon float

message ReorganizeDataLayerParams
  1 mode int32
  2 blockSize uint64

message SequenceRepeatLayerParams
  1 nRepetitions uint64

message SplitLayerParams
  1 nOutputs uint64

message SliceLayerParams
  1 startIndex int64
  2 endIndex int64
  3 stride uint64
  4 axis int32

message DotProductLayerParams
  1 cosineSimilarity bool

message UnaryFunctionLayerParams
  1 type int32
  2 alpha float
  3 epsilon float
  4 shift float
  5 scale float

message ReduceLayerParams
  1 mode int32
  2 epsilon float
  3 axis int32
"""

_C = build_messages(_SCHEMA, "mlqpipe.quality.evaluate")
ValidPadding, SamePadding, ValidCompletePadding = _C["ValidPadding"], _C["SamePadding"], _C["ValidCompletePadding"]
Preprocessing, StringVector, Int64Vector = _C["Preprocessing"], _C["StringVector"], _C["Int64Vector"]
LAYER_PARAMS = {
    "pooling": _C["PoolingLayerParams"],
    "flatten": _C["FlattenLayerParams"],
    "reshape": _C["ReshapeLayerParams"],
    "permute": _C["PermuteLayerParams"],
    "concat": _C["ConcatLayerParams"],
    "add": _C["AddLayerParams"],
    "multiply": _C["MultiplyLayerParams"],
    "softmax": _C["SoftmaxLayerParams"],
    "padding": _C["PaddingLayerParams"],
    "crop": _C["CropLayerParams"],
    "upsample": _C["UpsampleLayerParams"],
    "resizeBilinear": _C["ResizeBilinearLayerParams"],
    "cropResize": _C["CropResizeLayerParams"],
    "lrn": _C["LRNLayerParams"],
    "mvn": _C["MeanVarianceNormalizeLayerParams"],
    "l2normalize": _C["L2NormalizeLayerParams"],
    "reorganizeData": _C["ReorganizeDataLayerParams"],
    "sequenceRepeat": _C["SequenceRepeatLayerParams"],
    "split": _C["SplitLayerParams"],
    "slice": _C["SliceLayerParams"],
    "dot": _C["DotProductLayerParams"],
    "unary": _C["UnaryFunctionLayerParams"],
    "reduce": _C["ReduceLayerParams"],
}


for _kind in ("copy", "loopBreak", "loopContinue", "average", "max", "min"):  # parameterless layers
    LAYER_PARAMS[_kind] = _C["Empty"]


def activation_kind(raw: bytes) -> str | None:
    """The activation an ActivationParams kept as bytes names (recurrent layers list them)."""
    return _C["ActivationKinds"].FromString(raw).WhichOneof("NonlinearityType")


_ALPHA_BETA = {"linear", "leakyReLU", "thresholdedReLU", "scaledTanh", "sigmoidHard", "ELU"}


def activation_params(p, kind: str) -> dict:
    """alpha / beta of an activation: `p` is an ActivationParams message (sub-messages as bytes) or its
    bytes (parsed as ActivationKinds, sub-messages typed); {} for kinds without them."""
    if kind not in _ALPHA_BETA:
        return {}
    if isinstance(p, bytes):
        p = _C["ActivationKinds"].FromString(p)
    msg = getattr(p, kind)
    if isinstance(msg, bytes):
        msg = _C["AlphaBeta"].FromString(msg)
    return {"alpha": msg.alpha, "beta": msg.beta}
