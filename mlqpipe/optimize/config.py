"""coremltools.optimize.coreml's compression configs (9.0), as plain frozen dataclasses.

Same names, arguments, defaults and validation rules as coremltools 9.0, so code written for
`coremltools.optimize.coreml` runs unchanged; invalid values raise `ModelError` (a ValueError) with one
message naming the class, the argument and what to use instead. What is stored is normalised the way
coremltools normalises it, so equal settings compare equal (the selection's conflict check relies on it):
`mode` upper-case ("LINEAR_SYMMETRIC", "KMEANS", ...), `dtype` one of "int8" / "uint8" / "int4" / "uint4",
`granularity` a lower-case string, `block_size` / `n_m_ratio` tuples, floats as floats.

Deliberate differences (supersets; nothing coremltools accepts is refused, except where it fails later):
- an int where a float is expected (`target_sparsity=1`, YAML `threshold: 0`) is accepted as a float
  (coremltools raises TypeError for the constructor, although its from_dict converts);
- `weight_threshold=None` is refused here (coremltools accepts it and raises at compression time);
- `group_size`, `cluster_dim`, `num_kmeans_workers` must be positive ints, `channel_axis` an int or None,
  `n_m_ratio`'s m > 0 (coremltools does not check them and fails, or misbehaves, later);
- `OptimizationConfig.from_dict` always checks `config_type` names a config class (coremltools only when
  an entry uses it);
- `op_type_configs["const"]` is refused here (coremltools accepts it and raises at compression time);
- OptimizationConfig keeps coremltools' mutators (`set_global`, `set_op_type`, `set_op_name`), so it is a
  mutable dataclass; the per-op configs are frozen and hashable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, Union

from mlqpipe.errors import ModelError

DEFAULT_WEIGHT_THRESHOLD = 2048
LINEAR_DTYPES = ("int8", "uint8", "int4", "uint4")
PALETTIZATION_NBITS = (1, 2, 3, 4, 6, 8)
STRUCTURED_PRUNING_INPUTS = {"conv": "weight", "linear": "weight"}  # op type -> the only parameter allowed


# -- argument checks (each raises one ModelError naming the class and argument) ----------------------------


def _fail(cls: str, message: str) -> ModelError:
    return ModelError(f"{cls}: {message}")


def _is_int(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or _is_numpy_int(value)


def _is_numpy_int(value) -> bool:
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return kind in ("i", "u") and getattr(value, "ndim", 1) == 0


def _int(cls: str, name: str, value, *, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not _is_int(value):
        raise _fail(cls, f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise _fail(cls, f"{name} must be >= {minimum}, got {value}")
    return value


def _float(cls: str, name: str, value, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise _fail(cls, f"{name} must be a float{' or None' if optional else ''}, got {value!r}")
    return float(value)


def _weight_threshold(cls: str, value) -> int:
    if value is None:
        raise _fail(cls, f"weight_threshold must be a non-negative int (default {DEFAULT_WEIGHT_THRESHOLD}), got None")
    if not _is_int(value) or int(value) < 0:
        raise _fail(cls, f"weight_threshold must be a non-negative int (weights with more elements are compressed), "
                         f"got {value!r}")
    return int(value)


def _mode(cls: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.upper() not in allowed:
        choices = ", ".join(repr(m.lower()) for m in allowed)
        raise _fail(cls, f"mode {value!r} is not supported; use one of {choices}")
    return value.upper()


def _granularity(cls: str, value, allowed: tuple[str, ...]) -> str:
    """A string, or coremltools' CompressionGranularity enum (by its name)."""
    name = value.lower() if isinstance(value, str) else str(getattr(value, "name", value)).lower()
    if name not in allowed:
        raise _fail(cls, f"granularity {value!r} is not supported; use one of {', '.join(map(repr, allowed))}")
    return name


def _dtype_name(value) -> str | None:
    """The name of a dtype given as a string, a numpy type or dtype, or a coremltools MIL builtin type."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.lower()
    module = getattr(value, "__module__", "") or ""
    if module.startswith("coremltools.") and hasattr(value, "get_bitwidth"):  # a MIL builtin type (duck typed)
        bits = value.get_bitwidth()
        if hasattr(value, "is_unsigned"):
            return f"{'u' if value.is_unsigned() else ''}int{bits}"
        return f"fp{bits}"
    try:
        import numpy as np

        return np.dtype(value).name
    except (TypeError, ValueError):
        return None


def _dtype(cls: str, value) -> str:
    name = _dtype_name(value)
    if name not in LINEAR_DTYPES:
        shown = repr(value) if name is None or name == value else f"{value!r} ({name})"
        raise _fail(cls, f"dtype {shown} is not supported; use one of {', '.join(LINEAR_DTYPES)} "
                         "(a string, a numpy type or a MIL type)")
    return name


def _block_size(cls: str, value) -> int | tuple[int, ...]:
    if _is_int(value):
        if int(value) < 0:
            raise _fail(cls, f"block_size must be non-negative (0 = the whole axis), got {value}")
        return int(value)
    if isinstance(value, (list, tuple)):
        if not all(_is_int(v) and int(v) >= 0 for v in value):
            raise _fail(cls, f"block_size must hold non-negative ints (one per axis; 0 = the whole axis), got {value!r}")
        return tuple(int(v) for v in value)
    raise _fail(cls, f"block_size must be an int or a list of ints (one per axis), got {value!r}")


def _set(obj, **values) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


# -- the op configs -----------------------------------------------------------------------------------------


class OpCompressorConfig:
    """Base of the per-op configs (coremltools' name): `to_dict()` and `weight_threshold` on each."""

    weight_threshold: int
    NOT_IN_DICT: ClassVar[frozenset[str]] = frozenset()  # fields from_dict / to_dict refuse

    def to_dict(self) -> dict[str, Any]:
        """The arguments as coremltools' dict format takes them (from_dict(to_dict()) == self)."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self.NOT_IN_DICT:
                if value is not None:
                    raise _fail(type(self).__name__, f"{f.name} cannot be written to a dict or YAML (it is a function)")
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value.lower() if f.name == "mode" else value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Construct from a dict of arguments; unknown keys are an error (as coremltools' forbid_extra_keys)."""
        if not isinstance(values, Mapping):
            raise _fail(cls.__name__, f"expected a mapping of arguments, got {values!r}")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        extra = [k for k in values if k not in names or k in cls.NOT_IN_DICT]
        if extra:
            hint = " (a function cannot come from a dict or YAML: construct the config in Python)" if set(extra) & cls.NOT_IN_DICT else ""
            raise _fail(cls.__name__, f"unknown argument(s) {', '.join(map(repr, extra))}{hint}; "
                                      f"arguments: {', '.join(sorted(names - cls.NOT_IN_DICT))}")
        return cls(**values)


@dataclass(frozen=True)
class OpLinearQuantizerConfig(OpCompressorConfig):
    """Linear quantization: mode linear_symmetric | linear, dtype int8 | uint8 | int4 | uint4, granularity
    per_tensor | per_channel | per_block (block_size: int on the input axis, or one per axis; used by
    per_block only)."""

    mode: str = "linear_symmetric"
    dtype: Any = "int8"
    granularity: Any = "per_channel"
    block_size: Union[int, tuple[int, ...]] = 32
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD

    MODES: ClassVar[tuple[str, ...]] = ("LINEAR_SYMMETRIC", "LINEAR")
    GRANULARITIES: ClassVar[tuple[str, ...]] = ("per_tensor", "per_channel", "per_block")

    def __post_init__(self):
        c = type(self).__name__
        _set(self, mode=_mode(c, self.mode, self.MODES), dtype=_dtype(c, self.dtype),
             granularity=_granularity(c, self.granularity, self.GRANULARITIES),
             block_size=_block_size(c, self.block_size), weight_threshold=_weight_threshold(c, self.weight_threshold))

    @property
    def nbits(self) -> int:
        return int(self.dtype[-1])

    @property
    def signed(self) -> bool:
        return not self.dtype.startswith("u")


@dataclass(frozen=True)
class OpPalettizerConfig(OpCompressorConfig):
    """Palettization: mode kmeans | uniform (nbits required) | unique | custom (no nbits; custom needs
    lut_function(weight) -> (lut, indices)), granularity per_tensor | per_grouped_channel (group_size,
    channel_axis: None = the op's output axis), cluster_dim > 1 for vector LUTs, enable_per_channel_scale."""

    mode: str = "kmeans"
    nbits: int | None = None
    lut_function: Callable | None = None
    granularity: Any = "per_tensor"
    group_size: int = 32
    channel_axis: int | None = None
    cluster_dim: int = 1
    enable_per_channel_scale: bool = False
    num_kmeans_workers: int = 1
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD

    MODES: ClassVar[tuple[str, ...]] = ("KMEANS", "UNIFORM", "UNIQUE", "CUSTOM")
    GRANULARITIES: ClassVar[tuple[str, ...]] = ("per_tensor", "per_grouped_channel")
    NOT_IN_DICT: ClassVar[frozenset[str]] = frozenset({"lut_function"})

    def __post_init__(self):
        c = type(self).__name__
        mode = _mode(c, self.mode, self.MODES)
        nbits = _palette_nbits(c, mode, self.nbits)
        if mode == "CUSTOM" and self.lut_function is None:
            raise _fail(c, "mode 'custom' needs lut_function (a callable weight -> (lut, indices))")
        if mode != "CUSTOM" and self.lut_function is not None:
            raise _fail(c, f"lut_function is only used by mode 'custom', not {mode.lower()!r}; remove it or use mode 'custom'")
        if self.lut_function is not None and not callable(self.lut_function):
            raise _fail(c, f"lut_function must be callable, got {type(self.lut_function).__name__}")
        if not isinstance(self.enable_per_channel_scale, bool):
            raise _fail(c, f"enable_per_channel_scale must be True or False, got {self.enable_per_channel_scale!r}")
        _set(self, mode=mode, nbits=nbits, granularity=_granularity(c, self.granularity, self.GRANULARITIES),
             group_size=_int(c, "group_size", self.group_size, minimum=1),
             channel_axis=_int(c, "channel_axis", self.channel_axis, optional=True),
             cluster_dim=_int(c, "cluster_dim", self.cluster_dim, minimum=1),
             num_kmeans_workers=_int(c, "num_kmeans_workers", self.num_kmeans_workers, minimum=1),
             weight_threshold=_weight_threshold(c, self.weight_threshold))


def _palette_nbits(cls: str, mode: str, nbits) -> int | None:
    if nbits is None and mode in ("KMEANS", "UNIFORM"):
        raise _fail(cls, f"mode {mode.lower()!r} needs nbits (one of {', '.join(map(str, PALETTIZATION_NBITS))})")
    if nbits is not None and mode in ("UNIQUE", "CUSTOM"):
        raise _fail(cls, f"mode {mode.lower()!r} takes no nbits ("
                         + ("picked from the number of unique values" if mode == "UNIQUE" else "the lut_function decides") + ")")
    if nbits is not None and (not _is_int(nbits) or int(nbits) not in PALETTIZATION_NBITS):
        raise _fail(cls, f"nbits {nbits!r} is not supported for palettization; use one of {', '.join(map(str, PALETTIZATION_NBITS))}")
    return None if nbits is None else int(nbits)


@dataclass(frozen=True)
class OpMagnitudePrunerConfig(OpCompressorConfig):
    """Magnitude pruning: exactly one of target_sparsity (in [0, 1]) and n_m_ratio ((n, m), n <= m);
    block_size (> 1) only with target_sparsity; dim (0 or 1) only with block_size or n_m_ratio, and then
    defaulting to 0 (block) or 1 (n:m). Structured pruning applies to conv / linear weights only."""

    target_sparsity: float | None = None
    block_size: int | None = None
    n_m_ratio: tuple[int, int] | None = None
    dim: int | None = None
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD

    def __post_init__(self):
        c = type(self).__name__
        sparsity = _float(c, "target_sparsity", self.target_sparsity, optional=True)
        block = _int(c, "block_size", self.block_size, optional=True)
        ratio = self.n_m_ratio
        dim = _int(c, "dim", self.dim, optional=True)
        if (sparsity is None) == (ratio is None):
            raise _fail(c, "set exactly one of target_sparsity and n_m_ratio"
                           + (f" (got target_sparsity={sparsity} and n_m_ratio={tuple(ratio)})" if ratio is not None else ""))
        if sparsity is not None and not 0.0 <= sparsity <= 1.0:
            raise _fail(c, f"target_sparsity must be in [0, 1], got {sparsity}")
        if block is not None and ratio is not None:
            raise _fail(c, "block_size and n_m_ratio cannot be set at the same time")
        if block is not None and block <= 1:
            raise _fail(c, f"block_size must be an int > 1, got {block}")
        if ratio is not None:
            if not isinstance(ratio, (list, tuple)) or len(ratio) != 2 or not all(_is_int(v) and int(v) >= 0 for v in ratio) \
                    or ratio[0] > ratio[1] or ratio[1] == 0:
                raise _fail(c, f"n_m_ratio must be two ints (n, m) with n <= m and m > 0, got {ratio!r}")
            ratio = (int(ratio[0]), int(ratio[1]))
        if dim is not None and block is None and ratio is None:
            raise _fail(c, "dim can only be set along with block_size or n_m_ratio")
        if dim is not None and dim not in (0, 1):
            raise _fail(c, f"dim must be 0 or 1, got {dim}")
        if dim is None and (block is not None or ratio is not None):
            dim = 0 if block is not None else 1
        _set(self, target_sparsity=sparsity, block_size=block, n_m_ratio=ratio, dim=dim,
             weight_threshold=_weight_threshold(c, self.weight_threshold))

    @property
    def structured(self) -> bool:
        """Block or n:m pruning: only for conv / linear weights."""
        return self.block_size is not None or self.n_m_ratio is not None


@dataclass(frozen=True)
class OpThresholdPrunerConfig(OpCompressorConfig):
    """Threshold pruning: |w| < threshold (>= 0) becomes 0; stored sparse only when at least
    minimum_sparsity_percentile (in [0, 1]) of the weight is zero."""

    threshold: float = 1e-12
    minimum_sparsity_percentile: float = 0.5
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD

    def __post_init__(self):
        c = type(self).__name__
        threshold = _float(c, "threshold", self.threshold)
        minimum = _float(c, "minimum_sparsity_percentile", self.minimum_sparsity_percentile)
        if not threshold >= 0:
            raise _fail(c, f"threshold must be in [0, inf), got {threshold}")
        if not 0.0 <= minimum <= 1.0:
            raise _fail(c, f"minimum_sparsity_percentile must be in [0, 1], got {minimum}")
        _set(self, threshold=threshold, minimum_sparsity_percentile=minimum,
             weight_threshold=_weight_threshold(c, self.weight_threshold))


OpConfig = Union[OpLinearQuantizerConfig, OpPalettizerConfig, OpMagnitudePrunerConfig, OpThresholdPrunerConfig]
CONFIG_TYPES: dict[str, type] = {cls.__name__: cls for cls in
                                 (OpLinearQuantizerConfig, OpPalettizerConfig, OpMagnitudePrunerConfig, OpThresholdPrunerConfig)}


# -- OptimizationConfig -------------------------------------------------------------------------------------

_DICT_KEYS = ("config_type", "global_config", "op_type_configs", "op_name_configs")


def _check_op_config(where: str, value) -> None:
    if value is not None and not isinstance(value, OpCompressorConfig):
        raise ModelError(f"OptimizationConfig: {where} must be an op config ({', '.join(CONFIG_TYPES)}) or None, "
                         f"got {type(value).__name__}")


def _check_op_type(op_type, value) -> None:
    if not isinstance(op_type, str):
        raise ModelError(f"OptimizationConfig: op_type_configs keys must be op type strings, got {op_type!r}")
    if op_type == "const":
        raise ModelError("OptimizationConfig: op_type_configs['const'] is not allowed (consts are configured by the "
                         "op that reads them); use global_config, or op_name_configs with the const's name")
    _check_op_config(f"op_type_configs[{op_type!r}]", value)
    if isinstance(value, OpMagnitudePrunerConfig) and value.structured and op_type not in STRUCTURED_PRUNING_INPUTS:
        raise ModelError(f"OptimizationConfig: op_type_configs[{op_type!r}]: block or n:m pruning supports only op types "
                         f"{', '.join(STRUCTURED_PRUNING_INPUTS)}, not {op_type!r}")


@dataclass
class OptimizationConfig:
    """Which config each weight gets: op_name_configs (the const's name, else a consumer op's name) over
    op_type_configs (the consumer op's type) over global_config; a None value means "do not compress".
    See mlqpipe.optimize.select for exactly how a weight's config is resolved."""

    global_config: OpConfig | None = None
    op_type_configs: dict[str, OpConfig | None] = field(default_factory=dict)
    op_name_configs: dict[str, OpConfig | None] = field(default_factory=dict)

    def __post_init__(self):
        _check_op_config("global_config", self.global_config)
        for name, attr in (("op_type_configs", self.op_type_configs), ("op_name_configs", self.op_name_configs)):
            if attr is not None and not isinstance(attr, Mapping):
                raise ModelError(f"OptimizationConfig: {name} must be a dict, got {type(attr).__name__}")
        self.op_type_configs = dict(self.op_type_configs or {})
        self.op_name_configs = dict(self.op_name_configs or {})
        for op_type, value in self.op_type_configs.items():
            _check_op_type(op_type, value)
        for op_name, value in self.op_name_configs.items():
            if not isinstance(op_name, str):
                raise ModelError(f"OptimizationConfig: op_name_configs keys must be op names, got {op_name!r}")
            _check_op_config(f"op_name_configs[{op_name!r}]", value)

    # coremltools' mutators
    def set_global(self, op_config: OpConfig | None) -> None:
        _check_op_config("global_config", op_config)
        self.global_config = op_config

    def set_op_type(self, op_type: str, op_config: OpConfig | None) -> None:
        _check_op_type(op_type, op_config)
        self.op_type_configs[op_type] = op_config

    def set_op_name(self, op_name: str, op_config: OpConfig | None) -> None:
        if not isinstance(op_name, str):
            raise ModelError(f"OptimizationConfig: op names are strings, got {op_name!r}")
        _check_op_config(f"op_name_configs[{op_name!r}]", op_config)
        self.op_name_configs[op_name] = op_config

    def entries(self) -> list[tuple[str, OpConfig | None]]:
        """(where, config) of every entry, e.g. ("global_config", …), ("op_type_configs['conv']", …)."""
        out = [("global_config", self.global_config)]
        out += [(f"op_type_configs[{k!r}]", v) for k, v in self.op_type_configs.items()]
        out += [(f"op_name_configs[{k!r}]", v) for k, v in self.op_name_configs.items()]
        return out

    def require(self, api: str, *allowed: type) -> None:
        """Refuse configs of other classes, as each coremltools API does (linear_quantize_weights takes
        OpLinearQuantizerConfig only, prune_weights the two pruner configs, ...)."""
        for where, value in self.entries():
            if value is not None and not isinstance(value, allowed):
                raise ModelError(f"{api} accepts only {' or '.join(c.__name__ for c in allowed)}; "
                                 f"{where} is {type(value).__name__}")

    # -- dict / YAML (coremltools' format) ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> "OptimizationConfig":
        """coremltools' nested-dict format: `config_type` (a config class name, required), `global_config`,
        `op_type_configs`, `op_name_configs`; each entry is a dict of arguments (which may name its own
        `config_type`) or None (= skip). The input is not modified."""
        if not isinstance(config_dict, Mapping):
            raise ModelError(f"OptimizationConfig.from_dict: expected a mapping with keys {', '.join(_DICT_KEYS)}, "
                             f"got {type(config_dict).__name__}")
        extra = [k for k in config_dict if k not in _DICT_KEYS]
        if extra:
            raise ModelError(f"OptimizationConfig.from_dict: unknown key(s) {', '.join(map(repr, extra))}; "
                             f"the keys are {', '.join(_DICT_KEYS)}")
        config_type = config_dict.get("config_type")
        _config_class("config_type", config_type)
        kwargs: dict[str, Any] = {}
        if config_dict.get("global_config") is not None:
            kwargs["global_config"] = _entry("global_config", config_type, config_dict["global_config"])
        for key in ("op_type_configs", "op_name_configs"):
            entries = config_dict.get(key)
            if entries is None:
                continue
            if not isinstance(entries, Mapping):
                raise ModelError(f"OptimizationConfig.from_dict: {key} must be a mapping of name -> arguments, "
                                 f"got {type(entries).__name__}")
            kwargs[key] = {name: _entry(f"{key}[{name!r}]", config_type, v) for name, v in entries.items()}
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, yml) -> "OptimizationConfig":
        """The dict format as YAML (safe loading): a path (str or os.PathLike), an open file, or YAML text
        (a str that is not an existing file and holds a mapping)."""
        import yaml  # here, not at import: keeps `import mlqpipe.optimize` cheap

        where = "YAML"
        if hasattr(yml, "read"):
            text = yml.read()
        elif isinstance(yml, (str, os.PathLike)) and os.path.isfile(yml):
            where = os.fspath(yml)
            with open(yml, encoding="utf-8") as handle:
                text = handle.read()
        elif isinstance(yml, str) and ("\n" in yml or ":" in yml):
            text = yml
        else:
            raise ModelError(f"OptimizationConfig.from_yaml: {yml!r} is neither an existing file nor YAML text")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ModelError(f"{where}: not valid YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(data, Mapping):
            raise ModelError(f"{where}: expected a mapping with keys {', '.join(_DICT_KEYS)}, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The dict format from_dict reads (config_type of the global config, or of the first entry; other
        classes name their own config_type)."""
        present = [v for _, v in self.entries() if v is not None]
        base = type(present[0]).__name__ if present else "OpLinearQuantizerConfig"

        def one(value):
            if value is None:
                return None
            d = value.to_dict()
            return d if type(value).__name__ == base else {"config_type": type(value).__name__, **d}

        out: dict[str, Any] = {"config_type": base}
        if self.global_config is not None:
            out["global_config"] = one(self.global_config)
        if self.op_type_configs:
            out["op_type_configs"] = {k: one(v) for k, v in self.op_type_configs.items()}
        if self.op_name_configs:
            out["op_name_configs"] = {k: one(v) for k, v in self.op_name_configs.items()}
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _config_class(where: str, name) -> type:
    if not isinstance(name, str) or name not in CONFIG_TYPES:
        raise ModelError(f"OptimizationConfig.from_dict: {where} must name a config class "
                         f"({', '.join(CONFIG_TYPES)}), got {name!r}")
    return CONFIG_TYPES[name]


def _entry(where: str, config_type: str, values) -> OpConfig | None:
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise ModelError(f"OptimizationConfig.from_dict: {where} must be a mapping of arguments or null, got {values!r}")
    values = dict(values)
    cls = _config_class(f"{where}.config_type", values.pop("config_type", config_type))
    try:
        return cls.from_dict(values)
    except ModelError as exc:
        raise ModelError(f"OptimizationConfig.from_dict: {where}: {exc}") from None
