"""What `mlqpipe validate`, `plan` and `quantize` do (the CLI only parses arguments)."""

from __future__ import annotations

import json
import sys

from mlqpipe.formats.base import version_change
from mlqpipe.errors import RecipeError
from mlqpipe.fileio import shown_path as _rel
from mlqpipe.engine.plan import ModelPlan, plan_recipe
from mlqpipe.recipe import check_recipe_collisions, load_recipe
from mlqpipe.recipe.problems import Problem, raise_problems
from mlqpipe.quality.tables import table



def load_all(paths, *, plan: bool = True, allow_outside_root: bool = False):
    """Load every recipe; collect all problems of all of them (including cross-recipe output collisions)."""
    recipes, problems, plans = [], [], {}
    for path in paths:
        try:
            recipes.append(load_recipe(path, allow_outside_root=allow_outside_root))
        except RecipeError as e:
            problems += e.problems or [Problem(str(path), 0, 0, "", str(e))]
    problems += check_recipe_collisions(recipes)
    if plan:
        for r in recipes:
            model_plans, found = plan_recipe(r)
            plans[r.path] = model_plans
            problems += found
            if r.search is not None:
                from mlqpipe.search.groups import search_problems

                problems += search_problems(model_plans, r)
    return recipes, plans, problems


def validate(paths, verbose: int = 0, allow_outside_root: bool = False) -> int:
    recipes, plans, problems = load_all(paths, allow_outside_root=allow_outside_root)
    raise_problems(problems)
    for r in recipes:
        n = len(r.models)
        print(f"{_rel(r.path)}: OK ({n} model{'s' if n != 1 else ''}, {len(r.stages)} stage(s), {len(r.rules)} rule(s))")
    return 0


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else (f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B")


def plan_json(model_plans: list[ModelPlan]) -> list[dict]:
    return [
        {
            "input": _rel(mp.job.input),
            "output": _rel(mp.job.output),
            "bytes_before": mp.bytes_before,
            "bytes_after": mp.bytes_after,
            "specification_version": {"before": mp.version_before, "after": mp.version_after},
            "deployment_target_changes": list(mp.target_changes),
            "stages": [
                {
                    "name": sp.stage.name,
                    "mode": sp.stage.mode,
                    "nbits": sp.stage.nbits,
                    "folds": [f"{f.removed} -> {f.into}" for f in sp.folds],
                    "weights": [d.as_dict() for d in sp.decisions],
                }
                for sp in mp.stages
            ],
        }
        for mp in model_plans
    ]


def plan(path, as_json: bool = False, verbose: int = 0, allow_outside_root: bool = False) -> int:
    """The plan of one recipe. With problems, the plan is still shown when every model could be simulated
    (what the rules select helps fix them, e.g. a mode a model's format cannot store yet), then the
    problems are raised (exit 2)."""
    recipes, plans, problems = load_all([path], allow_outside_root=allow_outside_root)
    model_plans = plans.get(recipes[0].path) if recipes else None
    if problems and not (model_plans and all(mp.loaded for mp in model_plans)):
        raise_problems(problems)
    _show_plan(path, model_plans, as_json, verbose, recipes[0] if recipes else None)
    raise_problems(problems)
    return 0


def _show_plan(path, model_plans: list[ModelPlan], as_json: bool, verbose: int, recipe=None) -> None:
    if as_json:
        json.dump({"recipe": _rel(path), "models": plan_json(model_plans)}, sys.stdout, indent=2)
        print()
        return
    for mp in model_plans:
        ratio = mp.bytes_before / mp.bytes_after if mp.bytes_after else float("inf")
        print(f"{_rel(mp.job.input)} -> {_rel(mp.job.output)}: weights {_fmt_bytes(mp.bytes_before)} -> {_fmt_bytes(mp.bytes_after)} ({ratio:.2f}x)")
        change = version_change(mp.version_before, mp.version_after)
        if change:
            print(f"  {change}")
        for line in mp.target_changes:
            print(f"  deployment_target: {line}")
        for sp in mp.stages:
            print(f"  stage {sp.stage.label}")
            if sp.stage.mode == "fold":
                print("    " + ("; ".join(f"folded {f.removed} into {f.into}" for f in sp.folds) or "nothing to fold"))
                continue
            rows = [
                {"id": d.id, "type": d.layer_type, "shape": "x".join(map(str, d.shape)), "what": _what(d),
                 "why": d.reason, "bytes": f"{d.bytes_before} -> {d.bytes_after}" if d.action == "quantize" else str(d.bytes_before)}
                for d in sp.decisions
                if verbose or d.action != "keep" or d.rule is not None
            ]
            if rows:
                print("    " + table(rows, [("id", "weight"), ("type", "type"), ("shape", "shape"), ("what", "change"),
                                           ("bytes", "bytes"), ("why", "why")]).replace("\n", "\n    "))
            hidden = sum(1 for d in sp.decisions if d.action == "keep" and d.rule is None)
            if hidden and not verbose:
                print(f"    ({hidden} weights no rule of this stage matches; -v lists them)")
        if mp.searched is not None and recipe is not None:
            _show_search(mp, recipe)


def _show_search(mp: ModelPlan, recipe) -> None:
    """What `mlqpipe search` will try for this model: its groups and the trials they take."""
    from mlqpipe.search.groups import groups_of

    groups, _ = groups_of(mp.job, recipe, mp.searched[0])
    trials = sum(len(g.candidates) - 1 for g in groups)
    print(f"  search: {len(groups)} group(s), {trials} trials (`mlqpipe search` runs them; cached ones are not run again)")
    for g in groups:
        print(f"    {g.label}: {', '.join(c.label for c in g.candidates)}")


def _what(d) -> str:
    if d.action == "quantize":
        return f"{d.storage_before} -> {d.storage_after}"
    if d.action == "custom":
        return "custom code decides"
    return f"keep {d.storage_before}"


def quantize(paths, allow_custom=True, verbose: int = 0, allow_outside_root: bool = False) -> int:
    """Every model of every recipe, going on after a failure; then one table of all outputs. Exit 1 when a
    gate failed, 2 when a model could not be built (bad input), else 0."""
    from mlqpipe.errors import MlqpipeError
    from mlqpipe.engine.execute import quantize_job
    from mlqpipe.quality.gates import GateFailure
    from mlqpipe.quality.tables import outputs_table

    from mlqpipe.recipe.load import for_building

    recipes, _, problems = load_all(paths, allow_outside_root=allow_outside_root)
    raise_problems(problems)
    recipes, problems = for_building(recipes, lambda p: load_recipe(p, allow_outside_root=allow_outside_root))
    raise_problems(problems)
    rows, status = [], 0
    for r in recipes:
        for job in r.models:
            try:
                _, report = quantize_job(job, r, allow_custom=allow_custom)
                rows.append({"output": _rel(job.output), "build": "built", "status": report["status"], "report": report})
            except GateFailure as e:
                print(f"mlqpipe: {e}", file=sys.stderr)
                rows.append({"output": _rel(job.output), "build": "built", "status": "FAILED", "report": e.report})
                status = max(status, 1)
            except MlqpipeError as e:
                print(f"mlqpipe: error: {e}", file=sys.stderr)
                rows.append({"output": _rel(job.output), "build": "failed", "status": "FAILED", "report": None})
                status = 2
    sys.stderr.flush()
    print(outputs_table(rows))
    return status


def search(paths, options, jobs: int = 1, verbose: int = 0) -> int:
    """Search every recipe; write each one's resolved recipe and search report; print a table per model."""
    from mlqpipe.search.resolve import write_report, write_resolved
    from mlqpipe.search.run import search_recipe

    recipes, _, problems = load_all(paths, allow_outside_root=options.allow_outside_root)
    for r in recipes:
        if r.search is None:
            problems.append(Problem(str(r.path), 0, 0, "", f"{_rel(r.path)} has no search: section (or search: null): nothing to search",
                                    "add search: {rules: [...], candidates: [...]}, or build the recipe"))
    raise_problems(problems)
    for r in recipes:
        results = search_recipe(r, options, jobs=jobs)
        resolved = write_resolved(r, results)
        reports = write_report(r, results)
        print(f"{_rel(r.path)} -> {_rel(resolved)}  (report: {_rel(reports[1])})")
        for res in results:
            acc = ("" if res.final.accuracy_quantized is None else
                   f", accuracy {res.final.accuracy_float:.4f} -> {res.final.accuracy_quantized:.4f}")
            print(f"  {res.job.input.name}: {res.float_size} -> {res.final.size} bytes{acc}; "
                  f"{res.trials_run} trials run, {res.trials_cached} from cache")
            for g, i in zip(res.groups, res.chosen):
                print(f"    {g.label}: {g.candidates[i].label}")
    if not recipes:
        raise RecipeError("no recipe to search")
    return 0

