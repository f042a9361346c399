"""`mlqpipe build`: the same doit tasks as a user's dodo.py, run through doit's API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mlqpipe.build.console import BuildReporter
from mlqpipe.fileio import posix_path
from mlqpipe.build.lock import in_shard
from mlqpipe.build.tasks import BuildOptions, tasks_from_recipes

_CURRENT: dict = {"patterns": (), "options": BuildOptions()}


def _tasks(options: BuildOptions | None = None) -> list[dict]:
    """The task dicts for this invocation, generated once (recipes are read once per build)."""
    if _CURRENT.get("tasks") is None:
        _CURRENT["tasks"] = list(tasks_from_recipes(*_CURRENT["patterns"], options=options or _CURRENT["options"]))
    return _CURRENT["tasks"]


def task_mlqpipe():
    """Generated from the recipes named on the command line. doit takes over the dicts and lists it loads,
    and this build reads its tasks again afterwards, so each task goes out as a copy one level deep (the
    values inside are never mutated; a deep copy cost a tenth of a no-op build)."""
    for task in _tasks():
        yield _task_copy(task)


def _task_copy(task: dict) -> dict:
    return {k: list(v) if isinstance(v, list) else (dict(v) if isinstance(v, dict) else v) for k, v in task.items()}


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
            "reporter": BuildReporter,
            "outfile": sys.stdout,  # doit's default is the sys.stdout of its import time
        },
    }
    return DoitMain(ModuleTaskLoader(namespace)).run(argv)


def _lock_outputs(options: BuildOptions) -> dict:
    from mlqpipe.build.lock import outputs_or_empty

    return outputs_or_empty(options.lock_file) if options.lock_file else {}


MAX_LOG_BYTES = 1 << 20  # the task event log is started afresh past this


def build(patterns, *, jobs: int = 1, dry_run: bool = False, force: bool = False, prune: bool = False,
          options: BuildOptions | None = None, verbose: int = 0, keep_going: bool = False) -> int:
    """Run the build; `keep_going` builds every model it can after a failure (doit's --continue), so one
    run reports every failing model."""
    options = options or BuildOptions()
    from mlqpipe.build.cache import is_url

    if is_url(options.cache_dir):  # a remote that failed in an earlier build of this process gets another chance
        from mlqpipe.build.store import forget_remote_failures

        from mlqpipe.build.prefetch import STATS

        forget_remote_failures(options.state_dir)
        STATS["bundles"].clear()  # what an earlier build of this process found is no evidence now
        if not dry_run:  # the prefetch of what the lock file records starts now, while the recipes load
            from mlqpipe.build.cache import open_cache

            open_cache(options)
    _CURRENT["patterns"], _CURRENT["options"], _CURRENT["tasks"] = tuple(patterns), options, None
    _CURRENT["previous_lock"] = _lock_outputs(options)
    if dry_run:
        return _dry_run(options)
    invalid = next((t for t in _tasks(options) if t.get("basename") == "mlqpipe-invalid-recipes"), None)
    if invalid is not None:  # bad input: its located problems, once, and nothing runs
        action, args = invalid["actions"][0]
        action(*args)
        return 2
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
    if keep_going:
        argv += ["--continue"]
    status = _doit(argv, options)
    stale = _stale_outputs(options)
    if prune:
        for path, reports in stale.items():
            for file in [path, *reports]:
                Path(file).unlink(missing_ok=True)
        _stale_file(options).unlink(missing_ok=True)
    rows = _summary(options, status, stale, pruned=prune)
    if status == 0:
        return 0
    # a failed output is a finding (1) — doit says "error" when --continue skips the lock task after it;
    # anything else (invalid recipes, doit errors) is bad input (2)
    return 1 if status == 1 or any(r["build"] == "failed" for r in rows) else 2


def _current(options: BuildOptions) -> tuple[set[str], set[str]]:
    """(outputs, recipes) of the recipes named for this build."""
    outs, recipes = set(), set()
    for task in _tasks(options):
        if task.get("basename") == "mlqpipe-lock":
            recipes = set(task["meta"]["mlqpipe"]["recipes"])
        if task.get("basename", "").endswith("/output"):
            outs.add(posix_path(task["meta"]["mlqpipe"]["output"]))
    return outs, recipes


def _stale_outputs(options: BuildOptions) -> dict[str, list[str]]:
    """Outputs the lock file listed before this build whose recipe is gone, or is part of this build and no
    longer produces them (and that still exist on disk), each with its report files."""
    outputs, recipes = _current(options)
    previous = {**_lock_outputs(options), **_CURRENT.get("previous_lock", {})}
    stale = {
        path: entry.get("reports") or _default_reports(path) for path, entry in previous.items()
        if path not in outputs and in_shard(path, options.shard)
        and (entry.get("recipe") in recipes or not Path(entry.get("recipe", "")).is_file())
    }
    remembered = _stale_file(options)
    try:
        known = remembered.read_text(encoding="utf-8")
        old = json.loads(known)
    except (OSError, ValueError):
        known, old = None, {}
    if isinstance(old, list):  # the first format: output paths only
        old = {path: _default_reports(path) for path in old}
    stale = {p: reports for p, reports in sorted({**old, **stale}.items())
             if p not in outputs and in_shard(p, options.shard) and Path(p).exists()}
    # the lock file forgets outputs no recipe makes; remember them here until they are pruned (a no-op
    # build writes nothing)
    text = json.dumps(stale, sort_keys=True)
    if text != known and not (known is None and not stale):
        from mlqpipe.fileio import atomic_write

        atomic_write(remembered, text.encode())
    return stale


def _default_reports(output: str) -> list[str]:
    """Report files beside an output, for lock entries written before they listed their reports."""
    from mlqpipe.fileio import without_model_suffix

    base = without_model_suffix(output)
    return [f"{base}.report.{ext}" for ext in ("json", "md", "png")]


def _stale_file(options: BuildOptions) -> Path:
    """Outputs found stale and not pruned yet; a shard keeps its own list (it never judges another's outputs)."""
    shard = options.shard
    return Path(options.state_dir) / ("stale.json" if shard is None else f"stale.shard-{shard[0]}-of-{shard[1]}.json")


def _dry_run(options: BuildOptions) -> int:
    """What a build would rebuild, asked of doit's own dependency state (read only: nothing is written)."""
    from doit.control import TaskControl
    from doit.dependency import Dependency, SqliteDB
    from doit.loader import generate_tasks

    tasks = _tasks(options)
    if any(t.get("basename") == "mlqpipe-invalid-recipes" for t in tasks):
        status = _doit(["run"], options)  # prints the located problems
        return 2 if status else 0
    control = TaskControl(generate_tasks("mlqpipe", (_task_copy(t) for t in tasks)))
    dep_file = Path(options.state_dir) / "doit.sqlite3"
    outputs = [name for name in control.tasks if name.endswith("/output")]
    if dep_file.exists():
        dep = Dependency(SqliteDB, str(dep_file))  # never closed: closing writes the state back
        rebuild = [n for n in outputs if dep.status_is_ignore(control.tasks[n])
                   or dep.get_status(control.tasks[n], control.tasks).status != "up-to-date"]
    else:
        rebuild = outputs
    for name in rebuild:
        print(f"would rebuild {name.removeprefix('mlqpipe/').removesuffix('/output')} (inputs, recipe or versions changed, or output missing)")
    print(f"{len(rebuild)} output(s) would be rebuilt")
    for path in _stale_outputs(options):
        print(f"stale: {path} (no recipe produces it any more; --prune removes it)")
    return 0


def _events(options: BuildOptions) -> list[dict]:
    """What this run's tasks logged (run.jsonl from this run's starting offset)."""
    log = Path(options.state_dir) / "run.jsonl"
    if not log.exists():
        return []
    with open(log, "rb") as f:
        f.seek(_CURRENT.get("log_offset", 0))
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def outcomes(options: BuildOptions, events: list[dict]) -> list[dict]:
    """Per output of this build: how it was built (built, from cache, up to date, failed, not run) and its
    report, from what doit's reporter saw and what the tasks logged."""
    from mlqpipe.build import console
    from mlqpipe.quality.tables import report_of

    seen = console.LAST.status if console.LAST is not None else {}
    computed = {(e["recipe"], e["input"]) for e in events if e["event"] in ("stage", "output") and e.get("computed")}
    rows = []
    for task in _tasks(options):
        name = task.get("basename", "")
        if not name.endswith("/output"):
            continue
        prefix = name[: -len("output")]
        mine = [seen.get(n) for n in seen if n.startswith(prefix)]
        meta = task["meta"]["mlqpipe"]
        recipe_path, input_path = meta["recipe"], meta["input"]
        if "failed" in mine:
            build = "failed"
        elif seen.get(name) == "ran":
            build = "built" if (recipe_path, input_path) in computed else "from cache"
        elif seen.get(name) == "up-to-date":
            build = "up to date"
        else:
            build = "not run"
        json_report = meta["json_report"]
        report = report_of(json_report) if json_report and build != "not run" else None
        status = "FAILED" if build == "failed" else ("-" if build == "not run" else (report or {}).get("status", "passed"))
        rows.append({"output": posix_path(meta["output"]), "build": build, "status": status, "report": report})
    return rows


def _summary(options: BuildOptions, status: int, stale: dict[str, list[str]], pruned: bool) -> list[dict]:
    from mlqpipe.quality.tables import outputs_table

    events = _events(options)
    rows = outcomes(options, events)
    if rows:
        print(outputs_table(rows))
    count = {k: sum(r["build"] == k for r in rows) for k in ("built", "from cache", "up to date", "failed", "not run")}
    written = [e for e in events if e["event"] == "output"]
    size = f", {sum(e['bytes_before'] for e in written)} -> {sum(e['bytes_after'] for e in written)} bytes" if written else ""
    failed = "" if status == 0 else ", build FAILED"
    print(f"mlqpipe build: {', '.join(f'{n} {k}' for k, n in count.items())}{size}{failed}")
    for e in events:
        if e["event"] == "cache-problem":
            print(f"  cache: {e['message']}", file=sys.stderr)
    for path in stale:
        print(f"  stale: {path} (no recipe produces it any more){' — removed' if pruned else '; --prune removes it'}")
    return rows


def referenced_keys(options: BuildOptions) -> set[str]:
    """Stage keys the lock file references, and the bundle of its final entries' manifests (what
    `mlqpipe cache prune` keeps)."""
    from mlqpipe.build.cache import bundle_key, locked_keys

    keys = {k for entry in _lock_outputs(options).values() for k in entry.get("stage_keys", [])}
    return keys | ({bundle_key(locked_keys(options))} if keys else set())
