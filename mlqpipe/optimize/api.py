"""coremltools.optimize.coreml's compression functions, on ML programs, without coremltools.

`linear_quantize_weights`, `palettize_weights`, `prune_weights` and `decompress_weights` take the same
arguments as coremltools 9.0's and compress the same weights (mlqpipe.optimize.select decides which), each
with mlqpipe's kernel for the config (engine.modes.apply_mode). `model` is a .mlpackage path, an
`MLProgram` (never modified: the work is done on a copy) or a coremltools MLModel of an ML program (read
from its package on disk, without importing coremltools). They return a new `MLProgram`; `.save(path)`
writes it.

Where this differs from coremltools, on purpose:
- the program is otherwise left as it is (coremltools re-runs its graph passes, which fuse, rename and
  dedupe ops); a compressed op keeps the const's name and output;
- multi-function models are compressed (coremltools refuses them); a weight shared by functions is
  compressed once and stays shared;
- raising an iOS15 program to iOS16 (which compressed weights need) is said in one warning;
- an op_name_configs key that names no weight op is an error (select.py);
- a weight pruned to all zeros stays dense, with a warning (coremltools writes an empty sparse tensor);
- iOS18-only settings on an iOS16/17 program are refused before anything is compressed, 3-bit LUTs too
  (coremltools fails inside its type inference there);
- `num_kmeans_workers` is accepted and ignored (our k-means needs no process pool);
- joint compression is what the engine's joint kernels do: pruned weights palettized or quantized, LUTs
  quantized (per tensor); pruning a quantized or palettized weight, or palettizing a quantized one, is
  refused with an error naming the weight (coremltools does those).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from mlqpipe.errors import ModelError
from mlqpipe.optimize.config import (
    OpCompressorConfig,
    OpLinearQuantizerConfig,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OpThresholdPrunerConfig,
    OptimizationConfig,
)

__all__ = ["linear_quantize_weights", "palettize_weights", "prune_weights", "decompress_weights"]

_IOS18_OPSETS = ("CoreML8", "CoreML9")
_CONSTEXPR_SPEC = 7  # iOS16: the first specification version with constexpr ops
_PALETTE_MODES = {"KMEANS": "kmeans_lut", "UNIFORM": "linear_lut", "UNIQUE": "unique_lut", "CUSTOM": "custom_lut"}
# joint compression: the compressed weights (inventory layer_type) each function compresses again, as
# coremltools 9.0 does (the input of the chain's op it compresses is in the comment)
_JOINT_INPUTS = {
    "linear_quantize_weights": {"constexpr_lut_to_dense",  # lut
                                "constexpr_lut_to_sparse+constexpr_sparse_to_dense",  # lut
                                "constexpr_sparse_to_dense"},  # nonzero_data
    "palettize_weights": {"constexpr_sparse_to_dense",  # nonzero_data
                          "constexpr_blockwise_shift_scale"},  # data
    "prune_weights": {"constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"},  # the decoded weight
}


# -- the public functions -----------------------------------------------------------------------------------


def linear_quantize_weights(model: Any, config: OptimizationConfig, joint_compression: bool = False):
    """Linear (affine) quantization of the weights `config` selects (OpLinearQuantizerConfig entries):
    int8/uint8 (iOS16+) or int4/uint4 and per_block (iOS18) codes with a scale (and zero point) per
    tensor, output channel or block. `joint_compression` (iOS18) also quantizes the LUT of palettized and
    the nonzero values of pruned weights. Weights holding ±inf are skipped with a warning. Returns a new
    MLProgram."""
    return _compress("linear_quantize_weights", model, config, joint_compression, (OpLinearQuantizerConfig,))


def palettize_weights(model: Any, config: OptimizationConfig, joint_compression: bool = False):
    """Palettization (lookup tables) of the weights `config` selects (OpPalettizerConfig entries): kmeans,
    uniform, unique or custom LUTs of 1-8 bits, per tensor (iOS16+) or per grouped channel, vector,
    3-bit or with a per-channel scale (iOS18). `joint_compression` (iOS18) palettizes the nonzero values
    of pruned and the codes of quantized weights. Returns a new MLProgram."""
    return _compress("palettize_weights", model, config, joint_compression, (OpPalettizerConfig,))


def prune_weights(model: Any, config: OptimizationConfig, joint_compression: bool = False):
    """Pruning (sparse weights) of the weights `config` selects: OpMagnitudePrunerConfig (target sparsity,
    blocks, n:m) or OpThresholdPrunerConfig (|w| <= threshold, kept dense below minimum_sparsity_percentile,
    with a warning). `joint_compression` (iOS18) prunes quantized and palettized weights in their
    compressed form. Returns a new MLProgram."""
    return _compress("prune_weights", model, config, joint_compression, (OpMagnitudePrunerConfig, OpThresholdPrunerConfig))


def decompress_weights(model: Any):
    """Every compressed weight (any constexpr chain) back to a plain const of its float dtype; the rest of
    the program, and its deployment target, are left as they are. Returns a new MLProgram."""
    from mlqpipe.engine.modes import ModeSettings, apply_mode
    from mlqpipe.formats.registry import format_of

    program = _load("decompress_weights", model)
    settings = ModeSettings(mode="dequantize")
    for rec in format_of(program).inventory(program):
        if rec.compressed:
            try:
                apply_mode(rec, settings)
            except ModelError as e:
                raise _located(e, program.source) from None
    return program


# -- the shared path ----------------------------------------------------------------------------------------


def _compress(api: str, model: Any, config: OptimizationConfig, joint: bool, allowed: tuple[type, ...]):
    """Load a copy, check the config, select, refuse settings the program's opset lacks (before anything
    is computed), raise an iOS15 program to iOS16, then compress weight by weight."""
    from mlqpipe.formats.mlprogram.target import raise_target
    from mlqpipe.formats.registry import format_of
    from mlqpipe.optimize.select import decide

    _check_arguments(api, config, joint, allowed)
    program = _load(api, model)
    source = program.source
    if joint:
        _require_ios18_for_joint(api, program)
    records = format_of(program).inventory(program)
    by_id = {rec.id: rec for rec in records}
    candidates = [_as_candidate(rec) if joint and rec.layer_type in _JOINT_INPUTS[api] else rec for rec in records]
    decisions = decide(candidates, config, source=source)
    chosen = [(by_id[d.id], d.config) for d in decisions if d.chosen]
    for rec, cfg in chosen:
        _require_opset(program, rec, cfg)
    old_spec = program.spec.specificationVersion
    if old_spec < _CONSTEXPR_SPEC:  # in place: the records' ops stay where they are
        _warn(f"{source}: {api}: compressed weights need iOS16, and the model targets iOS15 "
              f"(specificationVersion {old_spec}); raised: {'; '.join(raise_target(program, 'iOS16'))}")
    for candidate, d in zip(candidates, decisions):
        if not d.chosen and _warned_skip(candidate, d, config, source):
            _warn(f"{source}: {by_id[d.id].where}: not compressed by {api}: {d.skipped}")
    for rec, cfg in chosen:
        _compress_one(api, source, rec, cfg, joint)
    return program


def _compress_one(api: str, source: str, rec, cfg, joint: bool) -> None:
    """apply_mode on one weight; what coremltools skips with a warning (settings that do not fit the
    weight, ±inf for linear quantization, too little sparsity) is skipped with one warning here."""
    from mlqpipe.engine.modes import NotApplicableError, apply_mode

    said: list[str] = []

    def warn(message: str) -> None:  # apply_mode's own notes (an all-zero weight kept dense)
        said.append(message)
        warnings.warn(f"{source}: {message}", stacklevel=6)  # warn <- apply_mode <- _compress_one <- _compress <- API

    def skip(reason: str) -> None:
        warnings.warn(f"{source}: {rec.where}: not compressed by {api}: {reason}", stacklevel=5)

    try:
        done = apply_mode(rec, _settings(cfg, joint), warn=warn)
    except NotApplicableError as e:
        skip(str(e).removeprefix(f"{rec.where}: "))
        return
    except ModelError as e:
        if isinstance(cfg, OpLinearQuantizerConfig) and _has_inf(rec):  # coremltools skips these, with a warning
            skip("it holds ±inf, which linear quantization cannot represent")
            return
        raise _located(e, source) from None
    if not done and not said and isinstance(cfg, OpThresholdPrunerConfig):
        skip(f"fewer than {cfg.minimum_sparsity_percentile:g} of its values are at most {cfg.threshold:g} in magnitude "
             "(minimum_sparsity_percentile); kept dense")


def _located(error: ModelError, source: str) -> ModelError:
    """The engine names the weight; the message also names the package (once)."""
    text = str(error)
    return error if text.startswith(source) else ModelError(f"{source}: {text}")


def _has_inf(rec) -> bool:
    import numpy as np

    return bool(np.isinf(rec.values()).any())


def _check_arguments(api: str, config, joint, allowed: tuple[type, ...]) -> None:
    if isinstance(config, OpCompressorConfig):
        raise ModelError(f"{api}: config must be an OptimizationConfig, got a {type(config).__name__}; wrap it: "
                         f"OptimizationConfig(global_config={type(config).__name__}(...))")
    if not isinstance(config, OptimizationConfig):
        raise ModelError(f"{api}: config must be an OptimizationConfig, got {type(config).__name__}")
    config.require(api, *allowed)
    if not isinstance(joint, bool):
        raise ModelError(f"{api}: joint_compression must be True or False, got {joint!r}")


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)  # _warn <- _compress <- the public function: the caller's line


# -- loading ------------------------------------------------------------------------------------------------


def _load(api: str, model: Any):
    """A private MLProgram to work on: a package path, a copy of an MLProgram, or the package of a
    coremltools MLModel (its `package_path`). Neural networks get a pointer to their API."""
    from mlqpipe.formats.mlprogram.model import MLProgram

    if isinstance(model, MLProgram):
        return model.copy()
    if isinstance(model, (str, os.PathLike)):
        return _load_path(api, model, os.fspath(model))
    package = getattr(model, "package_path", None)
    if isinstance(package, (str, os.PathLike)):
        if not Path(package).is_dir():
            raise ModelError(f"{os.fspath(package)}: the MLModel's package is gone (a temporary package deleted?); "
                             f"save the model and pass the .mlpackage path to {api}")
        return _load_path(api, package, os.fspath(package))
    if _is_neural_network(model):
        raise _neural_network(api, _name_of(model))
    raise ModelError(f"{api}: cannot compress a {type(model).__name__}; pass a .mlpackage path, an mlqpipe "
                     "MLProgram or a coremltools MLModel of an ML program")


def _load_path(api: str, path, where: str):
    from mlqpipe.formats.registry import format_for

    if not Path(path).exists():
        raise ModelError(f"{where}: no such model; {api} takes a .mlpackage directory")
    fmt = format_for(path)
    if fmt.name != "mlprogram":
        raise _neural_network(api, where)
    return fmt.load(path)


def _is_neural_network(model) -> bool:
    from mlqpipe.formats.nn.model import CoreMLModel

    return isinstance(model, (CoreMLModel, bytes, bytearray)) or callable(getattr(model, "get_spec", None)) \
        or callable(getattr(model, "SerializeToString", None))


def _name_of(model) -> str:
    return getattr(model, "source", None) or f"<{type(model).__name__}>"


def _neural_network(api: str, where: str) -> ModelError:
    return ModelError(f"{where}: a neural network (.mlmodel), not an ML program; {api} compresses ML programs "
                      "(.mlpackage): quantize neural networks with mlqpipe.quantize_weights")


# -- selection helpers --------------------------------------------------------------------------------------


def _as_candidate(rec):
    """A compressed weight seen as the const it stands for, so the selection resolves its config by the
    ops reading it (joint compression: coremltools follows the constexpr chain to those ops)."""
    import dataclasses

    return dataclasses.replace(rec, layer_type="const")


def _warned_skip(rec, decision, config: OptimizationConfig, source: str) -> bool:
    """Whether coremltools skips this weight with a warning (its shape does not fit the config: channel
    axes, divisibility, structured pruning), rather than silently (no config, too small, rank <= 1,
    already compressed, read by a constexpr op)."""
    from mlqpipe.optimize.select import _common_skip, _resolve

    if rec.compressed or not decision.skipped:
        return False
    chosen, _ = _resolve(rec, config, source)
    return chosen is not None and not _common_skip(rec, chosen)


# -- what the program's opset allows ------------------------------------------------------------------------


def _opsets(program, rec) -> list[tuple[str, str]]:
    """(function, opset) of every function holding the weight."""
    from mlqpipe.formats.mlprogram import proto

    return [(name, proto.find_entry(program.spec.mlProgram.functions, name).opset) for name in rec.functions]


def _ios18_setting(cfg) -> str | None:
    """The first setting of `cfg` that needs iOS18 (coremltools' order of checks), or None."""
    if isinstance(cfg, OpLinearQuantizerConfig):
        if cfg.granularity == "per_block":
            return "granularity per_block"
        if cfg.dtype in ("int4", "uint4"):
            return f"dtype {cfg.dtype} (4-bit quantization)"
    if isinstance(cfg, OpPalettizerConfig):
        if cfg.granularity == "per_grouped_channel":
            return "granularity per_grouped_channel"
        if cfg.cluster_dim > 1:
            return f"cluster_dim {cfg.cluster_dim} (vector palettization)"
        if cfg.nbits == 3:
            return "nbits 3 (iOS16/17 LUTs have 2, 4, 16, 64 or 256 entries)"
        if cfg.enable_per_channel_scale:
            return "enable_per_channel_scale"
    return None


def _require_opset(program, rec, cfg) -> None:
    setting = _ios18_setting(cfg)
    if setting is None:
        return
    for function, opset in _opsets(program, rec):
        if opset not in _IOS18_OPSETS:
            raise ModelError(f"{program.source}: {rec.where}: {setting} needs iOS18 (opset CoreML8), but function "
                             f"'{function}' has opset {opset}; convert the model for iOS18 (coremltools: "
                             "minimum_deployment_target=ct.target.iOS18) or choose a setting iOS16 supports")


def _require_ios18_for_joint(api: str, program) -> None:
    for entry in program.spec.mlProgram.functions:
        if entry.value.opset not in _IOS18_OPSETS:
            raise ModelError(f"{program.source}: {api}: joint_compression needs iOS18 (opset CoreML8), but function "
                             f"'{entry.key}' has opset {entry.value.opset}; convert the model for iOS18 (coremltools: "
                             "minimum_deployment_target=ct.target.iOS18) or compress without joint_compression")


# -- configs as mode settings -------------------------------------------------------------------------------


def _settings(cfg, joint: bool):
    """The engine's ModeSettings for one op config (see engine/modes.py for the fields)."""
    from mlqpipe.engine.modes import ModeSettings

    if isinstance(cfg, OpLinearQuantizerConfig):
        return ModeSettings(mode=cfg.mode.lower(), nbits=cfg.nbits, dtype=cfg.dtype, granularity=cfg.granularity,
                            block_size=cfg.block_size, joint=joint)
    if isinstance(cfg, OpPalettizerConfig):
        return ModeSettings(mode=_PALETTE_MODES[cfg.mode], nbits=cfg.nbits, lut_function=cfg.lut_function,
                            granularity=cfg.granularity, group_size=cfg.group_size, channel_axis=cfg.channel_axis,
                            cluster_dim=cfg.cluster_dim, per_channel_scale=cfg.enable_per_channel_scale, joint=joint)
    if isinstance(cfg, OpMagnitudePrunerConfig):
        return ModeSettings(mode="prune", target_sparsity=cfg.target_sparsity, prune_block_size=cfg.block_size,
                            n_m=cfg.n_m_ratio, dim=cfg.dim, joint=joint)
    if isinstance(cfg, OpThresholdPrunerConfig):
        return ModeSettings(mode="prune", threshold=cfg.threshold, minimum_sparsity=cfg.minimum_sparsity_percentile,
                            joint=joint)
    raise ModelError(f"no compression mode for {type(cfg).__name__}")
