"""Which weights of an ML program get which config: coremltools 9.0's decision, made on our inventory.

`decide(records, config)` gives one Decision per weight record (the config, where it came from, or why the
weight is left alone); `select` keeps the chosen ones. The rules, in coremltools' order
(MLPROGRAM.md §0.7, §5, §6):

1. Only plain consts (records whose `compressed` is False); an already compressed weight is left alone
   (compressing it again is joint compression, a separate step).
2. The config: `op_name_configs[<const name>]` if the key exists (its value may be None = skip); else no
   consumer op (the const only feeds block outputs) = skip; else each consumer op resolves
   op_name_configs[<op name>] > op_type_configs[<op type>] > global_config, and consumers that resolve
   to different configs are an error naming both (coremltools: "compression config conflict detected";
   raised, like there, whatever the weight's size). None = skip.
3. Skipped: a const also read by a constexpr op; rank <= 1 (coremltools' "MIL 1D tensor bug"); not more
   than `weight_threshold` elements (strictly greater is compressed).
4. Per config class, from the shapes alone (what coremltools skips with a warning):
   - linear quantization and palettization need the output and input channel axes of every consumer to
     agree (conv_transpose 1/0, matmul by its transpose flags, everything else 0/1). A const read by
     consumers that disagree is skipped — even for per_tensor, which needs no axis: coremltools computes
     block sizes from the axes for every granularity, and this API promises coremltools' choice of weights
     (recipes are where mlqpipe does better). The one exception, as there: linear per_block with one block
     size per axis uses them verbatim.
   - linear: every axis with a block size b > 0 must be divisible by b. palettization: the grouped axis
     must be divisible by its group size and the group by cluster_dim.
   - block or n:m magnitude pruning: only for consts read solely as the `weight` of conv / linear, unless
     the const is named in op_name_configs; and only when the block size (or m) is at most half of the
     pruned axis (`dim`).
   Pruning needs no channel axis; data-dependent skips (±inf for linear quantization, > 256 unique values,
   too little sparsity) are the kernels' business.

Differences from coremltools: an op_name_configs key that names no op holding or reading a weight is an
error with the closest names (coremltools ignores it silently), and multi-function models are selected
across all functions (records already merge a weight shared by functions; coremltools refuses them).
Vector palettization of a grouped convolution's weight needs cluster_dim to divide each group's channels
(coremltools' is_cluster_dim_valid; records carry the readers' `groups`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

from mlqpipe.errors import ModelError
from mlqpipe.optimize.config import (
    STRUCTURED_PRUNING_INPUTS,
    OpConfig,
    OpLinearQuantizerConfig,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OptimizationConfig,
)

_NO = object()  # "no entry" (None is a valid entry: skip)


@dataclass(frozen=True)
class Decision:
    """For one weight record: the config it gets (None: left alone), the config entry that decided
    ("op_name_configs['fc1']", "op_type_configs['linear']", "global_config"; "" when none applies), and
    `skipped`, why it is left alone ("" when it is compressed)."""

    id: str
    config: OpConfig | None
    source: str
    skipped: str = ""

    @property
    def chosen(self) -> bool:
        return self.config is not None and not self.skipped


def select(records: Sequence, config: OptimizationConfig, *, source: str | None = None) -> dict[str, OpConfig]:
    """record id -> config for every weight coremltools 9.0 would compress with `config` (absent: left
    alone). `records`: an ML program's inventory (MLWeightRecord); `source` names the model in errors."""
    return {d.id: d.config for d in decide(records, config, source=source) if d.chosen}


def decide(records: Sequence, config: OptimizationConfig, *, source: str | None = None) -> list[Decision]:
    """One Decision per record, in record order (see the module docstring for the rules)."""
    if not isinstance(config, OptimizationConfig):
        raise ModelError(f"config must be an OptimizationConfig, got {type(config).__name__}")
    source = source or _source(records)
    check_op_names(records, config, source)
    return [_decide(rec, config, source) for rec in records]


# -- op_name keys -------------------------------------------------------------------------------------------


def weight_op_names(records: Iterable) -> list[str]:
    """Every name an op_name_configs key may use: consts (and compressed weights' last ops) and the ops
    reading them, in record order."""
    names: dict[str, None] = {}
    for rec in records:
        names[rec.layer] = None
        names.update(dict.fromkeys(c.op for c in rec.consumers))
    return list(names)


def check_op_names(records: Sequence, config: OptimizationConfig, source: str) -> None:
    """An op_name_configs key must name an op that holds or reads a weight (coremltools ignores others
    silently, so a typo compresses what it was meant to protect)."""
    names = weight_op_names(records)
    known = set(names)
    for key in config.op_name_configs:
        if key in known:
            continue
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        hint = f"closest: {', '.join(map(repr, close))}; " if close else ""
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise ModelError(f"{source}: op_name_configs key {key!r} matches no op that holds or reads a weight; "
                         f"{hint}names in this model: {shown or '(none: the model has no weights)'} "
                         "(`mlqpipe inspect` lists them)")


# -- one record ---------------------------------------------------------------------------------------------


def _source(records: Sequence) -> str:
    for rec in records:
        model = getattr(getattr(rec, "handle", None), "model", None)
        if getattr(model, "source", None):
            return str(model.source)
    return "model"


def _decide(rec, config: OptimizationConfig, source: str) -> Decision:
    if rec.compressed:
        return Decision(rec.id, None, "", f"already compressed ({rec.layer_type})")
    chosen, where = _resolve(rec, config, source)
    if chosen is None:
        return Decision(rec.id, None, where, f"{where} is None" if where else "no op reads it (only block outputs)")
    skip = _common_skip(rec, chosen) or _class_skip(rec, chosen, config, source)
    return Decision(rec.id, None if skip else chosen, where, skip)


def _resolve(rec, config: OptimizationConfig, source: str) -> tuple[OpConfig | None, str]:
    """(config, entry) for a const, as coremltools' _get_const_op_config (raising on conflicts)."""
    named = config.op_name_configs.get(rec.layer, _NO)
    if named is not _NO:
        return named, f"op_name_configs[{rec.layer!r}]"
    if not rec.consumers:
        return None, ""
    resolved = [(c, *_consumer_config(c, config)) for c in rec.consumers]
    first, first_config, first_where = resolved[0]
    for other, other_config, other_where in resolved[1:]:
        if other_config != first_config:
            raise ModelError(
                f"{source}: {rec.where}: compression config conflict: the weight is read by "
                f"'{first.op}' ({first.op_type}.{first.parameter}), which gets {first_where} = {first_config!r}, and by "
                f"'{other.op}' ({other.op_type}.{other.parameter}), which gets {other_where} = {other_config!r}; "
                f"give the const its own entry, op_name_configs[{rec.layer!r}], or make the two agree")
    return first_config, first_where


def _consumer_config(consumer, config: OptimizationConfig) -> tuple[OpConfig | None, str]:
    if consumer.op in config.op_name_configs:
        return config.op_name_configs[consumer.op], f"op_name_configs[{consumer.op!r}]"
    if consumer.op_type in config.op_type_configs:
        return config.op_type_configs[consumer.op_type], f"op_type_configs[{consumer.op_type!r}]"
    return config.global_config, "global_config"


def _common_skip(rec, chosen: OpConfig) -> str:
    if not rec.consumers:  # named in op_name_configs, yet a constexpr cannot feed a block output
        return "no op reads it (only block outputs)"
    if any(c.op_type.startswith("constexpr_") for c in rec.consumers):
        return "also read by a constexpr op (joint compression is a separate step)"
    if len(rec.shape) <= 1:
        return f"rank {len(rec.shape)}: coremltools never compresses rank <= 1 consts"
    if rec.count <= chosen.weight_threshold:
        return f"{rec.count} elements, not more than weight_threshold {chosen.weight_threshold}"
    return ""


def _class_skip(rec, chosen: OpConfig, config: OptimizationConfig, source: str) -> str:
    if isinstance(chosen, OpMagnitudePrunerConfig):
        if chosen.structured and rec.layer not in config.op_name_configs and not all(
                STRUCTURED_PRUNING_INPUTS.get(c.op_type) == c.parameter for c in rec.consumers):
            return "block / n:m pruning applies only to the weight of conv and linear ops"
        return _structure_skip(rec, chosen) if chosen.structured else ""
    if not isinstance(chosen, (OpLinearQuantizerConfig, OpPalettizerConfig)):
        return ""
    sizes = block_sizes(rec, chosen, source)
    if sizes is None:
        return "its consumers need different channel axes"
    if isinstance(chosen, OpLinearQuantizerConfig):
        bad = [(axis, dim, b) for axis, (dim, b) in enumerate(zip(rec.shape, sizes)) if b > 0 and dim % b]
        return f"axis {bad[0][0]} ({bad[0][1]}) is not divisible by block size {bad[0][2]}" if bad else ""
    return _palette_skip(rec, chosen, sizes)


def _structure_skip(rec, chosen: OpMagnitudePrunerConfig) -> str:
    """coremltools skips block / n:m pruning when the block (or m) is more than half the pruned axis."""
    if not 2 <= len(rec.shape) <= 5:
        return f"rank {len(rec.shape)}: block / n:m pruning supports weights of rank 2 to 5"
    channel = rec.shape[chosen.dim]
    size, what = (chosen.block_size, "block_size") if chosen.block_size is not None else (chosen.n_m_ratio[1], "m")
    if size > channel / 2:
        return f"{what} {size} is more than half of axis {chosen.dim} ({channel})"
    return ""


def _palette_skip(rec, chosen: OpPalettizerConfig, sizes: tuple[int, ...]) -> str:
    axis = _grouped_axis(rec, chosen)
    grouped = [a for a, b in enumerate(sizes) if b != 0 and b != rec.shape[a]]
    group = sizes[grouped[0]] if grouped else rec.shape[axis]
    if rec.shape[axis] % group:
        return f"axis {axis} ({rec.shape[axis]}) is not divisible by group_size {group}"
    if group % chosen.cluster_dim:
        return f"the group of {group} channels on axis {axis} is not divisible by cluster_dim {chosen.cluster_dim}"
    for g in getattr(rec, "conv_groups", ()) if chosen.cluster_dim > 1 else ():  # coremltools' is_cluster_dim_valid
        per_group = list(rec.shape)
        per_group[0] //= g
        if per_group[axis] % chosen.cluster_dim:
            return (f"cluster_dim {chosen.cluster_dim} does not divide the {per_group[axis]} channels on axis {axis} of each of "
                    f"the {g} convolution groups")
    return ""


def _grouped_axis(rec, chosen: OpPalettizerConfig) -> int:
    rank = len(rec.shape)
    axis = rec.axis if chosen.channel_axis is None or chosen.granularity != "per_grouped_channel" else chosen.channel_axis
    return axis + rank if axis < 0 else axis


def block_sizes(rec, chosen: OpConfig, source: str = "model") -> tuple[int, ...] | None:
    """coremltools' block size per axis of the weight (0 = the whole axis) for a linear or palettizer
    config, from the record's channel axes; None when the consumers disagree on an axis."""
    rank = len(rec.shape)
    if isinstance(chosen, OpLinearQuantizerConfig) and chosen.granularity == "per_block" and isinstance(chosen.block_size, tuple):
        if len(chosen.block_size) != rank:
            raise ModelError(f"{source}: {rec.where}: block_size {list(chosen.block_size)} has {len(chosen.block_size)} "
                             f"entries, but the weight {list(rec.shape)} has {rank} axes; give one block size per axis "
                             "(or one int for the input axis)")
        return chosen.block_size
    out_axis, in_axis = rec.axis, rec.input_axis
    if out_axis is None or in_axis is None:
        return None
    if isinstance(chosen, OpPalettizerConfig) and chosen.granularity == "per_grouped_channel" and chosen.channel_axis is not None:
        if not -rank <= chosen.channel_axis < rank:
            raise ModelError(f"{source}: {rec.where}: channel_axis {chosen.channel_axis} is out of range for the weight "
                             f"{list(rec.shape)} (rank {rank}); use an axis in [{-rank}, {rank})")
        out_axis = chosen.channel_axis % rank
    in_block, out_block = {
        "per_tensor": (0, 0),
        "per_channel": (0, 1),
        "per_grouped_channel": (0, getattr(chosen, "group_size", 0)),
        "per_block": (getattr(chosen, "block_size", 0), 1),
    }[chosen.granularity]
    sizes = [0] * rank
    sizes[in_axis] = in_block
    sizes[out_axis] = out_block
    return tuple(sizes)
