"""The accuracy-aware search (issue #19) against the best uniform setting, on real models and real test data.

    python bench/search.py [--jobs N]   (or through bench/run.py --only search)

Models (copied into a temporary directory; nothing is written in the repository): the two demo
neural networks (pipelines/demo/digits_mlp.mlmodel, digits_cnn.mlmodel) and the demo ML program
(digits_mlp.mlpackage) on the held-out digits; the real Keras MNIST convnet from ../shared/models/ on its
28x28 digits (skipped when that folder is absent); and a larger model built here: a 64-256-256-128-10 MLP
trained on the same digits split with scikit-learn, written as a neuralNetworkClassifier by
pipelines/demo/make_model.py's `to_coreml` (deterministic; ~470 KB).

Per model, with the gate max_accuracy_drop 0.005 on the test data:
- groups: one per layer. Neural networks: a rule per innerProduct / convolution layer naming its weights
  and bias together (Core ML wants one float precision per layer, so fp16 must take both; every linear and
  kmeans_lut candidate validates on biases too). ML programs: `per_weight` over the `weight` consts (biases
  are rank-1 consts, which ML programs leave as they are).
- candidates: linear and kmeans_lut at every nbits the format stores (neural networks 2..8; ML programs
  linear 4 and 8, kmeans_lut 2, 3, 4, 6, 8), and fp16.
- the search: `mlqpipe search` in a fresh process, cold (empty cache) and warm (same cache: 0 trials), and
  once more cold with -j N (up to 4 cores), which must resolve to the same recipe bytes.
- the uniform baseline: every candidate applied to every searched weight (a plain recipe with one stage),
  evaluated in-process with mlqpipe.quality.gates.evaluate_models on the same data; the best uniform is
  the smallest that passes the gate (keep, the float model, when none does).
- the resolved recipe built with `mlqpipe build`: the output's bytes on disk must equal the search's
  predicted size and the release gates must pass.
Targets: searched <= best uniform on every model, searched < best uniform on at least two, warm searches
run no trial, resolved builds match.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdict import print_targets  # noqa: E402  (bench/verdict.py)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = ROOT / "pipelines" / "demo"
SHARED = ROOT.parent / "shared" / "models"
GATE = 0.005
NN_CANDIDATES = [{"mode": m, "nbits": n} for m in ("linear", "kmeans_lut") for n in range(2, 9)] + [{"mode": "fp16"}]
ML_CANDIDATES = ([{"mode": "linear", "nbits": n} for n in (4, 8)] + [{"mode": "kmeans_lut", "nbits": n} for n in (2, 3, 4, 6, 8)]
                 + [{"mode": "fp16"}])
BIG_HIDDEN = (256, 256, 128)


@dataclass(frozen=True)
class Case:
    """One benchmarked model: its file (copied to the work directory), its test data and input name."""

    name: str
    model: Path
    data: Path
    input_name: str
    note: str = ""


# --- models --------------------------------------------------------------------------------------------------


def _make_model_module():
    spec = importlib.util.spec_from_file_location("demo_make_model", DEMO / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def big_mlp(path: Path) -> None:
    """The larger model: an MLP with BIG_HIDDEN hidden layers on make_model.py's digits split (same
    permutation, same 1400 training images, so digits_test.npz is its held-out data)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    make_model = _make_model_module()
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=BIG_HIDDEN, max_iter=400, random_state=0).fit(X[order[:1400]].astype(np.float32) / 16.0, y[order[:1400]])
    path.write_bytes(make_model.to_coreml(clf).SerializeToString())


def cases(work: Path, log) -> tuple[list[Case], list[dict]]:
    """The benchmarked models, copied or built into `work`, and the rows of those that cannot be run."""
    out, skipped = [], []
    test = DEMO / "digits_test.npz"
    for name in ("digits_mlp.mlmodel", "digits_cnn.mlmodel", "digits_mlp.mlpackage"):
        out.append(Case(name, DEMO / name, test, "image"))
    keras, keras_data = SHARED / "keras_mnist_cnn.mlmodel", SHARED / "keras_mnist_cnn.digits28.npz"
    if keras.exists() and keras_data.exists():
        with np.load(keras_data, allow_pickle=False) as d:
            out.insert(2, Case(keras.name, keras, keras_data, str(d["input_name"]), "real model (Keras converter), 28x28 digits"))
    else:
        skipped.append({"model": keras.name, "reason": f"{SHARED} is absent"})
    if importlib.util.find_spec("sklearn") is None:
        skipped.append({"model": "digits_mlp_big.mlmodel", "reason": "scikit-learn is not installed"})
    else:
        log("search bench: training the larger MLP")
        big = work / "src" / "digits_mlp_big.mlmodel"
        big.parent.mkdir(parents=True, exist_ok=True)
        big_mlp(big)
        out.insert(len(out) - 1, Case(big.name, big, test, "image", f"built here: MLP 64-{'-'.join(map(str, BIG_HIDDEN))}-10"))
    return out, skipped


# --- recipes -------------------------------------------------------------------------------------------------


def searched_rules(model_path: Path) -> tuple[dict, bool, list[dict]]:
    """The searched rules (by name), whether they are searched per weight, and the candidates, for a model."""
    import mlqpipe
    from mlqpipe.formats.registry import format_of

    model = mlqpipe.load_model(model_path)
    fmt = format_of(model)
    records = fmt.inventory(model)
    if fmt.name == "mlprogram":
        return {"w": {"field": "weight"}}, True, ML_CANDIDATES
    rules = {}
    for rec in records:
        if rec.field == "weights" and rec.layer_type in ("innerProduct", "convolution"):
            fields = ["weights"] + (["bias"] if any(r.layer == rec.layer and r.field == "bias" for r in records) else [])
            rules[f"layer_{len(rules) + 1}"] = {"layer_regex": "^" + re.escape(rec.layer) + "$", "field": fields}
    return rules, False, NN_CANDIDATES


def recipe_dict(case: Case, rules: dict, *, search: dict | None = None, stages: list | None = None) -> dict:
    out_ext = ".mlpackage" if case.name.endswith(".mlpackage") else ".mlmodel"
    r = {"version": 1,
         "models": [{"input": case.name, "output": "out/{stem}.q" + out_ext,
                     "evaluation": {"data": case.data.name, "inputs": {case.input_name: "X"}, "labels": "y"},
                     "gates": {"max_accuracy_drop": GATE}}],
         "rules": rules}
    if search is not None:
        r["search"] = search
    if stages is not None:
        r["stages"] = stages
    return r


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _label(c: dict) -> str:
    return " ".join([c["mode"]] + ([str(c["nbits"])] if "nbits" in c else []))


# --- measuring -----------------------------------------------------------------------------------------------


def _cli(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlqpipe.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t, proc


def run_search(d: Path, recipe: Path, cache: Path, jobs: int) -> dict:
    """`mlqpipe search` in a fresh process; its wall time and the report it wrote."""
    seconds, proc = _cli(["search", "--cache", str(cache), "-j", str(jobs), recipe.name], d)
    if proc.returncode:
        return {"ok": False, "seconds": seconds, "error": (proc.stdout + proc.stderr).strip()[-2000:]}
    report = json.loads((d / f"{recipe.stem}.resolved.search.json").read_text())
    resolved = (d / f"{recipe.stem}.resolved.yaml").read_bytes()
    return {"ok": True, "seconds": seconds, "report": report["models"][0], "resolved": resolved}


def uniform(d: Path, case: Case, rules: dict, candidates: list[dict], log) -> list[dict]:
    """Every candidate on every searched weight (one plain stage), evaluated on the test data in-process."""
    import mlqpipe
    from mlqpipe.engine.execute import run_job
    from mlqpipe.formats.registry import format_of
    from mlqpipe.quality.gates import evaluate_models
    from mlqpipe.recipe import load_recipe

    float_model = mlqpipe.load_model(d / case.name)
    fmt = format_of(float_model)
    rows = []
    for c in candidates:
        recipe = load_recipe(_write(d / "uniform.yaml", recipe_dict(case, rules, stages=[{"name": "uniform", **c, "rules": list(rules)}])),
                             project_root=d)
        job = recipe.models[0]
        t = time.perf_counter()
        try:
            model, _ = run_job(job, recipe)
        except Exception as e:  # a candidate a whole model cannot take is a row, not a crash
            rows.append({"candidate": _label(c), "error": f"{type(e).__name__}: {e}"})
            continue
        ev = evaluate_models(job.evaluation, float_model, model, d / "eval-cache", case.name)
        drop = ev.accuracy_float - ev.accuracy_quantized
        rows.append({"candidate": _label(c), "size": fmt.size(model), "accuracy_float": ev.accuracy_float,
                     "accuracy_quantized": ev.accuracy_quantized, "drop": drop, "passes": bool(drop <= GATE + 1e-9),
                     "seconds": time.perf_counter() - t})
        log(f"search bench: {case.name}: uniform {_label(c)}: {rows[-1]['size']} bytes, accuracy {ev.accuracy_quantized:.4f}")
    acc = evaluate_models(job.evaluation, float_model, fmt.copy(float_model), d / "eval-cache", case.name).accuracy_float
    rows.insert(0, {"candidate": "keep", "size": fmt.size(float_model), "accuracy_float": acc, "accuracy_quantized": acc,
                    "drop": 0.0, "passes": True, "seconds": 0.0})
    return rows


def _output_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_resolved(d: Path, resolved: str, case: Case) -> dict:
    """`mlqpipe build` of the resolved recipe (its own cache): the written output's bytes and the gates."""
    seconds, proc = _cli(["build", "--cache", str(d / "build-cache"), resolved], d)
    ext = ".mlpackage" if case.name.endswith(".mlpackage") else ".mlmodel"
    stem = case.name.rsplit(".", 1)[0]
    out = d / "out" / f"{stem}.q{ext}"
    report = d / "out" / f"{stem}.q.report.json"
    row = {"ok": proc.returncode == 0, "seconds": seconds, "bytes": _output_bytes(out) if out.exists() else None}
    if report.exists():
        rep = json.loads(report.read_text())
        row.update(status=rep.get("status"), gates={g["gate"]: g["passed"] for g in rep.get("gates", [])})
    if proc.returncode:
        row["error"] = (proc.stdout + proc.stderr).strip()[-1500:]
    return row


def bench_case(work: Path, case: Case, jobs: int, parallel: int, log) -> dict:
    d = work / case.name.replace(".", "_")
    d.mkdir()
    copy = shutil.copytree if case.model.is_dir() else shutil.copy2
    copy(case.model, d / case.name)
    shutil.copy2(case.data, d / case.data.name)
    rules, per_weight, candidates = searched_rules(d / case.name)
    search = {"rules": list(rules), "per_weight": per_weight, "candidates": candidates}
    recipe = _write(d / "search.yaml", recipe_dict(case, rules, search=search))
    row = {"model": case.name, "note": case.note, "groups_rules": len(rules), "candidates": [_label(c) for c in candidates], "jobs": jobs}
    log(f"search bench: {case.name}: search, cold cache")
    cold = run_search(d, recipe, d / "cache", jobs)
    if not cold["ok"]:
        return {**row, "error": f"search failed: {cold['error']}"}
    if parallel > 1:
        log(f"search bench: {case.name}: search, cold cache, -j {parallel}")
        par = run_search(d, recipe, d / "cache-parallel", parallel)
        row.update(parallel_jobs=parallel, parallel_s=par["seconds"] if par["ok"] else None,
                   parallel_same_resolved=par["ok"] and par["resolved"] == cold["resolved"])
    log(f"search bench: {case.name}: search, warm cache")
    warm = run_search(d, recipe, d / "cache", jobs)
    if not warm["ok"]:
        return {**row, "error": f"warm search failed: {warm['error']}"}
    rep = cold["report"]
    row.update(float_bytes=rep["float_bytes"], searched=rep["chosen"], groups=len(rep["groups"]),
               choices={g["group"]: g["choice"] for g in rep["groups"]}, verifications=len(rep["verifications"]),
               cold_s=cold["seconds"], cold_trials_run=rep["trials_run"], cold_trials_cached=rep["trials_from_cache"],
               warm_s=warm["seconds"], warm_trials_run=warm["report"]["trials_run"], warm_trials_cached=warm["report"]["trials_from_cache"],
               warm_same_resolved=warm["resolved"] == cold["resolved"])
    t = time.perf_counter()
    row["uniform"] = uniform(d, case, rules, candidates, log)
    row["uniform_s"] = time.perf_counter() - t
    passing = [u for u in row["uniform"] if u.get("passes")]
    row["best_uniform"] = min(passing, key=lambda u: u["size"])
    log(f"search bench: {case.name}: building the resolved recipe")
    row["build"] = build_resolved(d, "search.resolved.yaml", case)
    return row


def bench(quick: bool = False, log=lambda m: None, jobs: int = 1, parallel: int | None = None) -> dict:
    """Every case, searched with `-j jobs` (the timed cold and warm runs) and once more cold with
    `-j parallel` (default: up to 4 cores; 1: not run), whose resolved recipe must be the same bytes.
    `quick` skips the parallel run (the comparison itself needs the full candidate list)."""
    if parallel is None:
        parallel = 1 if quick else min(4, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="mlqpipe-search-bench-") as tmp:
        work = Path(tmp)
        found, skipped = cases(work, log)
        rows = [bench_case(work, case, jobs, parallel, log) for case in found]
    return {"gate": {"max_accuracy_drop": GATE}, "models": rows, "skipped": skipped}


# --- targets and report --------------------------------------------------------------------------------------


def targets(r: dict) -> list[dict]:
    out = []

    def target(name, value, ok, goal):
        out.append({"target": name, "value": value, "goal": goal, "pass": bool(ok)})

    done = [m for m in r["models"] if "error" not in m]
    for m in r["models"]:
        if "error" in m:
            target(f"search: {m['model']} runs", m["error"][:120], False, "searched")
            continue
        s, u = m["searched"]["size"], m["best_uniform"]["size"]
        target(f"search: {m['model']} searched bytes <= best uniform ({m['best_uniform']['candidate']})", s, s <= u, f"<= {u}")
        target(f"search: {m['model']} warm search runs no trial", m["warm_trials_run"], m["warm_trials_run"] == 0, "0")
        if "parallel_jobs" in m:
            target(f"search: {m['model']} -j {m['parallel_jobs']} resolves to the same recipe bytes", m["parallel_same_resolved"],
                   m["parallel_same_resolved"], "True")
        b = m["build"]
        ok = b["ok"] and b["bytes"] == s and b.get("status") == "passed"
        target(f"search: {m['model']} resolved recipe builds to the predicted size, gates pass", b["bytes"], ok, f"{s} bytes, passed")
    smaller = sum(m["searched"]["size"] < m["best_uniform"]["size"] for m in done)
    target("search: searched < best uniform, models", smaller, smaller >= 2 and len(done) >= 3, ">= 2 of >= 3")
    return out


def _acc(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def report_lines(r: dict) -> list[str]:
    lines = ["## Search (issue #19): searched vs the best uniform setting", "",
             f"Gate max_accuracy_drop {r['gate']['max_accuracy_drop']} on each model's test data. Groups: one per layer "
             "(neural networks: each innerProduct / convolution layer's weights and bias together, so fp16 keeps one precision "
             "per layer; ML programs: each `weight` const, per_weight). Candidates: linear and kmeans_lut at every nbits the "
             "format stores (neural networks 2..8; ML programs linear 4, 8 and kmeans_lut 2, 3, 4, 6, 8) and fp16. Best uniform: "
             "the smallest single candidate applied to every searched weight that passes the same gate. Wall times: "
             "`mlqpipe search` in a fresh process (cold: empty cache; warm: the same cache).", "",
             "| model | float bytes | searched bytes | accuracy float → searched | best uniform | its bytes | its accuracy "
             "| searched / uniform | groups | trials cold (warm) | search cold s | cold -j N s | warm s | uniform sweep s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        if "error" in m:
            lines.append(f"| {m['model']} | failed: {m['error'][:200]} ||||||||||||| ")
            continue
        s, u = m["searched"], m["best_uniform"]
        par = f"{m['parallel_s']:.1f} (-j {m['parallel_jobs']})" if m.get("parallel_s") is not None else "-"
        lines.append(f"| {m['model']} | {m['float_bytes']} | {s['size']} | {_acc(s['accuracy_float'])} → {_acc(s['accuracy_quantized'])} "
                     f"| {u['candidate']} | {u['size']} | {_acc(u['accuracy_quantized'])} | {s['size'] / u['size']:.3f} | {m['groups']} "
                     f"| {m['cold_trials_run']} ({m['warm_trials_run']}) | {m['cold_s']:.1f} | {par} | {m['warm_s']:.2f} | {m['uniform_s']:.1f} |")
    lines += [""]
    for m in r["models"]:
        if "error" in m:
            continue
        b = m["build"]
        lines.append(f"- {m['model']}{' (' + m['note'] + ')' if m['note'] else ''}: chosen {', '.join(f'{g}: {c}' for g, c in m['choices'].items())}; "
                     f"{m['verifications']} combination(s) verified; resolved build {'ok' if b['ok'] else 'FAILED'}, "
                     f"{b['bytes']} bytes on disk (predicted {m['searched']['size']}), release gates {b.get('status', '-')}; "
                     f"warm resolved recipe byte-identical: {m['warm_same_resolved']}.")
    for s in r["skipped"]:
        lines.append(f"- {s['model']}: not run ({s['reason']}).")
    lines += ["", "Uniform settings per model (bytes, accuracy; * passes the gate):", ""]
    for m in r["models"]:
        if "error" in m:
            continue
        cells = [f"{u['candidate']} {u['size']} {_acc(u['accuracy_quantized'])}{'*' if u['passes'] else ''}" if "error" not in u
                 else f"{u['candidate']} refused" for u in m["uniform"]]
        lines.append(f"- {m['model']}: " + "; ".join(cells))
    return lines + [""]


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", "-j", type=int, default=1, help="mlqpipe search -j")
    ap.add_argument("--parallel", type=int, help="a second cold search with -j N (default: up to 4 cores; 1: none)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    r = bench(log=lambda m: print(m, file=sys.stderr), jobs=args.jobs, parallel=args.parallel)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    print("\n".join(report_lines(r)))
    return print_targets(targets(r))


if __name__ == "__main__":
    sys.exit(main())
