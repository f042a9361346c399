"""A search's result as a recipe release builds use without searching, and its report.

The resolved recipe extends the searched one (so rules, report, gates and evaluation stay where they are
written) and replaces what the search decided: `search: null`, the fixed stages followed by one stage per
model and group whose choice is not keep, and the model entries, one per input file, each skipping the
stages chosen for the other models. Per-weight groups get a rule each that names exactly their weight. A
comment block holds the measured figures. The same search gives the same bytes (sorted, no dates).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mlqpipe.recipe.types import Recipe
from mlqpipe.search.run import ModelResult


def _stage_entry(stage, name: str, rules: list[str]) -> dict:
    entry = {"name": name, "mode": stage.mode}
    for key in stage.keys_set():
        value = getattr(stage, key)
        entry[key] = list(value) if isinstance(value, tuple) else value
    entry["rules"] = rules
    return entry


def _pct(a, b) -> str:
    return "-" if a is None or b is None else f"{a:.4f} -> {b:.4f}"


def _comment(recipe: Recipe, results: list[ModelResult]) -> list[str]:
    lines = [f"Resolved by `mlqpipe search {recipe.path.name}`: build this recipe for releases (it searches nothing).",
             "Search results (on the search data; the build checks the release gates again):"]
    for r in results:
        gates = ", ".join(f"{k} {v}" for k, v in r.gates.items())
        lines.append(f"{r.job.input.name}: {r.float_size} -> {r.final.size} bytes; accuracy {_pct(r.final.accuracy_float, r.final.accuracy_quantized)}; "
                     f"top-1 agreement {r.final.top1_agreement if r.final.top1_agreement is not None else '-'}; "
                     f"output error {r.final.output_error:.4g}; gates {gates}; {sum(len(row) - 1 for row in r.trials)} trials")
        for g, i, row in zip(r.groups, r.chosen, r.trials):
            alone = row[i]
            lines.append(f"  {g.label}: {g.candidates[i].label} (alone: {alone.size} bytes, accuracy "
                         f"{alone.accuracy_quantized if alone.accuracy_quantized is not None else '-'}, output error {alone.output_error:.4g})")
    return lines


def resolved_document(recipe: Recipe, results: list[ModelResult]) -> tuple[dict, list[str]]:
    """The resolved recipe as a mapping, and its comment lines."""
    data = recipe.document
    base_dir = recipe.path.parent
    stages = list(data.get("stages") or [])
    rules: dict = {}
    per_model: list[list[str]] = []
    for m, r in enumerate(results):
        stem = Path(r.job.input).stem
        names = []
        for n, (g, i) in enumerate(zip(r.groups, r.chosen)):
            stage = g.candidates[i].stage
            if stage is None:
                continue
            rule = g.rule
            if g.own_rule is not None:
                rule = f"search_{m + 1}_{n + 1}"
                rules[rule] = g.own_rule
            name = f"search-{m + 1}-{stem}-{n + 1}"
            stages.append(_stage_entry(stage, name, [rule]))
            names.append(name)
        per_model.append(names)
    models = []
    raw_models = data.get("models") or []
    for m, r in enumerate(results):
        entry = {k: v for k, v in raw_models[r.job.entry].items()}
        entry["input"] = Path(os.path.relpath(r.job.input, base_dir)).as_posix()
        skips = {name: {"skip": True} for k, names in enumerate(per_model) if k != m for name in names}
        if skips:
            entry["stages"] = {**(entry.get("stages") or {}), **skips}
        models.append(entry)
    doc = {"version": 1, "extends": recipe.path.name, "search": None}
    if rules:
        doc["rules"] = rules
    doc["stages"] = stages
    doc["models"] = models
    return doc, _comment(recipe, results)


def write_resolved(recipe: Recipe, results: list[ModelResult]) -> Path:
    from mlqpipe.fileio import atomic_write

    doc, comment = resolved_document(recipe, results)
    text = "".join(f"# {line}\n" for line in comment) + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
    path = recipe.resolved_path
    atomic_write(path, text.encode())
    return path


def report(recipe: Recipe, results: list[ModelResult]) -> dict:
    """The search's report (JSON): per model, the base, every trial, the verifications and the choice."""
    out = {"recipe": recipe.path.name, "resolved": recipe.resolved_path.name, "models": []}
    for r in results:
        out["models"].append({
            "input": str(r.job.input), "gates": r.gates, "float_bytes": r.float_size, "base": r.base.as_dict(),
            "chosen": r.final.as_dict(), "trials_run": r.trials_run, "trials_from_cache": r.trials_cached,
            "groups": [{"group": g.label, "weights": list(g.ids), "choice": g.candidates[i].label,
                        "trials": [{"candidate": c.label, **m.as_dict()} for c, m in zip(g.candidates, row)]}
                       for g, i, row in zip(r.groups, r.chosen, r.trials)],
            "verifications": [{"choices": [r.groups[k].candidates[i].label for k, i in enumerate(ch)], **m.as_dict()}
                              for ch, m in r.verifications],
        })
    return out


def write_report(recipe: Recipe, results: list[ModelResult]) -> list[Path]:
    from mlqpipe.fileio import atomic_write

    data = report(recipe, results)
    base = recipe.resolved_path.with_suffix("")
    json_path, md_path = Path(f"{base}.search.json"), Path(f"{base}.search.md")
    atomic_write(json_path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode())
    atomic_write(md_path, markdown(data).encode())
    return [json_path, md_path]


def markdown(data: dict) -> str:
    lines = [f"# mlqpipe search: {data['recipe']}", "", f"Resolved recipe: `{data['resolved']}`", ""]
    for m in data["models"]:
        c, b = m["chosen"], m["base"]
        lines += [f"## {m['input']}", "",
                  f"Size {m['float_bytes']} → {c['size']} bytes; accuracy {_pct(c['accuracy_float'], c['accuracy_quantized'])}; "
                  f"gates {', '.join(f'{k} {v}' for k, v in m['gates'].items())}; {m['trials_run']} trials run, {m['trials_from_cache']} from cache.", "",
                  "| group | choice | bytes alone | accuracy alone | output error alone |", "|---|---|---|---|---|"]
        for g in m["groups"]:
            t = next(t for t in g["trials"] if t["candidate"] == g["choice"])
            acc = "-" if t["accuracy_quantized"] is None else f"{t['accuracy_quantized']:.4f}"
            lines.append(f"| {g['group']} | {g['choice']} | {t['size']} | {acc} | {t['output_error']:.4g} |")
        lines += ["", f"Base (fixed stages only): {b['size']} bytes, accuracy {_pct(b['accuracy_float'], b['accuracy_quantized'])}.", ""]
    return "\n".join(lines) + "\n"
