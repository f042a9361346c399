"""The .mlpackage directory: Manifest.json, where the root model and its weights live, and writing one.

Nothing here looks inside model.mlmodel or weight.bin. Reading follows Core ML's ModelPackage rules
(MLPROGRAM.md §1): the model is found only through `rootModelIdentifier` -> `itemInfoEntries[id].path`
(relative to `Data/`), the weights folder is the first item (in identifier order) named "weights" by
author "com.apple.CoreML", as coremltools finds it. Every problem a user can fix is one ModelError naming
the package and saying what to do; item paths may not leave `Data/`, even through symbolic links (Core ML
itself follows them), and Git LFS pointers in place of the model or a weight file are caught early.

Writing: `write_package(path, fill)` swaps a complete new directory in atomically (artifacts.write_tree_with);
`fill(root)` writes Manifest.json and Data/ itself, streaming. `new_manifest` gives the Manifest.json of a
package laid out as coremltools lays it out, byte for byte as coremltools serializes it (nlohmann json:
4-space indent, sorted keys, trailing newline), except that the identifiers are derived from the content
instead of random, so the same model gives the same package bytes in any process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mlqpipe.artifacts import write_tree_with
from mlqpipe.errors import ModelError

MANIFEST_NAME = "Manifest.json"
DATA_DIR = "Data"
COREML_AUTHOR = "com.apple.CoreML"
WEIGHTS_NAME = "weights"
MODEL_PATH_PREFIX = "@model_path/"
SUPPORTED_FORMAT_VERSION = (1, 0, 0)

_REQUIRED_KEYS = ("fileFormatVersion", "itemInfoEntries", "rootModelIdentifier")
_ITEM_KEYS = ("author", "description", "name", "path")
_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
_ZIP_MAGIC = b"PK\x03\x04"
# what a compiled model (.mlmodelc) has at its top level and a source package never has
_COMPILED_MARKERS = ("coremldata.bin", "model.espresso.net", "model.espresso.shape", "model.espresso.weights",
                     "model.mil", "analytics")
_DAMAGED = "the package is damaged (re-export the model)"
_INCOMPLETE = "the package is incomplete (copy the whole .mlpackage directory, or re-export the model)"


@dataclass(frozen=True)
class PackageFiles:
    """Where a new package puts its files (relative to the package root), as coremltools does."""

    manifest: str = MANIFEST_NAME
    model_relpath: str = "Data/com.apple.CoreML/model.mlmodel"
    weights_relpath: str = "Data/com.apple.CoreML/weights"
    weight_file: str = "weight.bin"  # the one weight file, inside weights_relpath
    blob_file_name: str = "@model_path/weights/weight.bin"  # what a blobFileValue.fileName says for it

    @property
    def weight_relpath(self) -> str:
        return f"{self.weights_relpath}/{self.weight_file}"


PACKAGE_FILES = PackageFiles()

# the two items coremltools writes: (path relative to Data/, name, description)
_MODEL_ITEM = ("com.apple.CoreML/model.mlmodel", "model.mlmodel", "CoreML Model Specification")
_WEIGHTS_ITEM = ("com.apple.CoreML/weights", WEIGHTS_NAME, "CoreML Model Weights")


@dataclass(frozen=True)
class PackageItem:
    """One entry of itemInfoEntries; `location` is `Data/<path>` under the package root."""

    identifier: str
    author: str
    description: str
    name: str
    path: str
    location: Path


@dataclass(frozen=True)
class PackageLayout:
    """A checked .mlpackage: its manifest (parsed and as read) and where its model and weights are."""

    root: Path
    manifest: dict
    manifest_bytes: bytes
    model_id: str
    model_path: Path
    weights_dir: Path | None
    items: tuple[PackageItem, ...]  # every entry, in identifier order (Core ML's order)

    @property
    def model_dir(self) -> Path:
        """What `@model_path` means in a blobFileValue.fileName."""
        return self.model_path.parent


# --- reading ------------------------------------------------------------------------------------------------


def read_layout(path) -> PackageLayout:
    """Check a package directory and find its root model and weights folder (see the module docstring)."""
    root = Path(path)
    where = os.fspath(path)
    _check_is_package_dir(root, where)
    manifest_bytes = _read_manifest_bytes(root, where)
    manifest = _parse_manifest(manifest_bytes, where)
    entries = manifest["itemInfoEntries"]
    items = tuple(_item(root, where, ident, entries[ident]) for ident in sorted(entries))
    model_id = manifest["rootModelIdentifier"]
    model = next(item for item in items if item.identifier == model_id)
    if not os.path.isfile(model.location):
        raise ModelError(f"{where}: the root model Data/{_text(model.path)} is not a file; {_DAMAGED}")
    weights = next((i for i in items if i.name == WEIGHTS_NAME and i.author == COREML_AUTHOR), None)
    if weights is not None and not os.path.isdir(weights.location):
        raise ModelError(f"{where}: the weights item Data/{_text(weights.path)} is not a folder; {_DAMAGED}")
    _refuse_lfs_pointer(model.location, where, f"Data/{_text(model.path)}")
    if weights is not None:
        for file in _files_under(weights.location):
            shown = f"Data/{weights.path}/{file.relative_to(weights.location).as_posix()}"
            _refuse_lfs_pointer(file, where, _text(shown))
    return PackageLayout(root=root, manifest=manifest, manifest_bytes=manifest_bytes, model_id=model_id,
                         model_path=model.location, weights_dir=weights.location if weights else None, items=items)


def _check_is_package_dir(root: Path, where: str) -> None:
    if not os.path.exists(root):
        if _is_link_loop(root):
            raise ModelError(f"{where}: a symbolic link loop, not a model package; point the link at the .mlpackage "
                             "directory")
        raise ModelError(f"{where}: no such model package (check the path; an ML program is a .mlpackage directory)")
    if not root.is_dir():
        if root.suffix.lower() == ".zip" or _starts_with(root, _ZIP_MAGIC):
            raise ModelError(f"{where}: a zipped package: unzip it first (an .mlpackage is a directory holding "
                             "Manifest.json and Data/)")
        raise ModelError(f"{where}: not a directory; an ML program is a .mlpackage directory holding Manifest.json "
                         "and Data/")
    has_manifest = os.path.lexists(root / MANIFEST_NAME)
    if root.suffix == ".mlmodelc" or (not has_manifest and any(_looks_compiled(root, m) for m in _COMPILED_MARKERS)):
        raise ModelError(f"{where}: compiled Core ML model (.mlmodelc); mlqpipe needs the source .mlpackage or "
                         ".mlmodel (the one it was compiled from)")
    if not has_manifest:
        raise ModelError(f"{where}: no Manifest.json, so not a model package (an .mlpackage directory holds "
                         f"Manifest.json and Data/); {_INCOMPLETE}")


def _looks_compiled(root: Path, marker: str) -> bool:
    return os.path.lexists(root / marker)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _read_manifest_bytes(root: Path, where: str) -> bytes:
    if not _inside(root / MANIFEST_NAME, root):
        raise ModelError(f"{where}: Manifest.json is a symbolic link leading outside the package; replace it by the "
                         "file itself")
    try:
        return (root / MANIFEST_NAME).read_bytes()
    except OSError as e:
        raise ModelError(f"{where}: Manifest.json cannot be read ({e.strerror or e}); {_DAMAGED}") from None


def _json_type(value) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _parse_manifest(data: bytes, where: str) -> dict:
    """The manifest as Core ML's ModelPackage accepts it: an object with the three keys, a version of
    the form a.b.c not above 1.0.0, items that are objects of four strings, a root id among them."""
    if data.startswith(_LFS_MAGIC):
        raise ModelError(f"{where}: Manifest.json is a Git LFS pointer, not the file itself; run `git lfs pull` "
                         "in the repository it came from")
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        _refuse_lone_surrogates(manifest)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{where}: Manifest.json is not valid JSON ({_short(e)}); {_DAMAGED}") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{where}: Manifest.json holds {_json_type(manifest)}, not an object; {_DAMAGED}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelError(f"{where}: Manifest.json lacks {', '.join(missing)}; {_DAMAGED}")
    for key, kind in (("fileFormatVersion", str), ("itemInfoEntries", dict), ("rootModelIdentifier", str)):
        if not isinstance(manifest[key], kind):
            wanted = "an object" if kind is dict else "a string"
            raise ModelError(f"{where}: Manifest.json: {key} must be {wanted}, not {_json_type(manifest[key])}; "
                             f"{_DAMAGED}")
    _check_version(manifest["fileFormatVersion"], where)
    entries = manifest["itemInfoEntries"]
    for ident in sorted(entries):
        _check_entry(ident, entries[ident], where)
    root_id = manifest["rootModelIdentifier"]
    if root_id not in entries:
        raise ModelError(f"{where}: Manifest.json: rootModelIdentifier {root_id!r} names no item in "
                         f"itemInfoEntries; {_DAMAGED}")
    return manifest


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; JSON (and Core ML) does not


def _refuse_lone_surrogates(value) -> None:
    """Python's json reads an escaped lone surrogate ("\\ud800") into a str; Core ML's parser refuses it,
    and such a str cannot become a file name: refuse it as invalid JSON, as Core ML does."""
    pending = [value]
    while pending:
        v = pending.pop()
        if isinstance(v, dict):
            pending += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            pending += v
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"a lone surrogate {v[e.start]!r} in a string") from None


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_version(version: str, where: str) -> None:
    if not _VERSION.fullmatch(version):
        raise ModelError(f"{where}: Manifest.json: fileFormatVersion {version!r} is not of the form "
                         f"major.minor.patch; {_DAMAGED}")
    if not _version_supported(_version_tuple(version)):
        raise ModelError(f"{where}: Manifest.json: fileFormatVersion {version} is not supported: Core ML and mlqpipe "
                         "read version 1.0.0; save the package with a tool that writes 1.0.0 (coremltools does)")


def _version_supported(version: tuple[int, ...]) -> bool:
    """Core ML's ModelPackage rule, quirk included: above 1.0.0 is refused, and so is any 0.0.x with x > 0
    (its test is `minor == 0 && patch > 0` whatever the major); 0.1.0 and 0.0.0 are accepted."""
    major, minor, patch = version if len(version) == 3 else (2**63, 0, 0)
    newest_major, newest_minor, newest_patch = SUPPORTED_FORMAT_VERSION
    return not (major > newest_major or (major == newest_major and minor > newest_minor)
                or (minor == newest_minor and patch > newest_patch))


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:  # more digits than int() takes: far above 1
        return (2**63, 0, 0)


def _check_entry(ident: str, entry, where: str) -> None:
    if not isinstance(entry, dict):
        raise ModelError(f"{where}: Manifest.json: item {ident!r} must be an object, not {_json_type(entry)}; "
                         f"{_DAMAGED}")
    missing = [k for k in _ITEM_KEYS if k not in entry]
    if missing:
        raise ModelError(f"{where}: Manifest.json: item {ident!r} lacks {', '.join(missing)} (every item needs "
                         f"author, description, name and path); {_DAMAGED}")
    for key in _ITEM_KEYS:
        if not isinstance(entry[key], str):
            raise ModelError(f"{where}: Manifest.json: item {ident!r}: {key} must be a string, not "
                             f"{_json_type(entry[key])}; {_DAMAGED}")


def _item(root: Path, where: str, ident: str, entry: dict) -> PackageItem:
    """The entry with its location, after checking its path stays inside Data/ and exists."""
    rel = entry["path"]
    prefix = f"{where}: Manifest.json: item {ident!r}: path {rel!r}"
    parts = _relative_parts(rel, prefix)
    data = root / DATA_DIR
    location = data.joinpath(*parts)
    if not (_inside(location, data) and _inside(data, root)):
        raise ModelError(f"{prefix} leads outside the package's Data/ folder through a symbolic link; replace "
                         "the link by the file or folder itself")
    if not os.path.exists(location):
        raise ModelError(f"{where}: item {ident!r} ({_text(entry['name'])}): Data/{_text(rel)} does not exist; "
                         f"{_INCOMPLETE}")
    return PackageItem(ident, entry["author"], entry["description"], entry["name"], rel, location)


def _is_link_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _relative_parts(rel: str, prefix: str) -> list[str]:
    """The components of an item path, refusing what could leave Data/ (or name it itself)."""
    if "\0" in rel or not _encodable(rel):
        raise ModelError(f"{prefix} is not a valid file name; {_DAMAGED}")
    if rel.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", rel):
        raise ModelError(f"{prefix} is absolute; item paths are relative to Data/; {_DAMAGED}")
    parts = [p for p in PurePosixPath(rel).parts if p != "."]
    if ".." in parts or ".." in rel.split("\\"):
        raise ModelError(f"{prefix} contains '..'; item paths must stay inside Data/; {_DAMAGED}")
    if not parts:
        raise ModelError(f"{prefix} names Data/ itself, not an item inside it; {_DAMAGED}")
    return parts


def _encodable(name: str) -> bool:
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return True


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, every symbolic link on the way resolved, is `folder` (resolved) or under it.
    os.path.realpath, not Path.resolve: a link loop must not raise."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _files_under(folder: Path) -> list[Path]:
    found = []
    for top, _dirs, names in os.walk(folder):
        found += [Path(top, n) for n in sorted(names)]
    return found


def _refuse_lfs_pointer(file: Path, where: str, shown: str) -> None:
    if _starts_with(file, _LFS_MAGIC):
        raise ModelError(f"{where}: {shown} is a Git LFS pointer, not the file itself; run `git lfs pull` in the "
                         "repository it came from")


# --- blob references ------------------------------------------------------------------------------------------


def resolve_blob_file(layout: PackageLayout, file_name: str) -> Path:
    """The file a `blobFileValue.fileName` names.

    `@model_path/<rel>` is `<rel>` under the root model's folder (Core ML's meaning); it must stay inside
    the weights folder (or, in a package without a weights item, the model's folder), links resolved.
    A bare file name without a folder ("weight.bin") is taken as coremltools takes every name (its last
    component, in the weights folder). Any other name (absolute, '..', a folder without `@model_path/`)
    is refused: Core ML and coremltools would read different files, and a path must not leave the package.
    """
    where = os.fspath(layout.root)
    allowed = layout.weights_dir if layout.weights_dir is not None else layout.model_dir
    folder = "the weights folder" if layout.weights_dir is not None else "the model's folder"
    outside = (f"{where}: blob file {file_name!r} is a reference outside {folder}; weights must be in "
               f"{_shown(layout, allowed)}/ and named '@model_path/...' (re-export the model)")
    if "\0" in file_name or not _encodable(file_name):
        raise ModelError(outside)
    if file_name.startswith(MODEL_PATH_PREFIX):
        parts = file_name[len(MODEL_PATH_PREFIX):].split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ModelError(outside)
        target = layout.model_dir.joinpath(*parts)
    elif file_name and "/" not in file_name and "\\" not in file_name and file_name not in (".", ".."):
        target = allowed / file_name
    else:
        raise ModelError(outside)
    if not _inside(target, allowed):
        raise ModelError(outside)
    if os.path.isdir(target):
        raise ModelError(f"{where}: blob file {file_name!r} ({_shown(layout, target)}) is a folder, not a file; "
                         f"{_DAMAGED}")
    if not os.path.isfile(target):
        raise ModelError(f"{where}: blob file {file_name!r} ({_shown(layout, target)}) does not exist; {_INCOMPLETE}")
    return target


def _shown(layout: PackageLayout, path: Path) -> str:
    """A path inside the package as messages show it: relative to the package root."""
    try:
        return _text(path.relative_to(layout.root).as_posix())
    except ValueError:
        return _text(os.fspath(path))


def _text(name: str) -> str:
    """A name from the package as one line of a message: control characters (and lone surrogates)
    escaped, so a hostile name cannot forge lines."""
    return name if name.isprintable() else name.encode("unicode_escape", "backslashreplace").decode("ascii")


# --- writing ----------------------------------------------------------------------------------------------------


def item_identifier(model_digest: str, item_path: str) -> str:
    """A UUID-formatted identifier derived from the content (RFC 9562 version 8: application-defined),
    so that equal packages are equal bytes; Core ML only needs identifiers to be unique strings."""
    raw = bytearray(hashlib.sha256(f"mlqpipe-item 1\0{model_digest}\0{item_path}".encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def dump_manifest(manifest: dict) -> bytes:
    """Serialize a manifest as Core ML's ModelPackage does (nlohmann json: 4-space indent, keys sorted,
    UTF-8 unescaped, trailing newline)."""
    return (json.dumps(manifest, indent=4, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def new_manifest(model_digest: str, has_weights: bool) -> bytes:
    """Manifest.json of a new package laid out as PACKAGE_FILES says (the items coremltools writes)."""
    items = [_MODEL_ITEM] + ([_WEIGHTS_ITEM] if has_weights else [])
    entries = {item_identifier(model_digest, path): {"author": COREML_AUTHOR, "description": description,
                                                      "name": name, "path": path}
               for path, name, description in items}
    return dump_manifest({"fileFormatVersion": "1.0.0", "itemInfoEntries": entries,
                           "rootModelIdentifier": item_identifier(model_digest, _MODEL_ITEM[0])})


def write_package(path, fill: Callable[[Path], None], *, fsync: bool | None = None) -> None:
    """Write a package atomically: `fill(root)` writes Manifest.json and Data/ under an empty directory,
    which is checked with `read_layout` (a package that would not read back is never swapped in) and then
    replaces `path` whole (a writer killed at any point leaves the complete old or the complete new
    package). Directories and files get the umask's permissions when `fill` uses os.mkdir and open."""
    where = os.fspath(path)

    def checked_fill(root: Path) -> None:
        fill(root)
        try:
            read_layout(root)
        except ModelError as e:
            raise ModelError(f"{where}: the package written is invalid, nothing was replaced: "
                             f"{str(e).replace(os.fspath(root), where)}") from None

    try:
        write_tree_with(path, checked_fill, fsync=fsync)
    except OSError as e:
        raise ModelError(f"{where}: cannot write the package: {e.strerror or e}; nothing was written") from None


def copy_other_items(layout: PackageLayout, root) -> list[str]:
    """Copy every file of the input package that is neither Manifest.json, the root model nor in the
    weights folder (other authors' items, extra files) to the same relative path under `root`, so a
    package written back keeps them (its writer writes the manifest: `layout.manifest_bytes` unchanged
    when the model and weights keep their paths). Returns the relative paths copied. Contents only: the
    copies get the umask's permissions. A link leaving the package is refused; a link to a file inside
    it is copied as that file's content (a tree artifact holds no links)."""
    root = Path(root)
    where = os.fspath(layout.root)
    copied = []
    for rel, source in _package_files(layout.root, where):
        if rel == MANIFEST_NAME or _is_model_or_weights(layout, source):
            continue
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, target)
        except OSError as e:
            raise ModelError(f"{where}: {_text(rel)}: cannot copy ({e.strerror or e}); nothing was replaced") from None
        copied.append(rel)
    return copied


def other_items_size(layout: PackageLayout) -> int:
    """Bytes of the files `copy_other_items` copies (what a written package holds besides the manifest, the
    model and the weights)."""
    where = os.fspath(layout.root)
    return sum(source.stat().st_size for rel, source in _package_files(layout.root, where)
               if rel != MANIFEST_NAME and not _is_model_or_weights(layout, source) and source.is_file())


def _is_model_or_weights(layout: PackageLayout, path: Path) -> bool:
    """Whether a file of the package is what the writer writes anew: the root model or a weights file
    (by its path, or by what a link to it resolves to)."""
    real = os.path.realpath(path)
    if path == layout.model_path or real == os.path.realpath(layout.model_path):
        return True
    weights = layout.weights_dir
    return weights is not None and (_inside(path, weights) or weights in path.parents)


def _package_files(root: Path, where: str) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every file under the package, links to files inside it included."""

    def unreadable(e: OSError) -> None:
        raise ModelError(f"{where}: {_text(str(e.filename))}: cannot be read ({e.strerror or e}); nothing was replaced")

    found = []
    for top, dirs, names in os.walk(root, onerror=unreadable):
        for name in dirs + names:
            p = Path(top, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                if not _inside(p, root):
                    raise ModelError(f"{where}: {_text(rel)} is a symbolic link leading outside the package; replace it by "
                                     "the file itself")
                if not os.path.exists(p):
                    raise ModelError(f"{where}: {_text(rel)} is a broken symbolic link; remove it or replace it by the file")
                if p.is_dir():
                    raise ModelError(f"{where}: {_text(rel)} is a symbolic link to a folder; replace it by the folder itself")
                found.append((rel, p))
            elif name in names:
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    raise ModelError(f"{where}: {_text(rel)} is not a regular file; a package holds only files and folders")
                found.append((rel, p))
    return sorted(found)
