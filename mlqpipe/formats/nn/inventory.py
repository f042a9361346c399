"""The weight inventory: one record per WeightParams anywhere in a model.

Selection, plans, reports and `inspect` all work from these records. A record keeps a reference to its
protobuf objects, so the engine can rewrite the blob it describes; everything else about it is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any, ClassVar

import numpy as np

from mlqpipe.formats.base import WeightRecord as BaseRecord
from mlqpipe.formats.nn.layers import Slot, layer_type, weight_slots
from mlqpipe.formats.nn.structure import iter_layers, neural_networks
from mlqpipe.formats.nn.weights import Storage, read_values, storage_of, stored_count


@dataclass(kw_only=True)
class WeightRecord(BaseRecord):
    """One weight blob (WeightParams) of a neural-network model.

    id: `[models[i]/][layer.subnetwork/]layer:slot`, unique and stable; where: the same, for messages.
    model_path / network_path: "" at the top; "models[1]/" inside pipelines, "loop_1.bodyNetwork/" inside
      branch/loop networks (`network` is both). layer_type ("convolution", ...), field ("weights", "bias",
      "gamma", "inputGateWeightMatrix", ...), slot_path (the field's path inside the layer's parameters).
    shape: logical shape from the layer's parameters (None when the layer does not say); axis: the output-
      channel axis per-channel scales use (None: per tensor); count: number of values.
    storage: how it is stored; compares equal to its printed form ("float32", "float16", "linear8",
      "lut4", "int8", "empty"); `storage.kind` drops the bit count, `storage.is_quantized` asks directly.
    updatable, expected (the layer's flags, e.g. hasBias, say the blob holds data), is_bias,
      coremltools (coremltools' quantize_weights would quantize it), in_channels, out_channels, groups,
      depthwise, kernel_channels (convolutions), layer_weight_count (values of the layer's first blob).
    values() / float_values(): the numbers as float32 (dequantized if needed; the latter refuses NaN/Inf).
    """

    model_path: str  # "" or "models[1]/" inside pipelines
    network_path: str  # "" or "loop_1.bodyNetwork/" for nested networks
    slot_path: str
    coremltools: bool
    is_bias: bool
    expected: bool  # the layer's flags (hasBias, ...) say this blob holds data
    in_channels: int | None
    out_channels: int | None
    groups: int
    depthwise: bool
    kernel_channels: int | None = None
    layer_weight_count: int | None = None
    layer_msg: Any = field(repr=False, compare=False, default=None)
    wp: Any = field(repr=False, compare=False, default=None)
    network_msg: Any = field(repr=False, compare=False, default=None)
    model_spec: Any = field(repr=False, compare=False, default=None)

    CONDITIONS: ClassVar[frozenset[str]] = frozenset({"in_channels", "out_channels", "kernel_channels", "layer_weight_count",
                                                      "depthwise", "position", "coremltools_selector"})
    FORMAT: ClassVar[str] = "neuralnetwork"

    @property
    def id(self) -> str:
        """Unique, stable name: `[models[i]/][layer.subnetwork/]layer:slot`."""
        return f"{self.model_path}{self.network_path}{self.layer}:{self.slot_path}"

    @property
    def where(self) -> str:
        return f"layer '{self.layer}' ({self.layer_type}) field {self.slot_path}" + (
            f" in {self.model_path}{self.network_path}".rstrip("/") if self.model_path or self.network_path else ""
        )

    @property
    def names(self) -> tuple[str, ...]:
        return (self.field, self.slot_path)

    @property
    def field_path(self) -> str:
        return self.slot_path

    @property
    def nbytes(self) -> int:
        """Bytes of weight data as currently stored (parameters of quantized blobs included)."""
        wp = self.wp
        q = wp.quantization
        extra = 4 * (len(q.linearQuantization.scale) + len(q.linearQuantization.bias) + len(q.lookupTableQuantization.floatValue))
        return len(wp.floatValue) + len(wp.float16Value) + len(wp.rawValue) + len(wp.int8RawValue) + extra

    def values(self, count: int | None = None) -> np.ndarray:
        """The blob's numbers as float32 in its logical shape (dequantized when stored quantized).

        `count`: for a quantized blob whose layer does not say its size (PReLU alpha: 1 or C values, known
        from the input's shape only), how many values to read; the caller knows it (the float blob before
        quantization, the evaluator's input)."""
        if count is not None and not self.count:
            return read_values(self.wp, count, self.where)
        flat = read_values(self.wp, self.count, self.where, shape=self.shape, axis=self.axis, groups=self.groups)
        return flat.reshape(self.shape) if self.shape and flat.size == prod(self.shape) else flat


def inventory(spec, *, include_empty: bool = False) -> list[WeightRecord]:
    """Every weight blob of every neural network in `spec` (our Model message; the public
    `mlqpipe.inventory` also takes paths, bytes and coremltools specs: registry.inventory_of)."""
    records = []
    for model_path, model_spec, nn in neural_networks(spec):
        for net_path, network, layer in iter_layers(nn):
            records += layer_records(model_path, net_path, network, layer, model_spec, include_empty=include_empty)
    return records


def layer_records(model_path, net_path, network, layer, model_spec, *, include_empty=False) -> list[WeightRecord]:
    """The records of one layer's blobs (empty ones only when asked)."""
    records = []
    slots = weight_slots(layer)
    layer_weight_count = prod(slots[0].shape) if slots and slots[0].shape else None
    for slot in slots:
        st = storage_of(slot.wp)
        if st.kind != "empty" or include_empty:
            records.append(_record(model_path, net_path, network, layer, slot, st, model_spec, layer_weight_count))
    return records


def _record(model_path, net_path, network, layer, slot: Slot, st: Storage, model_spec, layer_weight_count) -> WeightRecord:
    count = prod(slot.shape) if slot.shape is not None else stored_count(slot.wp, st)
    kind = layer_type(layer)
    # coremltools' definition (AdvancedQuantizedLayerSelector): one kernel channel, several groups
    depthwise = kind == "convolution" and int(layer.convolution.kernelChannels) == 1 and slot.groups > 1
    return WeightRecord(
        model_path=model_path,
        network_path=net_path,
        network=model_path + net_path,
        layer=layer.name,
        layer_type=kind,
        field=slot.field,
        slot_path=slot.path,
        shape=slot.shape if slot.shape is not None else (count,),
        axis=slot.axis,
        count=count,
        storage=st,
        updatable=bool(layer.isUpdatable or slot.wp.isUpdatable),
        coremltools=slot.coremltools,
        is_bias=slot.is_bias,
        expected=slot.expected,
        in_channels=slot.in_channels,
        out_channels=slot.out_channels,
        groups=slot.groups,
        depthwise=depthwise,
        kernel_channels=int(layer.convolution.kernelChannels) if kind == "convolution" else None,
        layer_weight_count=layer_weight_count,
        layer_msg=layer,
        wp=slot.wp,
        network_msg=network,
        model_spec=model_spec,
    )


def topological_layers(network) -> list:
    """The network's own layers (not branch/loop bodies) in topological order of their blobs, ties kept in
    stored order (converters store layers in order; this only matters when they do not)."""
    import heapq

    layers = list(network.layers)
    producer = {}
    for i, layer in enumerate(layers):
        for blob in layer.output:
            producer.setdefault(blob, i)
    deps = [{producer[b] for b in layer.input if b in producer and producer[b] != i} for i, layer in enumerate(layers)]
    users: dict[int, list[int]] = {}
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    order += [i for i in range(len(layers)) if i not in set(order)]  # a cycle (invalid model): stored order
    return [layers[i] for i in order]


def edge_layers(spec) -> dict[tuple[str, str], set[str]]:
    """(model path, layer name) -> {"first", "last"}: the first and last layer holding weights of every
    neural network of the model, in topological order; each network of a pipeline counts on its own,
    branch and loop bodies do not."""
    out: dict[tuple[str, str], set[str]] = {}
    for model_path, _, nn in neural_networks(spec):
        weighted = [layer for layer in topological_layers(nn)
                    if any(storage_of(s.wp).kind != "empty" for s in weight_slots(layer))]
        if weighted:
            out.setdefault((model_path, weighted[0].name), set()).add("first")
            out.setdefault((model_path, weighted[-1].name), set()).add("last")
    return out

