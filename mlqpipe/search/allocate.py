"""Choosing a candidate per weight group from measured trials: pure functions, no models.

A trial is one group compressed alone with one candidate, measured against the float model on the search
data. Its *cost* per gate is how much of the gate's budget it uses beyond the base model (the fixed stages
alone): accuracy points lost for `max_accuracy_drop`, disagreement for `min_top1_agreement`, squared relative
output error for `max_output_error` (independent errors add in quadrature). Costs of different groups are
predicted to add up; `allocate` then spends the budget greedily — always the move that saves the most bytes
per unit of budget — and `back_off` undoes the costliest choice when the full evaluation of a combination
says the prediction was too optimistic.
"""

from __future__ import annotations

from dataclasses import dataclass

_TINY = 1e-12  # a cost this small is free: such moves go first, the largest saving first


@dataclass(frozen=True)
class Option:
    """One candidate for one group, as measured: bytes it saves against keep, and its cost per gate."""

    label: str
    saved: int
    cost: tuple[float, ...]
    error: float = 0.0  # squared relative output error beyond the base: which of equal-cost choices hurts more


@dataclass(frozen=True)
class Budget:
    """What the gates allow, per gate, in cost units (the base model's own cost already subtracted)."""

    names: tuple[str, ...]
    limits: tuple[float, ...]


def costs(metrics: dict, base: dict, gates: dict) -> tuple[float, ...]:
    """A trial's cost per gate (in `gates` order) beyond the base model's; measured improvements count as 0."""
    out = []
    for name in gates:
        if name == "max_accuracy_drop":
            value = (base["accuracy_quantized"] or 0.0) - (metrics["accuracy_quantized"] or 0.0)
        elif name == "min_top1_agreement":
            value = (base["top1_agreement"] or 0.0) - (metrics["top1_agreement"] or 0.0)
        else:  # max_output_error: squared errors add for independent perturbations
            value = metrics["output_error"] ** 2 - base["output_error"] ** 2
        out.append(max(value, 0.0))
    return tuple(out)


def budget(base: dict, gates: dict) -> Budget:
    """How much cost each gate leaves once the base model's own cost is paid (never below 0)."""
    limits = []
    for name, threshold in gates.items():
        if name == "max_accuracy_drop":
            limits.append(threshold - ((base["accuracy_float"] or 0.0) - (base["accuracy_quantized"] or 0.0)))
        elif name == "min_top1_agreement":
            limits.append((base["top1_agreement"] or 0.0) - threshold)
        else:
            limits.append(threshold ** 2 - base["output_error"] ** 2)
    return Budget(tuple(gates), tuple(max(v, 0.0) for v in limits))


def _load(options: list[Option], budget_: Budget) -> float:
    """The largest share of any gate's budget a set of options uses together (predicted: costs add)."""
    worst = 0.0
    for k, limit in enumerate(budget_.limits):
        used = sum(o.cost[k] for o in options)
        worst = max(worst, used / limit if limit > _TINY else (0.0 if used <= _TINY else float("inf")))
    return worst


def allocate(groups: list[list[Option]], budget_: Budget) -> list[int]:
    """Per group, the index of the chosen option (index 0 is keep: saved 0, cost 0). Greedy: repeatedly take
    the move to a group's smaller option that saves the most bytes per unit of added load, while the
    predicted load stays within every gate's budget. Deterministic: ties go to the earlier group, then to
    the larger saving."""
    chosen = [0] * len(groups)
    while True:
        current = [g[i] for g, i in zip(groups, chosen)]
        load = _load(current, budget_)
        best = None
        for gi, options in enumerate(groups):
            here = options[chosen[gi]]
            for oi, option in enumerate(options):
                gain = option.saved - here.saved
                if gain <= 0:
                    continue
                trial = current[:gi] + [option] + current[gi + 1:]
                after = _load(trial, budget_)
                if after > 1.0 + 1e-9:
                    continue
                extra = after - load
                score = (float("inf") if extra <= _TINY else gain / extra, gain)
                if best is None or score > best[0]:
                    best = (score, gi, oi)
        if best is None:
            return chosen
        _, gi, oi = best
        chosen[gi] = oi


def back_off(groups: list[list[Option]], chosen: list[int]) -> list[int] | None:
    """The choice after undoing the costliest step: the group whose option uses the most budget (by its
    largest cost; ties: the larger output error, then the smaller saving, then the later group) moves to its
    next option with a smaller saving and no larger cost (keep at the end). None when every group is at keep."""
    ranked = [(max(groups[gi][i].cost, default=0.0), groups[gi][i].error, -groups[gi][i].saved, gi)
              for gi, i in enumerate(chosen) if i != 0]
    if not ranked:
        return None
    gi = max(ranked)[-1]
    here = groups[gi][chosen[gi]]
    safer = [oi for oi, o in enumerate(groups[gi])
             if o.saved < here.saved and max(o.cost, default=0.0) <= max(here.cost, default=0.0) and o.error <= here.error]
    out = list(chosen)
    out[gi] = max(safer, key=lambda oi: (groups[gi][oi].saved, -oi)) if safer else 0
    return out


def improvements(groups: list[list[Option]], chosen: list[int]):
    """Combinations worth a full evaluation after the allocation found `chosen`: every *uniform* one — the same candidate for each group — predicted smaller, so the
    result is never larger than the best single setting for all; then, from `chosen`, each group's next
    smaller option alone, largest predicted saving first. Predicted sizes only order them; the evaluation
    decides. Yields lists of option indices (the caller evaluates each once; duplicates are skipped)."""
    seen = {tuple(chosen)}
    saved = sum(g[i].saved for g, i in zip(groups, chosen))
    labels = [o.label for o in groups[0]] if groups else []
    uniform = []
    for label in labels[1:]:
        if all(any(o.label == label for o in g) for g in groups):
            pick = [next(k for k, o in enumerate(g) if o.label == label) for g in groups]
            total = sum(g[i].saved for g, i in zip(groups, pick))
            if total > saved:
                uniform.append((-total, pick))
    moves = []
    for gi, g in enumerate(groups):
        smaller = [k for k, o in enumerate(g) if o.saved > g[chosen[gi]].saved]
        if smaller:
            k = min(smaller, key=lambda k: (g[k].saved, k))  # the next step down, not a leap
            pick = list(chosen)
            pick[gi] = k
            moves.append((-(saved + g[k].saved - g[chosen[gi]].saved), pick))
    for _, pick in sorted(uniform) + sorted(moves):
        if tuple(pick) not in seen:
            seen.add(tuple(pick))
            yield pick

