"""Loading and saving Core ML model specs without coremltools.

`load_model` accepts whatever users hold — a path, bytes, our model, a coremltools spec or MLModel (anything
with `SerializeToString()` or `get_spec()`) — and always returns a fresh copy, so an input is never
modified. `CoreMLModel.save` checks the model against Core ML's loading rules, then writes it atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from mlqpipe.errors import ModelError
from mlqpipe.fileio import atomic_write
from mlqpipe.formats.nn import proto
from mlqpipe.formats.description import read_description
from mlqpipe.formats.nn.structure import PIPELINE_TYPES, iter_layers, neural_networks, pipeline_of

_LFS_MAGIC = b"version https://git-lfs"
_MAX_PROTO = 2**31 - 1


class CoreMLModel:
    """A Core ML model spec (our message classes) plus where it came from."""

    # structure findings its input already had when it was loaded for quantizing (check.input_findings):
    # warned about then, not refused by `save`
    inherited_findings: tuple = ()

    def __init__(self, spec, source: str = "<model>"):
        self.spec = spec
        self.source = source

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf name users already call
        return self.spec.SerializeToString()

    def get_spec(self):
        return self.spec

    def copy(self) -> "CoreMLModel":
        twin = CoreMLModel(proto.Model.FromString(self.spec.SerializeToString()), self.source)
        twin.inherited_findings = self.inherited_findings
        return twin

    def save(self, path: str | os.PathLike, *, check: bool = True, overwrite: bool = False) -> None:
        """Check the model against Core ML's loading rules, then write it atomically. The file the model
        was loaded from is an input: replacing it needs `overwrite=True`."""
        if not overwrite and self._loaded_from(path):
            raise ModelError(f"{os.fspath(path)}: this is the file the model was loaded from; refusing to overwrite "
                             "an input (save to another path, or pass overwrite=True)")
        if check:
            from mlqpipe.formats.nn.check import raise_on_errors

            raise_on_errors(self.spec, where=os.fspath(path), inherited=self.inherited_findings)
        try:
            atomic_write(path, self.SerializeToString())
        except OSError as e:
            raise ModelError(f"{os.fspath(path)}: cannot write the model: {e.strerror or e}; nothing was written") from None

    def _loaded_from(self, path) -> bool:
        try:
            return os.path.samefile(self.source, path)
        except (OSError, ValueError):  # no such file, or a source that is not a path ("<bytes>")
            return False

    @property
    def model_type(self) -> str | None:
        return self.spec.WhichOneof("Type")

    def __repr__(self) -> str:
        return f"CoreMLModel({self.source!r}, type={self.model_type}, specificationVersion={self.spec.specificationVersion})"


def load_model(model: Any, *, name: str | None = None) -> CoreMLModel:
    """A fresh CoreMLModel from a path, bytes, CoreMLModel, protobuf spec or coremltools MLModel."""
    if isinstance(model, CoreMLModel):
        return model.copy()
    if isinstance(model, (str, os.PathLike)):
        return parse_model(_read_file(Path(model)), os.fspath(model))
    if isinstance(model, (bytes, bytearray, memoryview)):
        return parse_model(bytes(model), name or "<bytes>")
    if hasattr(model, "get_spec") and callable(model.get_spec):
        spec = model.get_spec()
        return parse_model(spec.SerializeToString(), name or getattr(model, "package_path", None) or "<MLModel>")
    if hasattr(model, "SerializeToString"):
        return parse_model(model.SerializeToString(), name or "<spec>")
    raise ModelError(
        f"cannot read a model from {type(model).__name__}: pass a path, bytes, a Core ML spec or an MLModel"
    )


def _read_file(path: Path) -> bytes:
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not a .mlmodel file (mlqpipe.load_model reads .mlpackage directories)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    return data


def parse_model(data: bytes, where: str) -> CoreMLModel:
    """Parse and sanity-check serialized Model bytes."""
    if not data:
        raise ModelError(f"{where}: empty file; expected a Core ML .mlmodel")
    if data.startswith(_LFS_MAGIC):
        raise ModelError(f"{where}: is a Git LFS pointer, not the model itself; run `git lfs pull` first")
    if len(data) > _MAX_PROTO:
        raise ModelError(f"{where}: {len(data)} bytes exceeds protobuf's 2 GB message limit")
    try:
        spec = proto.Model.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{where}: not a valid Core ML model (protobuf parse failed: {e}); is the file corrupt?") from None
    model = CoreMLModel(spec, where)
    _check_supported(spec, where)
    try:
        bad = _invalid_text(spec)
    except (UnicodeDecodeError, DecodeError):
        bad = "a name"
    if bad:
        raise ModelError(f"{where}: {bad} is not valid UTF-8 text; the file is corrupt")
    return model


def _invalid_text(spec) -> str | None:
    """The first name that is not valid UTF-8 (proto2 parsing does not check; such values come back as
    bytes and would fail later, when a fold or a writer touches them)."""
    desc = read_description(spec)
    for feature in list(desc.input) + list(desc.output):
        if not isinstance(feature.name, str):
            return "a feature name"
    for _, model_spec, nn in neural_networks(spec):
        if not isinstance(getattr(nn, "labelProbabilityLayerName", ""), str):
            return "labelProbabilityLayerName"
        for net_path, _, layer in iter_layers(nn):
            if not isinstance(layer.name, str):
                return f"a layer name in {net_path or 'the network'}"
            if not all(isinstance(n, str) for n in list(layer.input) + list(layer.output)):
                return f"a blob name of layer '{layer.name}'"
    return None


def _check_supported(spec, where: str, path: str = "") -> None:
    kind = spec.WhichOneof("Type")
    at = f" (at {path})" if path else ""
    if kind is None:
        raise ModelError(f"{where}: not a Core ML model (no model type found{at}); is the file corrupt or of another format?")
    if kind == "mlProgram" and path:
        raise ModelError(f"{where}: is a pipeline with an ML program member{at}; pipelines of ML programs are not "
                         "supported yet: compress the ML program package before assembling the pipeline")
    if kind == "mlProgram":
        raise ModelError(f"{where}: is an ML program's model.mlmodel on its own; load its .mlpackage directory "
                         "(the package holds the weights)")
    if kind in PIPELINE_TYPES:
        for i, sub in enumerate(pipeline_of(spec).models):
            _check_supported(sub, where, f"{path}models[{i}]/")
