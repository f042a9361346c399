"""mlqpipe: declarative, cached, reproducible weight compression for Core ML models.

The public API is loaded lazily so `import mlqpipe` (and the CLI) stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "quantize_weights": "mlqpipe.engine.compat",
    "linear_quantize_weights": "mlqpipe.optimize.api",  # ML programs: coremltools.optimize.coreml's functions
    "palettize_weights": "mlqpipe.optimize.api",
    "prune_weights": "mlqpipe.optimize.api",
    "decompress_weights": "mlqpipe.optimize.api",
    "QuantizedLayerSelector": "mlqpipe.engine.ct_selectors",
    "AdvancedQuantizedLayerSelector": "mlqpipe.engine.ct_selectors",
    "MatrixMultiplyLayerSelector": "mlqpipe.engine.ct_selectors",
    "load_model": "mlqpipe.formats.registry",  # either format: .mlmodel files and .mlpackage directories
    "CoreMLModel": "mlqpipe.formats.nn.model",
    "MLProgram": "mlqpipe.formats.mlprogram.model",
    "inventory": "mlqpipe.formats.registry:inventory_of",  # paths, bytes, specs and loaded models
    "WeightRecord": "mlqpipe.formats.nn.inventory",
    "MlqpipeError": "mlqpipe.errors",
    "ModelError": "mlqpipe.errors",
    "CheckError": "mlqpipe.errors",
    "RecipeError": "mlqpipe.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlqpipe' has no attribute {name!r}")
    module, _, attr = module.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
