"""Reading recipe YAML safely, keeping where every value came from.

PyYAML's composer gives nodes with line/column marks; we build plain data from them ourselves, so we can
refuse duplicate keys (PyYAML silently keeps the last), bound alias expansion (a "billion laughs" document
would otherwise expand exponentially), the document size and its nesting depth, and record
`path -> (line, col)` for errors. Only safe YAML: no tags, no Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlqpipe.recipe.problems import Problem, dotted

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: same nodes and marks, faster
MAX_BYTES = 1 << 20  # 1 MiB of YAML is far more than any recipe needs
MAX_NODES = 50_000  # after alias expansion
MAX_DEPTH = 100  # nested mappings/sequences; real recipes use fewer than ten
_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


@dataclass
class Source:
    """A parsed YAML document: its data and the position of every value and key in it (located problems
    are made from these by the loader, which also tracks positions across `extends:`)."""

    file: str
    data: object = None
    positions: dict = field(default_factory=dict)  # tuple path -> (line, col), 1-based
    key_positions: dict = field(default_factory=dict)  # tuple path of a mapping key -> (line, col)


class _TooBig(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, node):
        self.node = node


def read_source(path: Path, shown: str) -> tuple[Source, list[Problem]]:
    """Parse one YAML file. Problems come back as a list (YAML errors stop at the first syntax error)."""
    src = Source(shown)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return src, [Problem(shown, 0, 0, "", "recipe file not found", "check the path")]
    except OSError as e:
        return src, [Problem(shown, 0, 0, "", f"cannot read recipe: {e.strerror or e}")]
    if len(raw) > MAX_BYTES:
        return src, [Problem(shown, 0, 0, "", f"recipe is {len(raw)} bytes; the limit is {MAX_BYTES}")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return src, [Problem(shown, 0, 0, "", f"not UTF-8 text (byte {e.start})")]
    try:
        deep = _first_too_deep(text)
        if deep is not None:
            return src, [_depth_problem(shown, deep)]
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if mark and "maximum nesting depth" in str(e.problem):  # libyaml's own limit, met while scanning ahead
            return src, [_depth_problem(shown, mark)]
        hint = "YAML does not allow tabs for indentation; use spaces" if mark and _tab_near(text, mark) else ""
        msg = f"YAML syntax error: {e.problem or e}" + (f" ({e.context})" if e.context else "")
        return src, [Problem(shown, mark.line + 1 if mark else 0, mark.column + 1 if mark else 0, "", msg, hint)]
    except yaml.YAMLError as e:
        return src, [Problem(shown, 0, 0, "", f"YAML error: {e}")]
    if node is None:
        return src, [Problem(shown, 1, 1, "", "the recipe is empty", "start with `version: 1`")]
    problems: list[Problem] = []
    budget = [MAX_NODES]
    constructor = yaml.SafeLoader("")
    try:
        src.data = _build(node, (), src, problems, budget, constructor)
    except _TooBig:
        return src, [Problem(shown, node.start_mark.line + 1, 1, "", f"document expands to more than {MAX_NODES} values (YAML aliases?)", "do not nest aliases")]
    except _TooDeep as e:  # within MAX_DEPTH as written, deeper once aliases are expanded
        return src, [_depth_problem(shown, e.node.start_mark)]
    return src, problems


def _first_too_deep(text: str):
    """The start mark of the first collection nested deeper than MAX_DEPTH, or None.

    Composing is recursive: in PyYAML's Python composer (RecursionError), in its libyaml composer (some
    releases segfault on 200,000 levels, well under MAX_BYTES; newer ones refuse past 1,000) and in `_build`.
    The parser's events are produced iteratively, so counting them first makes every allowed PyYAML safe.
    That costs about a third of reading the recipe, so it is skipped when the text cannot be deep: every
    mapping or sequence starts at a character of its own (its `[`, `{`, first `-`, or its first key's `?`
    or `:`), so a text with at most MAX_DEPTH of them cannot nest deeper (true of typical recipes)."""
    if sum(map(text.count, "[{-?:")) <= MAX_DEPTH:
        return None
    loader = _LOADER(text)
    try:
        depth = 0
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, _OPEN):
                depth += 1
                if depth > MAX_DEPTH:
                    return event.start_mark
            elif isinstance(event, _CLOSE):
                depth -= 1
        return None
    finally:
        loader.dispose()


def _depth_problem(shown: str, mark) -> Problem:
    return Problem(shown, mark.line + 1, mark.column + 1, "", f"nested more than {MAX_DEPTH} levels",
                   "a recipe needs only a few levels; flatten the data (aliases count at the depth they are used)")


def _tab_near(text: str, mark) -> bool:
    lines = text.splitlines()
    return 0 <= mark.line < len(lines) and "\t" in lines[mark.line]


_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null")}


def _build(node, path, src: Source, problems: list[Problem], budget, constructor):
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    if len(path) >= MAX_DEPTH and isinstance(node, yaml.CollectionNode):  # only aliases get here
        raise _TooDeep(node)
    src.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if node.tag == "tag:yaml.org,2002:timestamp":  # an unquoted date is just text in a recipe
        return node.value
    if node.tag not in _PLAIN_TAGS:
        problems.append(Problem(src.file, node.start_mark.line + 1, node.start_mark.column + 1, dotted(path),
                                f"unsupported YAML value with tag {node.tag}", "recipes are plain data: no tags"))
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(src.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1, dotted(path), "mapping keys must be plain strings"))
                continue
            key = _scalar(key_node, constructor, src, kpath_of(path, key_node), problems)
            key = key if isinstance(key, str) else str(key)
            kpath = path + (key,)
            if key in out:
                first = src.key_positions[kpath]
                problems.append(
                    Problem(src.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1, dotted(kpath),
                            f"duplicate key '{key}' (first defined at line {first[0]})", "YAML keeps only the last one; remove one of them")
                )
                continue
            src.key_positions[kpath] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _build(value_node, kpath, src, problems, budget, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(child, path + (i,), src, problems, budget, constructor) for i, child in enumerate(node.value)]
    return _scalar(node, constructor, src, path, problems)


def kpath_of(path, key_node):
    return path + (str(key_node.value),)


def _scalar(node, constructor, src: Source, path, problems: list[Problem]):
    """Resolve a scalar the way yaml.safe_load would (int, float, bool, null, str); refuse other tags."""
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        problems.append(Problem(src.file, node.start_mark.line + 1, node.start_mark.column + 1, dotted(path),
                                f"unsupported YAML value: {getattr(e, 'problem', None) or e}", "recipes are plain data: no tags"))
        return None
