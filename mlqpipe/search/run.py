"""`mlqpipe search`: per model, sensitivity trials, allocation, verification; the resolved recipe and a report.

1. The base: the model after the recipe's fixed stages (if any), measured against the float input.
2. Sensitivity: every group alone at every candidate (a trial), measured on the search data against the
   float input: accuracy, top-1 agreement, output error, bytes. Each trial is a content-addressed cache
   entry (key: the base model's bytes, the group, the candidate, the data and the evaluator), so a search
   that ran before runs no trial again, and one after a model changed re-runs only that model's.
3. Allocation (allocate.py) from the trials, then a full evaluation of the combination; while a gate fails,
   the costliest choice backs off and the combination is evaluated again (each a cached entry too).
4. The chosen settings become plain stages in a resolved recipe (resolve.py).

Deterministic: trials are independent and their results are collected in order; with `jobs` > 1 they run
in worker processes, the same trials with the same results.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlqpipe.errors import RecipeError
from mlqpipe.recipe.problems import raise_problems
from mlqpipe.recipe.types import ModelJob, Recipe
from mlqpipe.search.allocate import Option, allocate, back_off, budget, costs, improvements
from mlqpipe.search.groups import Group, groups_of, search_evaluation, search_gates
from mlqpipe.terminal import StatusLine

SEARCH_VERSION = 1  # bump when what a trial measures changes: invalidates cached trials


@dataclass
class Measured:
    """One evaluated model of the search: what the gates read, and its size in bytes."""

    accuracy_float: float | None
    accuracy_quantized: float | None
    top1_agreement: float | None
    output_error: float
    size: int
    cached: bool = False

    @classmethod
    def of(cls, evaluation, size: int) -> "Measured":
        errors = [o["relative_l2"] for o in evaluation.outputs.values()]
        return cls(evaluation.accuracy_float, evaluation.accuracy_quantized, evaluation.top1_agreement, max(errors, default=0.0), size)

    def passes(self, gates: dict) -> bool:
        for name, threshold in gates.items():
            if name == "max_accuracy_drop" and not (self.accuracy_float - self.accuracy_quantized <= threshold + 1e-9):
                return False
            if name == "min_top1_agreement" and not self.top1_agreement >= threshold - 1e-9:
                return False
            if name == "max_output_error" and not self.output_error <= threshold:
                return False
        return True

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "cached"}


@dataclass
class ModelResult:
    """The search's outcome for one model."""

    job: ModelJob
    gates: dict
    float_size: int
    base: Measured
    groups: list[Group]
    trials: list[list[Measured]]  # per group, per candidate (keep: the base)
    chosen: list[int]
    final: Measured
    verifications: list[tuple[list[int], Measured]] = field(default_factory=list)

    @property
    def trials_run(self) -> int:
        return sum(not m.cached for row in self.trials for m in row[1:]) + sum(not m.cached for _, m in self.verifications)

    @property
    def trials_cached(self) -> int:
        return sum(m.cached for row in self.trials for m in row[1:]) + sum(m.cached for _, m in self.verifications)


# --- measuring ---------------------------------------------------------------------------------------------


def _digest_of(model) -> str:
    from mlqpipe.artifacts import mapping_digest
    from mlqpipe.formats.registry import format_of

    art = format_of(model).to_artifact(model)
    return mapping_digest(art) if isinstance(art, dict) else hashlib.sha256(art).hexdigest()


def _data_key(cfg) -> dict:
    data = None
    if cfg.data is not None:
        data = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()
    return {"data": data, "inputs": sorted(cfg.inputs), "labels": cfg.labels, "random_inputs": cfg.random_inputs,
            "max_samples": cfg.max_samples}


def _key(kind: str, **parts) -> str:
    from mlqpipe.quality.evaluate.compare import EVALUATOR_VERSION

    text = json.dumps({"kind": kind, "search": SEARCH_VERSION, "evaluator": EVALUATOR_VERSION, **parts}, sort_keys=True, default=str)
    return "search-" + hashlib.sha256(text.encode()).hexdigest()


def _stage_key(stage) -> dict:
    return {k: v for k, v in asdict(stage).items() if k not in ("name", "rules")}


class _Context:
    """What every measurement of one model shares: the float input, the base, the data, the cache."""

    def __init__(self, job: ModelJob, recipe: Recipe, options):
        from mlqpipe.build.cache import evaluation_dir, open_cache
        from mlqpipe.engine.execute import run_job
        from mlqpipe.formats.registry import format_of, load_model

        self.job, self.recipe, self.allow_custom = job, recipe, options.allow_custom
        self.cache = open_cache(options, prefetch=False)  # trials are entries of the build's cache (local or remote)
        self.cache_dir = evaluation_dir(options)  # where the float model's outputs are kept (always local)
        self.float_model = load_model(job.input)
        self.base, _ = run_job(job, recipe, allow_custom=self.allow_custom, model=self.float_model)
        self.fmt = format_of(self.base)
        self.cfg = search_evaluation(job, recipe)
        self.base_digest = _digest_of(self.base)
        self.float_digest = _digest_of(self.float_model)
        self.data = _data_key(self.cfg)

    def measure(self, key: str, build) -> Measured:
        """A cached measurement, or `build()` -> model, evaluated against the float input and cached."""
        from mlqpipe.quality.gates import evaluate_models

        stored = self.cache.get(key)
        if stored is not None:
            try:
                return Measured(**json.loads(stored), cached=True)
            except (ValueError, TypeError):
                pass  # an unreadable entry is measured again
        model = build()
        evaluation = evaluate_models(self.cfg, self.float_model, model, self.cache_dir, str(self.job.input.name))
        if not evaluation.evaluated:
            raise RecipeError(f"{self.job.input}: the search cannot evaluate this model: {evaluation.reason}")
        measured = Measured.of(evaluation, self.fmt.size(model))
        self.cache.put(key, json.dumps(measured.as_dict(), sort_keys=True).encode(), {"search": str(self.job.input)})
        return measured

    def apply(self, model, choices: list[tuple[Group, int]]):
        """`model` with each group's chosen candidate applied (in group order), in place."""
        from mlqpipe.engine.execute import run_stage

        for group, index in choices:
            stage = group.candidates[index].stage
            if stage is not None:
                run_stage(model, stage, self.recipe, allow_custom=self.allow_custom, only=set(group.ids))
        return model

    def base_measured(self) -> Measured:
        return self.measure(_key("base", base=self.base_digest, float=self.float_digest, data=self.data), lambda: self.fmt.copy(self.base))

    def trial(self, group: Group, index: int) -> Measured:
        key = _key("trial", base=self.base_digest, float=self.float_digest, data=self.data, ids=group.ids,
                   candidate=_stage_key(group.candidates[index].stage))
        return self.measure(key, lambda: self.apply(self.fmt.copy(self.base), [(group, index)]))

    def combination(self, groups: list[Group], chosen: list[int]) -> Measured:
        picked = [(g, i) for g, i in zip(groups, chosen) if i != 0]
        key = _key("combination", base=self.base_digest, float=self.float_digest, data=self.data,
                   choices=[(g.ids, _stage_key(g.candidates[i].stage)) for g, i in picked])
        return self.measure(key, lambda: self.apply(self.fmt.copy(self.base), picked))


# --- one model -------------------------------------------------------------------------------------------


def _trial_worker(args):
    """A process pool's trial: the context is rebuilt once per worker and model (the base is deterministic)."""
    recipe_path, options_dict, entry_index, input_path, group, index = args
    ctx = _worker_context(recipe_path, options_dict, entry_index, input_path)
    return ctx.trial(group, index)


_WORKER: dict = {}


def _worker_context(recipe_path, options_dict, entry_index, input_path):
    key = (recipe_path, input_path)
    if key not in _WORKER:
        from mlqpipe.build.tasks import BuildOptions
        from mlqpipe.recipe import load_recipe

        options = BuildOptions(**options_dict)
        recipe = load_recipe(recipe_path, allow_outside_root=options.allow_outside_root)
        job = next(j for j in recipe.models if j.entry == entry_index and str(j.input) == input_path)
        _WORKER.clear()
        _WORKER[key] = _Context(job, recipe, options)
    return _WORKER[key]


def search_model(job: ModelJob, recipe: Recipe, options, *, jobs: int = 1, progress: StatusLine | None = None) -> ModelResult:
    """One model's search; `options` (BuildOptions) name the cache, and the custom-code and output-root policies."""
    ctx = _Context(job, recipe, options)
    groups, problems = groups_of(job, recipe, ctx.base)
    raise_problems(problems)
    gates = search_gates(job, recipe)
    name = job.input.name
    show = progress.show if progress is not None else (lambda _m: None)
    show(f"search {name}: measuring the base")
    base = ctx.base_measured()
    if not base.passes(gates):
        raise RecipeError(f"{recipe.where('search')}: {job.input}: the model fails the search's gates before any search choice "
                          f"(accuracy {base.accuracy_float} -> {base.accuracy_quantized}, top-1 agreement {base.top1_agreement}, "
                          f"output error {base.output_error:.3g}); loosen the gates or the fixed stages")
    work = [(gi, ci) for gi, g in enumerate(groups) for ci in range(1, len(g.candidates))]
    results: dict = {}
    if jobs > 1 and len(work) > 1:
        args = [(str(recipe.path), options.as_args(), job.entry, str(job.input), groups[gi], ci) for gi, ci in work]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for n, ((gi, ci), measured) in enumerate(zip(work, pool.map(_trial_worker, args)), 1):
                results[gi, ci] = measured
                show(f"search {name}: trial {n}/{len(work)}")
    else:
        best = base.size
        for n, (gi, ci) in enumerate(work, 1):
            show(f"search {name}: trial {n}/{len(work)} ({groups[gi].label}: {groups[gi].candidates[ci].label}); "
                 f"best single change so far {best} bytes")
            results[gi, ci] = ctx.trial(groups[gi], ci)
            if results[gi, ci].passes(gates):
                best = min(best, results[gi, ci].size)
    trials = [[base] + [results[gi, ci] for ci in range(1, len(g.candidates))] for gi, g in enumerate(groups)]
    options = [[Option(c.label, base.size - m.size, costs(asdict(m), asdict(base), gates),
                       max(m.output_error ** 2 - base.output_error ** 2, 0.0)) for c, m in zip(g.candidates, row)]
               for g, row in zip(groups, trials)]
    chosen = allocate(options, budget(asdict(base), gates))
    verifications: list[tuple[list[int], Measured]] = []

    def verify(combination: list[int]) -> Measured:
        show(f"search {name}: evaluating combination {len(verifications) + 1}")
        measured = ctx.combination(groups, combination) if any(combination) else base
        verifications.append((list(combination), measured))
        return measured

    final = verify(chosen)
    while not final.passes(gates):  # the prediction was too optimistic: undo the costliest choice
        chosen = back_off(options, chosen)
        if chosen is None:  # cannot happen: all keep is the base, which passes
            raise RecipeError(f"{job.input}: the search found no combination that keeps its gates")
        final = verify(chosen)
    for combination in improvements(options, chosen):  # never worse than one setting for all
        if any(combination == tried for tried, _ in verifications):
            continue
        measured = verify(combination)
        if measured.passes(gates) and measured.size < final.size:
            chosen, final = combination, measured
    if recipe.search.max_size_bytes is not None and final.size > recipe.search.max_size_bytes:
        raise RecipeError(f"{recipe.where('search', 'max_size_bytes')}: {job.input}: the smallest model the search found that "
                          f"keeps its gates is {final.size} bytes, over the budget of {recipe.search.max_size_bytes}; "
                          "add smaller candidates, loosen the gates, or raise the budget")
    float_size = ctx.fmt.size(ctx.float_model)
    return ModelResult(job, gates, float_size, base, groups, trials, chosen, final, verifications)


def search_recipe(recipe: Recipe, options, *, jobs: int = 1) -> list[ModelResult]:
    """Search every model of `recipe`; `options` (mlqpipe.build.BuildOptions) name the cache the trials live in."""
    if recipe.search is None:
        raise RecipeError(f"{recipe.path}: the recipe has no search: section (nothing to search; build it instead)")
    progress = StatusLine()
    try:
        return [search_model(job, recipe, options, jobs=jobs, progress=progress) for job in recipe.models]
    finally:
        progress.clear()
