"""ML-program (.mlpackage) benchmarks: open + inventory + unchanged save, next to the I/O floor and coremltools.

    python bench/mlprogram.py [--skip-2gb] [--quick] [--no-compress] [--fresh-coremltools]   (or through bench/run.py)

Two parts: open + inventory + unchanged save (against the I/O floor and coremltools' loaders), and
compression (mlqpipe.optimize against coremltools.optimize.coreml, same calls and configs, and against the
I/O floor with one numpy int8 pass): the issue's PASS/FAIL targets for both.

Packages are built here with coremltools' MIL builder (fp32 `linear` layers, fixed seeds, converted with the
EMPTY pass pipeline for iOS18) and cached under $MLQPIPE_BENCH_CACHE (default /tmp/mlqpipe-bench), keyed by
their parameters, so reruns do not rebuild them; nothing large is written inside the repository.

Every measured side runs in a fresh process: it imports its modules (not timed), then times best-of-N runs
of its task against a warm page cache and reports its peak RSS (VmHWM). "Above the interpreter" subtracts
the peak RSS of a fresh process that only imported the same modules, as the neural-network benchmark does.
"""

from __future__ import annotations

import dataclasses
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdict import print_targets  # noqa: E402  (bench/verdict.py)

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("MLQPIPE_BENCH_CACHE", "/tmp/mlqpipe-bench"))
MODEL_REL = "Data/com.apple.CoreML/model.mlmodel"
WEIGHTS_REL = "Data/com.apple.CoreML/weights/weight.bin"


# --- packages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A chain of `layers` linear layers of dim × dim weights (and dim biases), or, with `widths`, an MLP
    whose layer i maps widths[i] to widths[i+1] ("trained"-looking: differently shaped layers). `dist`
    "normal" draws N(0, 0.02²); "student_t" draws heavy-tailed weights (t with 3 degrees of freedom, scaled
    by 1/sqrt(fan-in)), which is what trained weights look like to a k-means. `dtype` fp32 or fp16 weights."""

    label: str
    layers: int
    dim: int
    seed: int = 0
    dtype: str = "fp32"
    widths: tuple[int, ...] = ()
    dist: str = "normal"

    @property
    def shapes(self) -> list[tuple[int, int]]:
        if self.widths:
            return [(o, i) for i, o in zip(self.widths, self.widths[1:])]
        return [(self.dim, self.dim)] * self.layers

    @property
    def weights(self) -> int:
        return sum(o * i + o for o, i in self.shapes)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "fp16" else 4

    @property
    def largest_tensor_mb(self) -> float:
        return max(o * i for o, i in self.shapes) * self.itemsize / 2**20

    @property
    def key(self) -> str:
        shape = f"mlp{'-'.join(map(str, self.widths))}" if self.widths else f"linear{self.layers}x{self.dim}"
        dist = "" if self.dist == "normal" else f"-{self.dist}"
        return f"{shape}-seed{self.seed}{dist}-ios18-{self.dtype}"


PACKAGES = (Spec("4M", 1, 2048), Spec("50M", 12, 2048), Spec("2GB", 30, 4096))


def _draw(spec: Spec, rng, out: int, inp: int) -> tuple[np.ndarray, np.ndarray]:
    if spec.dist == "student_t":
        w = rng.standard_t(3, (out, inp)) * (0.5 / np.sqrt(inp))
        b = rng.standard_t(3, out) * 0.01
    else:
        w = rng.standard_normal((out, inp), dtype=np.float32) * 0.02
        b = rng.standard_normal(out, dtype=np.float32) * 0.02
    dt = np.float16 if spec.dtype == "fp16" else np.float32
    return w.astype(dt), b.astype(dt)


def build_with_coremltools(spec: Spec, path: Path) -> None:
    """The package built with the MIL builder and ct.convert (EMPTY pipeline, so the program is as written)."""
    import warnings

    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(spec.seed)
    params = [_draw(spec, rng, o, i) for o, i in spec.shapes]
    dtype = types.fp16 if spec.dtype == "fp16" else types.fp32

    @mb.program(input_specs=[mb.TensorSpec((1, spec.shapes[0][1]), dtype=dtype)], opset_version=ct.target.iOS18)
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
            f"b.build_with_coremltools(b.Spec(**{dataclasses.asdict(spec)!r}), b.Path({str(path)!r}))")
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


# --- compression: load -> compress -> save, mlqpipe.optimize next to coremltools.optimize.coreml ----------------


@dataclass(frozen=True)
class Case:
    """One compression call, the same on both sides: `api` of mlqpipe.optimize / coremltools.optimize.coreml
    with OptimizationConfig(global_config=<config>(**kwargs)); the class names and arguments are shared."""

    label: str
    api: str
    config: str
    kwargs: tuple[tuple[str, object], ...]

    def optimization_config(self, module):
        return module.OptimizationConfig(global_config=getattr(module, self.config)(**dict(self.kwargs)))


CASES = {
    "int8": Case("int8 per_channel", "linear_quantize_weights", "OpLinearQuantizerConfig",
                 (("dtype", "int8"), ("granularity", "per_channel"))),
    "int4": Case("int4 per_block 32", "linear_quantize_weights", "OpLinearQuantizerConfig",
                 (("dtype", "int4"), ("granularity", "per_block"), ("block_size", 32))),
    "prune": Case("prune 50 %", "prune_weights", "OpMagnitudePrunerConfig", (("target_sparsity", 0.5),)),
    "km4": Case("k-means 4-bit per_tensor", "palettize_weights", "OpPalettizerConfig", (("mode", "kmeans"), ("nbits", 4))),
    "km6g16": Case("k-means 6-bit per_grouped_channel g16", "palettize_weights", "OpPalettizerConfig",
                   (("mode", "kmeans"), ("nbits", 6), ("granularity", "per_grouped_channel"), ("group_size", 16))),
    "vq2": Case("vector k-means 4-bit cluster_dim 2", "palettize_weights", "OpPalettizerConfig",
                (("mode", "kmeans"), ("nbits", 4), ("cluster_dim", 2))),
}

# the packages of the compression section (the 4M and 50M ones are shared with the section above)
COMPRESS_PACKAGES = {
    "4M": PACKAGES[0],
    "50M": PACKAGES[1],
    "4M-fp16": Spec("4M-fp16", 1, 2048, dtype="fp16"),
    "4.35M-fp16": Spec("4.35M-fp16", 0, 0, dtype="fp16", widths=(64, 2048, 2048, 10), dist="student_t"),
}
# a tiny package per dtype: each side runs its case on it once before timing (lazy imports, first calls)
WARM = {"fp32": Spec("warm", 1, 128), "fp16": Spec("warm-fp16", 1, 128, dtype="fp16")}


@dataclass(frozen=True)
class Row:
    """package × case, and what it is held to: "speedup" (≥ goal × faster than coremltools), "no_slower",
    or "floor" (≤ goal × the I/O floor with one numpy int8 pass)."""

    package: str
    case: str
    goal: str
    factor: float = 1.0


ROWS = (
    Row("4M", "int8", "floor", 1.5), Row("4M", "int4", "floor", 1.5), Row("4M", "prune", "floor", 2.0), Row("4M", "km4", "speedup", 50.0),
    Row("50M", "int8", "floor", 1.5), Row("50M", "int4", "floor", 1.5), Row("50M", "prune", "floor", 2.0), Row("50M", "km4", "speedup", 50.0),
    Row("4M-fp16", "km4", "no_slower"), Row("4.35M-fp16", "km6g16", "no_slower"), Row("4M", "vq2", "no_slower"),
)
# coremltools' k-means on the 50M package takes minutes: always taken from the timing cache once measured
CT_ALWAYS_CACHED = {("50M", "km4")}


def _silenced():
    import contextlib
    import io

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def compress_task(side: str, case_key: str, dtype: str):
    """The timed call of one side: load -> compress -> save, the module imported and the case run once on
    a tiny package of the same dtype first (neither timed)."""
    import warnings

    warnings.simplefilter("ignore")
    case = CASES.get(case_key)
    if side == "ours-numpy":  # mlqpipe where no C compiler built its k-means: the numpy path
        os.environ["MLQPIPE_NO_COMPILED"] = "1"
        side = "ours"
    if side == "ours":
        import mlqpipe.optimize as module

        def run(src: Path, dst: Path):
            model = getattr(module, case.api)(src, case.optimization_config(module))
            model.save(dst)
            model.close()
    else:
        with _silenced():
            import coremltools as ct
            import coremltools.optimize.coreml as module

        def run(src: Path, dst: Path):
            with _silenced():
                getattr(module, case.api)(ct.models.MLModel(str(src), skip_model_load=True), case.optimization_config(module)).save(str(dst))

    if case is not None:  # the baseline process (no case) only imports
        warm = package(WARM[dtype], log=lambda m: None)
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="warm-") as tmp:
            run(warm, Path(tmp) / "warm.mlpackage")
    return run, {}


_FLOAT_CODES = {1: "<f2", 2: "<f4"}


def floor_int8_run(src: Path, dst: Path):
    """The I/O floor of a compression, as the neural-network benchmark defines it: read, parse (protobuf
    and blob metadata), ONE vectorised 8-bit pass over every float blob (min, max, rint of the scaled
    values to uint8), serialize, write the new package with the uint8 blobs in a new weight.bin."""
    from mlqpipe.formats.mlprogram import proto

    manifest = (src / "Manifest.json").read_bytes()
    spec = proto.Model.FromString((src / MODEL_REL).read_bytes())
    weights = (src / WEIGHTS_REL).read_bytes()
    (count,) = struct.unpack_from("<I", weights, 0)
    (dst / "Data/com.apple.CoreML/weights").mkdir(parents=True)
    at = 64
    with open(dst / WEIGHTS_REL, "wb") as out:
        out.write(weights[:64])
        for _ in range(count):
            _, code, size, data, _ = struct.unpack_from("<IIQQQ", weights, at)
            at = -(-(data + size) // 64) * 64
            if code in _FLOAT_CODES:
                dt = np.dtype(_FLOAT_CODES[code])
                w = np.frombuffer(weights, dt, size // dt.itemsize, data)
                lo, hi = w.min(), w.max()
                blob, code = np.rint((w - lo) * (255 / (hi - lo or 1))).astype(np.uint8), 3
            else:
                blob = memoryview(weights)[data:data + size]
            start = out.tell()
            out.write(struct.pack("<IIQQQ32x", 0xDEADBEEF, code, blob.nbytes, start + 64, 0))
            out.write(blob)
            out.write(b"\0" * (-out.tell() % 64))
    (dst / MODEL_REL).write_bytes(spec.SerializeToString())
    (dst / "Manifest.json").write_bytes(manifest)


def floor_int8_task():
    from mlqpipe.formats.mlprogram import proto  # noqa: F401  (imported before timing, like the others)

    return floor_int8_run, {}


def _task(task: str):
    """A task by name: one of TASKS, or "compress:<side>:<case>:<dtype>" (side ours / ct; no case: the
    baseline process of that side, imports only)."""
    if task.startswith("compress:"):
        _, side, case_key, dtype = task.split(":")
        return compress_task(side, case_key, dtype)
    return TASKS[task]()


TASKS = {"floor": floor_task, "floor_int8": floor_int8_task, "ours": lambda: ours_task(False), "ours_check": lambda: ours_task(True),
         "ct_save": lambda: ct_task("save"), "ct_spec": lambda: ct_task("spec"), "ct_program": lambda: ct_task("program")}

_HWM = ("\nimport json as _j; print(_j.dumps({'hwm_kb': int([l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')][0])}))")


def measure(task: str, src: Path, repeat: int, budget_s: float = float("inf")) -> dict:
    """In this process: set the task up (imports, not timed), warm the page cache, best of `repeat` runs
    (each writing a new package, removed untimed; no further run once `budget_s` seconds were spent).
    repeat=0 only sets up: the baseline process."""
    run, extra = _task(task)
    sampled = task.startswith(("compress:", "floor_int8"))
    if not repeat:
        return {**extra, "anon_mb": _status_mb("RssAnon")} if sampled else extra
    _warm(src)
    times = []
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="out-") as tmp, AnonPeak(sampled) as anon:
        for i in range(repeat):
            dst = Path(tmp) / f"out{i}.mlpackage"
            t = time.perf_counter()
            run(src, dst)
            times.append(time.perf_counter() - t)
            last = i == repeat - 1 or sum(times) >= budget_s
            if last and task.startswith(("compress:", "floor_int8")):
                out = _only_weight_file(dst)
                extra["out_weight_bin_mb"] = None if out is None else out.stat().st_size / 1e6
            elif last and task != "ct_spec":
                extra["weights_identical"] = _same_bytes(src / WEIGHTS_REL, _only_weight_file(dst))
            shutil.rmtree(dst, ignore_errors=True)
            if last:
                break
    if sampled:
        extra["anon_peak_mb"] = anon.peak_mb
    return {"best_s": min(times), "times": times, **extra}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


class AnonPeak:
    """The peak of RssAnon (the process's own memory, not the pages of mapped files, which VmHWM also
    counts and which a reader that maps weight.bin touches in full), sampled every 10 ms by a thread: a
    diagnostic next to VmHWM (a spike shorter than 10 ms can be missed; the sampling costs < 1 %)."""

    def __init__(self, enabled: bool):
        import threading

        self.enabled, self.peak_mb, self._stop = enabled, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))
            if self._stop.wait(0.01):
                return

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()


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


def _in_fresh_process(task: str, src: Path, repeat: int, budget_s: float = float("inf")) -> tuple[dict, float]:
    if repeat and hasattr(os, "sync"):  # start every measurement with no dirty pages of earlier ones to write back
        os.sync()
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import mlprogram as b; "
            f"print(json.dumps(b.measure({task!r}, b.Path({str(src)!r}), {repeat}, float({str(budget_s)!r}))))")
    proc = subprocess.run([sys.executable, "-c", code + _HWM], capture_output=True, text=True)
    if proc.returncode:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        raise RuntimeError(f"{task} on {src.name} failed: {last}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-2]), json.loads(lines[-1])["hwm_kb"] / 1024


# tasks whose setup is the same imports share one baseline process per run (coremltools' import takes seconds)
_SETUP = {"ct_save": "ct", "ct_spec": "ct", "ct_program": "ct"}
_BASELINES: dict[str, float] = {}


def run_measured(task: str, src: Path, repeat: int) -> dict:
    """`measure` in a fresh process, with its peak RSS, and the peak RSS of a fresh process that set the
    same task up (the same imports) and did nothing: the interpreter baseline (the setup does not depend
    on the package, so it is measured once per run and setup)."""
    out, peak = _in_fresh_process(task, src, repeat)
    setup = _SETUP.get(task, task)
    if setup not in _BASELINES:
        _BASELINES[setup] = _in_fresh_process(task, src, 0)[1]
    base = _BASELINES[setup]
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


def bench(*, skip_2gb: bool = False, quick: bool = False, compress: bool = True, fresh_coremltools: bool = False, log=print) -> dict:
    """Every package, every side: {"packages": [{label, weights, mb, sides: {task: measure}}]}, and the
    compression section under "compression" (see compress_bench)."""
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
    if compress and has_ct:
        result["compression"] = compress_bench(quick=quick, fresh_coremltools=fresh_coremltools, log=log)
    return result


class TimingCache:
    """coremltools' compression timings, one JSON file in the bench cache, keyed by package, case and
    coremltools version: coremltools' side does not change when mlqpipe does, and its k-means on the
    50M package takes minutes."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def _ct_key(spec: Spec, case_key: str, version: str) -> str:
    return f"{spec.key}|{case_key}|{dict(CASES[case_key].kwargs)}|coremltools {version}"


def compress_bench(*, quick: bool, fresh_coremltools: bool = False, log=print) -> dict:
    """Every ROWS entry: mlqpipe's and coremltools' load -> compress -> save, each in a fresh process
    (best of up to 5 runs within a time budget, as the floor; --quick: up to 2 within 5 s), peak RSS above a fresh process
    of the same side that only imported its modules; the I/O floor with one numpy int8 pass per package.
    coremltools' timings come from the TimingCache for CT_ALWAYS_CACHED rows (measured once, one run), and
    for every row with --quick; fresh_coremltools measures (and re-caches) all of them."""
    import datetime
    from importlib.metadata import version

    ct_version = version("coremltools")
    cache = TimingCache(CACHE / "coremltools-compress.json")
    out = {"coremltools_version": ct_version, "quick": quick, "timing_cache": str(cache.path), "rows": [], "floors": {},
           "load_average_before": os.getloadavg()[0]}
    for spec in [*WARM.values(), *(COMPRESS_PACKAGES[r.package] for r in ROWS)]:
        package(spec, log)
    any_src = package(WARM["fp32"])
    base = {side: _in_fresh_process(f"compress:{side}::fp32", any_src, 0) for side in ("ours", "ct")}
    out["baseline_rss_mb"] = {side: hwm for side, (_, hwm) in base.items()}
    out["baseline_anon_mb"] = {side: info["anon_mb"] for side, (info, _) in base.items()}
    for label in sorted({r.package for r in ROWS if r.goal == "floor"}):
        log(f"  compression {label}: I/O floor + int8 pass ...")
        out["floors"][label] = _compress_side("floor_int8", package(COMPRESS_PACKAGES[label]), 5, float("inf"), None, None)
    repeat, budget = (2, 5.0) if quick else (5, 30.0)  # as many runs as the floor gets (5)
    for row in ROWS:
        spec, case = COMPRESS_PACKAGES[row.package], CASES[row.case]
        src = package(spec)
        floor = None
        if row.package in out["floors"]:  # again right before the row: the same page-cache state as its runs
            log(f"  compression {row.package}: I/O floor + int8 pass, for {case.label} ...")
            floor = _compress_side("floor_int8", src, 5, float("inf"), None, None)
        log(f"  compression {row.package}: {case.label}: mlqpipe ...")
        ours = _compress_side(f"compress:ours:{row.case}:{spec.dtype}", src, repeat, budget, out["baseline_rss_mb"]["ours"],
                              out["baseline_anon_mb"]["ours"])
        numpy_only = None
        if row.case.startswith("km"):  # exact 1-D k-means: also without the compiled DP (information, no target)
            log(f"  compression {row.package}: {case.label}: mlqpipe, numpy only ...")
            numpy_only = _compress_side(f"compress:ours-numpy:{row.case}:{spec.dtype}", src, repeat, budget,
                                        out["baseline_rss_mb"]["ours"], out["baseline_anon_mb"]["ours"])
        key = _ct_key(spec, row.case, ct_version)
        use_cache = not fresh_coremltools and (quick or (row.package, row.case) in CT_ALWAYS_CACHED)
        ct = dict(cache.get(key), cached=True) if use_cache and cache.get(key) else None
        if ct is None:
            once = (row.package, row.case) in CT_ALWAYS_CACHED
            log(f"  compression {row.package}: {case.label}: coremltools{' (one run, then cached)' if once else ''} ...")
            ct = _compress_side(f"compress:ct:{row.case}:{spec.dtype}", src, 1 if once else repeat, budget, out["baseline_rss_mb"]["ct"],
                                out["baseline_anon_mb"]["ct"])
            if "error" not in ct:
                cache.put(key, dict(ct, measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                    load_average=os.getloadavg()[0]))
            ct["cached"] = False
        out["rows"].append({"package": row.package, "case": row.case, "label": case.label, "goal": row.goal, "factor": row.factor,
                            "weights": spec.weights, "dtype": spec.dtype, "largest_tensor_mb": spec.largest_tensor_mb,
                            "mlqpipe": ours, "coremltools": ct, **({"mlqpipe_numpy": numpy_only} if numpy_only else {}),
                            **({"floor": floor} if floor else {})})
    out["load_average_after"] = os.getloadavg()[0]
    return out


def _compress_side(task: str, src: Path, repeat: int, budget: float, baseline: float | None, anon_baseline: float | None) -> dict:
    try:  # (_in_fresh_process syncs first)
        res, peak = _in_fresh_process(task, src, repeat, budget)
    except RuntimeError as e:
        return {"error": str(e)}
    res = {**res, "peak_rss_mb": peak}
    if baseline is not None:
        res.update(baseline_rss_mb=baseline, above_mb=peak - baseline, anon_above_mb=res["anon_peak_mb"] - anon_baseline)
    return res


def compress_targets(c: dict) -> list[dict]:
    """The issue's targets, one row each: k-means fp32 >= 50x coremltools, fp16 and vector k-means no
    slower, linear <= 1.5x and pruning <= 2x the floor, and mlqpipe's peak RSS above the interpreter
    <= 64 MB + 2 x the package's largest tensor."""
    out = []
    for row in c["rows"]:
        ours, ct = row["mlqpipe"], row["coremltools"]
        name = f"ML program {row['label']} ({row['package']}, {row['dtype']}), load → compress → save"
        fl = _floor_of(c, row)
        error = ours.get("error") or (ct.get("error") if row["goal"] != "floor" else fl.get("error"))
        if row["goal"] == "floor":
            what, goal = f"{name} vs I/O floor + one int8 pass", f"<= {row['factor']:g}x"
            value = None if error else ours["best_s"] / fl["best_s"]
            ok = value is not None and value <= row["factor"]
        else:
            cached = " (coremltools timing cached)" if ct.get("cached") else ""
            what = f"{name} vs coremltools {c['coremltools_version']}{cached}"
            goal = f">= {row['factor']:g}x faster" if row["goal"] == "speedup" else ">= 1x (no slower)"
            value = None if error else ct["best_s"] / ours["best_s"]
            ok = value is not None and value >= row["factor"]
        out.append({"target": what, "value": value, "goal": goal, "pass": ok, **({"note": error} if error else {})})
    for row in c["rows"]:
        ours = row["mlqpipe"]
        if "error" in ours:
            continue
        allowed = 64 + 2 * row["largest_tensor_mb"]
        out.append({"target": f"ML program {row['label']} ({row['package']}), mlqpipe peak RSS above the interpreter", "value": ours["above_mb"],
                    "goal": f"<= {allowed:.0f} MB (64 MB + 2 x largest tensor {row['largest_tensor_mb']:.0f} MB)", "pass": ours["above_mb"] <= allowed})
    return out


def _floor_of(c: dict, row: dict) -> dict | None:
    """The floor a row is compared with: the one measured right before it (the section's first one in
    results from before that)."""
    return row.get("floor") or c["floors"].get(row["package"])


def compress_report_lines(c: dict) -> list[str]:
    def sec(side):
        return "error" if "error" in side else f"{side['best_s']:.3f}"

    def mem(side):
        return "-" if "error" in side or "above_mb" not in side else f"{side['above_mb']:.0f}"

    def anon(side):
        return "-" if "error" in side or "anon_above_mb" not in side else f"{side['anon_above_mb']:.0f}"

    def mb(side):
        return "-" if side.get("out_weight_bin_mb") is None else f"{side['out_weight_bin_mb']:.1f}"

    lines = [f"## ML programs (.mlpackage): compression, mlqpipe.optimize vs coremltools {c['coremltools_version']}", "",
             "End to end, load → compress → save, each side in a fresh process with its module imported and the same call run once on a "
             "128×128 package first (neither timed); best of up to " + ("2 runs within 5 s (--quick)" if c["quick"] else "5 runs within 30 s, as the floor")
             + ", warm page cache. mlqpipe: `mlqpipe.optimize.<api>(path, config).save(out)`; coremltools: "
             "`coremltools.optimize.coreml.<api>(MLModel(path, skip_model_load=True), config).save(out)`, with the same "
             "`OptimizationConfig(global_config=...)` arguments. Packages: 4M / 50M as above (fp32, N(0, 0.02²)); 4M-fp16 the same "
             "weights drawn as fp16; 4.35M-fp16 a 64-2048-2048-10 fp16 MLP with heavy-tailed (Student t, 3 dof) weights. "
             "Floor: read + parse + ONE numpy int8 pass (min, max, rint to uint8) over every float blob + serialize + write, as "
             "the neural-network benchmark defines it, measured again right before each row; every measurement starts after os.sync() "
             "(no dirty pages of earlier ones to write back). RSS: peak RSS above a fresh process of the same side that only imported its "
             "modules (mlqpipe " + f"{c['baseline_rss_mb']['ours']:.0f} MB, coremltools {c['baseline_rss_mb']['ct']:.0f} MB); VmHWM counts "
             "the pages of a memory-mapped weight.bin a side reads, so \"anonymous\" adds the peak of RssAnon above the same baseline "
             "(sampled every 10 ms; the process's own allocations). The RSS targets use VmHWM.", "",
             "| package | config | mlqpipe s | coremltools s | speed-up | floor + int8 s | mlqpipe / floor | weight.bin MB mlqpipe / coremltools | RSS above MB mlqpipe / coremltools | anonymous above MB mlqpipe / coremltools |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cached = []
    for row in c["rows"]:
        ours, ct = row["mlqpipe"], row["coremltools"]
        fl = _floor_of(c, row)
        speed = "-" if "error" in ours or "error" in ct else f"{ct['best_s'] / ours['best_s']:.1f}×"
        vs_floor = "-" if fl is None or "error" in fl or "error" in ours else f"{ours['best_s'] / fl['best_s']:.2f}×"
        mark = " †" if ct.get("cached") else ""
        if ct.get("cached"):
            cached.append(f"{row['package']} {row['label']} (measured {ct.get('measured_at', '?')}, {len(ct.get('times', []))} run(s), load {ct.get('load_average', float('nan')):.1f})")
        lines.append(f"| {row['package']} ({row['weights'] / 1e6:.2f}M, {row['dtype']}) | {row['label']} | {sec(ours)} | {sec(ct)}{mark} | {speed} "
                     f"| {'-' if fl is None else sec(fl)} | {vs_floor} | {mb(ours)} / {mb(ct)} | {mem(ours)} / {mem(ct)} | {anon(ours)} / {anon(ct)} |")
    numpy_rows = [row for row in c["rows"] if row.get("mlqpipe_numpy")]
    if numpy_rows:
        lines += ["", "The k-means rows use the compiled exact 1-D k-means (`mlqpipe/quant/_kmeans1d.c`, built where a C compiler is). "
                  "The same rows on the numpy path (`MLQPIPE_NO_COMPILED=1`, as without a compiler; no target): " + "; ".join(
                      f"{row['package']} {row['label']} {sec(row['mlqpipe_numpy'])} s"
                      + ("" if "error" in row["mlqpipe_numpy"] or "error" in row["coremltools"]
                         else f" ({row['coremltools']['best_s'] / row['mlqpipe_numpy']['best_s']:.2f}× coremltools' speed)")
                      + f", RSS above {mem(row['mlqpipe_numpy'])} MB" for row in numpy_rows) + "."]
    if cached:
        lines += ["", f"† coremltools' timing from the cache `{c['timing_cache']}` (keyed by package, config and coremltools version; "
                  "delete it or pass --fresh-coremltools to measure again): " + "; ".join(cached) + "."]
    errors = [f"{row['package']} {row['label']} {side}: {row[key]['error']}" for row in c["rows"]
              for side, key in (("mlqpipe", "mlqpipe"), ("coremltools", "coremltools")) if "error" in row[key]]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors) + "."]
    lines += ["", f"Load average (1 min) {c['load_average_before']:.1f} before the compression section, {c['load_average_after']:.1f} after."]
    return lines + [""]


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
    return out + (compress_targets(r["compression"]) if "compression" in r else [])


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
             "warm page cache, after os.sync() (no dirty pages of earlier measurements to write back). Peak RSS is the process's VmHWM; \"above\" subtracts a fresh process that only imported the same modules.",
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
    return lines + [""] + (compress_report_lines(r["compression"]) if "compression" in r else [])


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-2gb", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compress", action="store_true", help="leave out the compression rows")
    ap.add_argument("--fresh-coremltools", action="store_true", help="measure every coremltools compression row again (and re-cache it)")
    args = ap.parse_args()
    r = bench(skip_2gb=args.skip_2gb, quick=args.quick, compress=not args.no_compress, fresh_coremltools=args.fresh_coremltools,
              log=lambda m: print(m, file=sys.stderr))
    print("\n".join(report_lines(r)))
    return print_targets(targets(r))


if __name__ == "__main__":
    sys.exit(main())
