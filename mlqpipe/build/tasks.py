"""Recipes compiled into doit tasks: one task per (model, stage), one per final output, one for the lock file.

Up-to-date checks stay cheap and light: a task depends on its input model (doit's file_dep: mtime, then
size, then md5) and on its stages' configuration *as written* (doit's config_changed), so a comment in a
recipe changes nothing and no model is parsed to decide. Generating the tasks imports only PyYAML: a recipe
whose exact bytes already passed validation is not schema-checked again (no jsonschema import); numpy,
protobuf and the kernels load only inside actions that run.

Stage results live in the content-addressed cache under a key chained from the input's digest, so a later
stage reuses an earlier one, a killed build resumes from what it finished, and a shared cache directory
serves builds on other machines. Actions are module-level functions with plain arguments, so `doit -n N`
works under the spawn start method.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlqpipe.fileio import posix_path as _posix
from mlqpipe.fileio import shown_path as _rel
from mlqpipe.recipe.problems import Problem
from mlqpipe.build.cache import CACHE_FORMAT
from mlqpipe.build.lock import LOCK_FILE, LOCK_FORMAT, in_shard

KERNEL_VERSION = 1  # bump whenever any kernel's output bytes change: invalidates every cached stage
DEFAULT_CACHE = ".mlqpipe-cache"
STATE_DIR = ".mlqpipe-state"  # local to a checkout: doit's dep file, validated-recipe marks, run log


def _default_cache() -> str:
    return os.environ.get("MLQPIPE_CACHE") or DEFAULT_CACHE  # as the mlqpipe command: a dodo.py shares the cache


@dataclass(frozen=True)
class BuildOptions:
    cache_dir: str = field(default_factory=_default_cache)
    salt: str = ""
    allow_custom: bool | tuple = True  # False: --no-custom-code; a tuple: the modules --custom-code-allow names
    read_only_cache: bool = False
    allow_outside_root: bool = False
    lock_file: str | None = LOCK_FILE
    state_dir: str = STATE_DIR
    shard: tuple[int, int] | None = None  # (I, N): build only the outputs of shard I of N (1-based)

    def as_args(self) -> dict:
        return asdict(self)




def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(obj) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()



# --- recipes for task generation ------------------------------------------------------------------------


def _mark_path(recipe_path: Path, options: BuildOptions) -> Path:
    return Path(options.state_dir) / "validated" / (hashlib.sha256(str(recipe_path.resolve()).encode()).hexdigest() + ".json")


def _file_digests(paths) -> dict:
    out = {}
    for p in paths:
        try:
            out[str(Path(p).resolve())] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        except OSError:
            out[str(Path(p).resolve())] = None
    return out


_LOADED: dict = {}  # (cwd, recipe path, outside-root setting) -> (its files' stat signature, the loaded recipe), per build


def _signature(files) -> tuple | None:
    try:
        return tuple((str(f), st.st_mtime_ns, st.st_size, st.st_ino) for f in files for st in [os.stat(f)])
    except OSError:
        return None


def load_for_build(recipe_path, options: BuildOptions):
    """Load a recipe, skipping the schema pass when these exact files passed it before. A build's tasks
    load their recipe once per process: generating them, then one action per stage and output would
    otherwise parse the same YAML again each time (a tenth of a warm build's time)."""
    from mlqpipe import __version__
    from mlqpipe.recipe import load_recipe

    memo = (os.getcwd(), str(Path(recipe_path).resolve()), options.allow_outside_root)
    known = _LOADED.get(memo)
    if known is not None and known[0] is not None and _signature(known[1].files) == known[0]:
        return known[1]
    recipe = _load_checked(Path(recipe_path), options, __version__, load_recipe)
    _LOADED[memo] = (_signature(recipe.files), recipe)
    return recipe


def _load_checked(recipe_path: Path, options: BuildOptions, __version__, load_recipe):
    mark = _mark_path(recipe_path, options)
    try:
        known = json.loads(mark.read_text())
        trusted = known.get("version") == __version__ and known["files"] == _file_digests(known["files"])
    except (OSError, ValueError, KeyError):
        trusted = False
    recipe = load_recipe(recipe_path, schema=not trusted, allow_outside_root=options.allow_outside_root)
    if not trusted:
        from mlqpipe.fileio import atomic_write

        atomic_write(mark, json.dumps({"version": __version__, "files": _file_digests(recipe.files)}, sort_keys=True).encode())
    return recipe


# --- keys -----------------------------------------------------------------------------------------------


def stage_configs(recipe, job, options: BuildOptions) -> list[dict]:
    """What determines each stage's bytes, as written in the recipe: the stage (with per-model overrides),
    the rules it applies, custom code's source, and the versions and salt. Names and comments do not count."""
    from mlqpipe.recipe.custom import locate

    configs = []
    rules_doc = recipe.document.get("rules") or {}
    for stage in job.stages:
        code = {}
        refs = [stage.function] + [recipe.rule(r).python for r in stage.rules]
        for ref in filter(None, refs):
            spec = locate(ref.partition(":")[0], recipe.python_path)
            origin = spec.origin if spec and spec.origin and os.path.isfile(spec.origin) else None
            code[ref] = hashlib.sha256(Path(origin).read_bytes()).hexdigest() if origin else None
        stage_doc = {k: v for k, v in asdict(stage).items() if k != "name"}
        configs.append({
            **({"deployment_target": job.deployment_target} if job.deployment_target and not configs else {}),
            "stage": stage_doc,
            "rules": [[name, rules_doc.get(name)] for name in stage.rules],
            "code": code,
            "kernel": KERNEL_VERSION,
            "format": CACHE_FORMAT,
            "salt": options.salt,
        })
    return configs


def chain_keys(input_digest: str, configs: list[dict]) -> list[str]:
    """key_i = sha256(key_{i-1} or the input digest, config_i): full digests, canonical JSON."""
    keys, prev = [], {"input": input_digest}
    for config in configs:
        key = digest_of({"previous": prev, "config": config})
        keys.append(key)
        prev = key
    return keys


def _quality_config(recipe, job) -> dict:
    """What the report and gates depend on besides the stages (as written)."""
    doc = recipe.document
    return {
        "gates": asdict(job.gates),
        "evaluation": None if job.evaluation is None else {**asdict(job.evaluation), "data": str(job.evaluation.data)},
        "rule_gates": {r.name: r.min_snr_db for r in recipe.rules if r.min_snr_db is not None},
        "report": doc.get("report"),
    }


# --- tasks ----------------------------------------------------------------------------------------------


def _task_prefix(recipe_path: Path, job) -> str:
    """Task names are basenames (no ':'), so they can name each other in task_dep from any dodo.py."""
    model = Path(os.path.relpath(job.input, Path(recipe_path).parent)).as_posix()
    return f"mlqpipe/{Path(_posix(recipe_path)).with_suffix('').as_posix()}/{model}"


def tasks_from_recipes(*patterns, options: BuildOptions | None = None, subtasks_of: str | None = None, **kwargs):
    """doit task dicts for every recipe matching `patterns` (paths or globs).

    Use from your dodo.py:
        from mlqpipe.build import tasks_from_recipes, DOIT_CONFIG
        def task_quantize():
            yield from tasks_from_recipes("recipes/*.yaml")

    `subtasks_of`: the name of the task generator yielding them, when doit creates its tasks late
    (`@create_after`, e.g. after a search): doit runs only subtasks of such a generator, so the tasks are
    yielded as its subtasks ("quantize:mlqpipe/..."), naming each other so.
    """
    tasks = _tasks_from_recipes(patterns, options or BuildOptions(**kwargs))
    if subtasks_of is None:
        yield from tasks
        return
    for task in tasks:
        task = dict(task)
        task["name"] = task.pop("basename")
        task["task_dep"] = [f"{subtasks_of}:{d}" for d in task.get("task_dep", ())]
        yield task


def _tasks_from_recipes(patterns, options: BuildOptions):
    import glob as _glob

    from doit.tools import config_changed

    Path(options.state_dir).mkdir(parents=True, exist_ok=True)  # doit's sqlite3 dep file lives here
    _LOADED.clear()  # a new build reads its recipes and inputs afresh (file times are too coarse to tell a quick edit)
    _DIGESTS.clear()
    paths = []
    for pattern in patterns:
        found = sorted(_glob.glob(str(pattern), recursive=True)) if _glob.has_magic(str(pattern)) else [str(pattern)]
        paths += found
    from mlqpipe.errors import RecipeError
    from mlqpipe.recipe import check_recipe_collisions
    from mlqpipe.recipe.load import for_building

    recipes, problems = [], []
    for path in paths:
        try:
            recipes.append(load_for_build(path, options))
        except RecipeError as e:
            problems += e.problems or [Problem(path, 0, 0, "", str(e))]
    try:
        recipes, unresolved = for_building(recipes, lambda p: load_for_build(p, options))
    except RecipeError as e:
        recipes, unresolved = [], e.problems or [Problem("", 0, 0, "", str(e))]
    problems += unresolved
    problems += check_recipe_collisions(recipes)
    if problems:
        yield {"basename": "mlqpipe-invalid-recipes", "actions": [(report_problems, [[str(p) for p in problems]])], "verbosity": 2}
        return
    outputs = []
    for recipe in recipes:
        for job in recipe.models:
            if not in_shard(job.output, options.shard):
                continue  # another shard's (a CI job of its own builds it, sharing the cache)
            yield from _job_tasks(recipe, job, options)
            outputs.append((f"{_task_prefix(recipe.path, job)}/output", str(job.output)))
    recipe_names = [_posix(r.path) for r in recipes]
    if options.lock_file:
        yield {
            "basename": "mlqpipe-lock",
            "actions": [(write_lock, [[o for _, o in outputs], recipe_names, options.as_args()])],
            "task_dep": [name for name, _ in outputs],
            # each output's lock entry (its digest, gates, keys; a file even when the output is a directory)
            # and the recipes: a change to one model's settings refreshes the recorded recipe digest of every output
            "file_dep": [str(_entry_path(options, o)) for _, o in outputs] + sorted({str(f) for r in recipes for f in r.files}),
            "targets": [options.lock_file],
            "meta": {"mlqpipe": {"outputs": [o for _, o in outputs], "recipes": recipe_names}},
            "uptodate": [config_changed({"kernel": KERNEL_VERSION, "outputs": [o for _, o in outputs]})],
            "doc": "record inputs, recipe, stage keys and output digests of every output",
            "clean": True,
        }


def input_files(path) -> tuple[list[str], list[str]]:
    """What doit tracks of a model input: the file itself, or every file of a directory artifact (an
    .mlpackage), plus the directory's file list (a removed file changes it; doit only sees changed ones)."""
    from mlqpipe.artifacts import tree_files

    p = Path(path)
    if not p.is_dir():
        return [str(path)], []
    try:
        files = tree_files(p)
    except (OSError, ValueError):  # unreadable or holding a link: loading the model says why
        return [], [str(path)]
    return [str(f) for f in files], [f.relative_to(p).as_posix() for f in files]


def _job_tasks(recipe, job, options: BuildOptions):
    from doit.tools import config_changed

    prefix = _task_prefix(recipe.path, job)
    configs = stage_configs(recipe, job, options)
    args = [str(recipe.path), str(job.input), options.as_args()]
    deps, listing = input_files(job.input)
    previous = None
    for i, stage in enumerate(job.stages):
        name = f"{prefix}/{i + 1}-{stage.name}"
        yield {
            "basename": name,
            "actions": [(run_stage_action, args + [i])],
            "file_dep": deps,
            "task_dep": [previous] if previous else [],
            "uptodate": [config_changed({"chain": digest_of(configs[: i + 1]), **({"files": listing} if listing else {})})],
            "doc": f"{stage.label} on {_rel(job.input)}",
            "verbosity": 0,
        }
        previous = name
    reports = [str(p) for p in recipe.written_reports(job)]  # targets: `doit clean` removes them with the output
    evaluation_files = [str(job.evaluation.data)] if job.evaluation and job.evaluation.data else []
    yield {
        "basename": f"{prefix}/output",
        "actions": [(write_output_action, args)],
        "file_dep": deps + evaluation_files,
        "task_dep": [previous] if previous else [],
        "targets": [str(job.output)] + reports + [str(_entry_path(options, job.output))],
        "meta": {"mlqpipe": {"recipe": str(recipe.path), "input": str(job.input), "output": str(job.output),
                             "json_report": next((r for r in reports if r.endswith(".report.json")), None)}},
        "uptodate": [config_changed({"chain": digest_of(configs), "output": str(job.output), "quality": _quality_config(recipe, job),
                                     "lock_format": LOCK_FORMAT,  # a new lock format re-records every output once
                                     **({"files": listing} if listing else {})})],
        "clean": True,
        "doc": f"write {_rel(job.output)}",
    }


# --- actions (module level, plain arguments: picklable for doit -n under spawn) ------------------------------


def report_problems(lines) -> bool:
    import sys

    print(f"mlqpipe: error: {len(lines)} problem{'s' if len(lines) != 1 else ''} in recipes:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return False


def _context(recipe_path, input_path, options_dict):
    options = BuildOptions(**options_dict)
    recipe = load_for_build(recipe_path, options)
    job = next(j for j in recipe.models if str(j.input) == input_path)
    return options, recipe, job


def _log(options: BuildOptions, event: dict) -> None:
    log = Path(options.state_dir) / "run.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, sort_keys=True) + "\n")


ROWS = "report_rows"  # in a stage's cache manifest: the report rows of every stage up to it, one list per stage


_DIGESTS: dict = {}  # input path -> (its files' stat signature, its digest), per build


def _input_digest(path, data=None) -> str:
    """The digest of a model input, read and hashed once per build while its files are unchanged: a warm
    build's stage tasks need only their keys, and the output task reads the input anyway."""
    from mlqpipe.artifacts import ArtifactError, tree_files

    try:
        signature = _signature(tree_files(path))
    except (OSError, ArtifactError):
        signature = None
    known = _DIGESTS.get(str(path))
    if signature is not None and known is not None and known[0] == signature and data is None:
        return known[1]
    digest = artifact_digest(_read_artifact(path) if data is None else data)
    _DIGESTS[str(path)] = (signature, digest)
    return digest


def _chain_start(options, recipe, job, read: bool = True):
    """The cache, the input as the cache keeps it (None unless `read`), and the stage keys chained from
    its digest."""
    from mlqpipe.build.cache import open_cache

    cache = open_cache(options)
    data = _read_artifact(job.input) if read else None
    return cache, data, chain_keys(_input_digest(job.input, data), stage_configs(recipe, job, options))


def _stage_chain(options, recipe, job, upto: int, keep_all: bool = False, start_with=None) -> tuple[list[bytes], list[str], bool]:
    """The model after stage `upto` (-1: the input), from the cache or computed, with the stage keys and
    whether any stage had to be computed. With `keep_all`, every step: [input, after stage 0, ...].
    A computed stage is stored with its report rows and those of the stages before it (`ROWS`), so the
    output task can write the report from the final entry alone."""
    fmt = _input_format(job)
    cache, data, keys = start_with or _chain_start(options, recipe, job)
    steps, start = [data if data is not None else _read_artifact(job.input)], 0
    if keep_all:  # every step is wanted: take cached stages in order up to the first miss
        for i in range(upto + 1):
            hit = cache.get_artifact(keys[i])
            if hit is None:
                break
            steps.append(hit)
            start = i + 1
    else:  # only the last is wanted: start from the furthest cached stage
        for i in range(upto, -1, -1):
            hit = cache.get_artifact(keys[i])
            if hit is not None:
                steps, start = [hit], i + 1
                break
    computed = start <= upto
    if computed:
        from mlqpipe.engine.execute import run_stage
        from mlqpipe.quality.report import rows_of_stage

        rows = [] if start == 0 else _cached_rows(cache, keys[start - 1], start)
        model = fmt.from_artifact(steps[-1], str(job.input))
        if start == 0 and job.deployment_target:  # the recipe's explicit raise, before the first stage (in its key)
            from mlqpipe.engine.plan import raise_target

            raise_target(model, job, recipe)
        for i in range(start, upto + 1):
            before = fmt.from_artifact(steps[-1], str(job.input)) if rows is not None else None
            plan = run_stage(model, job.stages[i], recipe, allow_custom=options.allow_custom)
            if rows is not None:
                rows = rows + [rows_of_stage(before, model, job.stages[i], plan.decisions)]
            steps.append(fmt.to_artifact(model))
            cache.put_artifact(keys[i], steps[-1], {"stage": job.stages[i].name, "input": _rel(job.input), "recipe": _rel(recipe.path),
                                                    **({ROWS: rows} if rows is not None else {})})
    return steps, keys, computed


def _log_problems(options, cache) -> None:
    for problem in cache.problems:
        _log(options, {"event": "cache-problem", "message": problem})


def _cached_rows(cache, key: str, stages: int) -> list[list[dict]] | None:
    """The report rows of the first `stages` stages, from the manifest of the entry after them (None when
    it has none: an entry written before they were kept)."""
    rows = (cache.entry(key) or {}).get(ROWS)
    ok = isinstance(rows, list) and len(rows) == stages and all(isinstance(r, list) for r in rows)
    return rows if ok else None


def _final_from_cache(cache, keys: list[str], stages) -> tuple[bytes | dict, list[dict]] | None:
    """The final model and every stage's report rows from the last stage's entry alone, or None (then
    the chain is read, or computed, stage by stage). Names are not in the keys: rows take this recipe's."""
    if not keys:
        return None
    rows = _cached_rows(cache, keys[-1], len(stages))
    final = cache.get_artifact(keys[-1]) if rows is not None else None
    if final is None:
        return None
    return final, [{**row, "stage": stage.name} for stage, stage_rows in zip(stages, rows) for row in stage_rows]


def _input_format(job):
    from mlqpipe.formats.registry import format_for

    return format_for(job.input)


def _read_artifact(path) -> bytes | dict:
    """A model input as the cache keeps it: a file's bytes, or a directory's {relative path: bytes}."""
    from mlqpipe.artifacts import ArtifactError, read_tree
    from mlqpipe.errors import ModelError

    p = Path(path)
    try:
        return read_tree(p) if p.is_dir() else p.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{_rel(path)}: no such model") from None
    except (OSError, ArtifactError) as e:
        raise ModelError(f"{_rel(path)}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def artifact_digest(artifact: bytes | dict) -> str:
    """The digest of a model as the lock and the cache record it (artifacts.digest of the written file or tree)."""
    from mlqpipe.artifacts import mapping_digest

    return hashlib.sha256(artifact).hexdigest() if isinstance(artifact, bytes) else mapping_digest(artifact)


def _artifact_size(artifact: bytes | dict) -> int:
    return len(artifact) if isinstance(artifact, bytes) else sum(len(v) for v in artifact.values())


def lock_entry(recipe, job, *, status: str, output_sha256=None, input_sha256=None, keys=(), gates=(), failure=None) -> dict:
    """What the lock records about one output (see lock.py): no measured values, only digests, settings
    and verdicts, so two machines building the same thing write the same lock."""
    from mlqpipe.build.lock import artifact_sha256, file_sha256

    entry = {
        "status": status,
        "output_sha256": output_sha256,
        "inputs": {_posix(job.input): input_sha256 or artifact_sha256(job.input)},
        "recipe": _posix(recipe.path),
        "recipe_files": {_posix(p): file_sha256(p) for p in recipe.files},
        "data": {_posix(job.evaluation.data): file_sha256(job.evaluation.data)} if job.evaluation and job.evaluation.data else {},
        "stage_keys": list(keys),
        "gates": [{"gate": g["gate"], "threshold": g["threshold"], "passed": g["passed"],
                   **({"applied": False} if not g.get("applied", True) else {})} for g in gates],
        "reports": [_posix(p) for p in recipe.written_reports(job)],
    }
    if failure:
        entry["failure"] = failure
    return entry


def _record(options: BuildOptions, job, entry: dict) -> None:
    """Keep this output's entry for the lock task, and put it in the lock file now: a failed output must
    show as failed there even though doit never runs the lock task after a failure."""
    from mlqpipe.fileio import atomic_write
    from mlqpipe.build.lock import current_versions, update_lock

    atomic_write(_entry_path(options, job.output), json.dumps(entry, sort_keys=True).encode())
    if options.lock_file:
        update_lock(options.lock_file, options.state_dir, current_versions(KERNEL_VERSION), put={_posix(job.output): entry})


def _failed(options, recipe, job, error, failure="error", gates=(), line=None) -> bool:
    """A failed output: one located line (the text `mlqpipe quantize` prints), nothing left at the output
    path, and the lock entry marked failed."""
    import sys

    from mlqpipe.engine.execute import remove_output

    print(line or f"mlqpipe: error: {error}", file=sys.stderr)
    _log(options, {"event": "failed", "recipe": _posix(recipe.path), "input": str(job.input), "output": _posix(job.output),
                   "failure": failure, "message": str(error)})
    remove_output(job)
    _record(options, job, lock_entry(recipe, job, status="failed", gates=gates, failure=failure))
    return False


def run_stage_action(recipe_path, input_path, options_dict, index) -> dict | bool:
    from mlqpipe.errors import MlqpipeError

    options, recipe, job = _context(recipe_path, input_path, options_dict)
    try:
        chain = _chain_start(options, recipe, job, read=False)  # a cached stage needs its key, not the input
        cache, _, keys = chain
        # nothing to do when this stage's entry, or the final one, is cached: the output task reads the final
        # entry only, so a warm cache (a remote one especially) is never asked for intermediate models
        computed = False
        if all(cache.entry(key) is None for key in dict.fromkeys((keys[-1], keys[index]))):
            _, keys, computed = _stage_chain(options, recipe, job, index, start_with=chain)
        _log_problems(options, cache)
    except MlqpipeError as e:
        return _failed(options, recipe, job, e)
    _log(options, {"event": "stage", "recipe": recipe_path, "input": input_path, "stage": job.stages[index].name, "computed": computed})
    return {"key": keys[index], "computed": computed}


def write_output_action(recipe_path, input_path, options_dict):
    """Assess the final model (evaluation, report, gates); write the report, and the output only when every
    gate passed. A failed gate fails the task with the gate's message, removes an older output and marks
    the output failed in the lock."""
    from mlqpipe.build.cache import evaluation_dir
    from mlqpipe.engine.execute import finish_job
    from mlqpipe.engine.plan import decide_stage, matchers_for
    from mlqpipe.errors import MlqpipeError
    from mlqpipe.quality.gates import GateFailure

    options, recipe, job = _context(recipe_path, input_path, options_dict)
    try:
        fmt = _input_format(job)
        chain = _chain_start(options, recipe, job)
        input_sha256 = _DIGESTS[str(job.input)][1]  # what _chain_start just chained the keys from
        cached = _final_from_cache(chain[0], chain[2], job.stages)
        if cached is not None:  # the input (a local file) and the final entry: no intermediate model is read
            (data, rows), keys, computed = cached, chain[2], False
            steps = [chain[1], data]
            snapshots, plans = [fmt.from_artifact(step, str(job.input)) for step in steps], None
        else:
            steps, keys, computed = _stage_chain(options, recipe, job, len(job.stages) - 1, keep_all=True, start_with=chain)
            snapshots, rows = [fmt.from_artifact(step, str(job.input)) for step in steps], None
            decisions = [
                [] if stage.mode == "fold" else decide_stage(snapshots[i], stage, recipe, matchers_for(stage, recipe, options.allow_custom))[0]
                for i, stage in enumerate(job.stages)
            ]
            plans = _plans(job.stages, decisions)
        _log_problems(options, chain[0])
        data = steps[-1]
        final = fmt.from_artifact(data, str(job.input))  # the output (its own object: saving may mark it)
        # a read-only (shared) cache is not written: the float outputs are then recomputed each time
        report = finish_job(job, recipe, final, snapshots, plans, cache_dir=evaluation_dir(options), rows=rows)
    except GateFailure as e:
        return _failed(options, recipe, job, e, "gates", e.report["gates"], line=f"mlqpipe: {e}")
    except MlqpipeError as e:
        return _failed(options, recipe, job, e)
    entry = lock_entry(recipe, job, status="passed", output_sha256=artifact_digest(data), input_sha256=input_sha256,
                       keys=keys, gates=report["gates"])
    _record(options, job, entry)
    _log(options, {"event": "output", "recipe": recipe_path, "input": input_path, "output": _posix(job.output), "computed": computed,
                   "bytes_before": _artifact_size(steps[0]), "bytes_after": _artifact_size(data)})
    return {"output_sha256": entry["output_sha256"]}


def _plans(stages, decisions):
    from mlqpipe.engine.plan import StagePlan

    return [StagePlan(stage, d) for stage, d in zip(stages, decisions)]


def _entry_path(options: BuildOptions, output) -> Path:
    return Path(options.state_dir) / "entries" / (hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest() + ".json")


def write_lock(outputs, recipes, options_dict) -> None:
    """After every output of the build: the entries of this build's outputs, with their recipe files'
    digests as they are now (an output whose recipe changed only elsewhere is still what the recipe says);
    entries of outputs this build's recipes no longer make are dropped, other recipes' kept (building a
    subset of recipes does not forget the rest). The file is rewritten only when its text changes."""
    from mlqpipe.build.lock import current_versions, file_sha256, update_lock

    options = BuildOptions(**options_dict)
    entries = {}
    for out in outputs:
        entry = json.loads(_entry_path(options, out).read_text(encoding="utf-8"))
        entry["recipe_files"] = {p: file_sha256(p) for p in entry["recipe_files"]}
        entries[_posix(out)] = entry

    def keep(out, entry):
        if not in_shard(out, options.shard):
            return False  # a partial lock holds its own shard's outputs only
        return out in entries or (entry.get("recipe") not in recipes and Path(entry.get("recipe", "")).is_file())

    update_lock(options.lock_file, options.state_dir, current_versions(KERNEL_VERSION), put=entries, keep=keep)
    from mlqpipe.build.store import is_url

    if is_url(options.cache_dir):  # the final entries' manifests in one remote object, for fresh checkouts
        from mlqpipe.build.cache import locked_keys, open_cache

        open_cache(options, prefetch=False).put_bundle(locked_keys(options))
