"""One kernel per quantization mode: float values in, a neutral result (quant/results.py) out.

Every kernel has the same signature, so the mode registry (engine/modes.py) can name it in its table. The
arithmetic lives in linear.py and lut.py (neural networks: per-channel codes, one LUT per tensor) and in
affine.py, palette.py, prune.py (ML programs: coremltools.optimize.coreml's blockwise, grouped and sparse
forms); here it is only shaped for a weight. ML-program kernels see the weight in its own float dtype and
return None when the weight is left as it is (threshold pruning that reaches too little sparsity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.quant.linear import EXACT_MIN_SCALE, linear_lut as _linear_lut, quantize_linear
from mlqpipe.quant.results import Float16Result, Float32Result, LinearResult, LutResult


@dataclass(frozen=True)
class KernelSettings:
    nbits: int = 8
    axis: int | None = None  # per-channel axis of linear modes (None: per tensor)
    min_scale: float = EXACT_MIN_SCALE
    lut_function: Callable | None = None
    where: str = ""  # names the weight in errors
    # ML programs: coremltools.optimize.coreml's settings (engine/modes.py's ModeSettings documents them)
    mode: str = ""
    input_axis: int | None = None
    dtype: str = "int8"
    granularity: str | None = None
    block_size: int | tuple[int, ...] = 32
    group_size: int = 32
    channel_axis: int | None = None
    cluster_dim: int = 1
    per_channel_scale: bool = False
    lut_dtype: str | None = None
    target_sparsity: float | None = None
    threshold: float | None = None
    minimum_sparsity: float = 0.5
    prune_block_size: int | None = None
    n_m: tuple[int, int] | None = None
    dim: int | None = None
    conv_groups: tuple[int, ...] = ()  # groups of the convolutions reading the weight (vector LUTs respect them)


def float32(values: np.ndarray, s: KernelSettings) -> Float32Result:
    return Float32Result(np.asarray(values, dtype=np.float32).ravel())


FLOAT16_OVERFLOW = 65520.0  # float32 values at or beyond this round to infinity in float16


def float16(values: np.ndarray, s: KernelSettings) -> Float16Result:
    values = np.asarray(values, dtype=np.float32)
    worst = float(np.max(np.abs(values))) if values.size else 0.0  # a float32 reduction: cheap
    if worst >= FLOAT16_OVERFLOW:
        raise ModelError(
            f"{s.where}: values up to {worst:g} do not fit float16 (max 65504); keep this weight in float32 "
            "(exclude it from the fp16 stage) or use an n-bit mode"
        )
    return Float16Result(values.astype(np.float16).ravel())


def linear(values: np.ndarray, s: KernelSettings, symmetric: bool = False) -> LinearResult:
    """Per-channel affine codes; raises ValueError on NaN or Inf (the caller names the weight)."""
    rows, restore = channel_rows(values, s.axis)
    codes, scale, bias = quantize_linear(rows, s.nbits, symmetric, s.min_scale)
    return LinearResult(restore(codes), scale, bias, s.nbits, s.axis)


def linear_symmetric(values: np.ndarray, s: KernelSettings) -> LinearResult:
    return linear(values, s, symmetric=True)


def linear_lut(values: np.ndarray, s: KernelSettings) -> LutResult:
    table, codes = _linear_lut(values, s.nbits, s.min_scale)
    return LutResult(table, codes, s.nbits)


def kmeans_lut(values: np.ndarray, s: KernelSettings) -> LutResult:
    from mlqpipe.quant.lut import kmeans_lut as _kmeans_lut  # builds a 65,536-entry table on import: plans never need it

    table, codes = _kmeans_lut(values, s.nbits)
    return LutResult(table, codes, s.nbits)


def custom_lut(values: np.ndarray, s: KernelSettings) -> LutResult:
    """The user's `lut_function(nbits, weights) -> (lut, quantized_indices)`, checked."""
    from mlqpipe.quant.lut import check_custom_lut

    if s.lut_function is None or not callable(s.lut_function):
        raise ModelError("custom_lut needs a callable lut_function(nbits, weights) -> (lut, quantized_indices)")
    try:
        result = s.lut_function(s.nbits, values.copy())
    except Exception as e:  # user code: say whose call failed and keep the cause
        raise ModelError(f"{s.where}: custom LUT function raised {type(e).__name__}: {e}") from e
    try:
        table, codes = check_custom_lut(result, s.nbits, values.size, s.where)
    except ValueError as e:
        raise ModelError(str(e)) from None
    return LutResult(table, codes, s.nbits)


# --- ML programs ---------------------------------------------------------------------------------------------

PALETTE_MODES = {"kmeans_lut": "kmeans", "linear_lut": "uniform", "unique_lut": "unique", "custom_lut": "custom"}
QUANTIZED_LUT_DTYPES = ("int8", "uint8")


def affine_settings(s: KernelSettings):
    from mlqpipe.quant.affine import AffineSettings

    return AffineSettings(mode=s.mode, dtype=s.dtype, granularity=s.granularity or "per_channel",
                          block_size=s.block_size, axis=0 if s.axis is None else s.axis, input_axis=s.input_axis)


def palette_settings(s: KernelSettings):
    from mlqpipe.quant.palette import PaletteSettings

    axis = s.channel_axis if s.channel_axis is not None and s.granularity == "per_grouped_channel" else s.axis
    return PaletteSettings(mode=PALETTE_MODES[s.mode], nbits=s.nbits, granularity=s.granularity or "per_tensor",
                           group_size=s.group_size, channel_axis=0 if axis is None else axis, cluster_dim=s.cluster_dim,
                           enable_per_channel_scale=s.per_channel_scale, lut_function=s.lut_function)


def prune_settings(s: KernelSettings):
    from mlqpipe.quant.prune import PruneSettings

    if s.threshold is not None:
        return PruneSettings(mode="threshold", threshold=s.threshold, minimum_sparsity=s.minimum_sparsity)
    return PruneSettings(mode="magnitude", target_sparsity=s.target_sparsity, block_size=s.prune_block_size,
                         n_m=s.n_m, dim=s.dim)


def _needs_axis(s: KernelSettings, granularity: str) -> None:
    from mlqpipe.quant.affine import NotApplicable

    if s.axis is None and granularity != "per_tensor":
        raise NotApplicable("its readers disagree on its output channel axis, so it has no channels to scale per "
                            "(use granularity per_tensor)")


def affine(values: np.ndarray, s: KernelSettings):
    """Linear quantization in the blockwise form (quant/affine.py)."""
    from mlqpipe.quant.affine import linear_quantize

    settings = affine_settings(s)
    if not (settings.granularity == "per_block" and not isinstance(s.block_size, int)):
        _needs_axis(s, settings.granularity)
    return linear_quantize(values, settings)


def palette(values: np.ndarray, s: KernelSettings):
    """Palettization (quant/palette.py), its LUT quantized per tensor when lut_dtype is int8 or uint8."""
    from mlqpipe.quant.palette import palettize

    settings = palette_settings(s)
    if settings.granularity != "per_tensor" or settings.cluster_dim > 1 or settings.enable_per_channel_scale:
        _needs_axis(s, "per_grouped_channel")
    result = palettize(values, settings)
    if s.lut_dtype in QUANTIZED_LUT_DTYPES:
        from mlqpipe.quant.joint import quantize_lut

        result = quantize_lut(result, s.lut_dtype)
    return result


def sparse(values: np.ndarray, s: KernelSettings):
    """Pruning (quant/prune.py); None when threshold pruning reaches less than minimum_sparsity."""
    from mlqpipe.quant.prune import prune

    return prune(values, prune_settings(s))


def shape_problem(shape: tuple[int, ...], s: KernelSettings) -> str | None:
    """Why settings cannot apply to a weight of this shape (what the kernels would refuse with
    NotApplicable), found without reading its values — for plans. None when they fit."""
    if s.mode in ("linear", "linear_symmetric"):
        from mlqpipe.quant.affine import block_sizes

        a = affine_settings(s)
        if s.axis is None and a.granularity != "per_tensor" and not (a.granularity == "per_block" and not isinstance(s.block_size, int)):
            return "its readers disagree on its output channel axis (use granularity per_tensor)"
        try:
            sizes = block_sizes(tuple(shape), a)
        except ValueError as e:
            return str(e)
        bad = [(i, d, b) for i, (d, b) in enumerate(zip(shape, sizes)) if b > 0 and d % b]
        return f"axis {bad[0][0]} has {bad[0][1]} elements, not a multiple of the block size {bad[0][2]}" if bad else None
    if s.mode in PALETTE_MODES:
        p = palette_settings(s)
        if s.axis is None and (p.granularity != "per_tensor" or p.cluster_dim > 1 or p.enable_per_channel_scale):
            return "its readers disagree on its output channel axis (use granularity per_tensor)"
        axis = p.channel_axis % len(shape)
        size = shape[axis] if p.granularity == "per_tensor" or p.group_size == 0 else p.group_size
        if size <= 0 or shape[axis] % size:
            return f"the {shape[axis]} channels on axis {axis} are not a multiple of group_size {size}"
        if size % p.cluster_dim:
            return f"the group of {size} channels on axis {axis} is not a multiple of cluster_dim {p.cluster_dim}"
        for g in s.conv_groups if p.cluster_dim > 1 else ():  # a vector must not span two convolution groups
            per_group = list(shape)
            per_group[0] //= g
            if per_group[axis] % p.cluster_dim:
                return (f"a convolution reads it in {g} groups of {per_group[axis]} channels on axis {axis}, not a multiple "
                        f"of cluster_dim {p.cluster_dim}")
        return None
    if s.mode == "prune" and (s.prune_block_size or s.n_m):
        dim = (0 if s.prune_block_size else 1) if s.dim is None else s.dim
        if dim >= len(shape):
            return f"dim {dim} is not an axis of the {len(shape)}-D weight"
        unit, what = (s.prune_block_size, "block_size") if s.prune_block_size else (s.n_m[1], "m")
        if unit > shape[dim] / 2:
            return f"{what} {unit} is more than half of the {shape[dim]} channels on axis {dim}"
    return None


def joint(previous, s: KernelSettings):
    """A second compression on top of `previous` (the weight's current result, read back from the model):
    palettize or quantize a pruned weight's nonzero values, or quantize a palettized weight's LUT."""
    from mlqpipe.quant import joint as chains
    from mlqpipe.quant.results import PaletteResult, SparseResult

    if isinstance(previous, SparseResult) and s.mode in PALETTE_MODES:
        return chains.palettize_nonzero(previous, palette_settings(s))
    if isinstance(previous, SparseResult) and s.mode in ("linear", "linear_symmetric"):
        return chains.quantize_nonzero(previous, affine_settings(s))
    if isinstance(previous, PaletteResult) and s.mode in ("linear", "linear_symmetric"):
        if (s.granularity or "per_tensor") != "per_tensor":
            raise ValueError("a palettized weight's LUT is quantized per tensor only (granularity per_tensor)")
        return chains.quantize_lut(previous, s.dtype, s.mode)
    kind = {SparseResult: "pruned", PaletteResult: "palettized"}.get(type(previous), "compressed")
    raise ValueError(f"joint compression of a {kind} weight with {s.mode} is not supported "
                     "(prune then palettize or quantize; palettize then quantize the LUT)")


def channel_rows(w: np.ndarray, axis: int | None):
    """View weights as [channels, values] rows for per-channel scales, plus the inverse for the codes."""
    if axis is None or w.ndim < 2:
        return w.reshape(1, -1), lambda q: q.ravel()
    moved = np.moveaxis(w, axis, 0)
    shape = moved.shape
    return moved.reshape(shape[0], -1), lambda q: np.moveaxis(q.reshape(shape), 0, axis).ravel()
