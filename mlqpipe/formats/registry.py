"""Which format a path or a loaded model belongs to.

Formats are listed by import path and imported on first use, so asking about a `.mlmodel` never imports
the ML-program code. Directory formats are asked first: a directory is never a neural-network file.
Tests (and, later, plugins) add formats with `register`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from mlqpipe.errors import ModelError

_KNOWN = ["mlqpipe.formats.nn.format:FORMAT"]
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
    candidates = sorted(formats(), key=lambda f: not f.directory) if path.is_dir() else formats()
    for fmt in candidates:
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
    """The format whose inventory made this weight record."""
    for fmt in formats():
        if isinstance(rec, fmt.record_type):
            return fmt
    raise ModelError(f"{type(rec).__name__}: not a weight record of a known format")


def format_named(name: str) -> object:
    for fmt in formats():
        if fmt.name == name:
            return fmt
    raise ModelError(f"unknown model format {name!r}; known: {', '.join(f.name for f in formats())}")


def load_model(path):
    """A fresh model of whichever format `path` holds."""
    return format_for(path).load(path)
