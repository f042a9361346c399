"""The demo: build pipelines/demo/demo.yaml (the neural-network models) and demo_mlprogram.yaml (the same MLP
as an ML program, digits_mlp.mlpackage) through the doit build (cached, incremental, gated) and print size
and, where the build evaluated it, held-out accuracy before and after, from the build's own reports.

Run from anywhere: `python pipelines/demo/run_demo.py`. Outputs and reports go to `build/demo/` in the
repository, the cache to `.mlqpipe-cache/` (run it twice: the second build is a no-op).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mlqpipe.build.run import build
from mlqpipe.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("pipelines/demo/demo.yaml", "pipelines/demo/demo_mlprogram.yaml")


def _report(recipe, job) -> dict:
    return json.loads(recipe.report_paths(job)[0].read_text())


def _row(name: str, report: dict) -> str:
    """One model's line: size from the totals, accuracy and agreement where the build evaluated it."""
    t, ev = report["totals"], report.get("evaluation") or {}
    size = f"{name:<22}{t['bytes_before']:>14}{t['bytes_after']:>9}{t['compression']:>8.2f}"
    if ev.get("accuracy_float") is None:
        return size + f"  (not evaluated: {ev.get('reason') or 'no labelled data'})"
    return size + f"{ev['accuracy_float']:>16.3f}{ev['accuracy_quantized']:>11.3f}{ev['top1_agreement']:>11.3f}"


def main() -> int:
    os.chdir(ROOT)
    nn, program = (load_recipe(path) for path in RECIPES)
    for recipe in (nn, program):
        print(f"building {recipe.path}: " + ", ".join(s.label for s in recipe.stages))
    status = build(list(RECIPES))
    if status != 0:
        return status
    print(f"\n{'model':<22}{'bytes before':>14}{'after':>9}{'ratio':>8}{'accuracy float':>16}{'quantized':>11}{'agreement':>11}")
    for recipe in (nn, program):
        for job in recipe.models:
            print(_row(job.input.name, _report(recipe, job)))
    print(f"\nreports: mlqpipe report {nn.path}  (or {program.path}); Markdown in build/demo/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
