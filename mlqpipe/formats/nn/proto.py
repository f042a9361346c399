"""Our own protobuf definitions for the part of the Core ML format mlqpipe touches.

Why not coremltools' generated modules: importing coremltools costs seconds, and generated `_pb2` files pin a
protoc version. Instead the descriptors are built at import time from the small table below (field numbers
are public facts of the Core ML specification).

Two choices keep load -> save byte-identical:
- every field of every message on the path from Model down to WeightParams is declared, so re-serialisation
  keeps the original field order; sub-messages we never look inside are declared as `bytes` (same wire
  format), which also sidesteps map re-ordering in ModelDescription and custom-layer parameters;
- the file uses proto2 semantics, so every singular field has presence: an explicitly written default or an
  empty-but-present sub-message survives a round trip.

`WeightParams.floatValue` and the other large float arrays are declared as `bytes`: a packed repeated float
is a length-delimited run of little-endian float32s on the wire, so numpy reads and writes it without
per-element conversion (milliseconds instead of seconds for millions of weights).
"""

from __future__ import annotations

from mlqpipe.formats.protoschema import build_messages, model_message

_PACKAGE = "mlqpipe.formats.nn"

# One message per block. A field line: `number name type [repeated]`. Types are protobuf scalar names or a
# message name from this table; `oneof NAME` opens a group that runs to the next blank-indented line.
_SCHEMA = """
message Pipeline
  1 models Model repeated
  2 names string repeated

message PipelineClassifier
  1 pipeline Pipeline

message PipelineRegressor
  1 pipeline Pipeline

message NeuralNetwork
  1 layers NeuralNetworkLayer repeated
  2 preprocessing bytes repeated
  5 arrayInputShapeMapping int32
  6 imageInputShapeMapping int32
  10 updateParams bytes

message NeuralNetworkClassifier
  1 layers NeuralNetworkLayer repeated
  2 preprocessing bytes repeated
  5 arrayInputShapeMapping int32
  6 imageInputShapeMapping int32
  10 updateParams bytes
  oneof ClassLabels
    100 stringClassLabels bytes
    101 int64ClassLabels bytes
  200 labelProbabilityLayerName string

message NeuralNetworkRegressor
  1 layers NeuralNetworkLayer repeated
  2 preprocessing bytes repeated
  5 arrayInputShapeMapping int32
  6 imageInputShapeMapping int32
  10 updateParams bytes

message WeightParams
  1 floatValue bytes
  2 float16Value bytes
  30 rawValue bytes
  31 int8RawValue bytes
  40 quantization QuantizationParams
  50 isUpdatable bool

message QuantizationParams
  1 numberOfBits uint64
  oneof QuantizationType
    101 linearQuantization LinearQuantizationParams
    102 lookupTableQuantization LookUpTableQuantizationParams

message LinearQuantizationParams
  1 scale float repeated
  2 bias float repeated

message LookUpTableQuantizationParams
  1 floatValue float repeated

message ConvolutionLayerParams
  1 outputChannels uint64
  2 kernelChannels uint64
  10 nGroups uint64
  20 kernelSize uint64 repeated
  30 stride uint64 repeated
  40 dilationFactor uint64 repeated
  oneof ConvolutionPaddingType
    50 valid bytes
    51 same bytes
  60 isDeconvolution bool
  70 hasBias bool
  90 weights WeightParams
  91 bias WeightParams
  100 outputShape uint64 repeated

message InnerProductLayerParams
  1 inputChannels uint64
  2 outputChannels uint64
  10 hasBias bool
  20 weights WeightParams
  21 bias WeightParams
  22 int8DynamicQuantize bool

message EmbeddingLayerParams
  1 inputDim uint64
  2 outputChannels uint64
  10 hasBias bool
  20 weights WeightParams
  21 bias WeightParams

message EmbeddingNDLayerParams
  1 vocabSize uint64
  2 embeddingSize uint64
  3 hasBias bool
  20 weights WeightParams
  21 bias WeightParams

message BatchnormLayerParams
  1 channels uint64
  5 computeMeanVar bool
  6 instanceNormalization bool
  10 epsilon float
  15 gamma WeightParams
  16 beta WeightParams
  17 mean WeightParams
  18 variance WeightParams

message ScaleLayerParams
  1 shapeScale uint64 repeated
  2 scale WeightParams
  3 hasBias bool
  4 shapeBias uint64 repeated
  5 bias WeightParams

message BiasLayerParams
  1 shape uint64 repeated
  2 bias WeightParams

message LoadConstantLayerParams
  1 shape uint64 repeated
  2 data WeightParams

message LoadConstantNDLayerParams
  1 shape uint64 repeated
  2 data WeightParams

message SimpleRecurrentLayerParams
  1 inputVectorSize uint64
  2 outputVectorSize uint64
  10 activation bytes
  15 sequenceOutput bool
  20 hasBiasVector bool
  30 weightMatrix WeightParams
  31 recursionMatrix WeightParams
  32 biasVector WeightParams
  100 reverseInput bool

message GRULayerParams
  1 inputVectorSize uint64
  2 outputVectorSize uint64
  10 activations bytes repeated
  15 sequenceOutput bool
  20 hasBiasVectors bool
  30 updateGateWeightMatrix WeightParams
  31 resetGateWeightMatrix WeightParams
  32 outputGateWeightMatrix WeightParams
  50 updateGateRecursionMatrix WeightParams
  51 resetGateRecursionMatrix WeightParams
  52 outputGateRecursionMatrix WeightParams
  70 updateGateBiasVector WeightParams
  71 resetGateBiasVector WeightParams
  72 outputGateBiasVector WeightParams
  100 reverseInput bool

message LSTMParams
  10 sequenceOutput bool
  20 hasBiasVectors bool
  30 forgetBias bool
  40 hasPeepholeVectors bool
  50 coupledInputAndForgetGate bool
  60 cellClipThreshold float

message LSTMWeightParams
  1 inputGateWeightMatrix WeightParams
  2 forgetGateWeightMatrix WeightParams
  3 blockInputWeightMatrix WeightParams
  4 outputGateWeightMatrix WeightParams
  20 inputGateRecursionMatrix WeightParams
  21 forgetGateRecursionMatrix WeightParams
  22 blockInputRecursionMatrix WeightParams
  23 outputGateRecursionMatrix WeightParams
  40 inputGateBiasVector WeightParams
  41 forgetGateBiasVector WeightParams
  42 blockInputBiasVector WeightParams
  43 outputGateBiasVector WeightParams
  60 inputGatePeepholeVector WeightParams
  61 forgetGatePeepholeVector WeightParams
  62 outputGatePeepholeVector WeightParams

message UniDirectionalLSTMLayerParams
  1 inputVectorSize uint64
  2 outputVectorSize uint64
  10 activations bytes repeated
  15 params LSTMParams
  20 weightParams LSTMWeightParams
  100 reverseInput bool

message BiDirectionalLSTMLayerParams
  1 inputVectorSize uint64
  2 outputVectorSize uint64
  10 activationsForwardLSTM bytes repeated
  11 activationsBackwardLSTM bytes repeated
  15 params LSTMParams
  20 weightParams LSTMWeightParams repeated

message BatchedMatMulLayerParams
  1 transposeA bool
  2 transposeB bool
  5 weightMatrixFirstDimension uint64
  6 weightMatrixSecondDimension uint64
  7 hasBias bool
  8 weights WeightParams
  9 bias WeightParams
  10 int8DynamicQuantize bool

message ActivationPReLU
  1 alpha WeightParams

message ActivationParametricSoftplus
  1 alpha WeightParams
  2 beta WeightParams

message ActivationParams
  oneof NonlinearityType
    5 linear bytes
    10 ReLU bytes
    15 leakyReLU bytes
    20 thresholdedReLU bytes
    25 PReLU ActivationPReLU
    30 tanh bytes
    31 scaledTanh bytes
    40 sigmoid bytes
    41 sigmoidHard bytes
    50 ELU bytes
    60 softsign bytes
    70 softplus bytes
    71 parametricSoftplus ActivationParametricSoftplus

message LayerNormalizationLayerParams
  1 normalizedShape int64 repeated
  2 eps float
  3 gamma WeightParams
  4 beta WeightParams

message Convolution3DLayerParams
  1 outputChannels int32
  2 inputChannels int32
  10 nGroups int32
  20 kernelDepth int32
  21 kernelHeight int32
  22 kernelWidth int32
  31 strideDepth int32
  32 strideHeight int32
  33 strideWidth int32
  40 dilationDepth int32
  41 dilationHeight int32
  42 dilationWidth int32
  50 hasBias bool
  60 weights WeightParams
  61 bias WeightParams
  70 paddingType int32
  80 customPaddingFront int32
  81 customPaddingBack int32
  82 customPaddingTop int32
  83 customPaddingBottom int32
  84 customPaddingLeft int32
  85 customPaddingRight int32
  86 isDeconvolution bool
  87 outputShape uint64 repeated

message CustomLayerParams
  10 className string
  20 weights WeightParams repeated
  30 parameters bytes repeated
  40 description string

message BranchLayerParams
  1 ifBranch NeuralNetwork
  2 elseBranch NeuralNetwork

message LoopLayerParams
  1 maxLoopIterations uint64
  2 conditionVar string
  3 conditionNetwork NeuralNetwork
  4 bodyNetwork NeuralNetwork

message NeuralNetworkLayer
  1 name string
  2 input string repeated
  3 output string repeated
  4 inputTensor bytes repeated
  5 outputTensor bytes repeated
  10 isUpdatable bool
  oneof layer
    @LAYERS
"""

# Every layer type of NeuralNetworkLayer's `layer` oneof, by field number. Types with weights (or nested
# networks) get a real message; the rest stay opaque bytes.
_LAYERS = """
100 convolution ConvolutionLayerParams; 120 pooling; 130 activation ActivationParams;
140 innerProduct InnerProductLayerParams; 150 embedding EmbeddingLayerParams;
160 batchnorm BatchnormLayerParams; 165 mvn; 170 l2normalize; 175 softmax; 180 lrn; 190 crop; 200 padding;
210 upsample; 211 resizeBilinear; 212 cropResize; 220 unary; 230 add; 231 multiply; 240 average;
245 scale ScaleLayerParams; 250 bias BiasLayerParams; 260 max; 261 min; 270 dot; 280 reduce;
290 loadConstant LoadConstantLayerParams; 300 reshape; 301 flatten; 310 permute; 320 concat; 330 split;
340 sequenceRepeat; 345 reorganizeData; 350 slice; 400 simpleRecurrent SimpleRecurrentLayerParams;
410 gru GRULayerParams; 420 uniDirectionalLSTM UniDirectionalLSTMLayerParams;
430 biDirectionalLSTM BiDirectionalLSTMLayerParams; 500 custom CustomLayerParams; 600 copy;
605 branch BranchLayerParams; 615 loop LoopLayerParams; 620 loopBreak; 625 loopContinue; 635 rangeStatic;
640 rangeDynamic; 660 clip; 665 ceil; 670 floor; 680 sign; 685 round; 700 exp2; 710 sin; 715 cos; 720 tan;
730 asin; 735 acos; 740 atan; 750 sinh; 755 cosh; 760 tanh; 770 asinh; 775 acosh; 780 atanh; 790 erf;
795 gelu; 815 equal; 820 notEqual; 825 lessThan; 827 lessEqual; 830 greaterThan; 832 greaterEqual;
840 logicalOr; 845 logicalXor; 850 logicalNot; 855 logicalAnd; 865 modBroadcastable; 870 minBroadcastable;
875 maxBroadcastable; 880 addBroadcastable; 885 powBroadcastable; 890 divideBroadcastable;
895 floorDivBroadcastable; 900 multiplyBroadcastable; 905 subtractBroadcastable; 920 tile; 925 stack;
930 gather; 935 scatter; 940 gatherND; 945 scatterND; 950 softmaxND; 952 gatherAlongAxis;
954 scatterAlongAxis; 960 reverse; 965 reverseSeq; 975 splitND; 980 concatND; 985 transpose;
995 sliceStatic; 1000 sliceDynamic; 1005 slidingWindows; 1015 topK; 1020 argMin; 1025 argMax;
1040 embeddingND EmbeddingNDLayerParams; 1045 batchedMatmul BatchedMatMulLayerParams; 1065 getShape;
1070 loadConstantND LoadConstantNDLayerParams; 1080 fillLike; 1085 fillStatic; 1090 fillDynamic;
1100 broadcastToLike; 1105 broadcastToStatic; 1110 broadcastToDynamic; 1120 squeeze; 1125 expandDims;
1130 flattenTo2D; 1135 reshapeLike; 1140 reshapeStatic; 1145 reshapeDynamic; 1150 rankPreservingReshape;
1155 constantPad; 1170 randomNormalLike; 1175 randomNormalStatic; 1180 randomNormalDynamic;
1190 randomUniformLike; 1195 randomUniformStatic; 1200 randomUniformDynamic; 1210 randomBernoulliLike;
1215 randomBernoulliStatic; 1220 randomBernoulliDynamic; 1230 categoricalDistribution; 1250 reduceL1;
1255 reduceL2; 1260 reduceMax; 1265 reduceMin; 1270 reduceSum; 1275 reduceProd; 1280 reduceMean;
1285 reduceLogSum; 1290 reduceSumSquare; 1295 reduceLogSumExp; 1313 whereNonZero; 1315 matrixBandPart;
1320 lowerTriangular; 1325 upperTriangular; 1330 whereBroadcastable;
1350 layerNormalization LayerNormalizationLayerParams; 1400 NonMaximumSuppression; 1450 oneHot;
1455 cumSum; 1460 clampedReLU; 1461 argSort; 1465 pooling3d; 1466 globalPooling3d; 1470 sliceBySize;
1471 convolution3d Convolution3DLayerParams
"""

def _layer_lines() -> str:
    entries = [e.split() for e in _LAYERS.replace("\n", " ").split(";") if e.strip()]
    return "\n".join(f"    {e[0]} {e[1]} {e[2] if len(e) > 2 else 'bytes'}" for e in entries)


# the model types this format looks inside; the others stay opaque bytes
_MODEL = model_message(pipelineClassifier="PipelineClassifier", pipelineRegressor="PipelineRegressor", pipeline="Pipeline",
                       neuralNetworkRegressor="NeuralNetworkRegressor", neuralNetworkClassifier="NeuralNetworkClassifier",
                       neuralNetwork="NeuralNetwork")
_CLASSES = build_messages(_MODEL + _SCHEMA.replace("@LAYERS", _layer_lines().strip()), _PACKAGE)
Model = _CLASSES["Model"]
NeuralNetwork = _CLASSES["NeuralNetwork"]
NeuralNetworkLayer = _CLASSES["NeuralNetworkLayer"]
WeightParams = _CLASSES["WeightParams"]
Pipeline = _CLASSES["Pipeline"]


def message_class(name: str):
    """The message class called `name` in our definitions (for tests and builders)."""
    return _CLASSES[name]
