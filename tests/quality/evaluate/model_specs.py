"""Specs of Core ML's non-network models and pipelines for evaluator tests, built with coremltools' own proto
classes, interface helpers and pipeline classes (independent of mlqpipe's message definitions). Parameters
come from fitted scikit-learn estimators, which also give the reference outputs."""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.evaluate.models import run_model
from tests.quality.evaluate.harness import coremltools, spec_of


def datatypes():
    coremltools()
    from coremltools.models import datatypes as dt

    return dt


def _new(kind: str):
    ct = coremltools()
    spec = ct.proto.Model_pb2.Model()
    spec.specificationVersion = ct.SPECIFICATION_VERSION
    getattr(spec, kind).SetInParent()
    return spec


def transform(kind: str, inputs, outputs):
    """A model of type `kind` with the given [(name, datatype)] inputs and outputs; fill its parameters."""
    from coremltools.models._interface_management import set_transform_interface_params

    return set_transform_interface_params(_new(kind), inputs, outputs)


def classifier(kind: str, inputs, labels, outputs=None):
    from coremltools.models._interface_management import set_classifier_interface_params

    return set_classifier_interface_params(_new(kind), inputs, labels, kind, outputs)


def regressor(kind: str, inputs, output: str = "prediction"):
    from coremltools.models._interface_management import set_regressor_interface_params

    return set_regressor_interface_params(_new(kind), inputs, output)


def pipeline(kind: str, inputs, outputs, models):
    """coremltools' Pipeline / PipelineClassifier (outputs: its class labels) / PipelineRegressor, with
    `models` added in order; the outer specificationVersion is the highest of its models'."""
    coremltools()
    from coremltools.models import pipeline as pl

    cls = {"pipeline": pl.Pipeline, "pipelineClassifier": pl.PipelineClassifier, "pipelineRegressor": pl.PipelineRegressor}[kind]
    p = cls(inputs, outputs)
    for m in models:
        p.add_model(m)
    p.spec.specificationVersion = max([p.spec.specificationVersion] + [m.specificationVersion for m in models])
    return p.spec


def save(tmp_path, **specs) -> None:
    """Write the specs as .mlmodel files: Core ML's validator judges every model a test writes (conftest)."""
    for name, spec in specs.items():
        (tmp_path / f"{name}.mlmodel").write_bytes(spec.SerializeToString())


def run(spec, feeds: dict) -> dict:
    """mlqpipe's outputs for coremltools spec `spec` (through bytes); feeds are passed as given."""
    return run_model(spec_of(spec), feeds)


# --- from scikit-learn estimators -------------------------------------------------------------------------------


def scaler(sk, inp: str, out: str, width: int):
    """StandardScaler: Core ML's scale * (x + shift), shift = -mean, scale = 1 / scale_."""
    dt = datatypes()
    spec = transform("scaler", [(inp, dt.Array(width))], [(out, dt.Array(width))])
    spec.scaler.shiftValue.extend((-sk.mean_).tolist())
    spec.scaler.scaleValue.extend((1.0 / sk.scale_).tolist())
    return spec


def glm_classifier(coefs, intercepts, labels, inp: str, width: int, *, one_vs_rest=True, probit=False, outputs=None):
    dt = datatypes()
    spec = classifier("glmClassifier", [(inp, dt.Array(width))], list(labels), outputs)
    g = spec.glmClassifier
    for row in np.atleast_2d(coefs):
        g.weights.add().value.extend(np.asarray(row, dtype=np.float64).tolist())
    g.offset.extend(np.atleast_1d(np.asarray(intercepts, dtype=np.float64)).tolist())
    g.postEvaluationTransform = g.Probit if probit else g.Logit
    g.classEncoding = g.OneVsRest if one_vs_rest else g.ReferenceClass
    return spec


def glm_regressor(coef, intercept, inp: str, width: int, output: str = "prediction", transform_name: str = "NoTransform"):
    dt = datatypes()
    spec = regressor("glmRegressor", [(inp, dt.Array(width))], output)
    g = spec.glmRegressor
    g.weights.add().value.extend(np.asarray(coef, dtype=np.float64).ravel().tolist())
    g.offset.append(float(intercept))
    g.postEvaluationTransform = getattr(g, transform_name)
    return spec


def network(layers, inp: str, width: int, out: str, *, classifier_labels=None):
    """A classic neural network of [(W (in, out), b)] layers as scikit-learn's MLP stores them: innerProduct,
    ReLU between layers, then softmax for a classifier (labels given) or the last layer's raw output."""
    from coremltools.models.neural_network import NeuralNetworkBuilder

    dt = datatypes()
    b = NeuralNetworkBuilder([(inp, dt.Array(width))], [(out, dt.Array(layers[-1][0].shape[1]))],
                             mode="classifier" if classifier_labels is not None else None)
    blob = inp
    for i, (w, bias) in enumerate(layers):
        last = i == len(layers) - 1
        dense = out if last and classifier_labels is None else f"dense{i}"
        b.add_inner_product(f"dense{i}", w.T, bias, w.shape[0], w.shape[1], True, blob, dense)
        blob = dense
        if not last:
            b.add_activation(f"relu{i}", "RELU", blob, f"relu{i}")
            blob = f"relu{i}"
    if classifier_labels is not None:
        b.add_softmax("softmax", blob, out)
        b.set_class_labels(list(classifier_labels), prediction_blob=out)
    return b.spec
