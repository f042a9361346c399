"""ML-program (.mlpackage) benchmarks: open + inventory + unchanged save, next to the I/O floor and coremltools.

    python bench/mlprogram.py [--skip-2gb] [--quick]        (or through bench/run.py)

Packages are built here with coremltools' MIL builder (fp32 `linear` layers, fixed seeds, converted with the
EMPTY pass pipeline for iOS18) and cached under $MLQPIPE_BENCH_CACHE (default /tmp/mlqpipe-bench), keyed by
their parameters, so reruns do not rebuild them; nothing large is written inside the repository.

Every measured side runs in a fresh process: it imports its modules (not timed), then times best-of-N runs
of its task against a warm page cache and reports its peak RSS (VmHWM). "Above the interpreter" subtracts
the peak RSS of a fresh process that only imported the same modules, as the neural-network benchmark does.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("MLQPIPE_BENCH_CACHE", "/tmp/mlqpipe-bench"))
MODEL_REL = "Data/com.apple.CoreML/model.mlmodel"
WEIGHTS_REL = "Data/com.apple.CoreML/weights/weight.bin"


# --- packages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A chain of `layers` fp32 linear layers of dim × dim weights (and dim biases)."""

    label: str
    layers: int
    dim: int
    seed: int = 0

    @property
    def weights(self) -> int:
        return self.layers * self.dim * (self.dim + 1)

    @property
    def largest_tensor_mb(self) -> float:
        return self.dim * self.dim * 4 / 2**20

    @property
    def key(self) -> str:
        return f"linear{self.layers}x{self.dim}-seed{self.seed}-ios18-fp32"


PACKAGES = (Spec("4M", 1, 2048), Spec("50M", 12, 2048), Spec("2GB", 30, 4096))


def build_with_coremltools(spec: Spec, path: Path) -> None:
    """The package built with the MIL builder and ct.convert (EMPTY pipeline, so the program is as written)."""
    import warnings

    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb

    rng = np.random.default_rng(spec.seed)
    params = [(rng.standard_normal((spec.dim, spec.dim), dtype=np.float32) * 0.02,
               rng.standard_normal(spec.dim, dtype=np.float32) * 0.02) for _ in range(spec.layers)]

    @mb.program(input_specs=[mb.TensorSpec((1, spec.dim))], opset_version=ct.target.iOS18)
    def prog(x):
        for i, (w, b) in enumerate(params):
            x = mb.linear(x=x, weight=w, bias=b, name=f"fc{i}")
        return x

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(path))


def package(spec: Spec, log=print) -> Path:
    """The cached package of `spec`, built (in a fresh process, so its memory is not ours) when missing."""
    path = CACHE / f"{spec.key}.mlpackage"
    if (path / "Manifest.json").exists() and (CACHE / f"{spec.key}.done").exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    log(f"building {spec.label} package ({spec.weights / 1e6:.0f}M weights) with coremltools' MIL builder ...")
    t = time.perf_counter()
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import mlprogram as b; "
            f"b.build_with_coremltools(b.Spec({spec.label!r}, {spec.layers}, {spec.dim}, {spec.seed}), b.Path({str(path)!r}))")
    proc = subprocess.run([sys.executable, "-c", code + _HWM], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"building {spec.key} failed:\n{proc.stderr[-3000:]}")
    info = {"seconds": time.perf_counter() - t, "peak_rss_mb": _last_json(proc.stdout)["hwm_kb"] / 1024, "by": "coremltools MIL builder"}
    (CACHE / f"{spec.key}.done").write_text(json.dumps(info) + "\n")
    return path


def build_info(spec: Spec) -> dict:
    return json.loads((CACHE / f"{spec.key}.done").read_text())


# --- the measured tasks (each runs in its own process) ------------------------------------------------------


def _inventory():
    """(inventory function of a model, label): the real inventory when it exists, else a walk asking every
    const for its value (views into the mapping), which is what an inventory reads at least."""
    try:
        from mlqpipe.formats.mlprogram.inventory import inventory

        return inventory, "inventory()"
    except ImportError:
        from mlqpipe.formats.mlprogram.program import const_value, walk

        def touch(m):
            for site in walk(m.spec.mlProgram, m.source):
                value = const_value(site.op) if site.op.type == "const" else None
                if value is not None:
                    m.value_array(value, f"{m.source}: op {site.name}")

        return touch, "walk + value_array (no inventory module yet)"


def ours_task(check: bool):
    from mlqpipe.formats.mlprogram.model import load_package

    inventory_fn, how = _inventory()
    if check:
        import mlqpipe.formats.mlprogram.check  # noqa: F401  (present, else the caller skips this row)

    def run(src: Path, dst: Path):
        m = load_package(src)
        inventory_fn(m)
        m.save(dst, check=check)
        m.close()

    return run, {"inventory": how}


def ct_task(kind: str):
    import contextlib
    import io
    import warnings

    warnings.simplefilter("ignore")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import coremltools as ct

    if kind == "save":  # the package directory copied: the weights are never read
        def run(src: Path, dst: Path):
            ct.models.MLModel(str(src), skip_model_load=True).save(str(dst))
    elif kind == "program":  # what coremltools.optimize.coreml does around a compression pass: every weight read
        from coremltools.models.utils import _apply_graph_pass

        def run(src: Path, dst: Path):
            with contextlib.redirect_stderr(io.StringIO()):
                _apply_graph_pass(ct.models.MLModel(str(src), skip_model_load=True), [], skip_model_load=True).save(str(dst))
    else:  # spec reading only: what ct.utils.load_spec reads of a package (the model.mlmodel)
        def run(src: Path, dst: Path):
            ct.utils.load_spec(str(src))
    return run, {}


_DTYPES = {1: "<f2", 2: "<f4", 3: "u1", 4: "i1", 14: "<i4"}


def floor_run(src: Path, dst: Path):
    """The I/O floor: read the model and the weight file, parse the protobuf, one numpy pass (max) over every
    blob, serialize and write model.mlmodel, weight.bin and Manifest.json to a new directory."""
    from mlqpipe.formats.mlprogram import proto

    manifest = (src / "Manifest.json").read_bytes()
    spec = proto.Model.FromString((src / MODEL_REL).read_bytes())
    weights = (src / WEIGHTS_REL).read_bytes()
    (count,) = struct.unpack_from("<I", weights, 0)
    at, top = 64, -np.inf
    for _ in range(count):
        _, code, size, data, _ = struct.unpack_from("<IIQQQ", weights, at)
        dt = np.dtype(_DTYPES.get(code, "u1"))
        top = max(top, float(np.frombuffer(weights, dt, size // dt.itemsize, data).max()))
        at = -(-(data + size) // 64) * 64
    (dst / "Data/com.apple.CoreML/weights").mkdir(parents=True)
    (dst / MODEL_REL).write_bytes(spec.SerializeToString())
    (dst / WEIGHTS_REL).write_bytes(weights)
    (dst / "Manifest.json").write_bytes(manifest)
    return top


def floor_task():
    from mlqpipe.formats.mlprogram import proto  # noqa: F401  (imported before timing, like the others)

    return floor_run, {}


TASKS = {"floor": floor_task, "ours": lambda: ours_task(False), "ours_check": lambda: ours_task(True),
         "ct_save": lambda: ct_task("save"), "ct_spec": lambda: ct_task("spec"), "ct_program": lambda: ct_task("program")}

_HWM = ("\nimport json as _j; print(_j.dumps({'hwm_kb': int([l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')][0])}))")


def measure(task: str, src: Path, repeat: int) -> dict:
    """In this process: set the task up (imports, not timed), warm the page cache, best of `repeat` runs
    (each writing a new package, removed untimed). repeat=0 only sets up: the baseline process."""
    run, extra = TASKS[task]()
    if not repeat:
        return extra
    _warm(src)
    times = []
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="out-") as tmp:
        for i in range(repeat):
            dst = Path(tmp) / f"out{i}.mlpackage"
            t = time.perf_counter()
            run(src, dst)
            times.append(time.perf_counter() - t)
            if i == repeat - 1 and task != "ct_spec":
                extra["weights_identical"] = _same_bytes(src / WEIGHTS_REL, _only_weight_file(dst))
            shutil.rmtree(dst, ignore_errors=True)
    return {"best_s": min(times), "times": times, **extra}


def _only_weight_file(root: Path) -> Path | None:
    found = list(root.rglob("weight.bin"))
    return found[0] if len(found) == 1 else None


def _same_bytes(a: Path, b: Path | None) -> bool:
    """Whether the output's weight file equals the input's (an unchanged save keeps every blob in order)."""
    import filecmp

    return b is not None and filecmp.cmp(a, b, shallow=False)


def _warm(src: Path) -> None:
    """Read the package once so every side meets a warm page cache (1 MB reused buffer: no RSS to speak of)."""
    buf = bytearray(1 << 20)
    for f in src.rglob("*"):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def _in_fresh_process(task: str, src: Path, repeat: int) -> tuple[dict, float]:
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import mlprogram as b; "
            f"print(json.dumps(b.measure({task!r}, b.Path({str(src)!r}), {repeat})))")
    proc = subprocess.run([sys.executable, "-c", code + _HWM], capture_output=True, text=True)
    if proc.returncode:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        raise RuntimeError(f"{task} on {src.name} failed: {last}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-2]), json.loads(lines[-1])["hwm_kb"] / 1024


def run_measured(task: str, src: Path, repeat: int) -> dict:
    """`measure` in a fresh process, with its peak RSS, and the peak RSS of a fresh process that set the
    same task up (the same imports) and did nothing: the interpreter baseline."""
    out, peak = _in_fresh_process(task, src, repeat)
    _, base = _in_fresh_process(task, src, 0)
    return {**out, "peak_rss_mb": peak, "baseline_rss_mb": base, "above_mb": peak - base}


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


# --- the section ---------------------------------------------------------------------------------------------


def bench(*, skip_2gb: bool = False, quick: bool = False, log=print) -> dict:
    """Every package, every side: {"packages": [{label, weights, mb, sides: {task: measure}}]}."""
    has_ct = _available("coremltools")
    has_check = _available("mlqpipe.formats.mlprogram.check")
    result = {"packages": [], "check_available": has_check, "coremltools": has_ct, "cache": str(CACHE),
              "load_average_before": os.getloadavg()[0]}
    for spec in PACKAGES:
        if skip_2gb and spec.label == "2GB":
            continue
        if not has_ct:
            break
        src = package(spec, log)
        big = spec.label == "2GB"
        repeat = 1 if quick else (2 if big else 3)
        entry = {"label": spec.label, "weights": spec.weights, "layers": spec.layers, "dim": spec.dim,
                 "weight_bin_mb": (src / WEIGHTS_REL).stat().st_size / 1e6, "largest_tensor_mb": spec.largest_tensor_mb,
                 "build": build_info(spec), "sides": {}}
        tasks = ["floor", "ours"] + (["ours_check"] if has_check else []) + ["ct_save", "ct_spec", "ct_program"]
        for task in tasks:
            log(f"  {spec.label}: {task} ...")
            try:  # coremltools' full program load of the 2 GB package takes ~17 s and ~4 GB: once
                entry["sides"][task] = run_measured(task, src, 1 if big and task == "ct_program" else repeat)
            except RuntimeError as e:
                entry["sides"][task] = {"error": str(e)}
        result["packages"].append(entry)
    result["load_average_after"] = os.getloadavg()[0]
    return result


def targets(r: dict) -> list[dict]:
    out = []
    for p in r["packages"]:
        s = p["sides"]
        floor = s["floor"].get("best_s")
        for task, what in (("ours", "open + inventory + save"), ("ours_check", "open + inventory + save(check=True)")):
            if task not in s:
                continue
            if "error" in s[task] or floor is None:
                out.append({"target": f"ML program {what} vs I/O floor ({p['label']})", "value": None, "goal": "<= 1.5x",
                            "pass": False, "note": s[task].get("error") or s["floor"].get("error")})
                continue
            ratio = s[task]["best_s"] / floor
            out.append({"target": f"ML program {what} vs I/O floor ({p['label']}; {s[task]['inventory']})", "value": ratio,
                        "goal": "<= 1.5x", "pass": ratio <= 1.5})
        if p["label"] != "2GB":
            continue
        allowed = 64 + 2 * p["largest_tensor_mb"]
        for task, what in (("ours", "open + inventory + save"), ("ours_check", "open + inventory + save(check=True)")):
            if task in s and "error" not in s[task]:
                above = s[task]["above_mb"]
                out.append({"target": f"ML program {what}, peak RSS above the interpreter (2GB package)", "value": above,
                            "goal": f"<= {allowed:.0f} MB (64 MB + 2 x largest tensor {p['largest_tensor_mb']:.0f} MB)", "pass": above <= allowed})
    return out


def _s(side: dict, key: str = "best_s", digits: int = 3) -> str:
    if "error" in side:
        return "error"
    return f"{side[key]:.{digits}f}"


def _ratio(side: dict, floor: float | None) -> str:
    return "-" if "error" in side or floor is None else f"{side['best_s'] / floor:.2f}×"


def report_lines(r: dict) -> list[str]:
    if not r["coremltools"]:
        return ["## ML programs (.mlpackage)", "", "Not run: coremltools is not installed (it builds the benchmark packages).", ""]
    lines = ["## ML programs (.mlpackage): open + inventory + unchanged save", "",
             "Packages: iOS18 fp32 chains of `linear` layers built with coremltools' MIL builder (EMPTY pass pipeline), cached in "
             f"`{r['cache']}`. Each side runs in a fresh process; imports are not timed; best of 3 runs (2 for the 2 GB package), "
             "warm page cache. Peak RSS is the process's VmHWM; \"above\" subtracts a fresh process that only imported the same modules.",
             "I/O floor: read model.mlmodel + weight.bin, parse the protobuf (our proto.Model), one numpy max over every blob, "
             "serialize, write model.mlmodel + weight.bin + Manifest.json to a new directory.", "",
             "coremltools (import not timed): open+save = `MLModel(path, skip_model_load=True).save(out)`, which copies the package "
             "directory without reading the weights; load_spec = `ct.utils.load_spec(path)` (model.mlmodel only); program = "
             "`models.utils._apply_graph_pass(MLModel(...), [])` + save: the MIL program loaded with every weight and written back "
             "through its default pass pipeline, i.e. what coremltools.optimize.coreml does around a compression pass.", "",
             "| package | floor s | mlqpipe s | ratio | mlqpipe check=True s | coremltools open+save s | ratio | coremltools load_spec s | coremltools program s | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["packages"]:
        s = p["sides"]
        fl = s["floor"].get("best_s")
        ours, chk, cts, ctp = s["ours"], s.get("ours_check"), s["ct_save"], s["ct_program"]
        chk_s = "not available" if chk is None else f"{_s(chk)} ({_ratio(chk, fl)})"
        lines.append(f"| {p['label']} ({p['weights'] / 1e6:.0f}M weights, {p['weight_bin_mb']:.0f} MB) | {_s(s['floor'])} | {_s(ours)} | {_ratio(ours, fl)} "
                     f"| {chk_s} | {_s(cts)} | {_ratio(cts, fl)} | {_s(s['ct_spec'], digits=4)} | {_s(ctp)} | {_ratio(ctp, fl)} |")
    lines += ["", "Peak RSS above the interpreter, MB (interpreter + imports in brackets):", "",
              "| package | largest tensor MB | floor | mlqpipe | mlqpipe check=True | coremltools open+save | coremltools program |", "|---|---|---|---|---|---|---|"]
    for p in r["packages"]:
        s = p["sides"]

        def mem(side):
            if side is None:
                return "-"
            return "error" if "error" in side else f"{side['above_mb']:.0f} ({side['baseline_rss_mb']:.0f})"

        lines.append(f"| {p['label']} | {p['largest_tensor_mb']:.0f} | {mem(s['floor'])} | {mem(s['ours'])} | {mem(s.get('ours_check'))} | {mem(s['ct_save'])} | {mem(s['ct_program'])} |")
    for p in r["packages"]:
        inv = p["sides"]["ours"].get("inventory")
        if inv:
            lines.append("")
            lines.append(f"Inventory used: {inv}.")
            break
    differ = [f"{p['label']} {task}" for p in r["packages"] for task, side in p["sides"].items() if side.get("weights_identical") is False]
    lines += ["", "Every output's weight.bin is byte-identical to the input's." if not differ
              else f"weight.bin differs from the input's: {', '.join(differ)}."]
    lines += ["", f"Load average (1 min) {r['load_average_before']:.1f} before the section, {r.get('load_average_after', float('nan')):.1f} after "
              f"({os.cpu_count()} cores): the figures are only as quiet as the machine."]
    built = [f"{p['label']} {p['build']['seconds']:.0f} s / peak {p['build']['peak_rss_mb']:.0f} MB" for p in r["packages"]]
    if built:
        lines += ["", f"Packages built by {r['packages'][0]['build']['by']} (first run only; cached after): " + ", ".join(built) + "."]
    return lines + [""]


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-2gb", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    r = bench(skip_2gb=args.skip_2gb, quick=args.quick, log=lambda m: print(m, file=sys.stderr))
    print("\n".join(report_lines(r)))
    for t in targets(r):
        print(f"{t['target']}: {t['value'] if t['value'] is None else round(t['value'], 3)} (goal {t['goal']}) {'PASS' if t['pass'] else 'FAIL'}")
    return 0 if all(t["pass"] for t in targets(r)) else 1


if __name__ == "__main__":
    sys.exit(main())
