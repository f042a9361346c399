"""JSON Schema validation that reports every violation at its file:line with a readable message."""

from __future__ import annotations

import difflib
import json

from mlqpipe.schema import recipe_schema
from mlqpipe.recipe.problems import Problem, dotted

# key -> (whether the hint names the modes that take it, else those that do not; the hint's end): the mode
# names come from the schema, itself kept equal to the mode registry by tests/recipe/test_schema_modes.py
_NOT_ALLOWED = {"nbits": (False, "stages take no nbits"),
                "function": (True, "stages take a function"),
                "fold": (True, "stages take a fold list"),
                "coremltools_rounding": (True, "stages round like coremltools"),
                **{key: (True, f"stages take {key}") for key in (
                    "dtype", "granularity", "block_size", "group_size", "channel_axis", "cluster_dim", "per_channel_scale",
                    "lut_dtype", "target_sparsity", "n_m", "dim", "threshold", "minimum_sparsity", "joint")}}


def did_you_mean(word, candidates) -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else ""


def schema_problems(doc, locate) -> list[Problem]:
    """All schema violations of `doc`; `locate(path, key=False)` gives (file, line, col)."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(recipe_schema())
    problems = []
    for error in validator.iter_errors(doc):
        problems += _explain(error, locate)
    return problems


def stage_problems(stage: dict, locate, at: tuple) -> list[Problem]:
    """Violations of the stage schema by `stage` (a search candidate made a stage), located at `at` — keys
    the candidate does not give (rules) are the search's, so a problem about them is not the user's."""
    from jsonschema import Draft202012Validator

    root = recipe_schema()
    validator = Draft202012Validator({**_stage_schema(), "$defs": root["$defs"]})
    problems = []
    for error in validator.iter_errors(stage):
        error.path.extendleft(reversed(at))
        problems += _explain(error, locate)
    return problems


def _problem(locate, path, message, hint="", key=False) -> Problem:
    file, line, col = locate(tuple(path), key=key)
    return Problem(file, line, col, dotted(path), message, hint)


def _explain(error, locate) -> list[Problem]:
    path = list(error.absolute_path)
    kind = error.validator
    schema = error.schema
    inst = error.instance
    if kind == "additionalProperties" and isinstance(inst, dict):
        known = list(schema.get("properties", {}))
        extra = [k for k in inst if k not in known]
        where = "the recipe" if not path else dotted(path)
        return [
            _problem(locate, path + [k], f"unknown key '{k}' in {where}",
                     did_you_mean(k, known) or f"allowed keys: {', '.join(known)}", key=True)
            for k in extra
        ]
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [_problem(locate, path, f"missing required key '{missing}'", _required_hint(missing, inst))]
    if kind == "enum":
        options = schema["enum"]
        return [_problem(locate, path, f"{json.dumps(inst)} is not one of: {', '.join(map(str, options))}", did_you_mean(inst, options))]
    if kind == "const":
        return [_problem(locate, path, f"must be {json.dumps(schema['const'])}, got {json.dumps(inst)}")]
    if kind == "type":
        expected = schema["type"]
        return [_problem(locate, path, f"expected {_article(expected)}, got {_describe(inst)}")]
    if kind == "oneOf":
        return [_problem(locate, path, _one_of_message(schema, inst))]
    if kind == "not" and isinstance(inst, dict):
        bad = [k for k in _NOT_ALLOWED if k in inst and _forbidden(k, inst)]
        return [_problem(locate, path + [k], f"'{k}' is not allowed for mode {inst.get('mode')!r}", _not_allowed_hint(k), key=True) for k in bad] or [
            _problem(locate, path, error.message)
        ]
    if kind in ("minimum", "maximum"):
        bound = schema[kind]
        word = "at least" if kind == "minimum" else "at most"
        return [_problem(locate, path, f"{json.dumps(inst)} is too {'small' if kind == 'minimum' else 'large'}; must be {word} {bound}", _bound_hint(path))]
    if kind == "pattern":
        return [_problem(locate, path, f"{json.dumps(inst)} does not have the expected form", _pattern_hint(schema["pattern"]))]
    if kind == "propertyNames":
        return [_problem(locate, path, f"invalid name: {error.message}")]
    return [_problem(locate, path, error.message)]


def _forbidden(key: str, stage: dict) -> bool:
    """Whether the schema's rules for this stage's mode forbid `key` (the schema is the recipe's copy of
    the mode registry, engine/modes.py; tests keep the two equal)."""
    mode = stage.get("mode")
    for rule in _stage_schema()["allOf"]:
        branch = rule.get("then") if _mode_holds(rule["if"], mode) else rule.get("else")
        if branch and "not" in branch and key in _required_keys(branch["not"]):
            return True
    return False


def stage_nbits(mode) -> tuple[int, int]:
    """The nbits range the schema allows a stage of `mode` (whether it takes nbits at all: see _forbidden)."""
    stage = _stage_schema()
    bounds = stage["properties"]["nbits"]
    lo, hi = bounds["minimum"], bounds["maximum"]
    for rule in stage["allOf"]:
        if _mode_holds(rule["if"], mode):
            narrower = rule.get("then", {}).get("properties", {}).get("nbits", {})
            lo, hi = narrower.get("minimum", lo), narrower.get("maximum", hi)
    return lo, hi


def _stage_schema() -> dict:
    return recipe_schema()["$defs"]["stage"]


def _mode_holds(condition: dict, mode) -> bool:
    """An `if` of the stage schema on its mode (const, enum or not), as plain Python: a missing mode
    matches no name."""
    if "not" in condition:
        return not _mode_holds(condition["not"], mode)
    test = condition["properties"]["mode"]
    return mode == test["const"] if "const" in test else mode in test["enum"]


def _required_keys(schema: dict) -> list:
    return list(schema.get("required", ())) + [k for sub in schema.get("anyOf", ()) for k in _required_keys(sub)]


def _not_allowed_hint(key: str) -> str:
    only, end = _NOT_ALLOWED[key]
    named = [m for m in _stage_schema()["properties"]["mode"]["enum"] if _forbidden(key, {"mode": m}) != only]
    return f"{'only ' if only else ''}{_and(named)} {end}"


def _and(words: list) -> str:
    return " and ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)


def _nbits_ranges() -> tuple[str, list[str]]:
    """The stage nbits range ('1..8') and the modes that allow less ('linear_symmetric 2..8')."""
    bounds = _stage_schema()["properties"]["nbits"]
    base = (bounds["minimum"], bounds["maximum"])
    takes = [m for m in _stage_schema()["properties"]["mode"]["enum"] if not _forbidden("nbits", {"mode": m})]
    narrower = ["{} {}..{}".format(m, *stage_nbits(m)) for m in takes if stage_nbits(m) != base]
    return f"{base[0]}..{base[1]}", narrower


def _required_hint(key: str, inst) -> str:
    if key == "nbits":
        whole, narrower = _nbits_ranges()
        return f"n-bit modes need nbits: {whole}" + (f" ({'; '.join(narrower)})" if narrower else "")
    if key == "rules":
        return "list the rules this stage applies, e.g. rules: [everything]"
    if key == "function":
        return "custom_lut needs function: module:attr"
    return ""


def _bound_hint(path) -> str:
    if not (path and path[-1] == "nbits"):
        return ""
    whole, narrower = _nbits_ranges()
    return f"nbits is {whole} ({'; '.join(narrower + ['use mode fp16 for 16-bit'])})"


def _pattern_hint(pattern: str) -> str:
    return "write module:attr, e.g. my_luts:quantile_lut" if ":" in pattern else f"must match {pattern}"


def _one_of_message(schema, inst) -> str:
    kinds = [s.get("type") or ("one of " + ", ".join(s["enum"]) if "enum" in s else "?") for s in schema["oneOf"]]
    if kinds == ["string", "array"]:
        return f"expected a string or a list of strings, got {_describe(inst)}"
    return f"expected {' or '.join(_article(k) for k in kinds)}, got {_describe(inst)}"


def _article(kind) -> str:
    if isinstance(kind, list):
        return " or ".join(_article(k) for k in kind)
    return {"object": "a mapping", "array": "a list", "integer": "an integer", "string": "a string",
            "number": "a number", "boolean": "true or false"}.get(kind, str(kind))


def _describe(value) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {json.dumps(value)}" if isinstance(value, (int, float, str)) else repr(value)
