"""coremltools' layer selectors and which blobs they pick: the one owner of these semantics.

`quantize_weights` (compat.py) and recipe rules (`coremltools_selector:` settings and `python:` rules naming a
QuantizedLayerSelector, in select.py) both ask `select_like_coremltools`, so a selector picks the same
blobs whichever way it is used. The walk follows coremltools 9.0: layers in order, nested networks only
inside selected branch/loop layers, biases of convolution / innerProduct / batchedMatmul asked separately
(`weight_param="bias"`), blobs the layer's flags mark unused left alone.
"""

from __future__ import annotations

from mlqpipe.formats.nn.fold import blob_uses, fold_network
from mlqpipe.formats.nn.inventory import WeightRecord, inventory, layer_records
from mlqpipe.formats.nn.layers import COREMLTOOLS_SELECTOR_TYPES, nested_networks
from mlqpipe.formats.nn.structure import neural_networks, output_names

_QUANTIZABLE = COREMLTOOLS_SELECTOR_TYPES


class QuantizedLayerSelector:
    """Selects every layer type coremltools quantizes; subclass and override `do_quantize` to customise."""

    def __init__(self):
        self.quantizable_layer_types = set(_QUANTIZABLE)

    def do_quantize(self, layer, **kwargs) -> bool:
        return layer.WhichOneof("layer") in self.quantizable_layer_types


class AdvancedQuantizedLayerSelector(QuantizedLayerSelector):
    """coremltools' selector: skip layer types, and small convolutions (weights only).

    Reproduced exactly, including coremltools' quirk that every non-convolution layer type is treated like
    innerProduct (its test `layer_type == "innerProduct" or "batchedMatmul"` is always true), so `"bias"` in
    skip_layer_types also skips biases of innerProduct and batchedMatmul, and nothing else.
    """

    def __init__(self, skip_layer_types=(), minimum_conv_kernel_channels=4, minimum_conv_weight_count=4096):
        super().__init__()
        invalid = [t for t in skip_layer_types if t not in self.quantizable_layer_types]
        if invalid:
            raise ValueError(
                f"Skip quantization layer types ({','.join(invalid)}) is not supported. "
                f"Supported: {', '.join(sorted(self.quantizable_layer_types))}"
            )
        self.skip_layer_types = list(skip_layer_types)
        self.minimum_conv_kernel_channels = minimum_conv_kernel_channels
        self.minimum_conv_weight_count = minimum_conv_weight_count

    def do_quantize(self, layer, weight_param=None) -> bool:
        if not super().do_quantize(layer):
            return False
        kind = layer.WhichOneof("layer")
        if kind in self.skip_layer_types:
            return False
        if weight_param not in (None, "weights", "bias"):
            raise ValueError(f"Unrecognized quantization weight field {weight_param}")
        if weight_param == "bias":
            return "bias" not in self.skip_layer_types
        if kind == "convolution":
            c = layer.convolution
            kc, groups = int(c.kernelChannels), int(c.nGroups)
            count = int(c.outputChannels) * kc * int(c.kernelSize[0]) * int(c.kernelSize[1])
            if "depthwiseConv" in self.skip_layer_types and kc == 1 and groups > 1:
                return False
            if kc < self.minimum_conv_kernel_channels or count < self.minimum_conv_weight_count:
                return False
        return True


class MatrixMultiplyLayerSelector(QuantizedLayerSelector):
    """coremltools' selector for innerProduct / batchedMatmul by weight count, channels and names.

    `include_layers_with_names` works here (coremltools 9.0 raises AttributeError when it is given).
    """

    def __init__(
        self,
        minimum_weight_count=1,
        minimum_input_channels=1,
        minimum_output_channels=1,
        maximum_input_channels=None,
        maximum_output_channels=None,
        include_layers_with_names=None,
    ):
        super().__init__()
        names = [] if include_layers_with_names is None else include_layers_with_names
        if not (isinstance(names, (list, tuple)) and all(isinstance(s, str) for s in names)):
            raise ValueError("Property 'include_layers_with_names' must be a list/tuple of str objects")
        self.minimum_weight_count = minimum_weight_count
        self.minimum_input_channels = minimum_input_channels
        self.minimum_output_channels = minimum_output_channels
        self.maximum_input_channels = maximum_input_channels
        self.maximum_output_channels = maximum_output_channels
        self.include_layers_with_names = list(names)

    def do_quantize(self, layer, weight_param=None) -> bool:
        if not super().do_quantize(layer):
            return False
        kind = layer.WhichOneof("layer")
        if kind in ("loop", "branch"):
            return True
        if kind not in ("innerProduct", "batchedMatmul"):
            return False
        if weight_param == "bias":
            return True
        if weight_param not in (None, "weights"):
            raise ValueError(f"Unrecognized quantization weight field {weight_param}")
        if kind == "innerProduct":
            ic, oc = int(layer.innerProduct.inputChannels), int(layer.innerProduct.outputChannels)
        else:
            ic = int(layer.batchedMatmul.weightMatrixFirstDimension)
            oc = int(layer.batchedMatmul.weightMatrixSecondDimension)
        return not (
            ic * oc < self.minimum_weight_count
            or ic < self.minimum_input_channels
            or oc < self.minimum_output_channels
            or (self.maximum_input_channels and ic > self.maximum_input_channels)
            or (self.maximum_output_channels and oc > self.maximum_output_channels)
            or (self.include_layers_with_names and layer.name not in self.include_layers_with_names)
        )


SELECTORS = {"default": QuantizedLayerSelector, "advanced": AdvancedQuantizedLayerSelector,
             "matrix_multiply": MatrixMultiplyLayerSelector}  # recipe `coremltools_selector: {type: ...}`


def select_like_coremltools(spec, selector, fold: bool = False) -> list[WeightRecord]:
    """The blobs coremltools' quantize_weights would touch with this selector, in its order; with `fold`,
    each network is folded when the walk reaches it, as coremltools does below 16 bits.

    `selector` is a QuantizedLayerSelector (ours, coremltools', or a subclass: `do_quantize(layer, ...)`),
    or mlqpipe's own selector interface: any callable taking a WeightRecord and returning True to quantize
    it (recipe rules implement this one; it may pick any weight, not only those coremltools handles).
    """
    if not hasattr(selector, "do_quantize"):
        if not callable(selector):
            raise TypeError("selector must have do_quantize(layer, ...) or be a callable(weight_record) -> bool")
        return [rec for rec in inventory(spec) if selector(rec)]
    chosen: list[WeightRecord] = []
    protected = output_names(spec)
    for model_path, model_spec, nn in neural_networks(spec):
        folding = (protected, blob_uses(nn)) if fold else None
        _select_network(nn, selector, chosen, model_path, "", model_spec, folding)
    return chosen


def _unused_by_coremltools(rec: WeightRecord) -> bool:
    """Blobs the layer's flags mark unused (hasBias false, ...) are left alone by coremltools — except LSTM
    bias vectors, which it quantizes whatever hasBiasVectors says."""
    lstm_bias = rec.layer_type in ("uniDirectionalLSTM", "biDirectionalLSTM") and rec.field.endswith("BiasVector")
    return not rec.expected and not lstm_bias


def _select_network(network, selector, chosen, model_path, net_path, model_spec, folding=None) -> None:
    if folding is not None:
        fold_network(network, *folding, f"{model_path}{net_path}")
    for layer in network.layers:
        kind = layer.WhichOneof("layer")
        if not selector.do_quantize(layer):
            continue
        for name, sub in nested_networks(layer):
            _select_network(sub, selector, chosen, model_path, f"{net_path}{layer.name}.{name}/", model_spec, folding)
        for rec in layer_records(model_path, net_path, network, layer, model_spec):
            if not rec.coremltools or _unused_by_coremltools(rec):
                continue
            if rec.field == "bias" and kind in ("convolution", "innerProduct", "batchedMatmul"):
                if not selector.do_quantize(layer, weight_param="bias"):
                    continue
            chosen.append(rec)
