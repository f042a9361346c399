"""JSON Schema validation that reports every violation at its file:line with a readable message."""

from __future__ import annotations

import difflib
import json

from mlqpipe.schema import recipe_schema
from mlqpipe.recipe.problems import Problem, dotted

_NOT_ALLOWED = {"nbits": "fold, fp16 and dequantize stages take no nbits",
                "function": "only custom_lut stages take a function",
                "fold": "only fold stages take a fold list",
                "coremltools_rounding": "only linear, linear_symmetric and linear_lut stages round like coremltools"}


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
        return [_problem(locate, path + [k], f"'{k}' is not allowed for mode {inst.get('mode')!r}", _NOT_ALLOWED[k], key=True) for k in bad] or [
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
    mode = stage.get("mode")
    if key == "nbits":
        return mode in ("fold", "fp16", "dequantize")
    if key == "function":
        return mode != "custom_lut"
    if key == "coremltools_rounding":
        return mode not in ("linear", "linear_symmetric", "linear_lut")
    return mode != "fold"


def _required_hint(key: str, inst) -> str:
    if key == "nbits":
        return "n-bit modes need nbits: 1..8 (linear_symmetric 2..8)"
    if key == "rules":
        return "list the rules this stage applies, e.g. rules: [everything]"
    if key == "function":
        return "custom_lut needs function: module:attr"
    return ""


def _bound_hint(path) -> str:
    return "nbits is 1..8 (linear_symmetric 2..8; use mode fp16 for 16-bit)" if path and path[-1] == "nbits" else ""


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
