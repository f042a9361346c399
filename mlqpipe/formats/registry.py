"""Which format a path or a loaded model belongs to.

Formats are listed by import path and imported on first use; their modules import their heavy parts
lazily. The ML-program format is asked first: it claims directories and package-like files (zipped or
compiled packages, which it refuses by name); the neural-network format takes every other file. Tests
(and, later, plugins) add formats with `register`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from mlqpipe.errors import ModelError

_KNOWN = ["mlqpipe.formats.mlprogram.format:FORMAT", "mlqpipe.formats.nn.format:FORMAT"]
_LOADED: list = []


def register(fmt, *, first: bool = True) -> None:
    """Add a format object (see formats.base.ModelFormat); `first`: asked before the built-in ones."""
    formats()
    _LOADED.insert(0 if first else len(_LOADED), fmt)


def unregister(fmt) -> None:
    _LOADED.remove(fmt)


def formats() -> list:
    if not _LOADED:
        for ref in _KNOWN:
            module, _, attr = ref.partition(":")
            _LOADED.append(getattr(importlib.import_module(module), attr))
    return _LOADED


def format_for(path) -> object:
    """The format that claims `path` (by name and content); ModelError when none does."""
    path = Path(path)
    for fmt in formats():
        if fmt.claims(path):
            return fmt
    kinds = ", ".join(s for f in formats() for s in f.suffixes)
    raise ModelError(f"{os.fspath(path)}: not a model format mlqpipe reads ({kinds})")


def format_of(model) -> object:
    """The format of a loaded model."""
    for fmt in formats():
        if fmt.owns(model):
            return fmt
    raise ModelError(f"{type(model).__name__}: not a model mlqpipe loaded")


def format_of_record(rec) -> object:
    """The format whose inventory made this weight record (each record class names its format)."""
    return format_named(rec.FORMAT)


def format_named(name: str) -> object:
    for fmt in formats():
        if fmt.name == name:
            return fmt
    raise ModelError(f"unknown model format {name!r}; known: {', '.join(f.name for f in formats())}")


def load_model(model, *, name: str | None = None):
    """`mlqpipe.load_model`: a fresh model from a path of either format, a loaded model (copied), or what
    the neural-network loader takes (bytes, specs, coremltools MLModels); a coremltools MLModel of an ML
    program is read from its package path, without importing coremltools."""
    if isinstance(model, (str, os.PathLike)):
        return format_for(model).load(model)
    for fmt in formats():
        if fmt.owns(model):
            return fmt.copy(model)
    package = getattr(model, "package_path", None)
    if isinstance(package, (str, os.PathLike)) and Path(package).is_dir():
        return format_for(package).load(package)
    from mlqpipe.formats.nn.model import load_model as load_nn

    return load_nn(model, name=name)


def inventory_of(model, *, include_empty: bool = False) -> list:
    """`mlqpipe.inventory`: the weight records of a loaded model or of anything `load_model` takes."""
    from mlqpipe.formats.nn import proto

    if isinstance(model, proto.Model):
        from mlqpipe.formats.nn.inventory import inventory

        return inventory(model, include_empty=include_empty)
    m = model if any(f.owns(model) for f in formats()) else load_model(model)
    fmt = format_of(m)
    if include_empty and fmt.name == "neuralnetwork":
        from mlqpipe.formats.nn.inventory import inventory

        return inventory(m.spec, include_empty=True)
    return fmt.inventory(m)
