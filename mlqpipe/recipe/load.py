"""Loading a recipe: YAML with positions -> `extends` merge -> JSON Schema -> checks a schema cannot make
-> typed Recipe. Every problem found is reported at once, each at its file:line."""

from __future__ import annotations

import glob
import os
import re
import string
from dataclasses import replace
from pathlib import Path

from mlqpipe.fileio import shown_path as _shown
from mlqpipe.recipe.custom import find_code
from mlqpipe.recipe.problems import Problem, dotted, raise_problems
from mlqpipe.recipe.schema_check import did_you_mean, schema_problems, stage_nbits
from mlqpipe.recipe.source import read_source
from mlqpipe.recipe.types import (
    STAGE_SETTINGS, Candidate, CoremltoolsSelector, Evaluation, Gates, ModelJob, Range, Recipe, Report, Rule, Search, Stage,
)

_PLACEHOLDERS = {"stem", "name", "dir", "recipe"}
_RANGES = ("count", "in_channels", "out_channels", "kernel_channels", "layer_weight_count")


class _Located:
    """A merged document plus, for every path, the file and position it came from."""

    def __init__(self):
        self.data = None
        self.positions: dict = {}
        self.keys: dict = {}

    def locate(self, path, key: bool = False):
        path = tuple(path)
        while True:
            if key and path in self.keys:
                return self.keys[path]
            if path in self.positions:
                return self.positions[path]
            if not path:
                return ("<recipe>", 0, 0)
            path = path[:-1]
            key = False

    def problem(self, path, message, hint="", key=False) -> Problem:
        file, line, col = self.locate(path, key)
        return Problem(file, line, col, dotted(path), message, hint)



def _read_chain(path: Path, problems: list[Problem], seen: tuple[Path, ...] = ()) -> tuple[_Located, list[Path]]:
    """Read a recipe and the files it extends, merged; base values keep their own file positions."""
    src, found = read_source(path, _shown(path))
    problems += found
    here = _Located()
    here.data = src.data
    here.positions = {p: (src.file, *pos) for p, pos in src.positions.items()}
    here.keys = {p: (src.file, *pos) for p, pos in src.key_positions.items()}
    files = [path]
    if found or not isinstance(src.data, dict) or "extends" not in src.data:
        return here, files
    target = src.data["extends"]
    if not isinstance(target, str):
        return here, files  # the schema reports the type
    base_path = (path.parent / target).resolve()
    if base_path in seen + (path.resolve(),):
        problems.append(here.problem(("extends",), f"'{target}' extends itself (cycle through {', '.join(_shown(p) for p in seen + (path,))})"))
        return here, files
    if not base_path.is_file():
        problems.append(here.problem(("extends",), f"extended recipe '{target}' not found", f"path is relative to {_shown(path.parent)}"))
        return here, files
    base, base_files = _read_chain(base_path, problems, seen + (path.resolve(),))
    if not isinstance(base.data, dict):
        return here, files + base_files
    child = {k: v for k, v in src.data.items() if k != "extends"}
    replaced: list[tuple] = []
    merged = _Located()
    merged.data = _merge(base.data, child, (), replaced)
    merged.positions, merged.keys = dict(base.positions), dict(base.keys)
    for table in (merged.positions, merged.keys):  # positions of base values the child replaced go
        for p in [p for p in table if any(p[: len(r)] == r for r in replaced)]:
            del table[p]
    merged.positions.update(here.positions)
    merged.keys.update(here.keys)
    return merged, files + base_files


def _merge(base, child, path: tuple, replaced: list):
    """Mappings merge key by key (child wins); anything else the child gives replaces the base's."""
    if isinstance(base, dict) and isinstance(child, dict):
        out = dict(base)
        for k, v in child.items():
            out[k] = _merge(base[k], v, path + (k,), replaced) if k in base else v
        return out
    replaced.append(path)
    return child


def load_recipe(path, *, project_root=None, check_files: bool = True, schema: bool = True,
                allow_outside_root: bool = False) -> Recipe:
    """Load and validate one recipe; raises RecipeError listing every problem with its location.

    `schema=False` skips the JSON Schema pass (and the jsonschema import): only for recipe files whose
    exact content has already passed it (the build remembers those by digest)."""
    path = Path(path)
    problems: list[Problem] = []
    doc, files = _read_chain(path, problems)
    if problems:
        raise_problems(problems)
    if not isinstance(doc.data, dict):
        raise_problems([doc.problem((), "a recipe is a mapping of keys (version, models, rules, stages, ...)", "start with `version: 1`")])
    if schema:
        problems += schema_problems(doc.data, doc.locate)
    if problems:
        raise_problems(problems)
    recipe = _build(path, files, doc, problems, project_root, check_files, allow_outside_root)
    raise_problems(problems)
    return recipe


def _tuple(v) -> tuple:
    return () if v is None else (tuple(v) if isinstance(v, list) else (v,))


def _range(v) -> Range | None:
    return Range(v.get("min"), v.get("max")) if isinstance(v, dict) else None


def _build(path: Path, files, doc: _Located, problems: list[Problem], project_root, check_files: bool,
           allow_outside_root: bool = False) -> Recipe:
    data = doc.data
    base_dir = path.parent
    root = Path(project_root) if project_root else Path.cwd()
    python_path = tuple(dict.fromkeys([base_dir.resolve(), root.resolve()] + [(base_dir / p).resolve() for p in data.get("python_path", [])]))

    rules = []
    for name, raw in (data.get("rules") or {}).items():
        rules.append(_rule(name, raw, doc, problems, python_path))
    rule_names = [r.name for r in rules]

    stages = []
    for i, raw in enumerate(data.get("stages") or []):
        stages.append(_stage(i, raw, doc, problems, rule_names, python_path))
    names = [s.name for s in stages]
    for i, name in enumerate(names):
        if names.index(name) != i:
            problems.append(doc.problem(("stages", i, "name"), f"duplicate stage name '{name}'", "stage names must be unique"))
    search = _search(data["search"], doc, problems, rule_names, python_path, base_dir, check_files) if data.get("search") else None
    used = {r for s in stages for r in s.rules} | set(search.rules if search else ())
    resolved = "search" in data and data["search"] is None  # a search's result: the rules it searched may go unused
    for r in rules:
        if r.name not in used and not resolved:
            problems.append(doc.problem(("rules", r.name), f"rule '{r.name}' is not used by any stage", "list it in a stage's rules, or delete it", key=True))

    if data.get("models") and not stages and search is None:
        problems.append(doc.problem(("models",), "models are listed but there are no stages", "add stages: [...]"))
    defaults = data.get("defaults") or {}
    base_gates = _gates(data.get("gates"))
    models = []
    for i, entry in enumerate(data.get("models") or []):
        models += _jobs(i, entry, defaults, doc, problems, base_dir, path, stages, base_gates, check_files,
                        None if allow_outside_root else root.resolve())
    _check_collisions(models, doc, problems)
    report = data.get("report") or {}
    return Recipe(
        path=path,
        files=tuple(files),
        rules=tuple(rules),
        stages=tuple(stages),
        models=tuple(models),
        report=Report(tuple(report.get("formats", ("json", "markdown"))), report.get("path")),
        gates=base_gates,
        python_path=python_path,
        search=search,
        document=data,
        locations=dict(doc.positions),
    )


def _rule(name, raw, doc, problems, python_path) -> Rule:
    at = ("rules", name)
    for i, pattern in enumerate(_tuple(raw.get("layer_regex"))):
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(doc.problem(at + ("layer_regex",) + ((i,) if isinstance(raw["layer_regex"], list) else ()),
                                        f"invalid regular expression {pattern!r}: {e}", "regexes must match the whole layer name"))
    for key in _RANGES:
        r = raw.get(key)
        if r and r.get("min") is not None and r.get("max") is not None and r["min"] > r["max"]:
            problems.append(doc.problem(at + (key,), f"min {r['min']} is larger than max {r['max']}"))
    if raw.get("python"):
        err = find_code(raw["python"], python_path)
        if err:
            problems.append(doc.problem(at + ("python",), err, "custom code is searched in: " + ", ".join(_shown(p) for p in python_path)))
    sel = raw.get("coremltools_selector")
    selector = None
    if sel:
        selector = CoremltoolsSelector(sel["type"], tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in sel.items() if k != "type")))
        problems += _selector_problems(sel, doc, at + ("coremltools_selector",))
    gates = raw.get("gates") or {}
    return Rule(
        name=name,
        layer=_tuple(raw.get("layer")),
        layer_regex=_tuple(raw.get("layer_regex")),
        layer_type=_tuple(raw.get("layer_type")),
        field=_tuple(raw.get("field")),
        network=_tuple(raw.get("network")),
        function=_tuple(raw.get("function")),
        position=_tuple(raw.get("position")),
        count=_range(raw.get("count")),
        in_channels=_range(raw.get("in_channels")),
        out_channels=_range(raw.get("out_channels")),
        kernel_channels=_range(raw.get("kernel_channels")),
        layer_weight_count=_range(raw.get("layer_weight_count")),
        depthwise=raw.get("depthwise"),
        storage=_tuple(raw.get("storage")),
        coremltools_selector=selector,
        python=raw.get("python"),
        exclude=bool(raw.get("exclude", False)),
        optional=bool(raw.get("optional", False)),
        min_snr_db=gates.get("min_snr_db"),
    )


_SELECTOR_KEYS = {
    "default": set(),
    "advanced": {"skip_layer_types", "minimum_conv_kernel_channels", "minimum_conv_weight_count"},
    "matrix_multiply": {"minimum_weight_count", "minimum_input_channels", "minimum_output_channels",
                        "maximum_input_channels", "maximum_output_channels", "include_layers_with_names"},
}


def _selector_problems(sel, doc, at) -> list[Problem]:
    from mlqpipe.formats.nn.layers import COREMLTOOLS_SELECTOR_TYPES as _QUANTIZABLE

    out = []
    allowed = _SELECTOR_KEYS[sel["type"]]
    for k in sel:
        if k != "type" and k not in allowed:
            out.append(doc.problem(at + (k,), f"'{k}' is not a setting of the {sel['type']} selector",
                                   f"its settings: {', '.join(sorted(allowed)) or 'none'}", key=True))
    for i, t in enumerate(sel.get("skip_layer_types", [])):
        if t not in _QUANTIZABLE:
            out.append(doc.problem(at + ("skip_layer_types", i), f"'{t}' is not a layer type coremltools quantizes",
                                   did_you_mean(t, sorted(_QUANTIZABLE)) or "see coremltools' QuantizedLayerSelector"))
    return out


_ML_KEYS = tuple(k for k in STAGE_SETTINGS if k not in ("nbits", "function", "coremltools_rounding"))


def _prune_problems(at, raw, doc) -> list:
    """coremltools' pruner rules the schema does not spell: which keys go with which way of pruning."""
    out = []
    if raw.get("mode") != "prune":
        return out
    pairs = [("block_size", "target_sparsity", "block pruning needs target_sparsity"),
             ("minimum_sparsity", "threshold", "minimum_sparsity goes with threshold pruning")]
    for key, needs, why in pairs:
        if key in raw and needs not in raw:
            out.append(doc.problem(at + (key,), f"'{key}' without '{needs}'", why, key=True))
    if "dim" in raw and not ("block_size" in raw or "n_m" in raw):
        out.append(doc.problem(at + ("dim",), "'dim' without 'block_size' or 'n_m'", "dim says where blocks or n:m runs lie", key=True))
    if "n_m" in raw and raw["n_m"][0] > raw["n_m"][1]:
        out.append(doc.problem(at + ("n_m",), f"n_m {raw['n_m']}: n must not exceed m", "e.g. n_m: [2, 4]"))
    if isinstance(raw.get("block_size"), int) and raw["block_size"] < 2:
        out.append(doc.problem(at + ("block_size",), f"block_size {raw['block_size']} is not a block", "prune blocks of 2 or more channels"))
    return out


def _stage(i, raw, doc, problems, rule_names, python_path) -> Stage:
    at = ("stages", i)
    mode = raw["mode"]
    problems += _prune_problems(at, raw, doc)
    for j, name in enumerate(raw.get("rules", [])):
        if name not in rule_names:
            problems.append(doc.problem(at + ("rules", j), f"no rule named '{name}'",
                                        did_you_mean(name, rule_names) or f"defined rules: {', '.join(rule_names) or 'none'}"))
    if raw.get("function"):
        err = find_code(raw["function"], python_path)
        if err:
            problems.append(doc.problem(at + ("function",), err, "custom code is searched in: " + ", ".join(_shown(p) for p in python_path)))
    return Stage(
        name=raw.get("name") or f"{i + 1}-{mode}",
        mode=mode,
        nbits=raw.get("nbits"),
        rules=tuple(raw.get("rules", ())),
        function=raw.get("function"),
        fold=tuple(raw.get("fold", ("batchnorm", "scale", "bias") if mode == "fold" else ())),
        coremltools_rounding=bool(raw.get("coremltools_rounding", False)),
        **{k: (tuple(raw[k]) if isinstance(raw[k], list) else raw[k]) for k in _ML_KEYS if k in raw},
    )


def _candidates(raw: list, at: tuple, doc, problems, rule: str, python_path) -> tuple[Candidate, ...]:
    """A search's candidates, each checked as the stage it becomes (its rules: the group's), keep first."""
    from mlqpipe.recipe.schema_check import stage_problems

    out = [Candidate(None)]
    for j, raw_candidate in enumerate(raw):
        if raw_candidate == "keep":
            continue
        if raw_candidate["mode"] in ("fold", "dequantize"):
            problems.append(doc.problem(at + (j, "mode"), f"mode {raw_candidate['mode']} is not a compression the search can choose",
                                        "candidates compress weights: fp16, linear, kmeans_lut, ..., or keep"))
            continue
        stage_raw = {**raw_candidate, "rules": [rule]}
        found = stage_problems(stage_raw, doc.locate, at + (j,))
        if found:
            problems += found
            continue
        stage = _stage(0, stage_raw, doc, problems, [rule], python_path)
        candidate = Candidate(stage, at + (j,))
        out.append(replace(candidate, stage=replace(stage, name=f"search {rule}: {candidate.label}")))
    labels = [c.label for c in out]
    for j, label in enumerate(labels):
        if labels.index(label) != j:
            problems.append(doc.problem(at, f"candidate '{label}' is listed twice", "list each setting once"))
    return tuple(out)


def _search(raw: dict, doc, problems, rule_names, python_path, base_dir: Path, check_files: bool) -> Search:
    at = ("search",)
    listed = raw["rules"]
    names = list(listed) if isinstance(listed, (list, dict)) else []
    for j, name in enumerate(names):
        if name not in rule_names:
            where = at + ("rules", name) if isinstance(listed, dict) else at + ("rules", j)
            problems.append(doc.problem(where, f"no rule named '{name}'", did_you_mean(name, rule_names) or
                                        f"defined rules: {', '.join(rule_names) or 'none'}", key=isinstance(listed, dict)))
    common = _candidates(raw["candidates"], at + ("candidates",), doc, problems, "{rule}", python_path)
    candidates = {}
    for name in names:
        own = listed.get(name) if isinstance(listed, dict) else None
        if own:
            candidates[name] = _candidates(own, at + ("rules", name), doc, problems, name, python_path)
        else:
            candidates[name] = tuple(Candidate(replace(c.stage, rules=(name,), name=f"search {name}: {c.label}") if c.stage else None, c.at)
                                     for c in common)
    gates = _gates(raw["gates"]) if raw.get("gates") else None
    return Search(rules=tuple(names), candidates=candidates, per_weight=bool(raw.get("per_weight", False)),
                  evaluation=_evaluation(raw.get("evaluation"), base_dir, doc, at + ("evaluation",), problems, check_files),
                  gates=gates, max_size_bytes=raw.get("max_size_bytes"), output=raw.get("output", "{recipe}.resolved.yaml"))


def _gates(raw) -> Gates:
    raw = raw or {}
    return Gates(**{k: raw.get(k) for k in Gates.__dataclass_fields__})


def _evaluation(raw, base_dir: Path, doc, at, problems, check_files) -> Evaluation | None:
    if not raw:
        return None
    data = base_dir / raw["data"] if raw.get("data") else None
    if data is not None and check_files and not data.is_file():
        problems.append(doc.problem(at + ("data",), f"evaluation data '{raw['data']}' not found", f"path is relative to {_shown(base_dir)}"))
    return Evaluation(data, tuple(sorted((raw.get("inputs") or {}).items())), raw.get("labels"), raw.get("random_inputs"),
                      bool(raw.get("allow_unevaluated", False)), raw.get("max_samples"), raw.get("memory_mb"))


def _jobs(i, entry, defaults, doc, problems, base_dir: Path, recipe_path: Path, stages, base_gates, check_files,
          confine_to: Path | None = None) -> list[ModelJob]:
    at = ("models", i)
    settings = {**defaults, **{k: v for k, v in entry.items() if k != "input"}}
    template = settings.get("output")
    if not template:
        problems.append(doc.problem(at, "no output path", "give output: build/{stem}.q.mlmodel here or under defaults"))
        return []
    try:
        bad = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None and f not in _PLACEHOLDERS]
    except ValueError as e:  # an unmatched brace
        problems.append(doc.problem(at + ("output",), f"output {template!r} is not a valid path template ({e})",
                                    "placeholders are written {stem}; write {{ or }} for a literal brace"))
        return []
    if bad:
        problems.append(doc.problem(at + ("output",), f"unknown placeholder {{{bad[0]}}} in output", f"placeholders: {', '.join('{' + p + '}' for p in sorted(_PLACEHOLDERS))}"))
        return []
    pattern = entry["input"]
    matches = sorted(Path(p) for p in glob.glob(str(base_dir / pattern), recursive=True))
    if not glob.has_magic(pattern):
        matches = [base_dir / pattern]
    if check_files:
        if not matches or (not glob.has_magic(pattern) and not matches[0].exists()):
            problems.append(doc.problem(at + ("input",), f"no model file matches '{pattern}'", f"paths are relative to {_shown(base_dir)}"))
            return []
    overrides = settings.get("stages") or {}
    names = [s.name for s in stages]
    for name in overrides:
        if name not in names:
            problems.append(doc.problem(at + ("stages", name), f"no stage named '{name}' to override", did_you_mean(name, names) or f"stages: {', '.join(names)}", key=True))
    job_stages = []
    for s in stages:
        o = overrides.get(s.name) or {}
        if o.get("skip"):
            continue
        if "nbits" in o:
            if s.nbits is None:
                problems.append(doc.problem(at + ("stages", s.name, "nbits"), f"stage '{s.name}' ({s.mode}) takes no nbits"))
            elif not stage_nbits(s.mode)[0] <= o["nbits"] <= stage_nbits(s.mode)[1]:  # the schema's per-mode range
                lo, hi = stage_nbits(s.mode)
                problems.append(doc.problem(at + ("stages", s.name, "nbits"), f"{s.mode} needs nbits {lo}..{hi}"))
            s = replace(s, nbits=o["nbits"])
        job_stages.append(s)
    gates = _gates({**{k: v for k, v in base_gates.__dict__.items() if v is not None}, **(settings.get("gates") or {})})
    evaluation = _evaluation(settings.get("evaluation"), base_dir, doc, at + ("evaluation",), problems, check_files)
    jobs = []
    for m in matches:
        rel_dir = os.path.relpath(m.parent, base_dir)
        out = Path(os.path.normpath(base_dir / template.format(stem=m.stem, name=m.name, dir="" if rel_dir == "." else rel_dir, recipe=recipe_path.stem)))
        if confine_to is not None and not _inside(out, confine_to):
            problems.append(doc.problem(at + ("output",), f"output '{out}' is outside the project root {confine_to}",
                                        "outputs stay inside the project unless you pass --allow-outside-root (untrusted recipes must not write elsewhere)"))
            continue
        if check_files and out.resolve() == m.resolve():
            problems.append(doc.problem(at + ("output",), f"output '{_shown(out)}' is the input itself", "inputs are never modified: choose another output path"))
            continue
        jobs.append(ModelJob(m, out, tuple(job_stages), gates, evaluation, i, settings.get("deployment_target")))
    return jobs


def _inside(path: Path, root: Path) -> bool:
    """Whether `path` (symlinks in its existing parents followed) stays under `root`."""
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _check_collisions(jobs: list[ModelJob], doc, problems) -> None:
    seen: dict = {}
    for job in jobs:
        key = job.output.resolve()
        if key in seen:
            first = seen[key]
            problems.append(doc.problem(("models", job.entry, "output"),
                                        f"output '{_shown(job.output)}' is written twice: by '{_shown(first.input)}' (models[{first.entry}]) and '{_shown(job.input)}' (models[{job.entry}])",
                                        "make the output template unique, e.g. with {stem}"))
        else:
            seen[key] = job


def check_recipe_collisions(recipes: list[Recipe]) -> list[Problem]:
    """Two recipes writing the same output, or two models (of any recipes) the same report file — e.g.
    m.q.mlmodel and m.q.mlpackage, whose reports are both m.q.report.json: a problem naming both."""
    seen: dict = {}
    problems = []
    for r in recipes:
        for job in r.models:
            file, line, col = r.locations.get(("models", job.entry), (str(r.path), 0, 0))
            written = [("output", job.output)] + [("report", p) for p in r.written_reports(job)]
            for what, path in written:
                key = path.resolve()
                if key not in seen:
                    seen[key] = (r, job)
                    continue
                other, other_job = seen[key]
                if what == "output" and other is not r:
                    problems.append(Problem(file, line, col, f"models[{job.entry}].output",
                                            f"output '{_shown(job.output)}' is also written by {_shown(other.path)} (models[{other_job.entry}])",
                                            "each output must come from one recipe"))
                elif what == "report" and other_job is not job and (other is not r or other_job.output != job.output):
                    by = f"{_shown(other.path)} (models[{other_job.entry}], {_shown(other_job.input)})"
                    problems.append(Problem(file, line, col, f"models[{job.entry}]",
                                            f"report '{_shown(path)}' of {_shown(job.input)} is also written for {by}",
                                            "give this recipe a report path of its own, e.g. report: {path: 'build/{stem}.{recipe}'}"))
    return problems


def for_building(recipes: list[Recipe], load) -> tuple[list[Recipe], list[Problem]]:
    """The recipes a build or `mlqpipe quantize` builds: a recipe with a search stands for its resolved
    recipe (`load(path)` loads it; it must exist: `mlqpipe search` writes it), each recipe once."""
    out, problems, seen = [], [], set()
    for r in recipes:
        if r.search is not None:
            path = r.resolved_path
            if not path.is_file():
                file, line, col = r.locations.get(("search",), (str(r.path), 0, 0))
                problems.append(Problem(file, line, col, "search", f"{_shown(r.path)} searches; its result {_shown(path)} does not exist yet",
                                        f"run `mlqpipe search {_shown(r.path)}` (then build either recipe)"))
                continue
            r = load(path)
        key = Path(r.path).resolve()
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, problems

