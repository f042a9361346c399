"""Plain-text tables for the terminal, without heavy imports (a no-op build prints one)."""

from __future__ import annotations

import json


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width table: columns are (key, heading)."""
    cells = [[h for _, h in columns]] + [[str(row[k]) for k, _ in columns] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


# --- the per-output table at the end of `mlqpipe build` and `mlqpipe quantize` ---------------------------


def _num(v, digits=4) -> str:
    if isinstance(v, str) or v is None:
        return str(v)
    return f"{v:.{digits}g}"


def quality_text(report: dict | None) -> str:
    """The one number a release reviewer asks for first: accuracy, else agreement, else output error."""
    ev = (report or {}).get("evaluation")
    if not ev:
        return "-"
    if not ev["evaluated"]:
        return "not evaluated"
    if ev.get("accuracy_float") is not None:
        return f"accuracy {ev['accuracy_float']:.3f} -> {ev['accuracy_quantized']:.3f}"
    if ev.get("top1_agreement") is not None:
        return f"top-1 agreement {ev['top1_agreement']:.3f}"
    errors = [o["relative_l2"] for o in ev.get("outputs", {}).values()]
    return f"output error {max(errors):.2e}" if errors else "-"


def gates_text(report: dict | None) -> str:
    parts = []
    for g in (report or {}).get("gates", []):
        op = "<=" if g["gate"].split(".")[-1].startswith("max_") else ">="
        verdict = "not applied" if not g.get("applied", True) else ("ok" if g["passed"] else "FAILED")
        value = g["value"] if g.get("applied", True) else "-"
        parts.append(f"{g['gate']} {_num(value)} {op} {_num(g['threshold'])} {verdict}")
    return "; ".join(parts) or "-"


def outputs_table(rows: list[dict]) -> str:
    """rows: {output, build ("built", "from cache", "up to date", "failed", "not run"), status, report}."""
    lines = []
    for r in rows:
        totals = (r.get("report") or {}).get("totals")
        size = f"{totals['bytes_before']} -> {totals['bytes_after']}" if totals else "-"
        lines.append({"output": r["output"], "build": r["build"], "size": size, "quality": quality_text(r.get("report")),
                      "gates": gates_text(r.get("report")), "status": r["status"]})
    return table(lines, [("output", "output"), ("build", "build"), ("size", "bytes"), ("quality", "quality"),
                         ("gates", "gates"), ("status", "status")])


def report_of(json_path) -> dict | None:
    """A report written beside an output (None when there is none, e.g. the build failed before it)."""
    from pathlib import Path

    try:
        return json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
