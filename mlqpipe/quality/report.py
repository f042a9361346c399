"""Quality reports: what each stage did to every weight, sizes, the evaluation, and the gates.

The report is computed from the model before and after each stage (so a fold followed by quantization
measures the quantization error against the folded float weights), is deterministic (no timings, no
paths outside the project) and is written as JSON (format below) and Markdown beside the output.

JSON format (report_format 1): {report_format, status ("passed" | "failed"), input, output, recipe,
totals {bytes_before, bytes_after, compression}, specification_version {before, after,
deployment_target_before, deployment_target_after}, weights [{id, layer, type, field, shape, stage, mode,
nbits, bytes_before, bytes_after, snr_db, max_abs_error, relative_l2_error, rule}], flags [{id, snr_db,
hint}], evaluation {evaluated, reason, samples, available_samples, random_inputs, top1_agreement, accuracy_float,
accuracy_quantized, outputs {name: {relative_l2, max_abs}}} or null, gates [{gate, threshold, value,
passed, applied, detail}]} — `applied` false: the gate could not be measured (model not evaluated).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mlqpipe.fileio import posix_path
from mlqpipe.formats.base import deployment_target, version_change
from mlqpipe.formats.registry import format_of

REPORT_FORMAT = 1
FLAG_MARGIN_DB = 15.0  # a weight this far below the median SNR is flagged


def _metrics(before: np.ndarray, after: np.ndarray) -> tuple[float, float, float]:
    a = before.astype(np.float64).ravel()
    b = after.astype(np.float64).ravel()
    noise = np.sum((a - b) ** 2)
    signal = np.sum(a**2)
    snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    rel = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    return snr, float(np.abs(a - b).max()) if a.size else 0.0, rel


def _num(x):
    """JSON-safe numbers: infinities as strings, rounded for stable text."""
    if x is None:
        return None
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return round(x, 6)
    return x


def stage_rows(models: list, stages, decisions_by_stage: list | None = None) -> list[dict]:
    """One row per weight a stage changed: metrics between the model before and after that stage
    (`models`: the input and the model after each stage)."""
    rows = []
    for i, stage in enumerate(stages):
        rows += rows_of_stage(models[i], models[i + 1], stage, decisions_by_stage[i] if decisions_by_stage else None)
    return rows


def rows_of_stage(before_model, after_model, stage, decisions=None) -> list[dict]:
    """The rows of one stage (`decisions`: its plan's, naming the rule that chose each weight). A build
    computes them when it runs the stage and keeps them in the stage's cache entry, so writing the report
    later needs only the input and the final model."""
    if stage.mode == "fold":
        return []
    fmt = format_of(before_model)
    before = {r.id: r for r in fmt.inventory(before_model)}
    rules = {d.id: d.rule for d in decisions} if decisions else {}
    rows = []
    for rec in fmt.inventory(after_model):
        old = before.get(rec.id)
        if old is None or old.storage.describe() == rec.storage.describe():  # the detail shows a joint stage
            continue
        snr, max_abs, rel = _metrics(old.values(), rec.values(count=old.count))
        rows.append({
            "id": rec.id, "layer": rec.layer, "type": rec.layer_type, "field": rec.field_path,
            "shape": list((rec if rec.count else old).shape or ()), "stage": stage.name, "mode": stage.mode, "nbits": stage.nbits or _dtype_bits(stage),
            "bytes_before": old.nbytes, "bytes_after": rec.nbytes,
            "snr_db": snr, "max_abs_error": max_abs, "relative_l2_error": rel, "rule": rules.get(rec.id),
        })
    return rows


def _dtype_bits(stage) -> int | None:
    """An ML-program linear stage says its bits with dtype (int4, uint8, ...)."""
    dtype = getattr(stage, "dtype", None)
    return int(dtype[-1]) if dtype else None


def flags(rows: list[dict], restoring=frozenset()) -> list[dict]:
    """Weights whose SNR is far below the rest of the model's quantized weights. `restoring`: names of
    stages that give float values back (dequantize; the engine's mode registry says which) — not counted."""
    finite = [r["snr_db"] for r in rows if r["stage"] not in restoring and math.isfinite(r["snr_db"])]
    if len(finite) < 3:
        return []
    median = float(np.median(finite))
    out = []
    for r in rows:
        if math.isfinite(r["snr_db"]) and r["snr_db"] < median - FLAG_MARGIN_DB:
            hint = ("a per-tensor lookup table on a layer whose channels differ in range: try linear (per channel) "
                    "or more bits for this weight") if "lut" in r["mode"] else "try more bits for this weight, or exclude it"
            out.append({"id": r["id"], "snr_db": r["snr_db"], "median_snr_db": median, "hint": hint})
    return out


def set_gates(report: dict, gates: list[dict]) -> None:
    report["gates"] = [{k: _num(v) for k, v in g.items()} for g in gates]
    report["status"] = "failed" if any(not g["passed"] for g in gates) else "passed"


def build_report(job, recipe, models: list, decisions_by_stage=None, evaluation=None, restoring=frozenset(), rows=None) -> dict:
    """The report without gates (see `set_gates`); `_rows` keeps the raw floats the gates read. `rows`:
    the stages' rows when known already (then `models` may be just the input and the output)."""
    if rows is None:
        rows = stage_rows(models, job.stages, decisions_by_stage)
    fmt = format_of(models[0])
    before, after = fmt.size(models[0]), fmt.size(models[-1])
    v_before, v_after = fmt.version(models[0]), fmt.version(models[-1])
    return {
        "report_format": REPORT_FORMAT,
        "status": "passed",
        "input": posix_path(job.input),
        "output": posix_path(job.output),
        "recipe": posix_path(recipe.path),
        "totals": {"bytes_before": before, "bytes_after": after, "compression": round(before / after, 4) if after else None},
        "specification_version": {"before": v_before, "after": v_after,
                                  "deployment_target_before": deployment_target(v_before),
                                  "deployment_target_after": deployment_target(v_after)},
        "weights": [{k: _num(v) for k, v in r.items()} for r in rows],
        "flags": [{k: _num(v) for k, v in f.items()} for f in flags(rows, restoring)],
        "evaluation": None if evaluation is None else {k: _num(v) if not isinstance(v, dict) else
                                                      {n: {m: _num(x) for m, x in d.items()} for n, d in v.items()}
                                                      for k, v in evaluation.as_dict().items()},
        "gates": [],
        "_rows": rows,  # raw floats for gates; dropped before writing
    }


def to_json(report: dict) -> bytes:
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    return (json.dumps(clean, sort_keys=True, indent=2) + "\n").encode()


def _fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}"


def to_markdown(report: dict) -> str:
    t = report["totals"]
    lines = [
        f"# mlqpipe report: {report['output']}",
        "",
        f"Status: **{report['status'].upper()}** · input `{report['input']}` · recipe `{report['recipe']}`",
        "",
        f"Size: {t['bytes_before']} → {t['bytes_after']} bytes ({_fmt(t['compression'], 2)}×)",
        "",
    ]
    v = report.get("specification_version")
    if v and v["before"] != v["after"]:
        lines += [f"**{version_change(v['before'], v['after'])}**", ""]
    ev = report["evaluation"]
    if ev is not None:
        if ev["evaluated"]:
            cut = not ev["random_inputs"] and ev.get("available_samples", ev["samples"]) > ev["samples"]
            lines.append(f"Evaluation on {ev['samples']} {'random ' if ev['random_inputs'] else ''}inputs"
                         + (f" of the {ev['available_samples']} in the data (max_samples)" if cut else "")
                         + (" (random inputs: no evaluation data given)" if ev["random_inputs"] else "") + ":")
            if ev["top1_agreement"] is not None:
                lines.append(f"- top-1 agreement with the float model: {_fmt(ev['top1_agreement'] * 100)} %")
            if ev["accuracy_float"] is not None:
                lines.append(f"- accuracy: {_fmt(ev['accuracy_float'] * 100)} % float → {_fmt(ev['accuracy_quantized'] * 100)} % quantized")
            for name, o in sorted(ev["outputs"].items()):
                lines.append(f"- output `{name}`: relative L2 error {_fmt(o['relative_l2'], 5)}, max abs error {_fmt(o['max_abs'], 5)}")
        else:
            lines.append(f"Evaluation: **not evaluated** — {ev['reason']}")
        lines.append("")
    if report["gates"]:
        lines += ["| gate | threshold | value | result |", "|---|---|---|---|"]
        for g in report["gates"]:
            result = g["detail"] if not g.get("applied", True) and g["passed"] else ("pass" if g["passed"] else "FAIL: " + g["detail"])
            lines.append(f"| {g['gate']} | {g['threshold']} | {_fmt(g['value'], 4) if not isinstance(g['value'], str) else g['value']} | {result} |")
        lines.append("")
    if report["flags"]:
        lines.append("Flagged weights:")
        lines += [f"- `{f['id']}`: SNR {_fmt(f['snr_db'])} dB (median {_fmt(f['median_snr_db'])} dB) — {f['hint']}" for f in report["flags"]]
        lines.append("")
    lines += ["| weight | type | shape | stage | mode | bytes | SNR dB | max abs err | rel. L2 err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["weights"]:
        mode = f"{r['mode']} {r['nbits']}" if r["nbits"] else r["mode"]
        lines.append(f"| `{r['id']}` | {r['type']} | {'x'.join(map(str, r['shape']))} | {r['stage']} | {mode} | "
                     f"{r['bytes_before']} → {r['bytes_after']} | {_fmt(r['snr_db'])} | {_fmt(r['max_abs_error'], 6)} | {_fmt(r['relative_l2_error'], 6)} |")
    return "\n".join(lines) + "\n"


def to_png(report: dict, models: list) -> bytes:
    """Per-weight SNR bars and, for the lowest-SNR weight, float vs quantized value histograms.
    Needs matplotlib, an optional extra: a recipe asking for png without it is an error, not a skipped file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from mlqpipe.errors import MlqpipeError

        raise MlqpipeError("report format png needs matplotlib: pip install 'mlqpipe[plot]' "
                           "(or drop png from report.formats)") from None
    import io

    rows = [r for r in report["weights"] if not isinstance(r["snr_db"], str)]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6 + 0.1 * len(rows)))
    ax1.barh([r["id"] for r in rows], [r["snr_db"] for r in rows], color="tab:blue")
    ax1.set_xlabel("SNR (dB)")
    ax1.set_title(f"{report['output']}: per-weight SNR")
    if rows:
        worst = min(rows, key=lambda r: r["snr_db"])
        fmt = format_of(models[0])
        before = {r.id: r for r in fmt.inventory(models[0])}.get(worst["id"])
        after = {r.id: r for r in fmt.inventory(models[-1])}.get(worst["id"])
        if before is not None and after is not None:
            ax2.hist(before.values().ravel(), bins=100, alpha=0.6, label="float")
            ax2.hist(after.values().ravel(), bins=100, alpha=0.6, label="quantized")
            ax2.set_title(f"{worst['id']} ({worst['mode']} {worst['nbits'] or ''}): values")
            ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, job, recipe, formats=("json", "markdown"), models: list | None = None) -> list[Path]:
    from mlqpipe.fileio import atomic_write as _write

    def atomic_write(path, data):
        try:
            _write(path, data)
        except OSError as e:
            from mlqpipe.errors import MlqpipeError

            raise MlqpipeError(f"{path}: cannot write the report: {e.strerror or e}") from None

    json_path, md_path, png_path = recipe.report_paths(job)
    written = []
    if "png" in formats and models:
        atomic_write(png_path, to_png(report, models))
        written.append(png_path)
    if "json" in formats:
        atomic_write(json_path, to_json(report))
        written.append(json_path)
    if "markdown" in formats:
        atomic_write(md_path, to_markdown(report).encode())
        written.append(md_path)
    return written
