"""The one matcher: recipe rules -> which weight records they match.

Planning and applying both call `decide`, so what `plan` shows is what a build does. Within a stage the
listed rules are tried in order and the first that matches a weight decides: quantize it, or leave it
alone when the rule says `exclude: true`. Weights no listed rule matches are left alone.

Names match as globs (fnmatch, whole name, case-sensitive); `layer_regex` must match the whole name
(re.fullmatch). A `python:` rule's code is imported only when a build runs (`allow_custom=True`); a plan
shows the weights it would decide as "decided by custom code at build time".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mlqpipe.engine.ct_selectors import SELECTORS, select_like_coremltools
from mlqpipe.formats.base import WeightRecord
from mlqpipe.formats.registry import format_of
from mlqpipe.recipe.types import Rule

PENDING = "pending"  # a python rule not evaluated in a plan
# conditions every format's records answer; the others are listed by each record type (CONDITIONS)
NEUTRAL_CONDITIONS = frozenset({"layer", "layer_regex", "layer_type", "field", "network", "count", "storage", "python"})
_RANGES = ("count", "in_channels", "out_channels", "kernel_channels", "layer_weight_count")
_FLAGS = ("name", "exclude", "optional", "min_snr_db")  # a rule's settings that are not conditions


def set_conditions(rule: Rule) -> set[str]:
    """The conditions a rule sets (the ones a model's format must be able to answer)."""
    return {k for k, v in rule.__dict__.items() if k not in _FLAGS and v not in (None, ())}


@dataclass(frozen=True)
class Match:
    rule: str | None
    include: bool
    pending: bool = False


def _storage_class(rec: WeightRecord) -> str:
    return "quantized" if rec.storage.is_quantized else rec.storage.kind


class RuleMatcher:
    """A compiled rule: plain criteria plus, per model state, the ids a coremltools selector would pick."""

    def __init__(self, rule: Rule, python_path=(), allow_custom: bool | None = None):
        self.rule = rule
        self.regexes = [re.compile(p) for p in rule.layer_regex]
        self.python_path = python_path
        self.allow_custom = allow_custom  # None: plan only, do not import
        self._ct_ids: set[str] | None = None
        self._edges: dict = {}
        self._custom = None

    def prepare(self, model) -> None:
        """Compute what depends on the whole model (coremltools selector semantics, first/last layers) for
        this state. Conditions the model's format cannot answer were refused by the plan."""
        if self.rule.position:
            self._edges = format_of(model).edge_layers(model)
        if self.rule.python and self.allow_custom is not None and self._custom is None:
            from mlqpipe.recipe.custom import load_code

            self._custom = _custom_rule(load_code(self.rule.python, self.python_path, allow=self.allow_custom))
        selectors = [self._ct_selector()] if self.rule.coremltools_selector is not None else []
        if hasattr(self._custom, "do_quantize"):  # a coremltools-style selector in a python: rule
            selectors.append(self._custom)
        picked = [{r.id for r in select_like_coremltools(model.spec, sel)} for sel in selectors]  # neural networks only
        self._ct_ids = set.intersection(*picked) if picked else None  # a rule naming both needs both

    def _ct_selector(self):
        sel = self.rule.coremltools_selector
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in sel.settings}
        return SELECTORS[sel.type](**settings)

    def matches(self, rec: WeightRecord) -> bool | str:
        """True/False, or PENDING for custom code that a plan does not run."""
        r = self.rule
        if r.layer and not any(fnmatchcase(name, p) for name in rec.layer_names for p in r.layer):
            return False
        if self.regexes and not any(rx.fullmatch(name) for name in rec.layer_names for rx in self.regexes):
            return False
        if r.layer_type and not set(rec.layer_types) & set(r.layer_type):
            return False
        if r.function and not any(fnmatchcase(f, p) for f in rec.functions for p in r.function):
            return False
        if r.field and not any(fnmatchcase(name, p) for name in rec.names for p in r.field):
            return False
        if r.network and not any(fnmatchcase(rec.network, p) for p in r.network):
            return False
        for attr in _RANGES:  # read only when the rule sets it: records of other formats lack most of these
            bounds = getattr(r, attr)
            if bounds is not None and not bounds.contains(getattr(rec, attr)):
                return False
        if r.depthwise is not None and rec.depthwise != r.depthwise:
            return False
        if r.position and not set(r.position) & self._edges.get((rec.network, rec.layer), set()):
            return False
        if r.storage and _storage_class(rec) not in r.storage:
            return False
        if self._ct_ids is not None and rec.id not in self._ct_ids:
            return False
        if r.python:
            if self._custom is None:
                return PENDING
            return True if self._ct_ids is not None else bool(self._custom(rec))
        return True


# name conditions whose every entry must match some weight: rule attribute -> the record's name it tests
NAME_LISTS = {
    "layer": lambda rec, p: any(fnmatchcase(name, p) for name in rec.layer_names),
    "layer_regex": lambda rec, p: any(re.fullmatch(p, name) is not None for name in rec.layer_names),
    "layer_type": lambda rec, p: p in rec.layer_types,
    "function": lambda rec, p: any(fnmatchcase(f, p) for f in getattr(rec, "functions", ())),
    "field": lambda rec, p: any(fnmatchcase(name, p) for name in rec.names),
    "network": lambda rec, p: fnmatchcase(rec.network, p),
}


def entries_matching(rule: Rule, rec: WeightRecord) -> set[tuple[str, int]]:
    """(condition, index) of every entry of the rule's name lists that matches this weight's name: a list
    entry no weight of any model matches is a typo that would silently change what a stage selects."""
    return {(attr, i) for attr, test in NAME_LISTS.items() for i, p in enumerate(getattr(rule, attr)) if test(rec, p)}


def _custom_rule(obj):
    """A python: rule's object: a callable(record) -> bool, or a coremltools-style QuantizedLayerSelector
    (class or instance), which `prepare` applies with coremltools' walk (ct_selectors)."""
    if isinstance(obj, type):
        obj = obj()
    if not hasattr(obj, "do_quantize") and not callable(obj):
        from mlqpipe.errors import RecipeError

        raise RecipeError(f"custom rule code {obj!r} is neither callable nor a QuantizedLayerSelector")
    return obj


def decide(rec: WeightRecord, matchers: list[RuleMatcher]) -> Match:
    """First listed rule that matches decides; custom rules a plan cannot run are reported as pending."""
    for m in matchers:
        hit = m.matches(rec)
        if hit == PENDING:
            return Match(m.rule.name, not m.rule.exclude, pending=True)
        if hit:
            return Match(m.rule.name, not m.rule.exclude)
    return Match(None, False)
