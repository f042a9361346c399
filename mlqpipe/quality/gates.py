"""Assessing a built model: evaluation, report and gates — the check that can stop a release.

Used by `mlqpipe quantize` and by the doit build's output task alike. A failed gate means: the report is
written (status "failed"), the output is not, and the command or task fails naming the worst weights.
"""

from __future__ import annotations

import math

import numpy as np

from mlqpipe.errors import GateFailure  # raised here; defined with the other errors (the CLI tells findings from bad input)
from mlqpipe.quality.report import build_report, set_gates

EVALUATION_GATES = ("min_top1_agreement", "max_output_error", "max_accuracy_drop", "min_accuracy")
_EPS = 1e-9  # accuracies are fractions k/n: compare differences of them with a little slack for rounding




def _gate(name, threshold, value, passed, detail="", applied=True) -> dict:
    """One gate's verdict. `applied` False: it could not be measured (model not evaluated); it then passes
    only where the recipe allows that, and is shown as "not applied", never left out."""
    return {"gate": name, "threshold": threshold, "value": value, "passed": bool(passed), "applied": applied, "detail": detail}


def _accuracy_drop(evaluation):
    f, q = evaluation.accuracy_float, evaluation.accuracy_quantized
    return None if f is None or q is None else f - q


# evaluation gates: name -> (measure(evaluation), passes(value, threshold), what the value is)
_EVALUATION_GATES = {
    "min_top1_agreement": (lambda e: e.top1_agreement, lambda v, t: v >= t, "top-1 agreement with the float model"),
    "max_output_error": (lambda e: max((o["relative_l2"] for o in e.outputs.values()), default=None), lambda v, t: v <= t,
                         "largest relative L2 error of an output against the float model"),
    "max_accuracy_drop": (_accuracy_drop, lambda v, t: v <= t + _EPS, "accuracy lost against the float model"),
    "min_accuracy": (lambda e: e.accuracy_quantized, lambda v, t: v >= t - _EPS, "accuracy of the quantized model"),
}


def check_gates(rows: list[dict], gates, rule_snr: dict, evaluation, allow_unevaluated: bool, sizes: tuple[int, int]) -> list[dict]:
    out = []
    if gates.min_snr_db is not None and rows:
        worst = sorted(rows, key=lambda r: r["snr_db"])[:3]
        low = [r for r in rows if r["snr_db"] < gates.min_snr_db]
        out.append(_gate("min_snr_db", gates.min_snr_db, worst[0]["snr_db"], not low,
                         f"{len(low)} weight(s) below: " + ", ".join(f"{r['id']} {r['snr_db']:.1f} dB" for r in sorted(low, key=lambda r: r["snr_db"])[:5])))
    for rule, threshold in sorted(rule_snr.items()):
        mine = [r for r in rows if r.get("rule") == rule]
        if not mine:
            continue
        low = [r for r in mine if r["snr_db"] < threshold]
        worst = min(r["snr_db"] for r in mine)
        out.append(_gate(f"rules.{rule}.min_snr_db", threshold, worst, not low,
                         f"{len(low)} weight(s) below: " + ", ".join(f"{r['id']} {r['snr_db']:.1f} dB" for r in sorted(low, key=lambda r: r["snr_db"])[:5])))
    before, after = sizes
    if gates.max_size_bytes is not None:
        out.append(_gate("max_size_bytes", gates.max_size_bytes, after, after <= gates.max_size_bytes, f"output is {after} bytes"))
    if gates.min_compression is not None:
        ratio = before / after if after else math.inf
        out.append(_gate("min_compression", gates.min_compression, ratio, ratio >= gates.min_compression, f"compression {ratio:.2f}x"))
    wanted = [g for g in EVALUATION_GATES if getattr(gates, g) is not None]
    evaluated = evaluation is not None and evaluation.evaluated
    reason = "" if evaluated else (evaluation.reason if evaluation is not None else "no evaluation configured")
    for name in wanted:
        threshold = getattr(gates, name)
        measure, passes, what = _EVALUATION_GATES[name]
        if not evaluated:
            hint = "" if allow_unevaluated else "; set evaluation.allow_unevaluated: true to accept that"
            out.append(_gate(name, threshold, "not evaluated", allow_unevaluated, f"not applied: not evaluated ({reason}){hint}", applied=False))
            continue
        v = measure(evaluation)
        if v is None:  # `validate` refuses such settings; a model can still surprise (no labels in the data)
            out.append(_gate(name, threshold, "not measured", False, f"{what} cannot be measured on this model or data", applied=False))
            continue
        out.append(_gate(name, threshold, v, passes(v, threshold), what))
    return out


def _evaluated(model):
    """What compare.evaluate takes: an ML program as it is (weights live beside its spec), else the spec."""
    from mlqpipe.quality.evaluate.program import is_program

    return model if is_program(model) else model.spec


def _evaluate(job, models: list, cache_dir):
    """The float and the quantized model on the recipe's data (arrays read from the .npz as needed)."""
    return evaluate_models(job.evaluation, models[0], models[-1], cache_dir, str(job.input.name))


def evaluate_models(cfg, float_model, quantized, cache_dir=None, what: str = "model"):
    """Compare two loaded models (any format) on the data an evaluation setting names (`cfg`: a recipe
    Evaluation, or None for the defaults)."""
    from contextlib import nullcontext

    from mlqpipe.formats.registry import format_of
    from mlqpipe.quality.evaluate.compare import DEFAULT_MEMORY_MB, Evaluation, FloatCache, evaluate

    fmt = format_of(float_model)
    if fmt.evaluator is None:  # allowed by the plan only with allow_unevaluated: the gates say "not evaluated"
        return Evaluation(False, f"{fmt.name} models cannot be evaluated yet")
    opened = np.load(cfg.data, allow_pickle=False) if cfg is not None and cfg.data is not None else nullcontext(None)
    with opened as data:
        labels = data[cfg.labels] if data is not None and cfg.labels else None
        samples = (cfg.max_samples if data is not None else cfg.random_inputs) if cfg is not None else None
        return evaluate(_evaluated(float_model), _evaluated(quantized), data, names=dict(cfg.inputs) if cfg else {}, labels=labels,
                        samples=samples, memory_mb=(cfg.memory_mb if cfg and cfg.memory_mb else DEFAULT_MEMORY_MB),
                        cache=FloatCache(cache_dir) if cache_dir else None, what=what)


def assess(job, recipe, models: list, decisions_by_stage=None, cache_dir=None, restoring=frozenset(), rows=None) -> dict:
    """The report of one built model, gates applied. Raises GateFailure when a gate fails. `cache_dir`: where
    the float model's outputs on the data are kept between builds (None: not kept); `restoring`: stages
    that dequantize (see report.flags); `rows`: the stages' report rows when known (see build_report)."""
    evaluation = None
    wants_eval = job.evaluation is not None or any(getattr(job.gates, g) is not None for g in EVALUATION_GATES)
    if wants_eval:
        evaluation = _evaluate(job, models, cache_dir)
    report = build_report(job, recipe, models, decisions_by_stage, evaluation, restoring, rows)
    rule_snr = {r.name: r.min_snr_db for r in recipe.rules if r.min_snr_db is not None}
    sizes = (report["totals"]["bytes_before"], report["totals"]["bytes_after"])
    allow = bool(job.evaluation and job.evaluation.allow_unevaluated)
    gates = check_gates(report.pop("_rows"), job.gates, rule_snr, evaluation, allow, sizes)
    set_gates(report, gates)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        detail = "; ".join(f"{g['gate']} (threshold {g['threshold']}, got {g['value'] if isinstance(g['value'], str) else round(g['value'], 4)}): {g['detail']}" for g in failed)
        raise GateFailure(f"{report['output']}: quality gate failed — {detail}; the output was not written", report)
    return report
