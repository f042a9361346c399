"""The .mlpackage directory (package.py): every refusal with its exact message, reading hand-made and
coremltools-made packages, Manifest.json bytes as coremltools writes them, deterministic identifiers, atomic
package writes under kill -9, permissions, keeping unknown items, and fuzzed manifests.

Hand-made packages hold a small neural-network model.mlmodel (tests/builders.py), which Core ML's validator
accepts, so the tree-wide validator check (tests/conftest.py) passes on every package a test writes on
purpose as valid. Packages broken in a way Core ML's ModelPackage also refuses are named `*.mlpackage` and
marked `invalid_models`: the validator then has to reject them too (an oracle on the manifest rules).
Packages that only mlqpipe refuses (links, LFS pointers, compiled models) are named `*.pkg`."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlqpipe import artifacts
from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram.package import (
    PACKAGE_FILES,
    copy_other_items,
    dump_manifest,
    item_identifier,
    new_manifest,
    read_layout,
    resolve_blob_file,
    write_package,
)
from tests.builders import small_model
from tests.conftest import REPO, _validator, validate_models

MODEL = small_model().SerializeToString()
WEIGHTS = b"\x01\x00\x00\x00\x02\x00\x00\x00" + bytes(56) + b"blob data"  # only read as bytes here
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 1234\n"
MODEL_ID, WEIGHTS_ID = "1bf16f7c-4fee-46fa-b8be-5b17a9e9dcae", "bcdd618d-132c-4cc1-933f-8f0a13360e31"
DAMAGED = "the package is damaged (re-export the model)"
INCOMPLETE = "the package is incomplete (copy the whole .mlpackage directory, or re-export the model)"


def manifest() -> dict:
    """A manifest as coremltools writes it (its identifiers)."""
    return {
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            MODEL_ID: {"author": "com.apple.CoreML", "description": "CoreML Model Specification",
                       "name": "model.mlmodel", "path": "com.apple.CoreML/model.mlmodel"},
            WEIGHTS_ID: {"author": "com.apple.CoreML", "description": "CoreML Model Weights", "name": "weights",
                         "path": "com.apple.CoreML/weights"},
        },
        "rootModelIdentifier": MODEL_ID,
    }


def make_package(root: Path, manifest_data=None, files: dict | None = None) -> Path:
    """A hand-made package: the manifest (a dict, or raw bytes) plus files {relative path: bytes}."""
    files = {PACKAGE_FILES.model_relpath: MODEL, PACKAGE_FILES.weight_relpath: WEIGHTS, **(files or {})}
    for rel, data in files.items():
        if data is None:
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    data = manifest() if manifest_data is None else manifest_data
    (root / "Manifest.json").write_bytes(data if isinstance(data, bytes) else json.dumps(data, indent=4).encode())
    return root


def refused(path) -> str:
    with pytest.raises(ModelError) as info:
        read_layout(path)
    return str(info.value)


# --- good packages ------------------------------------------------------------------------------------------


def test_a_hand_made_package_reads(tmp_path):
    pkg = make_package(tmp_path / "m.mlpackage")
    layout = read_layout(pkg)
    assert layout.root == pkg and layout.model_id == MODEL_ID and layout.manifest == manifest()
    assert layout.manifest_bytes == (pkg / "Manifest.json").read_bytes()
    assert layout.model_path == pkg / "Data/com.apple.CoreML/model.mlmodel"
    assert layout.weights_dir == pkg / "Data/com.apple.CoreML/weights" and layout.model_dir == layout.model_path.parent
    assert [(i.identifier, i.name, i.path, i.location) for i in layout.items] == [
        (MODEL_ID, "model.mlmodel", "com.apple.CoreML/model.mlmodel", layout.model_path),
        (WEIGHTS_ID, "weights", "com.apple.CoreML/weights", layout.weights_dir)]
    assert resolve_blob_file(layout, "@model_path/weights/weight.bin") == pkg / PACKAGE_FILES.weight_relpath


def test_the_model_is_found_through_the_manifest_only(tmp_path):
    m = manifest()
    m["itemInfoEntries"][MODEL_ID]["path"] = "./org.example//nested/root.mlmodel"
    m["itemInfoEntries"]["other"] = {"author": "org.example", "description": "", "name": "n", "path": "org.example"}
    pkg = make_package(tmp_path / "m.mlpackage", m, {"Data/org.example/nested/root.mlmodel": MODEL})
    layout = read_layout(pkg)
    assert layout.model_path == pkg / "Data/org.example/nested/root.mlmodel"
    assert [i.identifier for i in layout.items] == sorted(m["itemInfoEntries"])


def test_no_weights_item_and_the_first_weights_item_in_identifier_order(tmp_path):
    m = manifest()
    del m["itemInfoEntries"][WEIGHTS_ID]
    layout = read_layout(make_package(tmp_path / "a.mlpackage", m))
    assert layout.weights_dir is None
    m = manifest()
    m["itemInfoEntries"]["0-first"] = {**m["itemInfoEntries"][WEIGHTS_ID], "path": "com.apple.CoreML/w0"}
    m["itemInfoEntries"]["z-other-author"] = {**m["itemInfoEntries"][WEIGHTS_ID], "author": "x", "path": "x"}
    pkg = make_package(tmp_path / "b.mlpackage", m, {"Data/com.apple.CoreML/w0/weight.bin": WEIGHTS,
                                                    "Data/x/f": b""})
    assert read_layout(pkg).weights_dir == pkg / "Data/com.apple.CoreML/w0"  # as coremltools' findItem


@pytest.mark.parametrize("name", ["mlp_ios18_fp32", "no_weights_ios16", "mlp_ios16_fp32"])
def test_coremltools_packages_read(mlpackage, name):
    pkg = mlpackage(name)
    layout = read_layout(pkg)
    assert layout.model_path == pkg / "Data/com.apple.CoreML/model.mlmodel"
    assert layout.weights_dir == pkg / "Data/com.apple.CoreML/weights"  # coremltools always makes the folder
    assert layout.manifest_bytes == (pkg / "Manifest.json").read_bytes()
    if name != "no_weights_ios16":
        assert resolve_blob_file(layout, "@model_path/weights/weight.bin").stat().st_size > 64


def _role_ids(m: dict) -> tuple[str, str]:
    """(model identifier, weights identifier) of a manifest."""
    entries = m["itemInfoEntries"]
    by_name = {entry["name"]: ident for ident, entry in entries.items()}
    return by_name["model.mlmodel"], by_name["weights"]


@pytest.mark.parametrize("name", ["mlp_ios18_fp32", "no_weights_ios16"])
def test_new_manifest_has_coremltools_bytes_apart_from_identifiers(mlpackage, name):
    theirs = (mlpackage(name) / "Manifest.json").read_bytes()
    assert dump_manifest(json.loads(theirs)) == theirs  # our serializer writes coremltools' bytes exactly
    their_model, their_weights = _role_ids(json.loads(theirs))
    # a digest whose identifiers sort as theirs do, so that the entries come in the same order
    digest = next(d for d in map(str, range(100)) if (item_identifier(d, "com.apple.CoreML/model.mlmodel")
                                                      < item_identifier(d, "com.apple.CoreML/weights"))
                  == (their_model < their_weights))
    ours = new_manifest(digest, has_weights=True)  # coremltools writes the weights item even when it is empty
    model_id, weights_id = _role_ids(json.loads(ours))
    assert theirs.replace(their_model.encode(), model_id.encode()).replace(their_weights.encode(),
                                                                           weights_id.encode()) == ours


def test_new_manifest_without_weights_and_its_identifiers():
    m = json.loads(new_manifest("d" * 64, has_weights=False))
    (ident, entry), = m["itemInfoEntries"].items()
    assert m == {"fileFormatVersion": "1.0.0", "rootModelIdentifier": ident, "itemInfoEntries": {ident: {
        "author": "com.apple.CoreML", "description": "CoreML Model Specification", "name": "model.mlmodel",
        "path": "com.apple.CoreML/model.mlmodel"}}}
    assert ident == item_identifier("d" * 64, "com.apple.CoreML/model.mlmodel")
    assert len(ident) == 36 and ident[14] == "8" and ident[19] in "89ab" and ident == ident.lower()
    assert new_manifest("d" * 64, True) != new_manifest("e" * 64, True)


def test_new_manifest_is_the_same_in_another_process():
    code = "import sys; from mlqpipe.formats.mlprogram.package import new_manifest as n; " \
           "sys.stdout.buffer.write(n('abc', True) + n('abc', False))"
    runs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] == new_manifest("abc", True) + new_manifest("abc", False)


# --- refusals: not a package ----------------------------------------------------------------------------------


def test_not_a_package(tmp_path):
    missing = tmp_path / "absent.mlpackage"
    assert refused(missing) == f"{missing}: no such model package (check the path; an ML program is a .mlpackage directory)"
    zipped = "a zipped package: unzip it first (an .mlpackage is a directory holding Manifest.json and Data/)"
    (tmp_path / "empty.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "m.pkg", "w") as z:
        z.writestr("m.mlpackage/Manifest.json", "{}")
    for p in (tmp_path / "empty.zip", tmp_path / "m.pkg"):
        assert refused(p) == f"{p}: {zipped}"
    (tmp_path / "plain").write_bytes(MODEL)
    assert refused(tmp_path / "plain") == (f"{tmp_path / 'plain'}: not a directory; an ML program is a .mlpackage "
                                           "directory holding Manifest.json and Data/")
    compiled = ("compiled Core ML model (.mlmodelc); mlqpipe needs the source .mlpackage or .mlmodel (the one it was "
                "compiled from)")
    for name, marker in (("m.mlmodelc", None), ("c1", "coremldata.bin"), ("c2", "model.espresso.net"), ("c3", "model.mil")):
        (tmp_path / name).mkdir()
        if marker:
            (tmp_path / name / marker).write_bytes(b"")
        assert refused(tmp_path / name) == f"{tmp_path / name}: {compiled}"
    (tmp_path / "bare").mkdir()
    assert refused(tmp_path / "bare") == (f"{tmp_path / 'bare'}: no Manifest.json, so not a model package (an "
                                          f".mlpackage directory holds Manifest.json and Data/); {INCOMPLETE}")


# --- refusals: the manifest -------------------------------------------------------------------------------------


def _set(path: list, value):
    def mutate(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return m
    return mutate


E = ["itemInfoEntries"]
# (case, mutation of manifest() or raw bytes, the message after "<package>: ")
MANIFEST_CASES = [
    ("not json", b"{\"fileFormatVersion\": ", f"Manifest.json is not valid JSON (Expecting value: line 1 column 23 "
                                              f"(char 22)); {DAMAGED}"),
    ("not utf-8", b"\xff{}", "Manifest.json is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: "
                             f"invalid start byte); {DAMAGED}"),
    ("a lone surrogate", b'{"fileFormatVersion": "1.0.0\\ud800"}',
     f"Manifest.json is not valid JSON (a lone surrogate '\\ud800' in a string); {DAMAGED}"),
    ("NaN", b'{"x": NaN}', f"Manifest.json is not valid JSON (NaN is not JSON); {DAMAGED}"),
    ("an array", b"[]", f"Manifest.json holds an array, not an object; {DAMAGED}"),
    ("no version", _set(["fileFormatVersion"], KeyError), f"Manifest.json lacks fileFormatVersion; {DAMAGED}"),
    ("no entries", _set(E, KeyError), f"Manifest.json lacks itemInfoEntries; {DAMAGED}"),
    ("no root", _set(["rootModelIdentifier"], KeyError), f"Manifest.json lacks rootModelIdentifier; {DAMAGED}"),
    ("version a number", _set(["fileFormatVersion"], 1),
     f"Manifest.json: fileFormatVersion must be a string, not a number; {DAMAGED}"),
    ("entries an array", _set(E, []), f"Manifest.json: itemInfoEntries must be an object, not an array; {DAMAGED}"),
    ("root null", _set(["rootModelIdentifier"], None),
     f"Manifest.json: rootModelIdentifier must be a string, not null; {DAMAGED}"),
    ("version a.b", _set(["fileFormatVersion"], "1.0"),
     f"Manifest.json: fileFormatVersion '1.0' is not of the form major.minor.patch; {DAMAGED}"),
    ("version letters", _set(["fileFormatVersion"], "1.0.x"),
     f"Manifest.json: fileFormatVersion '1.0.x' is not of the form major.minor.patch; {DAMAGED}"),
    *[(f"version {v[:9]}", _set(["fileFormatVersion"], v),
       f"Manifest.json: fileFormatVersion {v} is not supported: Core ML and mlqpipe read version 1.0.0; save the "
       "package with a tool that writes 1.0.0 (coremltools does)") for v in ("1.0.1", "1.1.0", "2.0.0", "0.0.1", "3.0.7",
                                                                             "9" * 5000 + ".0.0")],
    ("entry a string", _set([*E, MODEL_ID], "x"),
     f"Manifest.json: item '{MODEL_ID}' must be an object, not a string; {DAMAGED}"),
    *[(f"entry without {k}", _set([*E, WEIGHTS_ID, k], KeyError),
       f"Manifest.json: item '{WEIGHTS_ID}' lacks {k} (every item needs author, description, name and path); "
       f"{DAMAGED}") for k in ("author", "description", "name", "path")],
    ("entry author a number", _set([*E, MODEL_ID, "author"], 3),
     f"Manifest.json: item '{MODEL_ID}': author must be a string, not a number; {DAMAGED}"),
    ("unknown root", _set(["rootModelIdentifier"], "nope"),
     f"Manifest.json: rootModelIdentifier 'nope' names no item in itemInfoEntries; {DAMAGED}"),
    ("absolute path", _set([*E, MODEL_ID, "path"], "/etc/passwd"),
     f"Manifest.json: item '{MODEL_ID}': path '/etc/passwd' is absolute; item paths are relative to Data/; {DAMAGED}"),
    ("dotdot path", _set([*E, MODEL_ID, "path"], "com.apple.CoreML/../../Manifest.json"),
     f"Manifest.json: item '{MODEL_ID}': path 'com.apple.CoreML/../../Manifest.json' contains '..'; item paths "
     f"must stay inside Data/; {DAMAGED}"),
    ("empty path", _set([*E, WEIGHTS_ID, "path"], ""),
     f"Manifest.json: item '{WEIGHTS_ID}': path '' names Data/ itself, not an item inside it; {DAMAGED}"),
    ("missing item", _set([*E, MODEL_ID, "path"], "com.apple.CoreML/absent.mlmodel"),
     f"item '{MODEL_ID}' (model.mlmodel): Data/com.apple.CoreML/absent.mlmodel does not exist; {INCOMPLETE}"),
    ("missing, a newline in its name", _set([*E, MODEL_ID, "path"], "com.apple.CoreML/a\nb"),
     f"item '{MODEL_ID}' (model.mlmodel): Data/com.apple.CoreML/a\\nb does not exist; {INCOMPLETE}"),
    ("missing weights", _set([*E, WEIGHTS_ID, "path"], "com.apple.CoreML/w"),
     f"item '{WEIGHTS_ID}' (weights): Data/com.apple.CoreML/w does not exist; {INCOMPLETE}"),
]
# not handed to Core ML's validator: a path naming Data/ itself, which its ModelPackage accepts (it joins
# item paths to Data/ unchecked; "/etc/passwd" and "../../Manifest.json" fail there only because they are
# no model), and bytes that are not UTF-8 (its message echoes them, which tests/conftest.py's validator
# runner cannot decode). Core ML refuses every other case (checked: they are marked invalid_models).
CORE_ML_NOT_ASKED = {"empty path", "not utf-8"}


@pytest.mark.parametrize(("case", "mutation", "message"), MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_refusals(tmp_path, request, case, mutation, message):
    data = mutation if isinstance(mutation, bytes) else mutation(manifest())
    if case in CORE_ML_NOT_ASKED:
        pkg = make_package(tmp_path / "bad.pkg", data)
    else:  # Core ML's validator must refuse it too
        request.applymarker(pytest.mark.invalid_models("bad.mlpackage", reason="the manifest is broken on purpose"))
        pkg = make_package(tmp_path / "bad.mlpackage", data)
    assert refused(pkg) == f"{pkg}: {message}"


@pytest.mark.parametrize("version", ["1.0.0", "0.1.0", "0.0.0", "0.9.9", "01.00.000"])
def test_versions_core_ml_accepts_are_read(tmp_path, version):
    pkg = make_package(tmp_path / "m.mlpackage", _set(["fileFormatVersion"], version)(manifest()))
    assert read_layout(pkg).manifest["fileFormatVersion"] == version  # and Core ML's validator accepts it


def test_the_root_model_must_be_a_file_and_the_weights_a_folder(tmp_path):
    m = _set([*E, MODEL_ID, "path"], "com.apple.CoreML")(manifest())
    pkg = make_package(tmp_path / "a.pkg", m)
    assert refused(pkg) == f"{pkg}: the root model Data/com.apple.CoreML is not a file; {DAMAGED}"
    m = _set([*E, WEIGHTS_ID, "path"], "com.apple.CoreML/model.mlmodel")(manifest())
    pkg = make_package(tmp_path / "b.pkg", m)
    assert refused(pkg) == f"{pkg}: the weights item Data/com.apple.CoreML/model.mlmodel is not a folder; {DAMAGED}"


def test_links_out_of_the_package_are_refused(tmp_path):
    outside = make_package(tmp_path / "outside")  # a complete package elsewhere, for links to lead to
    message = ("leads outside the package's Data/ folder through a symbolic link; replace the link by the file or "
               "folder itself")
    a = make_package(tmp_path / "a.pkg", files={PACKAGE_FILES.model_relpath: None})
    os.symlink(outside / PACKAGE_FILES.model_relpath, a / PACKAGE_FILES.model_relpath)
    assert refused(a) == f"{a}: Manifest.json: item '{MODEL_ID}': path 'com.apple.CoreML/model.mlmodel' {message}"
    b = tmp_path / "b.pkg"
    b.mkdir()
    os.symlink(outside / "Data", b / "Data")  # the whole Data/ folder elsewhere
    (b / "Manifest.json").write_bytes((outside / "Manifest.json").read_bytes())
    assert refused(b) == f"{b}: Manifest.json: item '{MODEL_ID}': path 'com.apple.CoreML/model.mlmodel' {message}"
    c = make_package(tmp_path / "c.pkg")
    os.symlink(tmp_path / "outside" / "Data" / "com.apple.CoreML", c / "Data" / "escape")
    m = _set([*E, WEIGHTS_ID, "path"], "escape/weights")(manifest())
    (c / "Manifest.json").write_text(json.dumps(m))
    assert refused(c) == f"{c}: Manifest.json: item '{WEIGHTS_ID}': path 'escape/weights' {message}"
    e = make_package(tmp_path / "e.pkg")
    (e / "Manifest.json").unlink()
    os.symlink(outside / "Manifest.json", e / "Manifest.json")
    assert refused(e) == (f"{e}: Manifest.json is a symbolic link leading outside the package; replace it by the "
                          "file itself")
    d = make_package(tmp_path / "d.pkg")  # a link loop: refused as missing, not a RuntimeError
    os.symlink("loop", d / "Data" / "loop")
    (d / "Manifest.json").write_text(json.dumps(_set([*E, WEIGHTS_ID, "path"], "loop")(manifest())))
    assert refused(d) == f"{d}: item '{WEIGHTS_ID}' (weights): Data/loop does not exist; {INCOMPLETE}"


def test_a_link_inside_the_package_is_followed(tmp_path):
    pkg = make_package(tmp_path / "m.pkg", files={"Data/com.apple.CoreML/real.mlmodel": MODEL,
                                                 PACKAGE_FILES.model_relpath: None})
    os.symlink("real.mlmodel", pkg / PACKAGE_FILES.model_relpath)
    assert read_layout(pkg).model_path == pkg / PACKAGE_FILES.model_relpath


@pytest.mark.invalid_models("lfs-model.pkg/*", reason="the model is a Git LFS pointer on purpose")
def test_git_lfs_pointers_are_refused(tmp_path):
    advice = "is a Git LFS pointer, not the file itself; run `git lfs pull` in the repository it came from"
    a = make_package(tmp_path / "lfs-model.pkg", files={PACKAGE_FILES.model_relpath: LFS})
    assert refused(a) == f"{a}: Data/com.apple.CoreML/model.mlmodel {advice}"
    b = make_package(tmp_path / "lfs-weights.pkg", files={PACKAGE_FILES.weight_relpath: LFS})
    assert refused(b) == f"{b}: Data/com.apple.CoreML/weights/weight.bin {advice}"
    c = make_package(tmp_path / "lfs-manifest.pkg", LFS)
    assert refused(c) == f"{c}: Manifest.json {advice}"


# --- blob references --------------------------------------------------------------------------------------------


def test_blob_file_names(tmp_path):
    pkg = make_package(tmp_path / "m.mlpackage", files={"Data/com.apple.CoreML/weights/more.bin": b"x",
                                                       "Data/com.apple.CoreML/other.bin": b"y"})
    layout = read_layout(pkg)
    weights = pkg / "Data/com.apple.CoreML/weights"
    assert resolve_blob_file(layout, "@model_path/weights/more.bin") == weights / "more.bin"
    assert resolve_blob_file(layout, "weight.bin") == weights / "weight.bin"  # a bare name: as coremltools
    outside = ("is a reference outside the weights folder; weights must be in Data/com.apple.CoreML/weights/ and named "
               "'@model_path/...' (re-export the model)")
    for name in ("@model_path/other.bin", "@model_path/weights/../other.bin", "@model_path/../Manifest.json",
                 "/etc/passwd", "weights/weight.bin", "../weight.bin", "", "@model_path/", "@model_path//x",
                 "@model_path/weights/./weight.bin", "a\0b", "..", "x\\weight.bin"):
        with pytest.raises(ModelError) as info:
            resolve_blob_file(layout, name)
        assert str(info.value) == f"{pkg}: blob file {name!r} {outside}"
    with pytest.raises(ModelError) as info:
        resolve_blob_file(layout, "@model_path/weights/absent.bin")
    assert str(info.value) == (f"{pkg}: blob file '@model_path/weights/absent.bin' (Data/com.apple.CoreML/weights/"
                               f"absent.bin) does not exist; {INCOMPLETE}")
    (weights / "sub").mkdir()
    with pytest.raises(ModelError, match=r"\(Data/com.apple.CoreML/weights/sub\) is a folder, not a file"):
        resolve_blob_file(layout, "@model_path/weights/sub")


def test_blob_files_behind_links_must_stay_in_the_weights_folder(tmp_path):
    pkg = make_package(tmp_path / "m.pkg", files={"Data/com.apple.CoreML/weights/inner.bin": b"x"})
    (tmp_path / "secret").write_bytes(b"s")
    weights = pkg / "Data/com.apple.CoreML/weights"
    os.symlink(tmp_path / "secret", weights / "escape.bin")
    os.symlink("inner.bin", weights / "alias.bin")
    layout = read_layout(pkg)
    with pytest.raises(ModelError, match="escape.bin' is a reference outside the weights folder"):
        resolve_blob_file(layout, "@model_path/weights/escape.bin")
    assert resolve_blob_file(layout, "@model_path/weights/alias.bin") == weights / "alias.bin"


def test_without_a_weights_item_blobs_are_in_the_model_folder(tmp_path):
    m = manifest()
    del m["itemInfoEntries"][WEIGHTS_ID]
    pkg = make_package(tmp_path / "m.mlpackage", m)
    layout = read_layout(pkg)
    assert resolve_blob_file(layout, "@model_path/weights/weight.bin") == pkg / PACKAGE_FILES.weight_relpath
    with pytest.raises(ModelError, match=r"'@model_path/\.\./x' is a reference outside the model's folder; weights "
                                         r"must be in Data/com.apple.CoreML/ "):
        resolve_blob_file(layout, "@model_path/../x")


# --- writing ------------------------------------------------------------------------------------------------------


def filler(model: bytes = MODEL, weights: bytes | None = WEIGHTS, extra: dict | None = None):
    """A `fill` writing a package as a writer would: new manifest, model, weights, extra files."""

    def fill(root: Path) -> None:
        (root / PACKAGE_FILES.model_relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / PACKAGE_FILES.model_relpath).write_bytes(model)
        if weights is not None:
            (root / PACKAGE_FILES.weights_relpath).mkdir(exist_ok=True)
            (root / PACKAGE_FILES.weight_relpath).write_bytes(weights)
        for rel, data in (extra or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        (root / "Manifest.json").write_bytes(new_manifest(hashlib.sha256(model).hexdigest(), weights is not None))

    return fill


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("umask", "dirs", "files"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_write_package_writes_a_readable_package_with_the_umask_permissions(tmp_path, umask, dirs, files):
    old = os.umask(umask)
    try:
        write_package(tmp_path / "m.mlpackage", filler())
    finally:
        os.umask(old)
    pkg = tmp_path / "m.mlpackage"
    layout = read_layout(pkg)
    assert layout.model_path.read_bytes() == MODEL and layout.manifest_bytes == new_manifest(
        hashlib.sha256(MODEL).hexdigest(), True)
    entries = [pkg, *pkg.rglob("*")]
    assert {p.relative_to(tmp_path).as_posix(): _mode(p) for p in entries} == {
        p.relative_to(tmp_path).as_posix(): dirs if p.is_dir() else files for p in entries}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_write_package_replaces_a_package_whole(tmp_path):
    pkg = tmp_path / "m.mlpackage"
    write_package(pkg, filler(extra={"Data/org.example/old.txt": b"old"}))
    write_package(pkg, filler(weights=None))
    assert artifacts.read_tree(pkg) == {"Manifest.json": new_manifest(hashlib.sha256(MODEL).hexdigest(), False),
                                        PACKAGE_FILES.model_relpath: MODEL}


def test_write_package_never_swaps_in_a_package_that_does_not_read(tmp_path):
    pkg = tmp_path / "m.mlpackage"
    write_package(pkg, filler())
    before = artifacts.digest(pkg)

    def broken(root: Path) -> None:
        filler()(root)
        (root / PACKAGE_FILES.weight_relpath).write_bytes(LFS)

    with pytest.raises(ModelError) as info:
        write_package(pkg, broken)
    assert str(info.value) == (f"{pkg}: the package written is invalid, nothing was replaced: {pkg}: "
                               "Data/com.apple.CoreML/weights/weight.bin is a Git LFS pointer, not the file itself; run "
                               "`git lfs pull` in the repository it came from")
    assert artifacts.digest(pkg) == before and [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mlqpipe import artifacts
    from mlqpipe.formats.mlprogram.package import new_manifest, write_package
    target, step, nth, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    seen = {}
    def kill_at(name):
        seen[name] = seen.get(name, 0) + 1
        if name == step and seen[name] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    artifacts._step = kill_at
    if mode == "move-aside":
        artifacts._exchange = lambda a, b: False
    def fill(root):
        (root / "Data/com.apple.CoreML/weights").mkdir(parents=True)
        (root / "Data/com.apple.CoreML/model.mlmodel").write_bytes(Path(sys.argv[5]).read_bytes())
        kill_at("model")
        (root / "Data/com.apple.CoreML/weights/weight.bin").write_bytes(b"new weights" * 1000)
        (root / "Data/org.example/notes.txt").parent.mkdir()
        (root / "Data/org.example/notes.txt").write_bytes(b"new")
        (root / "Manifest.json").write_bytes(new_manifest("new", True))
    write_package(target, fill)
""")

KILL_STEPS = {
    "exchange": [("model", 1), ("filled", 1), ("exchanged", 1), ("removing", 1), ("removing", 3)],
    "move-aside": [("model", 1), ("filled", 1), ("renamed-new", 1), ("moved-old", 1), ("swapped", 1), ("doomed", 1),
                   ("removing", 2)],
}


@pytest.mark.parametrize(("mode", "step", "nth"), [(m, s, n) for m, steps in KILL_STEPS.items() for s, n in steps])
def test_a_killed_package_write_leaves_the_old_or_the_new_package(tmp_path, mode, step, nth):
    pkg = tmp_path / "m.mlpackage"
    write_package(pkg, filler(weights=b"old weights" * 1000))
    old = artifacts.digest(pkg)
    (tmp_path / "model.bin").write_bytes(MODEL)
    done = subprocess.run([sys.executable, "-c", CHILD, str(pkg), step, str(nth), mode, str(tmp_path / "model.bin")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    window = step == "moved-old"  # between the two renames of a move-aside: no target until healed
    assert not pkg.exists() if window else artifacts.digest(pkg) in {old, _new_digest(tmp_path)}
    artifacts.heal(pkg)
    state = artifacts.digest(pkg)
    assert state in {old, _new_digest(tmp_path)} and read_layout(pkg).model_path.read_bytes() == MODEL
    assert state == old if step in ("model", "filled", "renamed-new") else state == _new_digest(tmp_path)
    assert artifacts.leftovers(pkg) == []


def _new_digest(tmp_path) -> str:
    return artifacts.mapping_digest({
        "Manifest.json": new_manifest("new", True), PACKAGE_FILES.model_relpath: MODEL,
        PACKAGE_FILES.weight_relpath: b"new weights" * 1000, "Data/org.example/notes.txt": b"new"})


# --- keeping other items ----------------------------------------------------------------------------------------


def test_copy_other_items_keeps_everything_but_the_model_and_weights(tmp_path):
    m = manifest()
    m["itemInfoEntries"]["other"] = {"author": "org.example", "description": "d", "name": "n", "path": "org.example"}
    extras = {"Data/org.example/a.json": b"{}", "Data/org.example/deep/b.bin": b"b" * 100,
              "Data/com.apple.CoreML/sidecar.txt": b"kept", "README.txt": b"top level"}
    src = make_package(tmp_path / "in.mlpackage", m, {**extras, "Data/com.apple.CoreML/weights/w2.bin": b"w2"})
    layout = read_layout(src)
    out = tmp_path / "out.mlpackage"

    def fill(root: Path) -> None:
        assert copy_other_items(layout, root) == sorted(extras)
        filler()(root)
        (root / "Manifest.json").write_bytes(layout.manifest_bytes)  # the same items: the manifest unchanged

    old = os.umask(0o077)
    try:
        write_package(out, fill)
    finally:
        os.umask(old)
    tree = artifacts.read_tree(out)
    assert {k: tree[k] for k in extras} == extras and "Data/com.apple.CoreML/weights/w2.bin" not in tree
    assert tree["Manifest.json"] == (src / "Manifest.json").read_bytes()
    assert {_mode(out / k) for k in extras} == {0o600}  # contents copied, modes from the umask
    assert read_layout(out).manifest == m


def test_copy_other_items_refuses_links_out_of_the_package(tmp_path):
    src = make_package(tmp_path / "in.pkg", files={"Data/org.example/real.txt": b"r"})
    os.symlink("real.txt", src / "Data/org.example/alias.txt")
    (tmp_path / "secret").write_bytes(b"s")
    layout = read_layout(src)
    (tmp_path / "a").mkdir()
    assert copy_other_items(layout, tmp_path / "a") == ["Data/org.example/alias.txt", "Data/org.example/real.txt"]
    assert (tmp_path / "a/Data/org.example/alias.txt").read_bytes() == b"r"
    assert not (tmp_path / "a/Data/org.example/alias.txt").is_symlink()
    os.symlink("../com.apple.CoreML/model.mlmodel", src / "Data/org.example/model-alias")  # the model: not copied
    os.symlink("../com.apple.CoreML/weights/weight.bin", src / "Data/org.example/weights-alias")
    (tmp_path / "c").mkdir()
    assert copy_other_items(layout, tmp_path / "c") == ["Data/org.example/alias.txt", "Data/org.example/real.txt"]
    os.mkfifo(src / "Data/org.example/fifo")
    with pytest.raises(ModelError) as info:
        copy_other_items(layout, tmp_path / "d")
    assert str(info.value) == (f"{src}: Data/org.example/fifo is not a regular file; a package holds only files and "
                               "folders")
    os.unlink(src / "Data/org.example/fifo")
    os.symlink("absent", src / "Data/org.example/broken")
    with pytest.raises(ModelError) as info:
        copy_other_items(layout, tmp_path / "e")
    assert str(info.value) == (f"{src}: Data/org.example/broken is a broken symbolic link; remove it or replace it by "
                               "the file")
    os.unlink(src / "Data/org.example/broken")
    os.symlink(tmp_path / "secret", src / "Data/org.example/escape.txt")
    with pytest.raises(ModelError) as info:
        copy_other_items(layout, tmp_path / "b")
    assert str(info.value) == (f"{src}: Data/org.example/escape.txt is a symbolic link leading outside the package; "
                               "replace it by the file itself")


# --- fuzzing ----------------------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
PATHS = st.sampled_from(["fileFormatVersion", "itemInfoEntries", "rootModelIdentifier", f"itemInfoEntries/{MODEL_ID}",
                         f"itemInfoEntries/{WEIGHTS_ID}", *[f"itemInfoEntries/{i}/{k}" for i in (MODEL_ID, WEIGHTS_ID)
                                                           for k in ("author", "description", "name", "path")]])
NAMES = st.sampled_from(["", ".", "..", "a\nb", "/", "a/../..", "com.apple.CoreML", "com.apple.CoreML/model.mlmodel",
                         "com.apple.CoreML/weights", "\0", "\ud800", "C:\\x", "x" * 300, "../Data/com.apple.CoreML"])
MUTATION = st.tuples(PATHS, st.sampled_from(["delete", "json", "name"]), JSON, NAMES)


def _mutated(m: dict, mutations) -> dict:
    m = copy.deepcopy(m)
    for path, how, value, name in mutations:
        *parents, key = path.split("/")
        target = m
        for p in parents:
            target = target.get(p) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        if how == "delete":
            target.pop(key, None)
        else:
            target[key] = value if how == "json" else name
    return m


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4), garbage=st.binary(max_size=12))
def test_fuzzed_manifests_give_a_model_error_or_a_layout(tmp_path_factory, mutations, garbage):
    root = tmp_path_factory.mktemp("fuzz") / "m.pkg"
    m = _mutated(manifest(), mutations)
    data = json.dumps(m).encode("utf-8", "surrogatepass")
    if garbage and garbage[0] % 4 == 0:  # sometimes truncated or with bytes added
        data = data[: len(data) // 2] + garbage
    make_package(root, data)
    try:
        layout = read_layout(root)
    except ModelError as e:
        assert str(e).startswith(f"{root}: ") and "\n" not in str(e)
        event("refused")
        return
    event("read")
    assert layout.model_path.is_file() and layout.model_id in m["itemInfoEntries"]
    if _validator() is not None:  # what mlqpipe reads, Core ML's ModelPackage reads too
        accepted = root.rename(root.with_suffix(".mlpackage"))
        assert validate_models([accepted]) == {accepted: None}


BLOB_NAMES = st.lists(st.sampled_from(["@model_path", "weights", "weight.bin", "..", ".", "", "/", "\\", "\0", "x", "\n",
                                       "com.apple.CoreML", "Data", "Manifest.json", "\ud800"]), max_size=6).map("/".join)


@pytest.fixture(scope="module")
def blob_package(tmp_path_factory):
    pkg = make_package(tmp_path_factory.mktemp("blobs") / "m.mlpackage", files={"Data/com.apple.CoreML/x": b"x"})
    (pkg / "Data/com.apple.CoreML/weights/x").write_bytes(b"x")
    return read_layout(pkg)


@settings(max_examples=200, deadline=None)
@given(name=BLOB_NAMES | st.text(max_size=30))
def test_fuzzed_blob_file_names_stay_in_the_weights_folder(blob_package, name):
    layout = blob_package
    try:
        found = resolve_blob_file(layout, name)
    except ModelError as e:
        assert str(e).startswith(f"{layout.root}: blob file {name!r} ") and "\n" not in str(e)
        return
    real = os.path.realpath(found)
    assert os.path.isfile(real) and real.startswith(os.path.realpath(layout.weights_dir) + os.sep)

