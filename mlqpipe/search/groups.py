"""What a search searches, per model: its weight groups and their candidates, and the problems that stop it
before any trial runs (checked by `mlqpipe validate` / `plan` too).

A group is one searched rule's weights in one model, or — with `per_weight` — one of them alone. A weight
two searched rules select would be searched twice: that is a problem, located at the second rule. The
candidates of a group are checked as the stages they become, at the candidate's place in the recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlqpipe.engine.plan import _problem, decide_stage, mode_problems, setting_key_problems, target_problems
from mlqpipe.engine.select import RuleMatcher
from mlqpipe.fileio import shown_path as _shown
from mlqpipe.formats.registry import format_of
from mlqpipe.recipe.problems import Problem
from mlqpipe.recipe.types import Candidate, ModelJob, Recipe, Rule

RELATIVE_GATES = ("max_accuracy_drop", "min_top1_agreement", "max_output_error")


@dataclass(frozen=True)
class Group:
    """Weights searched together: `ids` of one model, selected by `rule` (a recipe rule, or for one weight
    a rule written for it, `own_rule`), with the candidates tried for them (keep first)."""

    rule: str
    ids: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    own_rule: dict | None = None  # per_weight: the rule (as a recipe writes it) selecting exactly this weight

    @property
    def label(self) -> str:
        return self.rule if self.own_rule is None else f"{self.rule}: {self.ids[0]}"


def search_gates(job: ModelJob, recipe: Recipe) -> dict[str, float]:
    """The relative gates the search keeps: the search's own, else the model's."""
    gates = recipe.search.gates if recipe.search.gates is not None else job.gates
    return {g: getattr(gates, g) for g in RELATIVE_GATES if getattr(gates, g) is not None}


def search_evaluation(job: ModelJob, recipe: Recipe):
    return recipe.search.evaluation if recipe.search.evaluation is not None else job.evaluation


def _glob_escaped(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def weight_rule(rec) -> dict:
    """A rule (as a recipe writes it) whose conditions name exactly this weight."""
    rule = {"layer_regex": ["^" + re.escape(rec.layer) + "$"], "field": [_glob_escaped(rec.field)]}
    if rec.network:
        rule["network"] = [_glob_escaped(rec.network)]
    return rule


def _as_rule(name: str, raw: dict) -> Rule:
    return Rule(name=name, layer_regex=tuple(raw["layer_regex"]), field=tuple(raw["field"]), network=tuple(raw.get("network", ())))


def groups_of(job: ModelJob, recipe: Recipe, model) -> tuple[list[Group], list[Problem]]:
    """The groups of one model as its fixed stages left it (`model`), in the order the search lists its rules."""
    fmt = format_of(model)
    records = fmt.inventory(model)
    problems: list[Problem] = []
    owner: dict[str, str] = {}
    groups: list[Group] = []
    for name in recipe.search.rules:
        matcher = RuleMatcher(recipe.rule(name), recipe.python_path, None)
        matcher.prepare(model)
        ids = []
        for rec in records:
            if not matcher.matches(rec) or recipe.rule(name).exclude:
                continue
            if rec.id in owner:
                problems.append(_problem(recipe, ("search", "rules"), f"{_shown(job.input)}: {rec.id} is selected by search rules "
                                         f"'{owner[rec.id]}' and '{name}'; a weight is searched once",
                                         f"narrow rule '{name}' or add exclude rules so the searched rules do not overlap"))
                continue
            owner[rec.id] = name
            ids.append(rec)
        candidates = recipe.search.candidates[name]
        if not recipe.search.per_weight:
            if ids:
                groups.append(Group(name, tuple(r.id for r in ids), candidates))
            continue
        for rec in ids:
            own = weight_rule(rec)
            matched = [r.id for r in records if RuleMatcher(_as_rule("w", own), (), None).matches(r)]
            if matched != [rec.id]:
                problems.append(_problem(recipe, ("search", "per_weight"), f"{_shown(job.input)}: no rule of layer, field and "
                                         f"network names selects {rec.id} alone (it also names {', '.join(m for m in matched if m != rec.id)})",
                                         "search this rule's weights together (per_weight: false)"))
                continue
            groups.append(Group(name, (rec.id,), candidates, own))
    return groups, problems


def candidate_problems(job: ModelJob, recipe: Recipe, model, groups: list[Group], overlay: dict | None = None) -> list[Problem]:
    """Candidates that cannot apply to their group in this model: a mode or a setting its format lacks, a
    deployment target below what a setting needs, a weight the mode refuses; each at the candidate."""
    fmt = format_of(model)
    out: list[Problem] = []
    for group in groups:
        for c in group.candidates:
            if c.stage is None:
                continue
            found = mode_problems(job, recipe, fmt, [c.stage]) + setting_key_problems(job, recipe, fmt, [c.stage])
            if not found:
                matchers = [RuleMatcher(recipe.rule(group.rule), recipe.python_path, None)]
                decisions, problems, _ = decide_stage(model, c.stage, recipe, matchers, overlay, model_file=job.input, only=set(group.ids))
                found = problems + target_problems(job, recipe, fmt, model, c.stage, decisions)
            out += found
    return out


def setting_problems(job: ModelJob, recipe: Recipe) -> list[Problem]:
    """A search needs data to measure on and a relative gate to keep, for every model."""
    out = []
    if not search_gates(job, recipe):
        out.append(_problem(recipe, ("search",), f"{_shown(job.input)}: the search has no gate to keep",
                            "give search.gates (or the model's gates) max_accuracy_drop, min_top1_agreement or max_output_error"))
    cfg = search_evaluation(job, recipe)
    if cfg is None or (cfg.data is None and cfg.random_inputs is None):
        out.append(_problem(recipe, ("search",), f"{_shown(job.input)}: the search has no data to measure on",
                            "give search.evaluation (or the model's evaluation) data: an .npz of inputs (and labels)"))
    return out


def search_problems(plans, recipe: Recipe) -> list[Problem]:
    """Everything that stops a search of `recipe`, from its model plans (engine/plan.py: each holds its model
    after the fixed stages): overlapping groups, candidates that cannot apply, missing data or gates."""
    out: list[Problem] = []
    for plan in plans:
        if plan.searched is None:
            continue
        model, overlay = plan.searched
        groups, found = groups_of(plan.job, recipe, model)
        out += found + candidate_problems(plan.job, recipe, model, groups, overlay) + setting_problems(plan.job, recipe)
    return out

