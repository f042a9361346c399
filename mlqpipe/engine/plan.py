"""Plans: for each model and stage, what happens to every weight and why.

`plan_job` simulates the stages (folds are applied to a copy, quantization only changes the recorded
storage), so it is cheap and never runs custom code; `execute.run_stage` makes the same decisions with
`decide_stage` and applies them. Problems that need the models — rules that match nothing, quantizing
weights that are already quantized, a stage that would leave a layer half float16 — are found here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mlqpipe.errors import ModelError
from mlqpipe.formats.base import Storage
from mlqpipe.formats.registry import format_of, load_model
from mlqpipe.fileio import shown_path as _shown
from mlqpipe.recipe.problems import Problem, dotted
from mlqpipe.recipe.types import STAGE_SETTINGS, ModelJob, Recipe, Stage
from mlqpipe.engine.modes import ModeSettings, kernel_settings, mode_named
from mlqpipe.quant import kernels
from mlqpipe.quant.linear import EXACT_MIN_SCALE
from mlqpipe.engine.select import NAME_LISTS, NEUTRAL_CONDITIONS, RuleMatcher, decide, entries_matching, set_conditions



@dataclass(frozen=True)
class Decision:
    id: str
    layer: str
    layer_type: str
    field: str
    shape: tuple
    stage: str
    action: str  # quantize | keep | custom | error
    rule: str | None
    reason: str
    storage_before: str
    storage_after: str
    bytes_before: int
    bytes_after: int

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class StagePlan:
    stage: Stage
    decisions: list[Decision] = field(default_factory=list)
    folds: list = field(default_factory=list)


@dataclass
class ModelPlan:
    job: ModelJob
    stages: list[StagePlan] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    matched_rules: set = field(default_factory=set)
    matched_entries: set = field(default_factory=set)  # (rule, condition, index) of name-list entries that match
    loaded: bool = True
    version_before: int = 0  # specificationVersion of the input and of the output
    version_after: int = 0
    target_changes: list = field(default_factory=list)  # what deployment_target changed (ML programs)
    searched: tuple | None = None  # a search recipe: (the model after the fixed stages, their storage overlay)


def storage_after(stage: Stage) -> Storage:
    bits = stage.nbits or (int(stage.dtype[-1]) if stage.dtype else None)
    return mode_named(stage.mode).storage_after(bits)


# the recipe's weight settings ModeSettings takes under the same name (nbits, function, rounding, dtype and
# block_size are mapped below)
_PASSED_AS_IS = tuple(k for k in STAGE_SETTINGS if k not in ("nbits", "function", "coremltools_rounding", "dtype", "block_size"))


def stage_settings(stage: Stage, lut_function=None, min_scale: float = EXACT_MIN_SCALE) -> ModeSettings:
    """A recipe stage's settings as the mode registry reads them; what the recipe leaves out keeps
    coremltools' defaults (linear: dtype int8, or int4 for nbits 4)."""
    mode = mode_named(stage.mode)
    extra = {k: getattr(stage, k) for k in _PASSED_AS_IS if getattr(stage, k) is not None}
    if stage.block_size is not None:
        extra["prune_block_size" if mode.name == "prune" else "block_size"] = stage.block_size
    if mode.name in ("linear", "linear_symmetric"):
        extra["dtype"] = stage.dtype or (f"int{stage.nbits}" if stage.nbits in (4, 8) else "int8")
    nbits = stage.nbits if stage.nbits is not None or mode.name in ("unique_lut", "custom_lut") else 8
    return ModeSettings(stage.mode, nbits, lut_function, min_scale, **extra)


def matchers_for(stage: Stage, recipe: Recipe, allow_custom: bool | None) -> list[RuleMatcher]:
    return [RuleMatcher(recipe.rule(name), recipe.python_path, allow_custom) for name in stage.rules]


def stage_index(recipe: Recipe, stage: Stage) -> int:
    return next(i for i, s in enumerate(recipe.stages) if s.name == stage.name)


def stage_at(recipe: Recipe, stage: Stage) -> tuple:
    """Where the recipe writes a stage: stages[i], or the search candidate it was made from."""
    for i, s in enumerate(recipe.stages):
        if s.name == stage.name:
            return ("stages", i)
    if recipe.search is not None:
        for options in recipe.search.candidates.values():
            for c in options:
                if c.stage is not None and c.stage.mode == stage.mode and replace(c.stage, rules=stage.rules, name=stage.name) == stage:
                    return c.at
    return ("search",)


def decide_stage(model, stage: Stage, recipe: Recipe, matchers: list[RuleMatcher], overlay: dict | None = None,
                 model_file: str = "", only=None):
    """Decisions for every weight of `model` (any format) in one quantizing stage, and the problems they
    imply (`model_file`: the input these are about, named in the problems; `only`: the ids the stage may
    touch — a search group —, None for all)."""
    fmt = format_of(model)
    for m in matchers:
        m.prepare(model)
    records = []
    for rec in fmt.inventory(model):
        if overlay and rec.id in overlay:
            rec = replace(rec, storage=overlay[rec.id])
        records.append(rec)
    at = stage_at(recipe, stage)
    rules_at = at + ("rules",) if at[0] == "stages" else at  # a search candidate has no rules of its own
    mode = mode_named(stage.mode)
    decisions, problems, after = [], [], {}
    for rec in records:
        match = decide(rec, matchers)
        st = rec.storage
        action, reason, new = "keep", "", st
        if only is not None and rec.id not in only:
            reason = "not in this search group"
        elif match.rule is None:
            reason = "no rule of this stage matches"
        elif not match.include:
            reason = f"excluded by rule '{match.rule}'"
        elif match.pending:
            action, reason, new = "custom", f"decided at build time by custom code {recipe.rule(match.rule).python}", st
        elif rec.updatable:
            reason = "updatable weight: Core ML trains only float weights, left as it is"
        elif (refusal := fmt.refusal(rec, mode.name)) and not (mode.reads_quantized and st.kind == mode.done_if):
            action, reason = "error", refusal
            problems.append(_problem(recipe, rules_at, f"{_shown(model_file) + ': ' if model_file else ''}stage '{stage.name}' "
                                     f"would {mode.name} {rec.id}: {refusal} — selected by rule '{match.rule}'",
                                     f"narrow rule '{match.rule}' (e.g. count: {{min: ...}}) or add a rule with exclude: true before it"))
        elif mode.reads_quantized:
            if st.kind == mode.done_if:
                reason = f"already {st.kind}"
            else:
                action, reason, new = "quantize", f"rule '{match.rule}'", storage_after(stage)
        elif st.is_quantized and stage.joint and hasattr(fmt, "compressed_result"):
            # the outer form stays (a sparse weight with palettized nonzero values is still sparse)
            action, reason, new = "quantize", f"rule '{match.rule}', joint: {storage_after(stage)} on top of {st}", st
        elif st.is_quantized:
            action, reason = "error", f"already quantized ({st})"
            problems.append(_problem(recipe, rules_at,
                                     f"{_shown(model_file) + ': ' if model_file else ''}stage '{stage.name}' would quantize {rec.id}, "
                                     f"which is already quantized ({st}) — selected by rule '{match.rule}'",
                                     f"add `storage: float32` (or [float32, float16]) to rule '{match.rule}' to leave quantized "
                                     "weights as they are, or add a dequantize stage before this one"
                                     + (", or say joint: true (ML programs) to compress on top" if hasattr(fmt, "compressed_result") else "")))
        elif st.kind == mode.done_if:
            reason = f"already {st.kind}"
        else:
            action, reason, new = "quantize", f"rule '{match.rule}'", storage_after(stage)
        if action == "quantize" and (misfit := _shape_problem(fmt, mode, rec, stage)):
            action, reason, new = "error", misfit, st
            problems.append(_problem(recipe, at, f"{_shown(model_file) + ': ' if model_file else ''}stage '{stage.name}': {rec.where}: "
                                     f"{misfit} — selected by rule '{match.rule}'",
                                     "change the stage's settings, or exclude this weight from its rules"))
        if action == "quantize" and len(shared := getattr(rec, "functions", ())) > 1:
            reason += f"; one weight shared by functions {', '.join(shared)}"
        after[rec.id] = new
        decisions.append(
            Decision(rec.id, rec.layer, rec.layer_type, rec.field_path, tuple(rec.shape or ()), stage.name, action, match.rule,
                     reason, str(st), str(new), fmt.stored_bytes(rec, st), fmt.stored_bytes(rec, new))
        )
    problems += [_problem(recipe, rules_at, f"stage '{stage.name}' would leave layer {f.where} mixing float16 and float32",
                          "Core ML needs one float precision per layer: select all of its float blobs in this stage (e.g. field: [weights, bias])")
                 for f in fmt.precision_problems(model, records, after)]
    return decisions, problems, after


def _shape_problem(fmt, mode, rec, stage: Stage) -> str | None:
    """Settings a format's own kernels cannot apply to this weight's shape (its values are not read)."""
    if mode.kernel_for(fmt.name) is mode.kernel or rec.shape is None or (stage.joint and rec.storage.is_quantized):
        return None
    dtype = getattr(rec, "dtype", None)
    if stage.lut_dtype in ("fp16", "fp32") and dtype != stage.lut_dtype:
        return (f"lut_dtype {stage.lut_dtype} on a {dtype} weight: a LUT has the weight's own float type (another would "
                "change the op's output type); leave lut_dtype out, or quantize the LUT with int8 / uint8")
    return kernels.shape_problem(tuple(rec.shape), kernel_settings(rec, stage_settings(stage)))


def rules_matching_something(model, matchers: list[RuleMatcher], overlay: dict | None = None) -> set[str]:
    """Rules whose conditions hold for at least one weight, whatever the precedence (custom code counts)."""
    found = set()
    for rec in format_of(model).inventory(model):
        if overlay and rec.id in overlay:
            rec = replace(rec, storage=overlay[rec.id])
        found |= {m.rule.name for m in matchers if m.rule.name not in found and m.matches(rec)}
    return found


def _problem(recipe: Recipe, path, message, hint="") -> Problem:
    path = tuple(path)
    file, line, col = recipe.locations.get(path) or recipe.locations.get(path[:2]) or (str(recipe.path), 0, 0)
    return Problem(file, line, col, dotted(path), message, hint)


def setting_problems(job: ModelJob, recipe: Recipe, model) -> list[Problem]:
    """Evaluation and gate settings that do not fit this model or its data (the .npz headers are read)."""
    from mlqpipe.quality.evaluate.settings import evaluation_problems
    from mlqpipe.quality.gates import EVALUATION_GATES

    fmt = format_of(model)
    if fmt.evaluator is None:  # this format has no evaluator yet: asking for an evaluation is a setting problem
        if job.evaluation is not None and job.evaluation.allow_unevaluated:
            return []  # the build reports the evaluation gates as "not evaluated"
        wanted = [("evaluation",)] if job.evaluation is not None else []
        wanted += [("gates", g) for g in EVALUATION_GATES if getattr(job.gates, g) is not None]
        return [_setting_problem(recipe, job, at, f"{_shown(job.input)}: {fmt.name} models cannot be evaluated yet",
                                 "remove the evaluation settings and the evaluation gates for this model, or set "
                                 "evaluation.allow_unevaluated: true to build it with them reported as not evaluated")
                for at in wanted]
    return [_setting_problem(recipe, job, at, f"{_shown(job.input)}: {message}", hint)
            for at, message, hint in evaluation_problems(model.spec, job.evaluation, job.gates)]


def mode_problems(job: ModelJob, recipe: Recipe, fmt, stages=None) -> list[Problem]:
    """Stages (the job's, or `stages`) whose mode this model's format cannot store (the plan still shows what
    they would select)."""
    out = []
    for stage in job.stages if stages is None else stages:
        mode = "fold" if stage.mode == "fold" else mode_named(stage.mode).name
        if mode not in fmt.modes:
            hint = getattr(fmt, "modes_note", "") or f"choose one of {', '.join(sorted(fmt.modes))}"
            out.append(_problem(recipe, stage_at(recipe, stage) + ("mode",),
                                f"{_shown(job.input)}: stage '{stage.name}': mode {stage.mode} is not available for {fmt.name} models", hint))
    return out


def setting_key_problems(job: ModelJob, recipe: Recipe, fmt, stages=None) -> list[Problem]:
    """Stage settings (of the job's stages, or of `stages`) this model's format does not read in that mode,
    and nbits it cannot store."""
    out = []
    for stage in job.stages if stages is None else stages:
        if stage.mode == "fold" or mode_named(stage.mode).name not in fmt.modes:
            continue
        mode = mode_named(stage.mode)
        at = stage_at(recipe, stage)
        reads = mode.keys_for(fmt.name)
        for key in stage.keys_set():
            if key not in reads:
                takes = f"it takes {', '.join(reads)}" if reads else "it takes no settings"
                out.append(_problem(recipe, at + (key,), f"{_shown(job.input)}: stage '{stage.name}': {key} is not a setting of "
                                    f"{mode.name} on {fmt.name} models", f"{takes} (see schemas/recipe.schema.json)"))
        if "nbits" in reads and stage.nbits is None and fmt.name not in mode.infers_nbits and mode.nbits:
            out.append(_problem(recipe, at + ("mode",), f"{_shown(job.input)}: stage '{stage.name}': {mode.name} on {fmt.name} "
                                f"models needs nbits", "add nbits: {}..{}".format(*mode.nbits)))
        allowed = mode.format_nbits.get(fmt.name)
        if allowed and stage.nbits is not None and stage.nbits not in allowed:
            out.append(_problem(recipe, at + ("nbits",), f"{_shown(job.input)}: stage '{stage.name}': {fmt.name} models store "
                                f"{mode.name} with nbits {', '.join(map(str, allowed))}, not {stage.nbits}",
                                f"choose one of {', '.join(map(str, allowed))}"))
        if stage.dtype and stage.nbits is not None and stage.nbits != int(stage.dtype[-1]):
            out.append(_problem(recipe, at + ("nbits",), f"stage '{stage.name}': nbits {stage.nbits} disagrees with dtype {stage.dtype}",
                                "give one of them (dtype is the ML-program setting; nbits the neural-network one)"))
    return out


def target_problems(job: ModelJob, recipe: Recipe, fmt, model, stage: Stage, decisions) -> list[Problem]:
    """Settings of a stage that need a newer OS than the model targets (after its deployment_target)."""
    if not hasattr(fmt, "requirements") or not any(d.action == "quantize" for d in decisions):
        return []
    from mlqpipe.formats.base import deployment_target

    have = fmt.version(model)
    out = []
    for need, what in fmt.requirements(mode_named(stage.mode).name, stage):
        if need > have:
            out.append(_problem(recipe, stage_at(recipe, stage),
                                f"{_shown(job.input)}: stage '{stage.name}': {what} needs {deployment_target(need)} "
                                f"(specificationVersion {need}); this model targets {deployment_target(have)}",
                                f"set deployment_target: {deployment_target(need).replace(' ', '')} for this model (in its models "
                                "entry or in defaults) to raise it, or choose a setting its target supports"))
            break
    return out


def condition_problems(job: ModelJob, recipe: Recipe, fmt) -> list[Problem]:
    """Rule conditions this model's format cannot answer, located in the recipe."""
    out = []
    for stage in job.stages:
        for name in stage.rules:
            for cond in sorted(set_conditions(recipe.rule(name)) - fmt.record_type.CONDITIONS - NEUTRAL_CONDITIONS):
                out.append(_problem(recipe, ("rules", name, cond), f"{_shown(job.input)}: rule '{name}' (stage '{stage.name}'): "
                                    f"condition {cond} cannot be answered for {fmt.name} models",
                                    "drop the condition, or give this model its own rule"))
    return out


def raise_target(model, job: ModelJob, recipe: Recipe) -> list[str]:
    """The recipe's explicit `deployment_target:` for this model, applied in place (the plan shows it)."""
    fmt = format_of(model)
    if not hasattr(fmt, "raise_target"):
        raise ModelError(f"{_shown(fmt.source(model))}: deployment_target applies to ML programs; "
                         f"{fmt.name} models get the version their modes need")
    return fmt.raise_target(model, job.deployment_target)


def _target_at(recipe: Recipe, job: ModelJob) -> tuple:
    for at in (("models", job.entry, "deployment_target"), ("defaults", "deployment_target")):
        if at in recipe.locations:
            return at
    return ("models", job.entry)


def _setting_problem(recipe: Recipe, job: ModelJob, at: tuple, message: str, hint: str) -> Problem:
    """A problem with a model's evaluation or gate setting, located where that setting is written: the model
    entry, `defaults:`, or the recipe's top level."""
    for n in range(len(at), 0, -1):  # the most specific key written anywhere
        for base in (("models", job.entry), ("defaults",), ()):
            if base + at[:n] in recipe.locations:
                return _problem(recipe, base + at[:n], message, hint)
    return _problem(recipe, ("models", job.entry), message, hint)


def plan_job(job: ModelJob, recipe: Recipe, model=None) -> ModelPlan:
    """Simulate every stage of one model (no kernels run, no custom code imported)."""
    plan = ModelPlan(job)
    try:
        model = load_model(job.input) if model is None else format_of(model).copy(model)
    except ModelError as e:
        plan.problems.append(_problem(recipe, ("models", job.entry, "input"), str(e)))
        plan.loaded = False
        return plan
    fmt = format_of(model)
    plan.problems += condition_problems(job, recipe, fmt)
    if plan.problems:  # rules this format cannot answer: nothing to simulate
        plan.loaded = False
        return plan
    plan.problems += mode_problems(job, recipe, fmt)
    plan.problems += setting_key_problems(job, recipe, fmt)
    plan.version_before = fmt.version(model)
    if job.deployment_target:
        try:
            plan.target_changes = raise_target(model, job, recipe)
        except ModelError as e:
            plan.problems.append(_problem(recipe, _target_at(recipe, job), str(e)))
    plan.problems += setting_problems(job, recipe, model)
    overlay: dict = {}
    plan.bytes_before = sum(fmt.stored_bytes(r, r.storage) for r in fmt.inventory(model))
    for stage in job.stages:
        sp = StagePlan(stage)
        if stage.mode == "fold":
            if "fold" not in fmt.modes:  # reported by mode_problems
                plan.stages.append(sp)
                continue
            try:
                sp.folds = fmt.fold(model, stage.fold)
            except ModelError as e:  # the input breaks Core ML's rules in a way no fold can repair
                plan.problems.append(_problem(recipe, ("models", job.entry, "input"), f"{_shown(job.input)}: stage '{stage.name}': {e}"))
                plan.loaded = False
                return plan
        else:
            matchers = matchers_for(stage, recipe, None)
            decisions, problems, after = decide_stage(model, stage, recipe, matchers, overlay, model_file=job.input)
            plan.matched_rules |= rules_matching_something(model, matchers, overlay)
            plan.matched_entries |= {(m.rule.name, *hit) for rec in fmt.inventory(model) for m in matchers for hit in entries_matching(m.rule, rec)}
            sp.decisions = decisions
            plan.problems += problems
            plan.problems += target_problems(job, recipe, fmt, model, stage, decisions)
            overlay.update(after)
            floor = mode_named(stage.mode).version_floor
            if floor and any(d.action == "quantize" for d in decisions) and mode_named(stage.mode).name in fmt.modes:
                fmt.raise_version(model, floor)  # as the build will
        plan.stages.append(sp)
    if recipe.search is not None:  # the searched rules count as used; search/groups.py checks the rest
        searched = [RuleMatcher(recipe.rule(name), recipe.python_path, None) for name in recipe.search.rules]
        plan.matched_rules |= rules_matching_something(model, searched, overlay)
        plan.matched_entries |= {(m.rule.name, *hit) for rec in fmt.inventory(model) for m in searched for hit in entries_matching(m.rule, rec)}
        plan.searched = (model, overlay)
    plan.version_after = fmt.version(model)
    plan.bytes_after = sum(fmt.stored_bytes(r, overlay.get(r.id, r.storage)) for r in fmt.inventory(model))
    return plan


def plan_recipe(recipe: Recipe) -> tuple[list[ModelPlan], list[Problem]]:
    """Plans for every model, and the recipe-level problems (unmatched rules included)."""
    plans = [plan_job(job, recipe) for job in recipe.models]
    problems = [p for mp in plans for p in mp.problems]
    matched = set().union(*(mp.matched_rules for mp in plans)) if plans else set()
    used = {name for s in recipe.stages for name in s.rules} | set(recipe.search.rules if recipe.search else ())
    if recipe.models and all(mp.loaded for mp in plans):
        for rule in (r for r in recipe.rules if r.name in used):  # unused ones: the searched rules of a resolved recipe
            if rule.name not in matched and not rule.optional:
                problems.append(_problem(recipe, ("rules", rule.name),
                                         f"rule '{rule.name}' matches no weight in any of this recipe's {len(recipe.models)} model(s)",
                                         "fix its conditions (see `mlqpipe inspect MODEL` for names), or mark it optional: true"))
            elif not rule.optional:
                problems += _unmatched_entries(recipe, rule, set().union(*(mp.matched_entries for mp in plans)))
    return plans, problems


def _unmatched_entries(recipe: Recipe, rule, matched: set) -> list[Problem]:
    """A name or glob in a rule's list that matches no weight: a typo there silently changes precision."""
    out = []
    raw = (recipe.document.get("rules") or {}).get(rule.name) or {}
    for attr in NAME_LISTS:
        for i, pattern in enumerate(getattr(rule, attr)):
            if (rule.name, attr, i) not in matched:
                at = ("rules", rule.name, attr) + ((i,) if isinstance(raw.get(attr), list) else ())
                out.append(_problem(recipe, at, f"{attr} '{pattern}' of rule '{rule.name}' matches no weight in any of this "
                                                f"recipe's {len(recipe.models)} model(s)",
                                    "fix the name (see `mlqpipe inspect MODEL`), or mark the rule optional: true"))
    return out
