"""Message definitions for the non-network model types our Model keeps as opaque bytes (scaler, normalizer,
imputer, featureVectorizer, arrayFeatureExtractor, oneHotEncoder, dictVectorizer, GLM classifier and
regressor): pure definitions, no evaluation code.

Field numbers are Core ML's (Scaler.proto, Normalizer.proto, Imputer.proto, FeatureVectorizer.proto,
ArrayFeatureExtractor.proto, OneHotEncoder.proto, DictVectorizer.proto, GLMClassifier.proto,
GLMRegressor.proto, DataStructures.proto). Enums are declared as int32 (the same varint on the wire) with
their values below; nested messages are top-level here (names are not on the wire); map fields are repeated
entry messages (what a map is on the wire).
"""

from __future__ import annotations

from mlqpipe.formats.protoschema import build_messages

_PACKAGE = "mlqpipe.quality.evaluate.models"

_SCHEMA = """
message StringVector
  1 vector string repeated

message Int64Vector
  1 vector int64 repeated

message DoubleVector
  1 vector double repeated

message StringToDoubleEntry
  1 key string
  2 value double

message StringToDoubleMap
  1 map StringToDoubleEntry repeated

message Int64ToDoubleEntry
  1 key int64
  2 value double

message Int64ToDoubleMap
  1 map Int64ToDoubleEntry repeated

message Scaler
  1 shiftValue double repeated
  2 scaleValue double repeated

message Normalizer
  1 normType int32

message Imputer
  oneof ImputedValue
    1 imputedDoubleValue double
    2 imputedInt64Value int64
    3 imputedStringValue string
    4 imputedDoubleArray DoubleVector
    5 imputedInt64Array Int64Vector
    6 imputedStringDictionary StringToDoubleMap
    7 imputedInt64Dictionary Int64ToDoubleMap
  oneof ReplaceValue
    11 replaceDoubleValue double
    12 replaceInt64Value int64
    13 replaceStringValue string

message InputColumn
  1 inputColumn string
  2 inputDimensions uint64

message FeatureVectorizer
  1 inputList InputColumn repeated

message ArrayFeatureExtractor
  1 extractIndex uint64 repeated

message OneHotEncoder
  oneof CategoryType
    1 stringCategories StringVector
    2 int64Categories Int64Vector
  10 outputSparse bool
  11 handleUnknown int32

message DictVectorizer
  oneof Map
    1 stringToIndex StringVector
    2 int64ToIndex Int64Vector

message DoubleArray
  1 value double repeated

message GLMClassifier
  1 weights DoubleArray repeated
  2 offset double repeated
  3 postEvaluationTransform int32
  4 classEncoding int32
  oneof ClassLabels
    100 stringClassLabels StringVector
    101 int64ClassLabels Int64Vector

message GLMRegressor
  1 weights DoubleArray repeated
  2 offset double repeated
  3 postEvaluationTransform int32
"""

# enum values
NORM_LMAX, NORM_L1, NORM_L2 = 0, 1, 2  # Normalizer.NormType
CLASSIFIER_LOGIT, CLASSIFIER_PROBIT = 0, 1  # GLMClassifier.PostEvaluationTransform
REFERENCE_CLASS, ONE_VS_REST = 0, 1  # GLMClassifier.ClassEncoding
REGRESSOR_NO_TRANSFORM, REGRESSOR_LOGIT, REGRESSOR_PROBIT = 0, 1, 2  # GLMRegressor.PostEvaluationTransform
ERROR_ON_UNKNOWN, IGNORE_UNKNOWN = 0, 1  # OneHotEncoder.HandleUnknown


_C = build_messages(_SCHEMA, _PACKAGE)

# Model.Type field name -> the message its bytes hold
MODEL_PARAMS = {
    "scaler": _C["Scaler"],
    "normalizer": _C["Normalizer"],
    "imputer": _C["Imputer"],
    "featureVectorizer": _C["FeatureVectorizer"],
    "arrayFeatureExtractor": _C["ArrayFeatureExtractor"],
    "oneHotEncoder": _C["OneHotEncoder"],
    "dictVectorizer": _C["DictVectorizer"],
    "glmClassifier": _C["GLMClassifier"],
    "glmRegressor": _C["GLMRegressor"],
}
