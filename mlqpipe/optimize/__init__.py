"""mlqpipe.optimize: a drop-in for coremltools.optimize.coreml on ML programs (.mlpackage).

The config classes (config.py) take the same arguments as coremltools 9.0's; `select` (select.py) decides
which weights get which config exactly as coremltools does, except that an op_name_configs key matching no
op is an error, a config conflict names both consumers, and multi-function models are supported. The
compression functions (api.py: linear_quantize_weights, palettize_weights, prune_weights,
decompress_weights) take coremltools' arguments and return an mlqpipe MLProgram.
"""

from mlqpipe.optimize.config import (  # noqa: F401
    OpCompressorConfig,
    OpConfig,
    OpLinearQuantizerConfig,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OpThresholdPrunerConfig,
    OptimizationConfig,
)
from mlqpipe.optimize.select import Decision, block_sizes, decide, select  # noqa: F401
from mlqpipe.optimize.api import (  # noqa: F401
    decompress_weights,
    linear_quantize_weights,
    palettize_weights,
    prune_weights,
)

__all__ = [
    "OpCompressorConfig", "OpConfig", "OpLinearQuantizerConfig", "OpMagnitudePrunerConfig", "OpPalettizerConfig",
    "OpThresholdPrunerConfig", "OptimizationConfig", "Decision", "block_sizes", "decide", "select",
    "linear_quantize_weights", "palettize_weights", "prune_weights", "decompress_weights",
]
