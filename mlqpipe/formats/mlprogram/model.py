"""Loading and saving ML-program packages (.mlpackage) without coremltools, never holding the weights in memory.

`MLProgram` is the spec (our Model message: the program and the description) plus the package it came
from: weights stay in the input's weight files, read through memory maps when a value is asked for.
Saving streams a new package: model.mlmodel from our messages, every weight file rewritten blob by blob
(untouched blobs copied without decoding, in the input's order, every `blobFileValue` offset updated),
other items of the package copied, and Manifest.json kept byte for byte when the model is unchanged
(identifiers derived from the content otherwise, so equal outputs are equal bytes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from math import prod
from pathlib import Path

from google.protobuf.message import DecodeError

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.blob import HEADER_SIZE, METADATA_SIZE, BlobFile, BlobWriter, align
from mlqpipe.formats.mlprogram.package import (
    COREML_AUTHOR, PACKAGE_FILES, WEIGHTS_NAME, PackageLayout, copy_other_items, dump_manifest, item_identifier,
    other_items_size, read_layout, resolve_blob_file, write_package,
)
from mlqpipe.formats.mlprogram.program import blob_dtype_code, immediate_array, tensor_type, walk

_LFS_MAGIC = b"version https://git-lfs"
_MAX_PROTO = 2**31 - 1


SCRATCH = "@mlqpipe/new-weights"  # the fileName of values written since loading (never valid in a package)


class Scratch:
    """A private weight file holding the blobs written into a model since it was loaded (compressed
    weights), on disk rather than in memory, append-only so copies of the model can share it. Saving moves
    its blobs into the package's weight file."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mlqpipe-new-"))
        self.path = self.dir / "weight.bin"
        self._writer = BlobWriter(self.path)
        self._done = weakref.finalize(self, Scratch._cleanup, self._writer, self.dir)

    @staticmethod
    def _cleanup(writer, directory) -> None:
        writer.close()
        shutil.rmtree(directory, ignore_errors=True)

    def add(self, data, dtype_code: int, padding_bits: int = 0) -> int:
        offset = self._writer.add(data, dtype_code, padding_bits)
        self._writer.flush_header()
        return offset


class MLProgram:
    """An ML program: `spec` (proto.Model with mlProgram set) and the package its weights live in."""

    inherited_findings: tuple = ()

    def __init__(self, spec, layout: PackageLayout, source: str, model_bytes: bytes | None = None):
        self.spec = spec
        self.layout = layout
        self.source = source
        self._model_bytes = model_bytes  # as read: an unchanged spec keeps the input's manifest
        self._blobs: dict[Path, BlobFile] = {}
        self._paths: dict[str, Path] = {}  # fileName -> the file it names, checked once (resolve_blob_file)
        self._keep: object = None  # a temporary package this model reads from (from_artifact)
        self.scratch: Scratch | None = None  # blobs written since loading (shared with copies)

    # --- weights ---------------------------------------------------------------------------------------------

    def blob_file(self, file_name: str) -> BlobFile:
        """The weight file a `blobFileValue.fileName` names, opened once (memory-mapped); SCRATCH names the
        blobs written since loading."""
        if file_name == SCRATCH:
            if self.scratch is None:
                raise ModelError(f"{self.source}: a value refers to new weights that were never written")
            path = self.scratch.path
        else:
            path = self._paths.get(file_name)
            if path is None:  # links resolved and checked once: every weight of a file names it again
                path = self._paths[file_name] = resolve_blob_file(self.layout, file_name)
        found = self._blobs.get(path)
        if found is not None and _changed(found, path):  # replaced or resized since opened: map it anew
            found.close()
            found = None
        if found is None:
            rel = "(new weights)" if file_name == SCRATCH else path.relative_to(self.layout.root).as_posix()
            found = self._blobs[path] = BlobFile(path, f"{self.source}: {rel}")
        return found

    def new_blob(self, data, dtype_code: int, padding_bits: int = 0) -> int:
        """Store a new blob (see blob.BlobWriter.add for `data`); returns its offset under SCRATCH."""
        if self.scratch is None:
            self.scratch = Scratch()
        return self.scratch.add(data, dtype_code, padding_bits)

    def value_array(self, value, where: str):
        """The numbers of a tensor Value (immediate or in a weight file) in its declared dtype and shape;
        a weight-file value is a read-only view into the mapping (sub-byte dtypes: decoded codes)."""
        if value.HasField("blobFileValue"):
            code, shape, count = _blob_request(value, where)
            ref = value.blobFileValue
            try:
                array = self.blob_file(ref.fileName).array(ref.offset, code, count)
            except ModelError as e:
                raise ModelError(f"{where}: {e}") from None
            return array.reshape(shape) if shape is not None else array
        return immediate_array(value, where)

    def op_parameters(self, op, where: str) -> dict:
        """parameter -> its value: a numpy array for a literal (an attribute, or an input bound to a value:
        constexpr ops keep their parameters as attributes before iOS18 and as inputs from iOS18), or the
        name of the variable bound to it (a str). The op's `name` attribute is left out."""
        out: dict = {}
        for e in op.attributes:
            if e.key != "name":
                out[e.key] = self.value_array(e.value, f"{where} parameter {e.key}")
        for e in op.inputs:
            args = list(e.value.arguments)
            if len(args) == 1:
                b = args[0]
                out[e.key] = b.name if b.WhichOneof("binding") == "name" else self.value_array(b.value, f"{where} parameter {e.key}")
            else:
                out[e.key] = [b.name if b.WhichOneof("binding") == "name" else self.value_array(b.value, f"{where} parameter {e.key}")
                              for b in args]
        return out

    def close(self) -> None:
        for b in self._blobs.values():
            b.close()
        self._blobs.clear()

    # --- copies and saving -----------------------------------------------------------------------------------

    def copy(self) -> "MLProgram":
        """A model with its own spec reading the same weight files (they are never modified)."""
        twin = MLProgram(proto.Model.FromString(self.spec.SerializeToString()), self.layout, self.source, self._model_bytes)
        twin._keep = self._keep
        twin.scratch = self.scratch  # append-only: the twin's new blobs get offsets of their own
        twin.inherited_findings = self.inherited_findings
        return twin

    def save(self, path, *, check: bool = True, overwrite: bool = False) -> None:
        """Write the package atomically (a directory; see the module docstring). The package the model was
        loaded from is an input: replacing it needs `overwrite=True`."""
        if not overwrite and _same(self.layout.root, path):
            raise ModelError(f"{os.fspath(path)}: this is the package the model was loaded from; refusing to overwrite "
                             "an input (save to another path, or pass overwrite=True)")
        if check:
            from mlqpipe.formats.mlprogram.check import raise_on_errors

            raise_on_errors(self, where=os.fspath(path))
        if overwrite and _same(self.layout.root, path):
            self._detach()  # the old package is replaced: read from a private copy of it while writing
        try:
            write_package(path, self._fill)
        except OSError as e:
            raise ModelError(f"{os.fspath(path)}: cannot write the package: {e.strerror or e}; nothing was written") from None

    def _detach(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="mlqpipe-pkg-"))
        shutil.copytree(self.layout.root, tmp / self.layout.root.name, symlinks=True)
        self.close()
        self.layout = read_layout(tmp / self.layout.root.name)
        self._paths = {}
        self._keep = weakref.finalize(self, shutil.rmtree, tmp, True)

    def _fill(self, root: Path) -> None:
        spec = proto.Model.FromString(self.spec.SerializeToString())
        model_rel = self.layout.model_path.relative_to(self.layout.root)
        _rewrite_blobs(self, spec, root)
        data = spec.SerializeToString()
        target = root / model_rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, data)
        if self.layout.weights_dir is not None:
            (root / self.layout.weights_dir.relative_to(self.layout.root)).mkdir(parents=True, exist_ok=True)
        copy_other_items(self.layout, root)
        unchanged = data == self._model_bytes
        _write(root / "Manifest.json", self.layout.manifest_bytes if unchanged else _derived_manifest(self.layout, data))

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf name, as CoreMLModel has
        return self.spec.SerializeToString()

    def __repr__(self) -> str:
        return f"MLProgram({self.source!r}, specificationVersion={self.spec.specificationVersion})"


def blob_values(spec):
    """Every Value of the program stored in a weight file, with the op holding it, in walk order: const
    `val`s and constexpr parameters (attributes before iOS18, input bindings from iOS18)."""
    for site, _, value in _blob_sites(spec, "<model>"):
        yield site, value


def _blob_sites(spec, where: str):
    """(op site, parameter name, Value) of every weight-file value, in walk order."""
    for site in walk(spec.mlProgram, where):
        for entry in site.op.attributes:
            if entry.value.HasField("blobFileValue"):
                yield site, entry.key, entry.value
        for entry in site.op.inputs:
            for binding in entry.value.arguments:
                if binding.HasField("value") and binding.value.HasField("blobFileValue"):
                    yield site, entry.key, binding.value


def _blob_request(value, where: str) -> tuple[int, tuple[int, ...] | None, int | None]:
    """(blob dtype code, shape, element count) a weight-file Value declares; shape and count are None when
    a dimension is unknown."""
    tt = tensor_type(value.type)
    if tt is None:
        raise ModelError(f"{where}: a weight-file value without a tensor type; the model is damaged")
    dtype, shape = tt
    code = blob_dtype_code(dtype)
    if code is None:
        raise ModelError(f"{where}: dtype {proto.DATA_TYPE_NAMES.get(dtype, dtype)} cannot be stored in a weight file")
    return code, shape, prod(shape) if shape is not None else None


def check_blob_references(model: MLProgram) -> None:
    """Every weight-file value resolves to a weight file inside the weights folder, whose record at its
    offset is sound (sentinel, known dtype, data inside the file) and holds the declared dtype and element
    count. Run at load, so a missing, truncated or corrupt weight file is one error naming the op that
    needs it, not a failure deep inside a later read or save. Reads one 64-byte record per blob, no data."""
    layout = model.layout
    prefix = f"{os.fspath(layout.root)}: "
    opened: dict[str, BlobFile] = {}  # by fileName: resolving a name (links followed) costs more than a record
    try:
        for site, key, value in _blob_sites(model.spec, model.source):
            what = _value_site(model.source, site, key)
            code, _, count = _blob_request(value, what)
            ref = value.blobFileValue
            try:
                blobs = opened.get(ref.fileName)
                if blobs is None:
                    path = resolve_blob_file(layout, ref.fileName)
                    blobs = opened[ref.fileName] = BlobFile(path, path.relative_to(layout.root).as_posix())
                blobs.checked(ref.offset, code, count)
            except ModelError as e:
                text = str(e)
                raise ModelError(f"{what}: {text[len(prefix):] if text.startswith(prefix) else text}") from None
    finally:
        for blobs in opened.values():
            blobs.close()


def _value_site(source: str, site, key: str) -> str:
    """How messages name a weight-file value: the package, the op, its type and block, the parameter
    (left out for a const's `val`)."""
    parameter = "" if (site.op.type, key) == ("const", "val") else f" parameter {key!r}"
    return f"{source}: op {site.name!r} ({site.op.type} in {site.block}){parameter}"


def _blob_files(spec) -> dict[str, tuple[list, list]]:
    """The weight files a written package holds, by `fileName`, each with the values stored in it and the
    order its blobs are written in: the input's blobs first in their offset order (each once however many
    values share it), then the blobs written since loading (SCRATCH, which go into the package's main weight
    file), in the order they were written. A key is (1 for SCRATCH else 0, offset)."""
    refs: dict[str, list] = {}
    for _, value in blob_values(spec):
        name = value.blobFileValue.fileName
        refs.setdefault(PACKAGE_FILES.blob_file_name if name == SCRATCH else name, []).append(value)
    out = {}
    for file_name, values in refs.items():
        keys = {(int(v.blobFileValue.fileName == SCRATCH), v.blobFileValue.offset) for v in values}
        out[file_name] = (values, sorted(keys))
    return out


def _point_values(values: list, file_name: str, moved: dict) -> None:
    for v in values:
        v.blobFileValue.offset = moved[(int(v.blobFileValue.fileName == SCRATCH), v.blobFileValue.offset)]
        v.blobFileValue.fileName = file_name


def _rewrite_blobs(model: MLProgram, spec, root: Path) -> None:
    """Write every referenced blob into the new package (copied without decoding, in `_blob_files` order)
    and point the values of `spec` at the new offsets."""
    for file_name, (values, keys) in _blob_files(spec).items():
        out = root / _weight_file_rel(model, file_name)
        out.parent.mkdir(parents=True, exist_ok=True)
        moved: dict = {}
        with BlobWriter(out) as writer:
            for key in keys:
                source = model.blob_file(SCRATCH if key[0] else file_name)
                moved[key] = writer.copy_from(source, key[1])
                source.release(key[1])
        _point_values(values, file_name, moved)


def written_size(model: MLProgram) -> int:
    """Bytes of the package `save` writes (every file), computed without writing: the blobs laid out as
    the writer lays them out (header, then per blob a 64-byte-aligned metadata record and its data), the
    model message with the offsets it will hold, the manifest and the other items copied."""
    spec = proto.Model.FromString(model.spec.SerializeToString())
    total = 0
    for file_name, (values, keys) in _blob_files(spec).items():
        pos, moved = HEADER_SIZE, {}
        for key in keys:
            info = model.blob_file(SCRATCH if key[0] else file_name).blob(key[1])
            moved[key] = align(pos)
            pos = moved[key] + METADATA_SIZE + info.size_in_bytes
        total += pos
        _point_values(values, file_name, moved)
    data = spec.SerializeToString()
    manifest = model.layout.manifest_bytes if data == model._model_bytes else _derived_manifest(model.layout, data)
    return total + len(data) + len(manifest) + other_items_size(model.layout)


def _weight_file_rel(model: MLProgram, file_name: str) -> Path:
    """Where a weight file goes in the new package: where the input has it, else (new weights in a package
    that had none) under the model's folder as `@model_path/...` says."""
    try:
        return resolve_blob_file(model.layout, file_name).relative_to(model.layout.root)
    except ModelError:
        tail = file_name[len("@model_path/"):] if file_name.startswith("@model_path/") else file_name
        return model.layout.model_dir.relative_to(model.layout.root) / tail


def _derived_manifest(layout: PackageLayout, model_bytes: bytes) -> bytes:
    """The input's manifest with the model's and the weights' identifiers derived from the new model's
    content (other items keep theirs)."""
    import hashlib

    digest = hashlib.sha256(model_bytes).hexdigest()
    entries = layout.manifest["itemInfoEntries"]
    renamed = {}
    for ident, entry in entries.items():
        ours = ident == layout.model_id or (entry.get("name") == WEIGHTS_NAME and entry.get("author") == COREML_AUTHOR)
        renamed[item_identifier(digest, entry["path"]) if ours else ident] = entry
    manifest = {**layout.manifest, "itemInfoEntries": renamed,
                "rootModelIdentifier": item_identifier(digest, entries[layout.model_id]["path"])}
    return dump_manifest(manifest)


def _changed(blobs: BlobFile, path: Path) -> bool:
    """Whether the file at `path` is no longer what `blobs` mapped (another file, or another size)."""
    try:
        now, opened = os.stat(path), os.fstat(blobs.fileno())
    except (OSError, AttributeError, ValueError):
        return True
    return (now.st_dev, now.st_ino, now.st_size) != (opened.st_dev, opened.st_ino, blobs.size)


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _same(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_package(path) -> MLProgram:
    """Read an .mlpackage: its layout (Manifest.json checked), its model.mlmodel, weights left on disk."""
    layout = read_layout(path)
    where = os.fspath(path)
    rel = layout.model_path.relative_to(layout.root).as_posix()
    try:
        data = layout.model_path.read_bytes()
    except OSError as e:
        raise ModelError(f"{where}: {rel}: cannot read: {e.strerror or e}") from None
    return parse_program(data, layout, where)


def parse_program(data: bytes, layout: PackageLayout, where: str) -> MLProgram:
    rel = layout.model_path.relative_to(layout.root).as_posix()
    if not data:
        raise ModelError(f"{where}: {rel} is empty; the package is damaged (re-export the model)")
    if data.startswith(_LFS_MAGIC):
        raise ModelError(f"{where}: {rel} is a Git LFS pointer, not the model itself; run `git lfs pull` first")
    if len(data) > _MAX_PROTO:
        raise ModelError(f"{where}: {rel}: {len(data)} bytes exceeds protobuf's 2 GB message limit")
    try:
        spec = proto.Model.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{where}: {rel} is not a valid Core ML model (protobuf parse failed: {e}); is it corrupt?") from None
    bad_text = _invalid_utf8(spec)
    if bad_text is not None:
        raise ModelError(f"{where}: {rel}: {bad_text} is not valid UTF-8 text; Core ML cannot read the model (is it "
                         "corrupt? re-export the model)")
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        what = "no model type" if kind is None else f"a {kind} model"
        hint = "; save neural networks as .mlmodel files" if kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor") else ""
        if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
            hint = ("; pipelines inside packages (e.g. a detector followed by non-maximum suppression) are not "
                    "supported yet: compress the ML program before assembling the pipeline")
        raise ModelError(f"{where}: {rel} holds {what}, not an ML program{hint}")
    model = MLProgram(spec, layout, where, data)
    list(walk(spec.mlProgram, where))  # every function has its active block (or a located error now)
    check_blob_references(model)
    return model


def _invalid_utf8(message) -> str | None:
    """The first string field (as "Message.field") holding bytes that are not UTF-8, or None. Our messages
    are proto2, whose parser hands such a string over as bytes; Core ML's proto3 parser refuses the model.
    Messages that cannot hold a string (dimensions, packed numbers) are not entered."""
    pending = [message]
    while pending:
        m = pending.pop()
        for field, value in m.ListFields():
            if field.type == field.TYPE_STRING:
                if any(isinstance(v, bytes) for v in (value if field.is_repeated else (value,))):
                    return f"{field.containing_type.name}.{field.name}"
            elif field.type == field.TYPE_MESSAGE and _holds_text(field.message_type):
                if field.is_repeated:
                    pending.extend(value)
                else:
                    pending.append(value)
    return None


_HOLDS_TEXT: dict = {}


def _holds_text(descriptor) -> bool:
    """Whether a message type can hold a string field, directly or in a nested message."""
    found = _HOLDS_TEXT.get(descriptor)
    if found is None:
        _HOLDS_TEXT[descriptor] = True  # while a recursive type is being answered: enter it (never miss text)
        found = any(f.type == f.TYPE_STRING or (f.type == f.TYPE_MESSAGE and _holds_text(f.message_type))
                    for f in descriptor.fields)
        _HOLDS_TEXT[descriptor] = found
    return found


def from_tree(files: dict, where: str) -> MLProgram:
    """A model from a package held as {relative path: bytes} (the build cache): written to a private
    temporary directory the model reads from while it lives."""
    from mlqpipe.artifacts import write_tree

    tmp = Path(tempfile.mkdtemp(prefix="mlqpipe-pkg-"))
    try:
        write_tree(tmp / "model.mlpackage", files)
        model = load_package(tmp / "model.mlpackage")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.source = where
    model._keep = weakref.finalize(model, shutil.rmtree, tmp, True)
    return model


def to_tree(model: MLProgram) -> dict:
    """The package as {relative path: bytes} (what the build cache stores)."""
    from mlqpipe.artifacts import read_tree

    tmp = Path(tempfile.mkdtemp(prefix="mlqpipe-pkg-"))
    try:
        model.save(tmp / "out.mlpackage", check=False)
        return read_tree(tmp / "out.mlpackage")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
