"""The mode registry: one `Mode` per quantization mode, and applying a mode to one weight record.

Everything that differs between modes is a field here — names, bits, what a recipe stage needs, the
storage and size afterwards, the specification-version floor, the kernel per format, the settings each
format reads — so the plan, the build, the compatibility APIs and the recipe schema (kept equal to this
table by tests/recipe/test_schema_modes.py) cannot disagree. A mode reads the weight's values, runs its
kernel from `mlqpipe.quant.kernels` and hands the neutral result to the format's writer. Compressed
weights are refused unless the mode reads them (`dequantize`) or the stage is `joint` (ML programs: a
second compression on top of the first, as coremltools' joint_compression): compressing codes again would
be silent double rounding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping

from mlqpipe.errors import ModelError
from mlqpipe.formats.base import Storage, WeightRecord
from mlqpipe.formats.registry import format_of_record
from mlqpipe.quant import kernels
from mlqpipe.quant.affine import NotApplicable
from mlqpipe.quant.linear import EXACT_MIN_SCALE

NBITS = (1, 8)  # what the neural-network format stores (numberOfBits); a mode may allow less
LUT_NBITS_MLPROGRAM = (1, 2, 3, 4, 6, 8)  # the index dtypes ML programs have (uint1..uint8, no 5 or 7)
DEFAULT = "*"  # the settings and kernel of formats a mode names no entry for

# recipe stage keys per format (besides mode, name, rules); a key set for a format that does not read it
# is a located plan problem
_NN_LINEAR = ("nbits", "coremltools_rounding")
_ML_LINEAR = ("nbits", "dtype", "granularity", "block_size", "joint")
_ML_LUT = ("nbits", "granularity", "group_size", "channel_axis", "cluster_dim", "per_channel_scale", "lut_dtype", "joint")
_ML_PRUNE = ("target_sparsity", "threshold", "minimum_sparsity", "block_size", "n_m", "dim")


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
    # per format name: another kernel (ML programs: coremltools.optimize's forms), the stage keys it reads,
    # the nbits it can store; DEFAULT for every other format
    kernels: Mapping[str, Callable] = field(default_factory=dict)
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    format_nbits: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    joint_kernel: Callable | None = None  # (previous result, KernelSettings) -> result, for joint stages
    infers_nbits: tuple[str, ...] = ()  # formats where a stage may leave nbits out (dtype says it; unique finds it)

    def storage_after(self, nbits: int | None) -> Storage:
        return Storage(self.storage, {"float16": 16, "float32": 32}.get(self.storage, nbits or 8))

    def kernel_for(self, fmt_name: str) -> Callable:
        return self.kernels.get(fmt_name, self.kernel)

    def keys_for(self, fmt_name: str) -> tuple[str, ...]:
        return self.keys.get(fmt_name, self.keys.get(DEFAULT, ()))

    @property
    def all_keys(self) -> frozenset[str]:
        """Every stage key some format reads in this mode (what the schema allows)."""
        return frozenset(k for keys in self.keys.values() for k in keys)


def _refuses(values, s):
    raise ModelError(f"{s.where}: this mode is not available for this model's format")


_ML = "mlprogram"
_LINEAR = dict(storage="linear", nbits=NBITS, coremltools_rounding=True, checks_finite=False,
               kernels={_ML: kernels.affine}, keys={DEFAULT: _NN_LINEAR, _ML: _ML_LINEAR},
               format_nbits={_ML: (4, 8)}, joint_kernel=kernels.joint, infers_nbits=(_ML,))
_LUT = dict(storage="lut", nbits=NBITS, kernels={_ML: kernels.palette}, keys={DEFAULT: ("nbits",), _ML: _ML_LUT},
            format_nbits={_ML: LUT_NBITS_MLPROGRAM}, joint_kernel=kernels.joint)
_ML_ONLY = dict(kernel=_refuses, checks_finite=False)

MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp16", kernels.float16, "float16", aliases=("float16",), version_floor="float16", done_if="float16"),
    Mode("linear", kernels.linear, coremltools_names=("linear",), **_LINEAR),
    Mode("linear_symmetric", kernels.linear_symmetric, coremltools_names=("linear_symmetric",),
         **{**_LINEAR, "nbits": (2, 8)}, nbits_note="1-bit symmetric quantization has no zero level"),
    Mode("linear_lut", kernels.linear_lut, coremltools_names=("linear_lut",), **{**_LUT, "coremltools_rounding": True,
         "keys": {DEFAULT: _NN_LINEAR, _ML: _ML_LUT}}),
    Mode("kmeans_lut", kernels.kmeans_lut, aliases=("kmeans",), coremltools_names=("kmeans_lut", "kmeans"), **_LUT),
    Mode("unique_lut", storage="lut", nbits=NBITS, kernels={_ML: kernels.palette}, keys={_ML: _ML_LUT},
         format_nbits={_ML: LUT_NBITS_MLPROGRAM}, joint_kernel=kernels.joint, infers_nbits=(_ML,), **_ML_ONLY),
    # ML programs: coremltools' lut_function(weight) -> (lut, indices), nbits follows from the LUT's size
    Mode("custom_lut", kernels.custom_lut, coremltools_names=("custom_lut",), needs=("function",),
         **{**_LUT, "keys": {DEFAULT: ("nbits", "function"), _ML: ("function", *_ML_LUT[1:])}, "infers_nbits": (_ML,)}),
    Mode("prune", storage="sparse", kernels={_ML: kernels.sparse}, keys={_ML: _ML_PRUNE}, **_ML_ONLY),
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
    # ML programs, named and defaulted as coremltools.optimize.coreml's configs (MLPROGRAM.md §5):
    dtype: str = "int8"  # linear codes: int8, uint8, int4, uint4
    granularity: str | None = None  # None: per_channel for linear, per_tensor for LUTs
    block_size: int | tuple[int, ...] = 32  # linear per_block: on the input axis, or one per axis (0: whole axis)
    group_size: int = 32  # per_grouped_channel: channels per LUT
    channel_axis: int | None = None  # per_grouped_channel: the grouped axis (None: the output axis)
    cluster_dim: int = 1  # > 1: vector LUTs
    per_channel_scale: bool = False
    lut_dtype: str | None = None  # None: the weight's float dtype; int8/uint8: the LUT quantized per tensor
    target_sparsity: float | None = None  # magnitude pruning (with prune_block_size, or n_m instead)
    threshold: float | None = None  # threshold pruning (values with |w| <= threshold), with minimum_sparsity
    minimum_sparsity: float = 0.5
    prune_block_size: int | None = None
    n_m: tuple[int, int] | None = None
    dim: int | None = None
    joint: bool = False  # compress on top of an earlier compression (ML programs)


class NotApplicableError(ModelError):
    """The settings do not fit this weight (its shape, its value count): coremltools' API skips such a weight
    with a warning, recipes report it."""


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


def apply_mode(rec: WeightRecord, settings: ModeSettings, *, warn: Callable[[str], None] | None = None) -> bool:
    """Rewrite `rec` in the given mode; returns False when there was nothing to do. `warn` receives what is
    left alone on purpose (an all-zero weight kept dense; default: a Python warning)."""
    mode = mode_named(settings.mode)
    st = rec.storage
    if rec.count == 0:  # a layer with no weights (zero channels): nothing to quantize
        return False
    if st.kind == mode.done_if:
        return False
    joint = settings.joint and st.is_quantized and not mode.reads_quantized
    if not mode.reads_quantized and st.is_quantized and not joint:
        raise ModelError(
            f"{rec.where}: already quantized ({st}); dequantize it first (a `dequantize` stage, or "
            "quantization_mode='dequantization') before quantizing again"
        )
    if not mode.reads_quantized and st.kind == "conflict":
        raise ModelError(f"{rec.where}: several storage fields are set; the model is invalid")
    fmt = format_of_record(rec)
    ks = kernel_settings(rec, settings)
    try:
        result = _run(mode, rec, fmt, ks, joint)
    except NotApplicable as e:
        raise NotApplicableError(f"{rec.where}: {e}") from None
    except ModelError:
        raise
    except ValueError as e:  # the kernels' own words, without the weight's name
        rec.float_values()  # NaN or Inf: raises ModelError naming the weight and the count
        raise ModelError(f"{rec.where}: {e}") from None
    if result is None:
        return False
    if _all_pruned(result):
        (warn or _warn)(f"{rec.where}: every value is zero; kept dense (a zero-length sparse weight is not written)")
        return False
    options = {"keep_empty_quantization": True} if settings.keep_empty_quantization else {}
    fmt.write_result(rec, result, **options)
    return True


# what ModeSettings hands the kernels under the same name (mode and nbits are resolved in kernel_settings)
_SHARED_SETTINGS = tuple(sorted({f.name for f in fields(ModeSettings)} & {f.name for f in fields(kernels.KernelSettings)}
                                - {"mode", "nbits"}))


def kernel_settings(rec: WeightRecord, settings: ModeSettings) -> kernels.KernelSettings:
    """What the kernels see: the settings, and the weight's channel axes and name."""
    return kernels.KernelSettings(nbits=settings.nbits, axis=rec.axis, where=rec.where, mode=mode_named(settings.mode).name,
                                  input_axis=getattr(rec, "input_axis", None), conv_groups=getattr(rec, "conv_groups", ()),
                                  **{n: getattr(settings, n) for n in _SHARED_SETTINGS})


def _run(mode: Mode, rec: WeightRecord, fmt, ks: kernels.KernelSettings, joint: bool):
    if joint:
        previous = fmt.compressed_result(rec) if hasattr(fmt, "compressed_result") else None
        if previous is None or mode.joint_kernel is None:
            raise ModelError(f"{rec.where}: {rec.storage} weights cannot be compressed jointly with {mode.name}")
        return mode.joint_kernel(previous, ks)
    kernel = mode.kernel_for(fmt.name)
    if kernel is not mode.kernel:  # a format's own kernels compute in the weight's dtype, as coremltools'
        return kernel(rec.native_values(), ks)
    if mode.checks_finite:
        return kernel(rec.float_values(), ks)
    return kernel(rec.values(), ks)


def _all_pruned(result) -> bool:
    mask = getattr(result, "mask", None)
    return mask is not None and not mask.any()


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
