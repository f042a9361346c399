"""A content-addressed cache of stage outputs, as a plain directory that can be shared.

Two layers, as in DVC or Bazel: `keys/ab/<key>.json` (a small manifest: which object, its size, what made
it) and `objects/ab/<sha256>` (the bytes, named by their digest). Every write goes to a temporary file and
is renamed into place, so a killed build leaves only complete entries; every read verifies the digest, so a
corrupted entry is reported by path and treated as a miss (the build recomputes and rewrites it).

A directory artifact (an ML program) is stored file by file: each file an object as above, and a tree
manifest under keys/ (`"kind": "tree"`, `"tree"`: its tree digest, `"files"`: {relative path: {"object",
"size"}}). A read verifies every object and the tree digest. File entries keep exactly their old format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mlqpipe.artifacts import TreeFile, read_tree, tree_digest
from mlqpipe.fileio import atomic_write

CACHE_FORMAT = 1


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Cache:
    root: Path
    read_only: bool = False

    def __post_init__(self):
        self.root = Path(self.root)
        self.problems: list[str] = []  # corrupted entries seen (reported by the build summary)

    def _key_path(self, key: str) -> Path:
        return self.root / "keys" / key[:2] / f"{key}.json"

    def _object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def get(self, key: str) -> bytes | None:
        """The bytes stored under `key`, verified; None when absent or corrupted."""
        kp = self._key_path(key)
        try:
            manifest = json.loads(kp.read_text(encoding="utf-8"))
            if _is_tree(manifest):
                return None  # a directory entry is not bytes: get_tree reads it
            digest = manifest["object"]
            data = self._object_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.problems.append(f"{kp}: unreadable cache manifest ({e}); rebuilding")
            return None
        if sha256(data) != digest:
            self.problems.append(f"{self._object_path(digest)}: cached bytes do not match their digest; rebuilding")
            return None
        return data

    def has(self, key: str) -> bool:
        return self._key_path(key).is_file()

    def put(self, key: str, data: bytes, meta: dict | None = None) -> str:
        digest = sha256(data)
        if self.read_only:
            return digest
        self._put_object(digest, data)
        manifest = {"format": CACHE_FORMAT, "key": key, "object": digest, "size": len(data), **(meta or {})}
        atomic_write(self._key_path(key), json.dumps(manifest, sort_keys=True, indent=1).encode())
        return digest

    def _put_object(self, digest: str, data: bytes) -> None:
        obj = self._object_path(digest)
        if not (obj.is_file() and sha256(obj.read_bytes()) == digest):
            atomic_write(obj, data)

    def get_tree(self, key: str) -> dict[str, bytes] | None:
        """The files {relative path: bytes} of the directory stored under `key`, every object and the tree
        digest verified; None when absent, not a directory entry, or corrupted (reported in `problems`)."""
        kp = self._key_path(key)
        try:
            manifest = json.loads(kp.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self.problems.append(f"{kp}: unreadable cache manifest ({e}); rebuilding")
            return None
        if not _is_tree(manifest):
            return None
        try:
            files = {rel: self._object_path(e["object"]).read_bytes() for rel, e in manifest["files"].items()}
            wanted = {rel: e["object"] for rel, e in manifest["files"].items()}
            consistent = _tree_of(manifest) == manifest["tree"]
        except (OSError, KeyError, TypeError, AttributeError) as e:
            self.problems.append(f"{kp}: directory entry incomplete ({e}); rebuilding")
            return None
        for rel, data in files.items():
            if sha256(data) != wanted[rel]:
                self.problems.append(f"{self._object_path(wanted[rel])}: cached bytes do not match their digest; rebuilding")
                return None
        if not consistent:
            self.problems.append(f"{kp}: its files do not make the tree digest it records; rebuilding")
            return None
        return files

    def put_tree(self, key: str, tree, meta: dict | None = None) -> str:
        """Store a directory (a path, or {relative path: bytes}) under `key`; returns its tree digest."""
        files = read_tree(tree) if isinstance(tree, (str, Path)) else dict(tree)
        entries = {rel: {"object": sha256(data), "size": len(data)} for rel, data in sorted(files.items())}
        digest = tree_digest(TreeFile(rel, e["object"], e["size"]) for rel, e in entries.items())
        if self.read_only:
            return digest
        for rel, data in files.items():
            self._put_object(entries[rel]["object"], data)
        manifest = {"format": CACHE_FORMAT, "key": key, "kind": "tree", "tree": digest, "files": entries,
                    "size": sum(e["size"] for e in entries.values()), **(meta or {})}
        atomic_write(self._key_path(key), json.dumps(manifest, sort_keys=True, indent=1).encode())
        return digest

    def get_artifact(self, key: str) -> bytes | dict | None:
        """What `put_artifact` stored: bytes for a file, {relative path: bytes} for a directory."""
        data = self.get(key)
        return data if data is not None else self.get_tree(key)

    def put_artifact(self, key: str, artifact: bytes | dict, meta: dict | None = None) -> str:
        return self.put(key, artifact, meta) if isinstance(artifact, bytes) else self.put_tree(key, artifact, meta)

    # --- maintenance: mlqpipe cache stats|verify|prune ---------------------------------------------------

    def manifests(self):
        for p in sorted((self.root / "keys").glob("*/*.json")):
            try:
                yield p, json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                yield p, None

    def stats(self) -> dict:
        objects = list((self.root / "objects").glob("*/*"))
        return {"root": str(self.root), "keys": sum(1 for _ in self.manifests()), "objects": len(objects),
                "bytes": sum(p.stat().st_size for p in objects)}

    def verify(self) -> list[str]:
        bad = []
        for p, m in self.manifests():
            if m is None:
                bad.append(f"{p}: unreadable manifest")
                continue
            if _is_tree(m):
                bad += self._verify_tree(p, m)
                continue
            obj = self._object_path(m.get("object", ""))
            if not obj.is_file():
                bad.append(f"{p}: object {obj} is missing")
            elif sha256(obj.read_bytes()) != m["object"]:
                bad.append(f"{obj}: bytes do not match their digest")
        return bad

    def _verify_tree(self, p: Path, m: dict) -> list[str]:
        bad = []
        try:
            for rel, e in sorted(m["files"].items()):
                obj = self._object_path(e["object"])
                if not obj.is_file():
                    bad.append(f"{p}: object {obj} ({rel}) is missing")
                elif sha256(obj.read_bytes()) != e["object"]:
                    bad.append(f"{obj}: bytes do not match their digest")
            if _tree_of(m) != m["tree"]:
                bad.append(f"{p}: its files do not make the tree digest it records")
        except (KeyError, TypeError, AttributeError) as e:
            bad.append(f"{p}: unreadable directory entry ({e})")
        return bad

    def prune(self, keep_keys: set[str]) -> int:
        """Remove manifests not in `keep_keys` and objects no kept manifest names; returns files removed."""
        removed, live = 0, set()
        for p, m in self.manifests():
            if m is not None and m.get("key") in keep_keys:
                live.update(_objects_of(m))
            else:
                p.unlink()
                removed += 1
        for obj in (self.root / "objects").glob("*/*"):
            if obj.name not in live:
                obj.unlink()
                removed += 1
        return removed


def _is_tree(manifest) -> bool:
    return isinstance(manifest, dict) and manifest.get("kind") == "tree"


def _tree_of(manifest: dict) -> str:
    return tree_digest(TreeFile(rel, e["object"], e["size"]) for rel, e in manifest["files"].items())


def _objects_of(manifest: dict) -> set[str]:
    """The objects an entry needs: its one object, or each file's of a directory entry."""
    if _is_tree(manifest):
        return {e["object"] for e in manifest.get("files", {}).values() if isinstance(e, dict)}
    return {manifest["object"]}
