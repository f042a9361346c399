"""Quantization modes applied to one weight record: the bridge from numpy kernels to WeightParams.

Every mode reads the blob's float values (float32, or float16 read as float16 values), runs one pure
kernel from `mlqpipe.quant`, and rewrites the blob's storage. Quantized blobs are refused unless the mode
is `dequantize`: quantizing codes again would be silent double rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlqpipe.formats.nn.inventory import WeightRecord
from mlqpipe.formats.nn.weights import write_float16, write_float32, write_linear, write_lut
from mlqpipe.errors import ModelError
from mlqpipe.quant.linear import EXACT_MIN_SCALE, linear_lut, quantize_linear
from mlqpipe.quant.lut import check_custom_lut, kmeans_lut

MODES = ("fp16", "linear", "linear_symmetric", "linear_lut", "kmeans_lut", "custom_lut", "dequantize")
ALIASES = {"kmeans": "kmeans_lut", "dequantization": "dequantize", "float16": "fp16"}


@dataclass(frozen=True)
class ModeSettings:
    mode: str
    nbits: int = 8
    lut_function: Callable | None = None
    min_scale: float = EXACT_MIN_SCALE
    # coremltools leaves an empty `quantization {}` behind when it dequantizes; the compatibility API
    # reproduces that for byte equality (Core ML ignores it next to floatValue)
    keep_empty_quantization: bool = False


def canonical_mode(mode: str) -> str:
    return ALIASES.get(mode, mode)


def check_settings(mode: str, nbits: int | None) -> None:
    """Refuse impossible mode / nbits combinations with a message saying what is allowed."""
    mode = canonical_mode(mode)
    if mode not in MODES:
        raise ModelError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode in ("fp16", "dequantize"):
        return
    if not isinstance(nbits, int) or isinstance(nbits, bool):
        raise ModelError(f"{mode}: nbits must be an integer, got {nbits!r}")
    if mode == "linear_symmetric" and nbits == 1:
        raise ModelError("linear_symmetric: nbits must be 2..8 (1-bit symmetric quantization has no zero level)")
    if not 1 <= nbits <= 8:
        raise ModelError(f"{mode}: nbits must be 1..8, got {nbits} (use mode fp16 for 16-bit)")


def apply_mode(rec: WeightRecord, settings: ModeSettings) -> bool:
    """Rewrite `rec`'s blob in the given mode; returns False when there was nothing to do."""
    mode = canonical_mode(settings.mode)
    st = rec.storage
    if rec.count == 0:  # a layer with no weights (zero channels): nothing to quantize
        return False
    if mode == "dequantize":
        if st.kind == "float32":
            return False
        write_float32(rec.wp, rec.float_values().ravel())
        if settings.keep_empty_quantization and st.kind in ("linear", "lut"):
            rec.wp.quantization.SetInParent()
        return True
    if st.is_quantized:
        raise ModelError(
            f"{rec.where}: already quantized ({st}); dequantize it first (a `dequantize` stage, or "
            "quantization_mode='dequantization') before quantizing again"
        )
    if st.kind == "conflict":
        raise ModelError(f"{rec.where}: several storage fields are set; the model is invalid")
    if mode == "fp16":
        if st.kind == "float16":
            return False
        keep = settings.keep_empty_quantization and rec.wp.HasField("quantization")  # coremltools leaves it
        write_float16(rec.wp, to_float16(rec.float_values(), rec.where))
        if keep:
            rec.wp.quantization.SetInParent()
        return True
    nbits = settings.nbits
    if mode in ("linear", "linear_symmetric"):
        w = rec.values()
        rows, restore = channel_rows(w, rec.axis)
        try:
            codes, scale, bias = quantize_linear(rows, nbits, mode == "linear_symmetric", settings.min_scale)
        except ValueError:
            rec.float_values()  # NaN or Inf: raises ModelError naming the layer and the count
            raise
        if rec.layer_type == "convolution" and rec.axis == 1 and rec.groups > 1:
            # grouped deconvolution: Core ML wants 1 or outputChannels scales; the per-(out/groups) scales
            # repeated for every group read the same whichever way a runtime indexes them
            scale, bias = np.tile(scale, rec.groups), np.tile(bias, rec.groups)
        write_linear(rec.wp, restore(codes), nbits, scale, bias)
        return True
    w = rec.float_values()
    if mode == "linear_lut":
        table, codes = linear_lut(w, nbits, settings.min_scale)
        write_lut(rec.wp, codes, nbits, table)
    elif mode == "kmeans_lut":
        table, codes = kmeans_lut(w, nbits)
        write_lut(rec.wp, codes, nbits, table)
    elif mode == "custom_lut":
        if settings.lut_function is None or not callable(settings.lut_function):
            raise ModelError("custom_lut needs a callable lut_function(nbits, weights) -> (lut, quantized_indices)")
        try:
            result = settings.lut_function(nbits, w.copy())
        except Exception as e:  # user code: say whose call failed and keep the cause
            raise ModelError(f"{rec.where}: custom LUT function raised {type(e).__name__}: {e}") from e
        try:
            table, codes = check_custom_lut(result, nbits, w.size, rec.where)
        except ValueError as e:
            raise ModelError(str(e)) from None
        write_lut(rec.wp, codes, nbits, table)
    else:  # pragma: no cover - check_settings guards this
        raise ModelError(f"unknown mode {mode}")
    return True


def channel_rows(w: np.ndarray, axis: int | None):
    """View weights as [channels, values] rows for per-channel scales, plus the inverse for the codes."""
    if axis is None or w.ndim < 2:
        return w.reshape(1, -1), lambda q: q.ravel()
    moved = np.moveaxis(w, axis, 0)
    shape = moved.shape
    return moved.reshape(shape[0], -1), lambda q: np.moveaxis(q.reshape(shape), 0, axis).ravel()


FLOAT16_OVERFLOW = 65520.0  # float32 values at or beyond this round to infinity in float16


def to_float16(values: np.ndarray, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    worst = float(np.max(np.abs(values))) if values.size else 0.0  # a float32 reduction: cheap
    if worst >= FLOAT16_OVERFLOW:
        raise ModelError(
            f"{where}: values up to {worst:g} do not fit float16 (max 65504); keep this weight in float32 "
            "(exclude it from the fp16 stage) or use an n-bit mode"
        )
    return values.astype(np.float16)
