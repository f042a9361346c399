"""The seam between the engine and a model format: what every format provides, and what the engine may ask.

The engine (select, plan, execute), the build (cache, lock, doit file lists) and the reports work from two
things only: `WeightRecord`s (one per weight, format-neutral) and a `ModelFormat` (loading, inventory,
writing kernel results back, folding, versions, checks, serialising to an artifact). Each format lives in
its own package (`formats/nn/` for neural networks) and is found through `formats/registry.py`. A format
never imports the engine; the engine never looks inside a format's messages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import numpy as np

from mlqpipe.errors import ModelError


@dataclass(frozen=True, eq=False)
class Storage:
    """How a weight is stored: kind is float32, float16, linear, lut, int8, empty or conflict (a format may
    add kinds); nbits the bit count of linear and lut storage; detail what else a format can say about it
    (e.g. "per_block(32)"), shown but not compared."""

    kind: str
    nbits: int = 0  # the value count is not kept here: reading it copies the bytes (formats know the count)
    detail: str = ""

    @property
    def is_float(self) -> bool:
        return self.kind in ("float32", "float16")

    @property
    def is_quantized(self) -> bool:
        return self.kind in ("linear", "lut", "int8", "sparse")

    def __str__(self) -> str:
        return f"{self.kind}{self.nbits}" if self.kind in ("linear", "lut") else self.kind

    def describe(self) -> str:
        """The printed form with the detail, for `inspect`."""
        return f"{self} {self.detail}" if self.detail else str(self)

    def __eq__(self, other) -> bool:
        """Equal to another Storage, or to the string it prints as (`rec.storage == "float32"`, "linear8")."""
        if isinstance(other, str):
            return str(self) == other
        if isinstance(other, Storage):
            return (self.kind, self.nbits) == (other.kind, other.nbits)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))  # consistent with equality to strings


@dataclass(kw_only=True)
class WeightRecord:
    """One weight of a model, as selection, plans and reports see it, whatever the format.

    layer / layer_type: the layer or op holding it and its type; field: the parameter ("weights", "bias",
    an op input name); network: the sub-graph it lives in ("" at the top; "models[1]/" inside a pipeline,
    "loop_1.bodyNetwork/" in a nested network, a function or block path in ML programs); shape (None when
    the format does not say), axis (the output-channel axis per-channel kernels use; None: per tensor),
    count, storage. handle: what the format needs to rewrite the weight (never looked at by the engine).
    Formats subclass it for their own derived attributes (rule conditions only they can answer)."""

    layer: str
    layer_type: str
    field: str
    shape: tuple[int, ...] | None
    axis: int | None
    count: int
    storage: Storage
    network: str = ""
    updatable: bool = False  # trained on device: left as it is
    handle: Any = field(repr=False, compare=False, default=None)

    # rule conditions beyond the neutral ones (layer, layer_regex, layer_type, field, network, count,
    # storage, python) that records of this class can answer
    CONDITIONS: ClassVar[frozenset[str]] = frozenset()
    FORMAT: ClassVar[str] = ""  # the name of the format whose inventory makes records of this class

    @property
    def id(self) -> str:
        """Unique, stable name within its model."""
        return f"{self.network}{self.layer}:{self.field}"

    @property
    def where(self) -> str:
        return f"layer '{self.layer}' ({self.layer_type}) field {self.field}" + (f" in {self.network.rstrip('/')}" if self.network else "")

    @property
    def names(self) -> tuple[str, ...]:
        """The names a rule's `field:` globs are tried against."""
        return (self.field,)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The names a rule's `layer:` globs and `layer_regex:` are tried against."""
        return (self.layer,)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The types a rule's `layer_type:` is tried against."""
        return (self.layer_type,)

    @property
    def field_path(self) -> str:
        """The field as reports show it (a format may name a path inside the layer's parameters)."""
        return self.field

    @property
    def nbytes(self) -> int:
        """Bytes of weight data as currently stored."""
        raise NotImplementedError

    def values(self, count: int | None = None) -> np.ndarray:
        """The numbers as float32 (dequantized when stored compressed)."""
        raise NotImplementedError

    def native_values(self) -> np.ndarray:
        """The numbers in the weight's own float dtype where the format keeps one (float16 stays float16):
        what kernels that compute in the weight's dtype read, as coremltools' ML-program kernels do."""
        return self.values()

    def float_values(self) -> np.ndarray:
        """Like `values`, but refuses NaN or Inf with an error naming the weight."""
        v = self.values()
        if not np.all(np.isfinite(v)):
            bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
            raise ModelError(f"{self.where}: {bad} NaN or Inf weight value(s); fix the source model before quantizing")
        return v


# Core ML specification versions (every format's models carry one): the first OS release of each, what
# the version means to a team shipping an app
DEPLOYMENT_TARGETS = {1: "iOS 11", 2: "iOS 11.2", 3: "iOS 12", 4: "iOS 13", 5: "iOS 14", 6: "iOS 15", 7: "iOS 16",
                      8: "iOS 17", 9: "iOS 18", 10: "iOS 26"}


def deployment_target(version: int) -> str:
    return DEPLOYMENT_TARGETS.get(version, f"unknown (specificationVersion {version})")


def version_change(before: int, after: int) -> str | None:
    """A sentence when the minimum deployment target moves, else None."""
    if after == before:
        return None
    return (f"specificationVersion {before} -> {after}: the minimum deployment target moves from "
            f"{deployment_target(before)} to {deployment_target(after)}")


# what a model holds after serialising: the bytes of a file, or the files of a directory tree (relative
# POSIX path -> bytes); artifacts.digest / mapping_digest give the digest either way
Artifact = bytes | dict


@dataclass(frozen=True)
class Finding:
    """One broken rule of a model check: how bad, which rule, where (layer or op), what."""

    severity: str  # "error" or "warning"
    rule: str
    where: str
    message: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message} [{self.rule}]"


class ModelFormat(Protocol):
    """One model format. `model` arguments are what `load` returns (each format has its own class)."""

    name: str  # "neuralnetwork", ...: shown in messages and reports
    suffixes: tuple[str, ...]  # path suffixes it claims (".mlmodel")
    directory: bool  # its artifacts are directory trees (an .mlpackage), not files
    modes: frozenset[str]  # the weight modes it can store (engine/modes.py names); "fold" when it folds
    record_type: type  # its WeightRecord subclass: the rule conditions it answers
    evaluator: str | None  # the evaluator quality/evaluate uses for it (None: no evaluation)

    def claims(self, path) -> bool: ...  # by name and content: is this file or directory one of ours?
    def owns(self, model) -> bool: ...  # is this loaded model one of ours?
    def load(self, path) -> Any: ...  # a fresh model; ModelError naming the path on any problem
    def from_artifact(self, data: Artifact, where: str) -> Any: ...
    def to_artifact(self, model) -> Artifact: ...
    def copy(self, model) -> Any: ...
    def save(self, model, path, *, check: bool = True) -> None: ...  # checked, atomic
    def source(self, model) -> str: ...
    def inventory(self, model) -> list[WeightRecord]: ...
    def version(self, model) -> int: ...  # specificationVersion: what OS the model needs (DEPLOYMENT_TARGETS)
    def size(self, model) -> int: ...  # bytes of its artifact, for reports
    def raise_version(self, model, change: str) -> None: ...  # after a mode with this version floor ran
    def stored_bytes(self, rec: WeightRecord, storage: Storage) -> int: ...  # size estimate for plans
    def write_result(self, rec: WeightRecord, result, **options) -> None: ...  # a quant.results result
    def refusal(self, rec: WeightRecord, mode: str) -> str | None: ...  # why this weight cannot take this mode
    def fold(self, model, kinds) -> list: ...  # layer folds; ModelError when the format has none
    def edge_layers(self, model) -> dict: ...  # (network, layer) -> {"first", "last"}
    def precision_problems(self, model, records, after: dict) -> list[Finding]: ...  # mixed float precision
    def describe(self, model) -> dict: ...  # for inspect: type, specificationVersion, inputs, outputs, more
    def check(self, model) -> list[Finding]: ...  # every rule Core ML enforces that we can verify
    def inherit_findings(self, model, original, where: str, warn: Callable) -> None: ...
    # ^ rules the input (`original`) already breaks: warned about, and not held against `model` when saved
