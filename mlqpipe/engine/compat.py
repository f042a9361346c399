"""coremltools-compatible API: `quantize_weights` and the layer selectors, without coremltools.

Same arguments and, wherever coremltools 9.0 is right, the same bytes. Where it raises or writes an
invalid or wrong model, this does the correct thing instead (see README, "Differences from coremltools").
"""

from __future__ import annotations

import os

import warnings
from typing import Any

from mlqpipe.formats.nn.check import input_findings
from mlqpipe.formats.nn.model import CoreMLModel, load_model
from mlqpipe.formats.nn.structure import neural_networks
from mlqpipe.formats.nn.version import raise_versions
from mlqpipe.errors import ModelError
from mlqpipe.engine.modes import MODES, ModeSettings, apply_mode, check_settings
from mlqpipe.engine.ct_selectors import (  # noqa: F401  (re-exported: coremltools' names)
    AdvancedQuantizedLayerSelector,
    MatrixMultiplyLayerSelector,
    QuantizedLayerSelector,
    select_like_coremltools,
)
from mlqpipe.quant.linear import COREMLTOOLS_MIN_SCALE

# coremltools' quantization_mode names -> ours (fp16 is nbits=16 there)
_CT_MODES = {ct: m.name for m in MODES.values() for ct in m.coremltools_names}


def quantize_weights(full_precision_model: Any, nbits: int, quantization_mode: str = "linear", sample_data=None, **kwargs) -> CoreMLModel:
    """Quantize a neural-network model the way coremltools' `quantize_weights` does (see module doc).

    `full_precision_model`: a path, bytes, CoreMLModel, protobuf spec or coremltools MLModel (never modified).
    kwargs: `selector` (a QuantizedLayerSelector, ours or coremltools', or a callable(WeightRecord) -> bool),
    `lut_function` for custom_lut.
    Returns a new CoreMLModel; `sample_data` is ignored (use recipes' evaluation and gates instead).
    """
    mode = _CT_MODES.get(quantization_mode)
    if mode is None:
        raise ModelError(f"Invalid quantization mode {quantization_mode!r}; choose one of {', '.join(_CT_MODES)}")
    unknown = set(kwargs) - {"selector", "lut_function"}
    if unknown:
        raise TypeError(f"quantize_weights() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    if not MODES[mode].reads_quantized and nbits == 16:  # coremltools' 16 bits: the float16 mode
        mode = next(name for name, entry in MODES.items() if entry.storage == "float16")
    check_settings(mode, nbits)
    m = MODES[mode]
    _refuse_ml_program(full_precision_model)
    model = load_model(full_precision_model)
    model.inherited_findings = input_findings(model.spec, model.source)  # already invalid: warn, keep going
    selector = kwargs.get("selector") or QuantizedLayerSelector()
    settings = ModeSettings(mode, nbits if isinstance(nbits, int) else 8, kwargs.get("lut_function"), COREMLTOOLS_MIN_SCALE, True)
    if not any(True for _ in neural_networks(model.spec)):
        raise ModelError(f"{model.source}: a {model.model_type} model has no neural-network weights to quantize")
    # coremltools folds below 16 bits, each network as it reaches it (nested ones only if selected)
    chosen = select_like_coremltools(model.spec, selector, fold=m.nbits is not None)
    already = [rec for rec in chosen if rec.storage.is_quantized and not m.reads_quantized]
    if already:  # as coremltools: quantize the float weights, leave quantized ones as they are
        warnings.warn(f"{model.source}: {len(already)} weight(s) already quantized, left as they are: "
                      f"{', '.join(rec.where for rec in already)}", stacklevel=2)
    for rec in chosen:
        if rec.updatable:
            warnings.warn(f"{rec.where}: updatable, left as it is (Core ML rejects quantized updatable weights)", stacklevel=2)
            continue
        if rec.storage.is_quantized and not m.reads_quantized:
            continue
        apply_mode(rec, settings)
    raise_versions(model.spec, "float16" if nbits == 16 else "quantized")  # coremltools keys this on nbits, not the mode
    return model


def _refuse_ml_program(model: Any) -> None:
    """quantize_weights is coremltools' neural-network API; an ML program (a package path, a loaded
    MLProgram, a coremltools MLModel of one) gets a pointer to the API for ML programs instead."""
    from mlqpipe.formats.registry import format_of, formats, load_model as load_any

    package = model if isinstance(model, (str, os.PathLike)) else getattr(model, "package_path", None)
    is_program = any(f.owns(model) and f.name == "mlprogram" for f in formats())
    if not is_program and isinstance(package, (str, os.PathLike)) and os.path.isdir(package):
        is_program = format_of(load_any(package)).name == "mlprogram"
    if is_program:
        raise ModelError("quantize_weights compresses neural networks (.mlmodel); this is an ML program (.mlpackage): "
                         "compress it with mlqpipe.linear_quantize_weights, mlqpipe.palettize_weights or "
                         "mlqpipe.prune_weights (coremltools.optimize.coreml's functions and configs, also in "
                         "mlqpipe.optimize), or with a recipe")
