"""Terminal and JSON output for `mlqpipe inspect` and `mlqpipe check`."""

from __future__ import annotations

import json
import sys

from mlqpipe.errors import ModelError
from mlqpipe.formats.base import WeightRecord
from mlqpipe.formats.registry import format_of, load_model
from mlqpipe.quality.tables import table


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"


def inventory_rows(records: list[WeightRecord]) -> list[dict]:
    return [{**_row(r), **_program_row(r)} for r in records]


def _row(r: WeightRecord) -> dict:
    return {"id": r.id, "layer": r.layer, "type": r.layer_type, "field": r.field_path,
            "shape": list(r.shape) if r.shape else None, "count": r.count, "storage": r.storage.describe(),
            "bytes": r.nbytes, "updatable": r.updatable}


def _program_row(r) -> dict:
    """What ML-program records add: their readers, functions and channel axes."""
    if not hasattr(r, "consumers"):
        return {}
    return {"consumers": [{"op": c.op, "op_type": c.op_type, "parameter": c.parameter} for c in r.consumers],
            "functions": list(r.functions), "axis": r.axis, "input_axis": r.input_axis, "dtype": r.dtype,
            "feeds_only_outputs": r.feeds_only_outputs}


def print_inventory(path: str, as_json: bool = False) -> int:
    model = load_model(path)
    fmt = format_of(model)
    rows = inventory_rows(fmt.inventory(model))
    info = fmt.describe(model)
    if as_json:
        json.dump({"model": path, "format": fmt.name, **info, "weights": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{path}: {info['type']}, specificationVersion {info['specificationVersion']}, "
          f"{len(rows)} weight{'s' if len(rows) != 1 else ''}, {sum(r['bytes'] for r in rows)} bytes of weights")
    for side in ("inputs", "outputs"):
        for f in info[side]:
            shape = f" {_shape(f['shape'])}" if f["shape"] else ""
            print(f"  {side[:-1]:6} {f['name']}: {f['type']}{shape}{' (optional)' if f['optional'] else ''}")
    for f in info.get("functions", ()):
        print(f"  function {f['name']}{' (default)' if f['default'] else ''}: opset {f['opset']}, {f['ops']} ops, "
              f"inputs {', '.join(f['inputs']) or '-'}")
    for row in rows:
        row["shape"] = _shape(row["shape"])
        row["updatable"] = "updatable" if row["updatable"] else ""
        if "consumers" in row:
            row["used by"] = ", ".join(f"{c['op']}.{c['parameter']}" for c in row["consumers"]) or "(block outputs)"
    used = [("used by", "used by")] if any("used by" in r for r in rows) else []
    print(table(rows, [("id", "weight"), ("type", "type"), ("shape", "shape"), ("storage", "storage"),
                       ("bytes", "bytes"), *used, ("updatable", "")]))
    params = info.get("parameters") or []
    if params:
        print(f"{len(params)} parameter{'s' if len(params) != 1 else ''} (small consts: shapes, axes, strides; never "
              "selected by rules):")
        print(table([{**p, "shape": _shape(p["shape"])} for p in params], [("name", "parameter"), ("dtype", "dtype"),
                                                                             ("shape", "shape")]))
    return 0


def print_check(paths: list[str], as_json: bool = False, verbose: int = 0) -> int:
    """Exit 0 when clean (warnings allowed), 1 with any error finding, 2 when a file cannot be read."""
    results, status = [], 0
    for path in paths:
        try:
            model = load_model(path)
            findings = format_of(model).check(model)
        except ModelError as e:
            results.append({"model": path, "readable": False, "error": str(e), "findings": []})
            status = 2
            continue
        results.append({"model": path, "readable": True, "findings": [f.as_dict() for f in findings]})
        if any(f.severity == "error" for f in findings) and status == 0:
            status = 1
    if as_json:
        json.dump({"results": results}, sys.stdout, indent=2)
        print()
        return status
    for res in results:
        if not res["readable"]:
            print(f"mlqpipe: error: {res['error']}", file=sys.stderr)
            continue
        errors = sum(f["severity"] == "error" for f in res["findings"])
        warnings = len(res["findings"]) - errors
        for f in res["findings"]:
            print(f"{res['model']}: {f['severity']}: {f['where']}: {f['message']} [{f['rule']}]")
        print(f"{res['model']}: {'OK' if not errors else 'FAILED'} ({errors} errors, {warnings} warnings)")
    return status

