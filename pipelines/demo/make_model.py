"""Make the demo model: a small multilayer perceptron trained on scikit-learn's bundled digits data.

Writes `digits_mlp.mlmodel` (a Core ML neuralNetworkClassifier built with mlqpipe's own messages) and
`digits_test.npz` (held-out images, labels and scikit-learn's own predictions). Both are committed, so the
demo needs no training; rerun this script to regenerate them (deterministic for a given scikit-learn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlqpipe.coreml import proto
from mlqpipe.coreml.description import DOUBLE, ModelDescription

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


def main() -> None:
    clf, X_test, y_test = train()
    (HERE / "digits_mlp.mlmodel").write_bytes(to_coreml(clf).SerializeToString())
    np.savez_compressed(
        HERE / "digits_test.npz", X=X_test, y=y_test, sklearn_pred=clf.predict(X_test / 16.0), input_name="image"
    )
    print(f"test accuracy {np.mean(clf.predict(X_test / 16.0) == y_test):.3f}; wrote digits_mlp.mlmodel, digits_test.npz")


if __name__ == "__main__":
    main()
