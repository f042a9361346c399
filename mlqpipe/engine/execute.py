"""Applying a recipe's stages to a model: used by `mlqpipe quantize` and by the doit build alike."""

from __future__ import annotations

from mlqpipe.errors import MlqpipeError, ModelError, RecipeError
from mlqpipe.formats.registry import format_of, load_model
from mlqpipe.engine.modes import NotApplicableError, apply_mode, mode_named
from mlqpipe.engine.plan import StagePlan, decide_stage, matchers_for, raise_target, stage_at, stage_settings
from mlqpipe.quant.linear import COREMLTOOLS_MIN_SCALE, EXACT_MIN_SCALE
from mlqpipe.recipe.problems import raise_problems
from mlqpipe.recipe.types import ModelJob, Recipe, Stage


def run_stage(model, stage: Stage, recipe: Recipe, *, allow_custom: bool | tuple = True, only=None) -> StagePlan:
    """Apply one stage to `model` (any format) in place; returns what was decided (the same decisions a
    plan shows). `only`: the weight ids it may change (a search group), None for every one it selects."""
    plan = StagePlan(stage)
    fmt = format_of(model)
    if ("fold" if stage.mode == "fold" else mode_named(stage.mode).name) not in fmt.modes:
        note = getattr(fmt, "modes_note", "") or f"choose one of {', '.join(sorted(fmt.modes))}"
        raise ModelError(f"{fmt.source(model)}: stage '{stage.name}': mode {stage.mode} is not available for {fmt.name} models; {note}")
    if stage.mode == "fold":
        plan.folds = fmt.fold(model, stage.fold)
        return plan
    decisions, problems, _ = decide_stage(model, stage, recipe, matchers_for(stage, recipe, allow_custom), model_file=fmt.source(model),
                                          only=only)
    raise_problems(problems)
    mode = mode_named(stage.mode)
    lut_function = None
    if "function" in mode.needs:
        from mlqpipe.recipe.custom import load_code

        lut_function = load_code(stage.function, recipe.python_path, allow=allow_custom)
        if not callable(lut_function):
            raise RecipeError(f"{recipe.where('stages')}: custom LUT '{stage.function}' is not callable")
    min_scale = COREMLTOOLS_MIN_SCALE if stage.coremltools_rounding else EXACT_MIN_SCALE
    settings = stage_settings(stage, lut_function, min_scale)
    chosen = {d.id for d in decisions if d.action == "quantize"}
    changed = False
    for rec in fmt.inventory(model):
        if rec.id in chosen:
            try:
                changed |= apply_mode(rec, settings)
            except NotApplicableError as e:  # settings that do not fit a selected weight: say where they are written
                raise ModelError(f"{recipe.where(*stage_at(recipe, stage))}: {fmt.source(model)}: stage "
                                 f"'{stage.name}': {e}; change the stage's settings or exclude this weight from its rules") from None
    if changed and mode.version_floor:
        fmt.raise_version(model, mode.version_floor)
    plan.decisions = decisions
    return plan


def run_job(job: ModelJob, recipe: Recipe, *, allow_custom: bool | tuple = True, model=None,
            snapshots: list | None = None) -> tuple[object, list[StagePlan]]:
    """All of a model's stages, in order, on a fresh copy of its input. `snapshots`, when given, receives
    a copy of the model before the first stage and after each one (for reports)."""
    model = load_model(job.input) if model is None else format_of(model).copy(model)
    fmt = format_of(model)
    if snapshots is not None:
        snapshots.append(fmt.copy(model))
    if job.deployment_target:
        raise_target(model, job, recipe)
    plans = []
    for stage in job.stages:
        plans.append(run_stage(model, stage, recipe, allow_custom=allow_custom))
        if snapshots is not None:
            snapshots.append(fmt.copy(model))
    return model, plans


def finish_job(job: ModelJob, recipe: Recipe, model, snapshots: list, plans: list[StagePlan] | None, warn=None,
               cache_dir=None, rows: list[dict] | None = None) -> dict:
    """Assess (evaluation, report, gates), then write the report and — only if every gate passed — the
    output, checked against Core ML's rules and written atomically. `snapshots`: the input and the model
    after each stage. Rules the input already breaks are reported by `warn(message)` (default: a warning
    line on stderr) and not held against the output. `cache_dir`: where the float model's evaluation
    outputs are kept between builds (None: not kept). `rows`: the stages' report rows when the caller
    knows them (a build keeps them in its cache); `snapshots` is then the input and the output only."""
    from mlqpipe.engine.plan import setting_problems
    from mlqpipe.quality.gates import GateFailure, assess
    from mlqpipe.quality.report import write_report

    raise_problems(setting_problems(job, recipe, snapshots[0]))  # builds skip `validate`'s model checks: never a traceback here

    fmt = format_of(model)
    fmt.inherit_findings(model, snapshots[0], str(job.input), warn or _warn)
    try:
        restoring = frozenset(s.name for s in job.stages if s.mode != "fold" and mode_named(s.mode).reads_quantized)
        report = assess(job, recipe, snapshots, None if plans is None else [p.decisions for p in plans], cache_dir=cache_dir,
                        restoring=restoring, rows=rows)
    except GateFailure as e:
        write_report(e.report, job, recipe, recipe.report.formats, snapshots)  # the callers remove an older output
        raise
    fmt.save(model, job.output)
    write_report(report, job, recipe, recipe.report.formats, snapshots)
    return report


def _warn(message: str) -> None:
    """A warning on the command line, as mlqpipe prints its errors."""
    import sys

    print(f"mlqpipe: warning: {message}", file=sys.stderr)


def remove_output(job: ModelJob) -> None:
    """A model whose build or gates failed leaves nothing shippable at its output path: an older output
    there would be copied into an app as if it were this build's (its report, marked failed, stays)."""
    from mlqpipe.artifacts import remove

    remove(job.output)


def quantize_job(job: ModelJob, recipe: Recipe, *, allow_custom: bool | tuple = True) -> tuple[list[StagePlan], dict]:
    """Build one model: stages, assessment, checked atomic write; on any failure nothing is left at its
    output path. Returns the stage plans and the report."""
    snapshots: list = []
    try:
        model, plans = run_job(job, recipe, allow_custom=allow_custom, snapshots=snapshots)
        report = finish_job(job, recipe, model, snapshots, plans)
    except MlqpipeError:
        remove_output(job)
        raise
    return plans, report


def quantize_recipe(recipe: Recipe, *, allow_custom: bool | tuple = True) -> list[tuple[ModelJob, list[StagePlan]]]:
    """Build every model of a recipe, stopping at the first failure (`mlqpipe quantize` goes on instead)."""
    return [(job, quantize_job(job, recipe, allow_custom=allow_custom)[0]) for job in recipe.models]
