"""Make the demo model: a small multilayer perceptron trained on scikit-learn's bundled digits data.

Writes `digits_mlp.mlmodel` and `digits_cnn.mlmodel` (Core ML neuralNetworkClassifiers built with mlqpipe's
own messages) and `digits_test.npz` (held-out images, labels and scikit-learn's own predictions). Both are committed, so the
demo needs no training; rerun this script to regenerate them (deterministic for a given scikit-learn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlqpipe.formats.nn import proto
from mlqpipe.formats.description import DOUBLE, ModelDescription

HERE = Path(__file__).resolve().parent
_VECTOR = proto.build_messages("message Int64Vector\n  1 vector int64 repeated\n", "mlqpipe.demo")["Int64Vector"]


def train():
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    train_idx, test_idx = order[:1400], order[1400:]
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=400, random_state=0)
    clf.fit(X[train_idx] / 16.0, y[train_idx])
    return clf, X[test_idx], y[test_idx]


def to_coreml(clf) -> "proto.Model":
    m = proto.Model(specificationVersion=1)
    nn = m.neuralNetworkClassifier
    scale = nn.layers.add(name="input_scale", input=["image"], output=["scaled"])
    scale.scale.shapeScale.append(1)
    scale.scale.scale.floatValue = np.array([1 / 16], "<f4").tobytes()
    blob = "scaled"
    for i, (W, b) in enumerate(zip(clf.coefs_, clf.intercepts_), start=1):
        dense = nn.layers.add(name=f"dense_{i}", input=[blob], output=[f"dense_{i}_out"])
        ip = dense.innerProduct
        ip.inputChannels, ip.outputChannels, ip.hasBias = W.shape[0], W.shape[1], True
        ip.weights.floatValue = np.ascontiguousarray(W.T, "<f4").tobytes()  # Core ML: [out, in]
        ip.bias.floatValue = np.asarray(b, "<f4").tobytes()
        blob = f"dense_{i}_out"
        if i < len(clf.coefs_):
            relu = nn.layers.add(name=f"relu_{i}", input=[blob], output=[f"relu_{i}_out"])
            relu.activation.ReLU = b""
            blob = f"relu_{i}_out"
    nn.layers.add(name="softmax", input=[blob], output=["classProbability"]).softmax = b""
    nn.int64ClassLabels = _VECTOR(vector=[int(c) for c in clf.classes_]).SerializeToString()
    nn.labelProbabilityLayerName = "classProbability"

    desc = ModelDescription(predictedFeatureName="classLabel", predictedProbabilitiesName="classProbability")
    image = desc.input.add(name="image", shortDescription="8x8 digit, pixel values 0..16, row major")
    image.type.multiArrayType.shape.append(64)
    image.type.multiArrayType.dataType = DOUBLE
    label = desc.output.add(name="classLabel")
    label.type.int64Type = b""
    probs = desc.output.add(name="classProbability")
    probs.type.dictionaryType.int64KeyType = b""
    m.description = desc.SerializeToString()
    return m


def train_cnn():
    """PCA filters -> standardisation -> logistic regression, all learned from the digits training split."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    pipe = make_pipeline(PCA(32, random_state=0), StandardScaler(), LogisticRegression(max_iter=2000))
    pipe.fit(X[order[:1400]].astype(np.float64), y[order[:1400]])
    return pipe


def cnn_to_coreml(pipe) -> "proto.Model":
    """The sklearn pipeline as Core ML layers: an 8x8 'valid' convolution with the PCA components as its
    32 filters (bias -components @ mean), a batchnorm doing the standardisation, and the linear head."""
    pca, scaler, logreg = (step for _, step in pipe.steps)
    m = proto.Model(specificationVersion=1)
    nn = m.neuralNetworkClassifier
    conv = nn.layers.add(name="pca_conv", input=["image"], output=["features"]).convolution
    conv.outputChannels, conv.kernelChannels, conv.nGroups = 32, 1, 1
    conv.kernelSize.extend([8, 8])
    conv.stride.extend([1, 1])
    conv.valid = b""
    conv.hasBias = True
    conv.weights.floatValue = pca.components_.astype("<f4").tobytes()
    conv.bias.floatValue = (-pca.components_ @ pca.mean_).astype("<f4").tobytes()
    bn = nn.layers.add(name="standardize", input=["features"], output=["standardized"]).batchnorm
    bn.channels, bn.epsilon = 32, 1e-9
    bn.gamma.floatValue = np.ones(32, "<f4").tobytes()
    bn.beta.floatValue = np.zeros(32, "<f4").tobytes()
    bn.mean.floatValue = scaler.mean_.astype("<f4").tobytes()
    bn.variance.floatValue = scaler.var_.astype("<f4").tobytes()
    flat = nn.layers.add(name="flatten", input=["standardized"], output=["flat"])
    flat.flatten = b""
    head = nn.layers.add(name="classifier", input=["flat"], output=["logits"]).innerProduct
    head.inputChannels, head.outputChannels, head.hasBias = 32, 10, True
    head.weights.floatValue = logreg.coef_.astype("<f4").tobytes()
    head.bias.floatValue = logreg.intercept_.astype("<f4").tobytes()
    nn.layers.add(name="softmax", input=["logits"], output=["classProbability"]).softmax = b""
    nn.int64ClassLabels = _VECTOR(vector=[int(c) for c in logreg.classes_]).SerializeToString()
    nn.labelProbabilityLayerName = "classProbability"
    desc = ModelDescription(predictedFeatureName="classLabel", predictedProbabilitiesName="classProbability")
    image = desc.input.add(name="image", shortDescription="8x8 digit, pixel values 0..16, shape [1, 8, 8]")
    image.type.multiArrayType.shape.extend([1, 8, 8])
    image.type.multiArrayType.dataType = DOUBLE
    desc.output.add(name="classLabel").type.int64Type = b""
    desc.output.add(name="classProbability").type.dictionaryType.int64KeyType = b""
    m.description = desc.SerializeToString()
    return m


def main() -> None:
    clf, X_test, y_test = train()
    cnn = train_cnn()
    (HERE / "digits_mlp.mlmodel").write_bytes(to_coreml(clf).SerializeToString())
    (HERE / "digits_cnn.mlmodel").write_bytes(cnn_to_coreml(cnn).SerializeToString())
    np.savez_compressed(
        HERE / "digits_test.npz", X=X_test, y=y_test, sklearn_pred=clf.predict(X_test / 16.0),
        sklearn_cnn_pred=cnn.predict(X_test.astype(np.float64)), input_name="image",
    )
    print(f"MLP test accuracy {np.mean(clf.predict(X_test / 16.0) == y_test):.3f}, "
          f"CNN {np.mean(cnn.predict(X_test.astype(np.float64)) == y_test):.3f}; "
          "wrote digits_mlp.mlmodel, digits_cnn.mlmodel, digits_test.npz")


if __name__ == "__main__":
    main()
