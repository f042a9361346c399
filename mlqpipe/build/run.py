"""`mlqpipe build`: the same doit tasks as a user's dodo.py, run through doit's API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .tasks import BuildOptions, tasks_from_recipes

_CURRENT: dict = {"patterns": (), "options": BuildOptions()}


def _tasks(options: BuildOptions | None = None) -> list[dict]:
    """The task dicts for this invocation, generated once (recipes are read once per build)."""
    if _CURRENT.get("tasks") is None:
        _CURRENT["tasks"] = list(tasks_from_recipes(*_CURRENT["patterns"], options=options or _CURRENT["options"]))
    return _CURRENT["tasks"]


def task_mlqpipe():
    """Generated from the recipes named on the command line (copies: doit consumes the dicts it loads)."""
    import copy

    for task in _tasks():
        yield copy.deepcopy(task)


def _heal_state(dep_file: Path) -> None:
    """A corrupted doit state file would stop every build: set it aside, say so, and start afresh (the
    stage cache makes the rebuild cheap)."""
    if not dep_file.exists():
        return
    import sqlite3

    try:
        with sqlite3.connect(dep_file) as conn:
            ok = conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError:
        ok = False
    if not ok:
        aside = dep_file.with_name(dep_file.name + ".corrupt")
        os.replace(dep_file, aside)
        print(f"mlqpipe: doit state {dep_file} was corrupt; moved to {aside} and rebuilding (the cache makes this cheap)",
              file=sys.stderr)


def _doit(argv: list[str], options: BuildOptions) -> int:
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    Path(options.state_dir).mkdir(parents=True, exist_ok=True)
    _heal_state(Path(options.state_dir) / "doit.sqlite3")
    namespace = {
        "task_mlqpipe": task_mlqpipe,
        "DOIT_CONFIG": {
            "dep_file": str(Path(options.state_dir) / "doit.sqlite3"),
            "backend": "sqlite3",
            "verbosity": 0,
            "outfile": sys.stdout,  # doit's default is the sys.stdout of its import time
        },
    }
    return DoitMain(ModuleTaskLoader(namespace)).run(argv)


def _lock_outputs(options: BuildOptions) -> dict:
    try:
        return json.loads(Path(options.lock_file).read_text(encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


MAX_LOG_BYTES = 1 << 20  # the task event log is started afresh past this


def build(patterns, *, jobs: int = 1, dry_run: bool = False, force: bool = False, prune: bool = False,
          options: BuildOptions | None = None, verbose: int = 0) -> int:
    options = options or BuildOptions()
    _CURRENT["patterns"], _CURRENT["options"], _CURRENT["tasks"] = tuple(patterns), options, None
    _CURRENT["previous_lock"] = _lock_outputs(options)
    if dry_run:
        return _dry_run(options)
    log = Path(options.state_dir) / "run.jsonl"
    try:  # tasks append their events; this run's start at the current end (a no-op build touches nothing)
        _CURRENT["log_offset"] = log.stat().st_size
        if _CURRENT["log_offset"] > MAX_LOG_BYTES:
            log.unlink()
            _CURRENT["log_offset"] = 0
    except FileNotFoundError:
        _CURRENT["log_offset"] = 0
    argv = ["run"]
    if jobs > 1:
        argv += ["-n", str(jobs), "-P", "process"]
        method = os.environ.get("MLQPIPE_START_METHOD")  # tests force "spawn" (macOS' default) on Linux
        if method:
            import multiprocessing

            multiprocessing.set_start_method(method, force=True)
    if force:
        argv += ["--always-execute"]
    status = _doit(argv, options)
    stale = _stale_outputs(options)
    if prune:
        for path, reports in stale.items():
            for file in [path, *reports]:
                Path(file).unlink(missing_ok=True)
        _stale_file(options).unlink(missing_ok=True)
    _summary(options, status, stale, pruned=prune)
    return 0 if status == 0 else (1 if status == 1 else 2)


def _current(options: BuildOptions) -> tuple[set[str], set[str]]:
    """(outputs, recipes) of the recipes named for this build."""
    outs, recipes = set(), set()
    for task in _tasks(options):
        if task.get("basename") == "mlqpipe-lock":
            recipes = set(task["actions"][0][1][1])
        if task.get("basename", "").endswith("/output"):
            outs.add(Path(os.path.relpath(task["targets"][0])).as_posix())
    return outs, recipes


def _current_outputs(options: BuildOptions) -> set[str]:
    return _current(options)[0]


def _stale_outputs(options: BuildOptions) -> dict[str, list[str]]:
    """Outputs the lock file listed before this build whose recipe is gone, or is part of this build and no
    longer produces them (and that still exist on disk), each with its report files."""
    outputs, recipes = _current(options)
    previous = {**_lock_outputs(options), **_CURRENT.get("previous_lock", {})}
    stale = {
        path: entry.get("reports") or _default_reports(path) for path, entry in previous.items()
        if path not in outputs and (entry.get("recipe") in recipes or not Path(entry.get("recipe", "")).is_file())
    }
    remembered = _stale_file(options)
    try:
        known = remembered.read_text(encoding="utf-8")
        old = json.loads(known)
    except (OSError, ValueError):
        known, old = None, {}
    if isinstance(old, list):  # the first format: output paths only
        old = {path: _default_reports(path) for path in old}
    stale = {p: reports for p, reports in sorted({**old, **stale}.items()) if p not in outputs and Path(p).exists()}
    # the lock file forgets outputs no recipe makes; remember them here until they are pruned (a no-op
    # build writes nothing)
    text = json.dumps(stale, sort_keys=True)
    if text != known and not (known is None and not stale):
        from ..fileio import atomic_write

        atomic_write(remembered, text.encode())
    return stale


def _default_reports(output: str) -> list[str]:
    """Report files beside an output, for lock entries written before they listed their reports."""
    base = output[: -len(".mlmodel")] if output.endswith(".mlmodel") else output
    return [f"{base}.report.{ext}" for ext in ("json", "md", "png")]


def _stale_file(options: BuildOptions) -> Path:
    return Path(options.state_dir) / "stale.json"


def _dry_run(options: BuildOptions) -> int:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = _doit(["list", "--all", "--status"], options)
    rebuild = []
    for line in buf.getvalue().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("R", "I") and parts[1].endswith("/output"):
            rebuild.append(parts[1])
    for name in rebuild:
        print(f"would rebuild {name.removeprefix('mlqpipe/').removesuffix('/output')} (inputs, recipe or versions changed, or output missing)")
    print(f"{len(rebuild)} output(s) would be rebuilt")
    for path in _stale_outputs(options):
        print(f"stale: {path} (no recipe produces it any more; --prune removes it)")
    return 0 if status == 0 else 2


def _summary(options: BuildOptions, status: int, stale: dict[str, list[str]], pruned: bool) -> None:
    events = []
    log = Path(options.state_dir) / "run.jsonl"
    if log.exists():
        with open(log, "rb") as f:
            f.seek(_CURRENT.get("log_offset", 0))
            events = [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    outputs = [e for e in events if e["event"] == "output"]
    computed_models = {(e["recipe"], e["input"]) for e in events if e["event"] in ("stage", "output") and e["computed"]}
    built = sum(1 for e in outputs if (e["recipe"], e["input"]) in computed_models)
    cached = len(outputs) - built
    total = len(_current_outputs(options))
    before = sum(e["bytes_before"] for e in outputs)
    after = sum(e["bytes_after"] for e in outputs)
    size = f", {before} -> {after} bytes" if outputs else ""
    failed = "" if status == 0 else ", build FAILED (see above)"
    print(f"mlqpipe build: {built} built, {cached} from cache, {total - len(outputs)} up to date{size}{failed}")
    for e in events:
        if e["event"] == "cache-problem":
            print(f"  cache: {e['message']}", file=sys.stderr)
    for path in stale:
        print(f"  stale: {path} (no recipe produces it any more){' — removed' if pruned else '; --prune removes it'}")


def referenced_keys(options: BuildOptions) -> set[str]:
    """Stage keys the lock file references (what `mlqpipe cache prune` keeps)."""
    return {k for entry in _lock_outputs(options).values() for k in entry.get("stage_keys", [])}
