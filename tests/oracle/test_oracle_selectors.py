"""Layer selectors: mlqpipe's own, coremltools' instances and user subclasses give coremltools' bytes."""

import pytest

ct = pytest.importorskip("coremltools")

import mlqpipe  # noqa: E402
from coremltools.models.neural_network import quantization_utils as ctq  # noqa: E402

from tests.oracle import oracle_models as O  # noqa: E402


def _skip_dense_2(base):
    """The selector of coremltools' QuantizedLayerSelector docstring: everything but layer "dense_2"."""

    class SkipDense2(base):
        def do_quantize(self, layer, **kwargs):
            ret = super().do_quantize(layer)
            if not ret or layer.name == "dense_2":
                return False
            return True

    return SkipDense2()


def _website_example(base):
    """The variant printed on coremltools' "Compressing Neural Network Weights" page.

    Its comment says it skips dense_2, but `return True` there quantizes dense_2 (and anything the base
    class rejects) and skips every other layer: reproduced as written, bug included.
    """

    class WebsiteExample(base):
        def do_quantize(self, layer, **kwargs):
            ret = super().do_quantize(layer)
            if not ret or layer.name == "dense_2":
                return True
            return False

    return WebsiteExample()


def _only_recurrent_and_biases(base):
    """A user selector that looks at the weight_param keyword as well."""

    class Picky(base):
        def do_quantize(self, layer, weight_param=None, **kwargs):
            if not super().do_quantize(layer):
                return False
            kind = layer.WhichOneof("layer")
            if weight_param == "bias":
                return kind == "innerProduct"
            return kind in ("gru", "uniDirectionalLSTM", "biDirectionalLSTM", "simpleRecurrent", "innerProduct", "loop", "branch")

    return Picky()


# name -> function(module providing the classes) -> selector instance
SELECTORS = {
    "none": None,
    "base": lambda mod: mod.QuantizedLayerSelector(),
    "adv_default": lambda mod: mod.AdvancedQuantizedLayerSelector(),
    "adv_skip_bias": lambda mod: mod.AdvancedQuantizedLayerSelector(
        skip_layer_types=["bias"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=1
    ),
    "adv_skip_depthwise": lambda mod: mod.AdvancedQuantizedLayerSelector(
        skip_layer_types=["depthwiseConv"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=10
    ),
    "adv_skip_types": lambda mod: mod.AdvancedQuantizedLayerSelector(
        skip_layer_types=["innerProduct", "batchnorm", "embedding"], minimum_conv_kernel_channels=2, minimum_conv_weight_count=100
    ),
    "adv_skip_conv_scale": lambda mod: mod.AdvancedQuantizedLayerSelector(skip_layer_types=["convolution", "scale", "gru"]),
    "adv_sizes": lambda mod: mod.AdvancedQuantizedLayerSelector(minimum_conv_kernel_channels=8, minimum_conv_weight_count=1000),
    "adv_skip_bias_depthwise": lambda mod: mod.AdvancedQuantizedLayerSelector(
        skip_layer_types=["bias", "depthwiseConv", "loadConstant"], minimum_conv_kernel_channels=1, minimum_conv_weight_count=1
    ),
    "matmul_default": lambda mod: mod.MatrixMultiplyLayerSelector(),
    "matmul_count": lambda mod: mod.MatrixMultiplyLayerSelector(minimum_weight_count=600),
    "matmul_channels": lambda mod: mod.MatrixMultiplyLayerSelector(
        minimum_input_channels=16, minimum_output_channels=8, maximum_input_channels=48, maximum_output_channels=16
    ),
    "skip_dense_2": lambda mod: _skip_dense_2(mod.QuantizedLayerSelector),
    "picky": lambda mod: _only_recurrent_and_biases(mod.QuantizedLayerSelector),
}
MODELS = ["conv_family", "dense", "folds", "embeddings_misc", "recurrent", "nested", "channels"]


def _make(name, mod):
    factory = SELECTORS[name]
    return None if factory is None else factory(mod)


@pytest.mark.parametrize("nbits", [8, 3, 16])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("selector", sorted(SELECTORS))
def test_selector_same_bytes(selector, model, nbits):
    """coremltools with its selector == mlqpipe with ours == mlqpipe given coremltools' selector object."""
    data = O.zoo_bytes(model)
    # coremltools crashes on an explicit selector=None (AttributeError); mlqpipe takes it as the default
    their_kwargs = {} if selector == "none" else {"selector": _make(selector, ctq)}
    theirs = O.ct_quantize(data, nbits, "linear", **their_kwargs)
    ours = O.ours_quantize(data, nbits, "linear", selector=_make(selector, mlqpipe))
    O.assert_same(ours, theirs, f"{model} {selector} (mlqpipe selector)")
    ours_ct_selector = O.ours_quantize(data, nbits, "linear", selector=_make(selector, ctq))
    O.assert_same(ours_ct_selector, theirs, f"{model} {selector} (coremltools selector)")


def test_skip_dense_2_leaves_exactly_dense_2():
    data = O.zoo_bytes("dense")
    ours = O.ours_quantize(data, 8, "linear", selector=_skip_dense_2(ctq.QuantizedLayerSelector))
    layers = O.layers_by_name(ours)
    assert O.storage_fields(layers["dense_2"].innerProduct.weights) == ["floatValue"]
    assert O.storage_fields(layers["dense_2"].innerProduct.bias) == ["floatValue"]
    for name in ("dense_1", "dense_3"):
        assert O.storage_fields(layers[name].innerProduct.weights) == ["rawValue"]


@pytest.mark.parametrize("model", ["folds", "recurrent", "channels"])
def test_website_example_same_bytes_without_weightless_layers(model):
    data = O.zoo_bytes(model)
    theirs = O.ct_quantize(data, 8, "linear", selector=_website_example(ctq.QuantizedLayerSelector))
    ours = O.ours_quantize(data, 8, "linear", selector=_website_example(mlqpipe.QuantizedLayerSelector))
    O.assert_same(ours, theirs, f"{model} website example")


def test_website_example_quantizes_only_dense_2():
    """The website example's inverted logic selects every weightless layer too: coremltools then raises
    "Unknown layer activation to be quantized"; mlqpipe quantizes dense_2 alone (what the code says)."""
    data = O.zoo_bytes("dense")
    with pytest.raises(Exception, match="Unknown layer activation"):
        O.ct_quantize(data, 8, "linear", selector=_website_example(ctq.QuantizedLayerSelector))
    ours = O.ours_quantize(data, 8, "linear", selector=_website_example(mlqpipe.QuantizedLayerSelector))
    layers = O.layers_by_name(ours)
    assert O.storage_fields(layers["dense_2"].innerProduct.weights) == ["rawValue"]
    assert O.storage_fields(layers["dense_1"].innerProduct.weights) == ["floatValue"]


def test_matrix_multiply_selector_layer_names():
    """coremltools 9.0 raises AttributeError when include_layers_with_names is given; mlqpipe honours it.

    Oracle: coremltools' selector with the attribute set by hand after construction.
    """
    with pytest.raises(AttributeError):
        ctq.MatrixMultiplyLayerSelector(include_layers_with_names=["dense_1", "dense_3"])
    patched = ctq.MatrixMultiplyLayerSelector()
    patched.include_layers_with_names = ["dense_1", "dense_3"]
    data = O.zoo_bytes("dense")
    theirs = O.ct_quantize(data, 8, "linear", selector=patched)
    ours = O.ours_quantize(
        data, 8, "linear", selector=mlqpipe.MatrixMultiplyLayerSelector(include_layers_with_names=["dense_1", "dense_3"])
    )
    O.assert_same(ours, theirs, "include_layers_with_names")
    layers = O.layers_by_name(ours)
    assert O.storage_fields(layers["dense_2"].innerProduct.weights) == ["floatValue"]
    assert O.storage_fields(layers["dense_1"].innerProduct.weights) == ["rawValue"]


@pytest.mark.parametrize("skip", [["foo"], ["bias", "relu"], ["activation"]])
def test_unknown_skip_types_are_refused_like_coremltools(skip):
    with pytest.raises(ValueError):
        ctq.AdvancedQuantizedLayerSelector(skip_layer_types=skip)
    with pytest.raises(ValueError):
        mlqpipe.AdvancedQuantizedLayerSelector(skip_layer_types=skip)


def test_include_layer_names_must_be_strings():
    with pytest.raises(ValueError):
        mlqpipe.MatrixMultiplyLayerSelector(include_layers_with_names=[1, 2])
    with pytest.raises(ValueError):
        mlqpipe.MatrixMultiplyLayerSelector(include_layers_with_names="dense_1")


@pytest.mark.parametrize("skip", [["branch"], ["loop"], ["branch", "loop"]])
def test_selector_skipping_containers_leaves_nested_networks_alone(skip):
    """A selector that rejects a branch / loop layer: coremltools neither quantizes nor folds its networks.

    coremltools folds a network only when it quantizes it (the fold runs inside _quantize_nn_spec, which
    it calls for a nested network only when the selector accepts the branch / loop layer).
    """
    data = O.zoo_bytes("nested")
    theirs = O.ct_quantize(data, 8, "linear", selector=ctq.AdvancedQuantizedLayerSelector(skip_layer_types=skip))
    ours = O.ours_quantize(data, 8, "linear", selector=mlqpipe.AdvancedQuantizedLayerSelector(skip_layer_types=skip))
    O.assert_same(ours, theirs, f"nested, skip {skip}")
