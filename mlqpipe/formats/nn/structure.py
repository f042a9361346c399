"""The structure of a neural-network Model message: which networks it holds (pipelines included), their
layers (branch and loop bodies included) and its declared outputs. The bottom of the format's modules:
it reads messages only, so inventory, checks, versions, I/O and folding all build on it, one way."""

from __future__ import annotations

from typing import Any, Iterator

from mlqpipe.formats.description import read_description
from mlqpipe.formats.nn.layers import nested_networks

NN_TYPES = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
PIPELINE_TYPES = ("pipeline", "pipelineClassifier", "pipelineRegressor")


def pipeline_of(spec):
    kind = spec.WhichOneof("Type")
    return spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline


def neural_networks(spec, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(model path, model spec, neural-network message) for every neural network, pipelines included."""
    kind = spec.WhichOneof("Type")
    if kind in NN_TYPES:
        yield path, spec, getattr(spec, kind)
    elif kind in PIPELINE_TYPES:
        for i, sub in enumerate(pipeline_of(spec).models):
            yield from neural_networks(sub, f"{path}models[{i}]/")


def output_names(spec) -> set[str]:
    """Names of the model's declared outputs (read from the opaque description)."""
    names = {f.name for f in read_description(spec).output}
    if spec.WhichOneof("Type") in PIPELINE_TYPES:
        for sub in pipeline_of(spec).models:
            names |= output_names(sub)
    return names


def iter_layers(network, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(network path, network, layer) for every layer, descending into branch and loop sub-networks."""
    for layer in network.layers:
        yield prefix, network, layer
        for name, sub in nested_networks(layer):
            yield from iter_layers(sub, f"{prefix}{layer.name}.{name}/")
