"""Applying a recipe's stages to a model: used by `mlqpipe quantize` and by the doit build alike."""

from __future__ import annotations

from .coreml.fold import fold_model
from .coreml.inventory import inventory
from .coreml.model import CoreMLModel, load_model
from .coreml.version import raise_versions
from .errors import RecipeError
from .modes import ModeSettings, apply_mode
from .plan import StagePlan, decide_stage, matchers_for
from .quant.linear import COREMLTOOLS_MIN_SCALE, EXACT_MIN_SCALE
from .recipe.problems import raise_problems
from .recipe.types import ModelJob, Recipe, Stage


def run_stage(model: CoreMLModel, stage: Stage, recipe: Recipe, *, allow_custom: bool = True) -> StagePlan:
    """Apply one stage to `model` in place; returns what was decided (the same decisions a plan shows)."""
    plan = StagePlan(stage)
    spec = model.spec
    if stage.mode == "fold":
        plan.folds = fold_model(spec, kinds=stage.fold)
        return plan
    decisions, problems, _ = decide_stage(spec, stage, recipe, matchers_for(stage, recipe, allow_custom))
    raise_problems(problems)
    lut_function = None
    if stage.mode == "custom_lut":
        from .recipe.custom import load_code

        lut_function = load_code(stage.function, recipe.python_path, allow=allow_custom)
        if not callable(lut_function):
            raise RecipeError(f"{recipe.where('stages')}: custom LUT '{stage.function}' is not callable")
    min_scale = COREMLTOOLS_MIN_SCALE if stage.coremltools_rounding else EXACT_MIN_SCALE
    settings = ModeSettings(stage.mode, stage.nbits or 8, lut_function, min_scale)
    chosen = {d.id for d in decisions if d.action == "quantize"}
    changed = False
    for rec in inventory(spec):
        if rec.id in chosen:
            changed |= apply_mode(rec, settings)
    if changed and stage.mode != "dequantize":
        raise_versions(spec, "fp16" if stage.mode == "fp16" else "quantized")
    plan.decisions = decisions
    return plan


def run_job(job: ModelJob, recipe: Recipe, *, allow_custom: bool = True, model: CoreMLModel | None = None) -> tuple[CoreMLModel, list[StagePlan]]:
    """All of a model's stages, in order, on a fresh copy of its input."""
    model = (model or load_model(job.input)).copy()
    plans = [run_stage(model, stage, recipe, allow_custom=allow_custom) for stage in job.stages]
    return model, plans


def quantize_recipe(recipe: Recipe, *, allow_custom: bool = True) -> list[tuple[ModelJob, list[StagePlan]]]:
    """Build every model of a recipe and write each output through the checked, atomic save."""
    done = []
    for job in recipe.models:
        model, plans = run_job(job, recipe, allow_custom=allow_custom)
        model.save(job.output)
        done.append((job, plans))
    return done
