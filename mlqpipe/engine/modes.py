"""The mode registry: one `Mode` per quantization mode, and applying a mode to one weight record.

Everything that differs between modes is a field here — names, bits, what a recipe stage needs, the
storage and size afterwards, the specification-version floor, the kernel — so the plan, the build, the
compatibility API and the recipe schema (kept equal to this table by tests/recipe/test_schema_modes.py)
cannot disagree. A mode reads the blob's float values (float32, or float16 read as float16 values), runs
its kernel from `mlqpipe.quant.kernels` and hands the neutral result to the format's writer. Quantized
blobs are refused unless the mode reads them (`dequantize`): quantizing codes again would be silent double
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mlqpipe.errors import ModelError
from mlqpipe.formats.base import Storage, WeightRecord
from mlqpipe.formats.registry import format_of_record
from mlqpipe.quant import kernels
from mlqpipe.quant.linear import EXACT_MIN_SCALE

NBITS = (1, 8)  # what the neural-network format stores (numberOfBits); a mode may allow less


@dataclass(frozen=True)
class Mode:
    """One quantization mode, as every part of mlqpipe sees it."""

    name: str
    kernel: Callable  # (values, kernels.KernelSettings) -> a quant.results result
    storage: str  # the weight's storage kind afterwards: float16, float32, linear or lut
    nbits: tuple[int, int] | None = None  # the bits a stage may ask for; None: the mode takes no nbits
    nbits_note: str = ""  # why the range is narrower than NBITS
    aliases: tuple[str, ...] = ()  # other names `canonical_mode` accepts
    coremltools_names: tuple[str, ...] = ()  # its quantization_mode names in coremltools' quantize_weights
    needs: tuple[str, ...] = ()  # recipe stage keys it needs besides rules and nbits
    coremltools_rounding: bool = False  # a stage may ask for coremltools' 1e-6 scale threshold
    version_floor: str | None = "quantized"  # raise_versions' change after it ran (None: no floor)
    done_if: str | None = None  # a storage kind that leaves nothing to do
    reads_quantized: bool = False  # takes quantized weights (others refuse them)
    checks_finite: bool = True  # False: the kernel meets NaN/Inf itself (ValueError), one pass fewer

    def storage_after(self, nbits: int | None) -> Storage:
        return Storage(self.storage, {"float16": 16, "float32": 32}.get(self.storage, nbits or 8))


_LINEAR = dict(storage="linear", nbits=NBITS, coremltools_rounding=True, checks_finite=False)
_LUT = dict(storage="lut", nbits=NBITS)

MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp16", kernels.float16, "float16", aliases=("float16",), version_floor="float16", done_if="float16"),
    Mode("linear", kernels.linear, coremltools_names=("linear",), **_LINEAR),
    Mode("linear_symmetric", kernels.linear_symmetric, coremltools_names=("linear_symmetric",),
         **{**_LINEAR, "nbits": (2, 8)}, nbits_note="1-bit symmetric quantization has no zero level"),
    Mode("linear_lut", kernels.linear_lut, coremltools_names=("linear_lut",), coremltools_rounding=True, **_LUT),
    Mode("kmeans_lut", kernels.kmeans_lut, aliases=("kmeans",), coremltools_names=("kmeans_lut", "kmeans"), **_LUT),
    Mode("custom_lut", kernels.custom_lut, coremltools_names=("custom_lut",), needs=("function",), **_LUT),
    Mode("dequantize", kernels.float32, "float32", aliases=("dequantization",), coremltools_names=("dequantization",),
         version_floor=None, done_if="float32", reads_quantized=True),
)}
# a recipe stage's modes: the weight modes, and fold, which changes layers (formats/nn/fold.py), not weights
STAGE_MODES = ("fold", *MODES)
ALIASES = {alias: m.name for m in MODES.values() for alias in m.aliases}


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


def mode_named(mode: str) -> Mode:
    """The registry entry of a mode or alias; an unknown name is refused, listing the modes."""
    found = MODES.get(canonical_mode(mode))
    if found is None:
        raise ModelError(f"unknown quantization mode {canonical_mode(mode)!r}; choose one of {', '.join(MODES)}")
    return found


def check_settings(mode: str, nbits: int | None) -> None:
    """Refuse impossible mode / nbits combinations with a message saying what is allowed."""
    m = mode_named(mode)
    if m.nbits is None:
        return
    if not isinstance(nbits, int) or isinstance(nbits, bool):
        raise ModelError(f"{m.name}: nbits must be an integer, got {nbits!r}")
    lo, hi = m.nbits
    if NBITS[0] <= nbits < lo:
        raise ModelError(f"{m.name}: nbits must be {lo}..{hi} ({m.nbits_note})")
    if not NBITS[0] <= nbits <= NBITS[1]:
        raise ModelError(f"{m.name}: nbits must be {NBITS[0]}..{NBITS[1]}, got {nbits} (use mode fp16 for 16-bit)")


def apply_mode(rec: WeightRecord, settings: ModeSettings) -> bool:
    """Rewrite `rec`'s blob in the given mode; returns False when there was nothing to do."""
    mode = mode_named(settings.mode)
    st = rec.storage
    if rec.count == 0:  # a layer with no weights (zero channels): nothing to quantize
        return False
    if st.kind == mode.done_if:
        return False
    if not mode.reads_quantized and st.is_quantized:
        raise ModelError(
            f"{rec.where}: already quantized ({st}); dequantize it first (a `dequantize` stage, or "
            "quantization_mode='dequantization') before quantizing again"
        )
    if not mode.reads_quantized and st.kind == "conflict":
        raise ModelError(f"{rec.where}: several storage fields are set; the model is invalid")
    ks = kernels.KernelSettings(settings.nbits, rec.axis, settings.min_scale, settings.lut_function, rec.where)
    if mode.checks_finite:
        result = mode.kernel(rec.float_values(), ks)
    else:
        try:
            result = mode.kernel(rec.values(), ks)
        except ValueError:
            rec.float_values()  # NaN or Inf: raises ModelError naming the layer and the count
            raise
    options = {"keep_empty_quantization": True} if settings.keep_empty_quantization else {}
    format_of_record(rec).write_result(rec, result, **options)
    return True
