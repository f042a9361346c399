"""A content-addressed cache of stage outputs, as a plain directory that can be shared.

Two layers, as in DVC or Bazel: `keys/ab/<key>.json` (a small manifest: which object, its size, what made
it) and `objects/ab/<sha256>` (the bytes, named by their digest). Every write goes to a temporary file and
is renamed into place, so a killed build leaves only complete entries; every read verifies the digest, so a
corrupted entry is reported by path and treated as a miss (the build recomputes and rewrites it).

A directory artifact (an ML program) is stored file by file: each file an object as above, and a tree
manifest under keys/ (`"kind": "tree"`, `"tree"`: its tree digest, `"files"`: {relative path: {"object",
"size"}}). A read verifies every object and the tree digest. File entries keep exactly their old format.

The bytes live in a store (store.py): the local directory, or an fsspec URL (`s3://bucket/prefix`) with a
local directory in front (`open_cache`): reads try local, then remote (a verified remote hit is copied into
local); writes go to both (objects create-if-absent, manifests last); `--cache-read-only` leaves the remote
unwritten. A failing remote never fails a build: one warning, then local only for the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from mlqpipe.artifacts import TreeFile, read_tree, tree_digest
from mlqpipe.build.store import LocalStore, is_url

CACHE_FORMAT = 1
LOCAL_CACHE = ".mlqpipe-cache"  # the local layer of a URL cache, unless $MLQPIPE_LOCAL_CACHE says otherwise
_PENDING: dict = {}  # local directory -> {manifest rel: Event set once its prefetch batch is done}
os.register_at_fork(after_in_child=_PENDING.clear)  # a forked worker hears nothing of the prefetch: it reads itself
PREFETCH_WAIT = 120  # seconds a read waits for its background prefetch batch before reading by itself
PACK_OBJECT_MAX = 1 << 20  # objects up to this size go into a lock's pack (put_bundle) ...
PACK_MAX = 64 << 20  # ... up to this many bytes in all


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key_rel(key: str) -> str:
    return f"keys/{key[:2]}/{key}.json"


def _object_rel(digest: str) -> str:
    return f"objects/{digest[:2]}/{digest}"


def bundle_key(keys) -> str:
    """The cache key of the bundle of these entries' manifests (any order, duplicates ignored)."""
    return sha256(("mlqpipe-bundle\n" + "\n".join(sorted(set(keys)))).encode())


def _manifest_bytes(manifest: dict) -> bytes:
    """A manifest as `put` writes it (a bundled manifest is written back byte for byte)."""
    return json.dumps(manifest, sort_keys=True, indent=1).encode()


def _manifest(data: bytes):
    """A manifest's JSON, or None when it does not parse as one (a truncated or foreign file)."""
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return m if isinstance(m, dict) else None


class Cache:
    """Content-addressed stage outputs. `Cache(root)` is the local directory; `open_cache(options)` also
    takes URLs (a remote behind a local layer)."""

    def __init__(self, root=None, read_only: bool = False, *, store=None, remote=None):
        self.store = store or LocalStore(Path(root))
        self.remote = remote  # store.Remote or None
        self.root = remote.store.shown if remote else self.store.root  # what messages and stats show
        self.read_only = read_only  # the local directory is never written (a plain-path cache only)
        self.problems: list[str] = []  # corrupted entries seen (reported by the build summary)
        self._bad: set[str] = set()  # rel paths found corrupt: rewritten, not skipped as present
        self.remote_bytes_read = 0  # what this cache read from the remote (the benchmark counts it)

    # --- the two layers -------------------------------------------------------------------------------

    def _fetch(self, rel: str, valid) -> bytes | None:
        """The bytes at `rel` that pass `valid`: local first, then the remote (copied into local). Bad bytes
        in either layer are reported and treated as absent."""
        self._wait_for_prefetch(rel)
        try:
            data = self.store.read(rel)
            if valid(data):
                return data
            self._corrupt(self.store.describe(rel), rel)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.problems.append(f"{self.store.describe(rel)}: unreadable ({e}); rebuilding")
            self._bad.add(rel)
        if self.remote is None:
            return None
        try:
            data = self.remote.attempt(self.remote.store.read, rel)
        except FileNotFoundError:
            return None
        if data is None:
            return None
        self.remote_bytes_read += len(data)
        if not valid(data):
            self._corrupt(self.remote.store.describe(rel), rel)
            return None
        if not self.read_only:
            self.store.write(rel, data)
        return data

    def _corrupt(self, where: str, rel: str) -> None:
        what = "cache manifest is unreadable" if rel.startswith("keys/") else "cached bytes do not match their digest"
        self.problems.append(f"{where}: {what}; rebuilding")
        self._bad.add(rel)

    def _store(self, rel: str, data: bytes, *, content_addressed: bool) -> None:
        """Write both layers: a content-addressed object only where absent (or found corrupt), a manifest
        always (after its objects)."""
        if not self.read_only:
            if content_addressed:
                if rel in self._bad or not self._local_object_ok(rel):
                    self.store.write(rel, data)
            else:
                self.store.write(rel, data)
        if self.remote is not None and not self.remote.read_only:
            absent_only = content_addressed and rel not in self._bad
            self.remote.attempt(self.remote.store.write, rel, data, if_absent=absent_only)
        self._bad.discard(rel)

    def _local_object_ok(self, rel: str) -> bool:
        try:
            return sha256(self.store.read(rel)) == rel.rsplit("/", 1)[-1]
        except OSError:
            return False

    def _object(self, digest: str) -> bytes | None:
        return self._fetch(_object_rel(digest), lambda data: sha256(data) == digest)

    def _read_manifest(self, key: str):
        data = self._fetch(_key_rel(key), lambda d: _manifest(d) is not None)
        return None if data is None else _manifest(data)

    def prefetch(self, keys, bundle: dict | None = None) -> int:
        """Copy the remote entries of `keys` that the local layer lacks into it, concurrently: one batch of
        manifests (those not in `bundle`, see read_bundle), one of their objects (each verified; anything
        bad is left for the normal read to report). Returns the number of entries copied."""
        if self.remote is None or self.read_only:
            return 0
        bundle = bundle or {}
        wanted = [k for k in dict.fromkeys(keys) if not self.store.exists(_key_rel(k))]
        found = self.remote.attempt(self.remote.store.read_many, [_key_rel(k) for k in wanted if k not in bundle], default={})
        self.remote_bytes_read += sum(len(d) for d in found.values())
        found.update({_key_rel(k): _manifest_bytes(bundle[k]) for k in wanted if k in bundle})
        manifests = {rel: (data, _manifest(data)) for rel, data in found.items() if _manifest(data) is not None}
        needed = sorted({d for _, m in manifests.values() for d in _objects_of(m)})
        rels = [_object_rel(d) for d in needed if not self._local_object_ok(_object_rel(d))]
        objects = self.remote.attempt(self.remote.store.read_many, rels, default={})
        self.remote_bytes_read += sum(len(d) for d in objects.values())
        good = {rel for rel, data in objects.items() if sha256(data) == rel.rsplit("/", 1)[-1]}
        for rel in sorted(good):
            self.store.write(rel, objects[rel])
        have = good | ({_object_rel(d) for d in needed} - set(rels))
        copied = 0
        for rel, (data, m) in sorted(manifests.items()):  # manifests last, and only when every object is here
            if all(_object_rel(d) in have for d in _objects_of(m)):
                self.store.write(rel, data)
                copied += 1
        return copied

    def put_bundle(self, keys) -> None:
        """Store the manifests of `keys` (a lock file's final entries) together on the remote, under a key
        made of them (bundle_key), with their small objects packed into one object beside it: a fresh
        checkout's prefetch then makes two requests where it made one per manifest and object (each costs
        CPU and money; a small object's is mostly the request). Large objects stay where they are (their
        transfer dominates, and a pack would store them twice). Only when every entry is here; optional."""
        if self.remote is None or self.remote.read_only or not keys:
            return
        from mlqpipe.build.prefetch import STATS

        rel = _key_rel(bundle_key(keys))
        if bundle_key(keys) in STATS["bundles"] or self.remote.attempt(self.remote.store.exists, rel, default=True):
            return  # the same keys' bundle (this build's prefetch read it): written by the build that wrote this lock
        entries = {}
        for key in sorted(set(keys)):
            manifest = self.entry(key)
            if manifest is None:
                return
            entries[key] = manifest
        bundle = {"format": CACHE_FORMAT, "kind": "bundle", "key": bundle_key(keys), "entries": entries}
        pack, index = self._pack(sorted({(d, n) for m in entries.values() for d, n in _object_sizes(m)}))
        if index:  # on the remote only (the local layer has the objects), before the manifest naming it
            digest = sha256(pack)
            self.remote.attempt(self.remote.store.write, _object_rel(digest), pack)  # a new bundle: rewrite a bad pack too
            bundle["pack"] = {"object": digest, "size": len(pack), "index": index}
        self.remote.attempt(self.remote.store.write, rel, json.dumps(bundle, sort_keys=True).encode())

    def _pack(self, objects) -> tuple[bytes, dict]:
        """The small ones of `objects` ((digest, size) as their manifests say) end to end, and {digest:
        [offset, size]}; large ones are not even read."""
        parts, index, at = [], {}, 0
        for digest, size in objects:
            if size > PACK_OBJECT_MAX or at + size > PACK_MAX:
                continue
            data = self._object(digest)
            if data is None:
                continue
            parts.append(data)
            index[digest] = [at, len(data)]
            at += len(data)
        return b"".join(parts), index

    def read_bundle(self, keys) -> dict:
        """{key: manifest} from the remote's bundle of exactly `keys` (see put_bundle), having copied the
        packed objects the local layer lacks into it (each verified); {} when there is no bundle. Each
        manifest must name its own key."""
        if self.remote is None or not keys:
            return {}
        try:
            data = self.remote.attempt(self.remote.store.read, _key_rel(bundle_key(keys)))
        except FileNotFoundError:
            return {}
        if data is None:
            return {}
        self.remote_bytes_read += len(data)
        bundle = _manifest(data)
        entries = bundle.get("entries") if bundle and bundle.get("kind") == "bundle" else None
        if not isinstance(entries, dict):
            return {}
        if not self._unpack(bundle.get("pack")) and not self.remote.read_only:  # the next lock-writing build rewrites both
            self.remote.attempt(self.remote.store.delete, _key_rel(bundle_key(keys)))
        wanted = set(keys)
        return {k: m for k, m in entries.items() if k in wanted and isinstance(m, dict) and m.get("key") == k}

    def _unpack(self, pack) -> bool:
        """Copy a bundle's packed objects into the local layer when it lacks any (one read of the pack);
        False when the pack is missing or corrupt (reported)."""
        if pack is None:
            return True
        try:
            index = {d: (int(at), int(size)) for d, (at, size) in pack["index"].items()}
            digest = pack["object"]
        except (TypeError, KeyError, ValueError, AttributeError):
            return False
        missing = [d for d in index if not self._local_object_ok(_object_rel(d))]
        if not missing or self.read_only:
            return True
        try:  # from the remote (not kept locally: the objects are), verified whole, then object by object
            data = self.remote.attempt(self.remote.store.read, _object_rel(digest))
        except FileNotFoundError:
            return False
        if data is None:
            return True  # the remote is down (warned): nothing is wrong with the pack
        self.remote_bytes_read += len(data)
        if sha256(data) != digest:
            self._corrupt(self.remote.store.describe(_object_rel(digest)), _object_rel(digest))
            return False
        for d in missing:
            at, size = index[d]
            part = data[at : at + size]
            if sha256(part) == d:
                self.store.write(_object_rel(d), part)
        return True

    def prefetch_in_background(self, keys, batch: int = 32, bundle_of=()) -> None:
        """Prefetch `keys` in this order, `batch` at a time, in a process beside the build (prefetch.py): a
        fresh checkout of a committed lock file then waits for the remote's round trips (and the protocol
        library's import) alongside its own work instead of before each stage. A read of a key not yet
        fetched waits for its batch rather than fetching it twice. `bundle_of`: the keys whose bundle
        (put_bundle) may hold the manifests."""
        import threading

        from mlqpipe.build import prefetch

        keys = list(dict.fromkeys(keys))
        pending = {_key_rel(k): threading.Event() for k in keys}
        _PENDING[str(self.store.root.resolve())] = pending  # every cache of this process on this directory waits
        prefetch.start(self.remote.store.url, self.store.root.resolve(), self.remote.marker.parent, self.remote.run, keys, pending,
                       _key_rel, batch, list(bundle_of))

    def _wait_for_prefetch(self, rel: str) -> None:
        if self.remote is None or not _PENDING:
            return
        event = _PENDING.get(str(self.store.root.resolve()), {}).get(rel)
        if event is not None:
            event.wait(PREFETCH_WAIT)

    # --- entries ----------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The bytes stored under `key`, verified; None when absent or corrupted."""
        manifest = self._read_manifest(key)
        if manifest is None or _is_tree(manifest):
            return None  # a directory entry is not bytes: get_tree reads it
        return self._file_entry(key, manifest)

    def _file_entry(self, key: str, manifest: dict) -> bytes | None:
        digest = manifest.get("object")
        if not isinstance(digest, str):
            self.problems.append(f"{self._describe(_key_rel(key))}: unreadable cache manifest (no object); rebuilding")
            return None
        return self._object(digest)

    def _describe(self, rel: str) -> str:
        return (self.remote.store if self.remote else self.store).describe(rel)

    def has(self, key: str) -> bool:
        if self.store.exists(_key_rel(key)):
            return True
        return bool(self.remote and self.remote.attempt(self.remote.store.exists, _key_rel(key), default=False))

    def put(self, key: str, data: bytes, meta: dict | None = None) -> str:
        digest = sha256(data)
        if self.read_only:
            return digest
        self._store(_object_rel(digest), data, content_addressed=True)
        manifest = {"format": CACHE_FORMAT, "key": key, "object": digest, "size": len(data), **(meta or {})}
        self._store(_key_rel(key), _manifest_bytes(manifest), content_addressed=False)
        return digest

    def entry(self, key: str) -> dict | None:
        """The manifest stored under `key` (what made the entry, and what a stage kept with it), or None.
        Its objects are not read: `get_artifact` reads and verifies them."""
        return self._read_manifest(key)

    def get_tree(self, key: str) -> dict[str, bytes] | None:
        """The files {relative path: bytes} of the directory stored under `key`, every object and the tree
        digest verified; None when absent, not a directory entry, or corrupted (reported in `problems`)."""
        manifest = self._read_manifest(key)
        if not _is_tree(manifest):
            return None
        return self._tree_entry(key, manifest)

    def _tree_entry(self, key: str, manifest: dict) -> dict[str, bytes] | None:
        where = self._describe(_key_rel(key))
        try:
            wanted = {rel: e["object"] for rel, e in manifest["files"].items()}
            consistent = _tree_of(manifest) == manifest["tree"]
        except (KeyError, TypeError, AttributeError) as e:
            self.problems.append(f"{where}: directory entry incomplete ({e}); rebuilding")
            return None
        if not consistent:
            self.problems.append(f"{where}: its files do not make the tree digest it records; rebuilding")
            return None
        files = {}
        for rel, digest in wanted.items():
            seen = len(self.problems)
            data = self._object(digest)
            if data is None:
                if len(self.problems) == seen:  # missing rather than corrupt (that is reported already)
                    self.problems.append(f"{where}: directory entry incomplete (object {digest} of {rel} is missing); rebuilding")
                return None
            files[rel] = data
        return files

    def put_tree(self, key: str, tree, meta: dict | None = None) -> str:
        """Store a directory (a path, or {relative path: bytes}) under `key`; returns its tree digest."""
        files = read_tree(tree) if isinstance(tree, (str, Path)) else dict(tree)
        entries = {rel: {"object": sha256(data), "size": len(data)} for rel, data in sorted(files.items())}
        digest = tree_digest(TreeFile(rel, e["object"], e["size"]) for rel, e in entries.items())
        if self.read_only:
            return digest
        for rel, data in files.items():
            self._store(_object_rel(entries[rel]["object"]), data, content_addressed=True)
        manifest = {"format": CACHE_FORMAT, "key": key, "kind": "tree", "tree": digest, "files": entries,
                    "size": sum(e["size"] for e in entries.values()), **(meta or {})}
        self._store(_key_rel(key), _manifest_bytes(manifest), content_addressed=False)
        return digest

    def get_artifact(self, key: str) -> bytes | dict | None:
        """What `put_artifact` stored: bytes for a file, {relative path: bytes} for a directory (one manifest
        read either way)."""
        manifest = self._read_manifest(key)
        if manifest is None:
            return None
        return self._tree_entry(key, manifest) if _is_tree(manifest) else self._file_entry(key, manifest)

    def put_artifact(self, key: str, artifact: bytes | dict, meta: dict | None = None) -> str:
        return self.put(key, artifact, meta) if isinstance(artifact, bytes) else self.put_tree(key, artifact, meta)

    # --- maintenance: mlqpipe cache stats|verify|prune (on the remote itself when there is one) ----------

    def _target(self):
        """The store maintenance looks at: the remote (its failures are errors here), else the directory."""
        return self.remote.store if self.remote else self.store

    def manifests(self, store=None):
        store = store or self._target()
        for e in _checked(store.entries, "keys"):
            if not e.rel.endswith(".json"):
                continue
            try:
                yield store.describe(e.rel), _manifest(_checked(store.read, e.rel))
            except OSError:
                yield store.describe(e.rel), None

    def stats(self) -> dict:
        store = self._target()
        objects = _checked(store.entries, "objects")
        return {"root": str(self.root), "keys": sum(1 for _ in self.manifests()), "objects": len(objects),
                "bytes": sum(e.size for e in objects)}

    def verify(self) -> list[str]:
        store = self._target()
        bad = []
        for p, m in self.manifests(store):
            if m is None:
                bad.append(f"{p}: unreadable manifest")
                continue
            if _is_tree(m):
                bad += self._verify_tree(store, p, m)
                continue
            if m.get("kind") == "bundle":  # copies of manifests (their own entries are verified) and a pack
                if not isinstance(m.get("entries"), dict):
                    bad.append(f"{p}: unreadable bundle")
                for digest in _objects_of(m):
                    bad += self._verify_object(store, p, digest, "pack")
                continue
            bad += self._verify_object(store, p, m.get("object", ""))
        return bad

    def _verify_object(self, store, p: str, digest, rel: str | None = None) -> list[str]:
        obj = store.describe(_object_rel(str(digest)))
        try:
            data = _checked(store.read, _object_rel(str(digest)))
        except FileNotFoundError:
            return [f"{p}: object {obj}{f' ({rel})' if rel else ''} is missing"]
        return [] if sha256(data) == digest else [f"{obj}: bytes do not match their digest"]

    def _verify_tree(self, store, p: str, m: dict) -> list[str]:
        bad = []
        try:
            for rel, e in sorted(m["files"].items()):
                bad += self._verify_object(store, p, e["object"], rel)
            if _tree_of(m) != m["tree"]:
                bad.append(f"{p}: its files do not make the tree digest it records")
        except (KeyError, TypeError, AttributeError) as e:
            bad.append(f"{p}: unreadable directory entry ({e})")
        return bad

    def prune(self, keep_keys: set[str], older_than_days: float | None = None) -> int:
        """Remove manifests not in `keep_keys` (and, with `older_than_days`, only those older than that) and
        objects no kept manifest names; returns files removed. A URL cache prunes its remote and local layer."""
        stores = [self.remote.store, self.store] if self.remote else [self.store]
        return sum(_prune(s, keep_keys, older_than_days) for s in stores)


def _prune(store, keep_keys: set[str], older_than_days: float | None) -> int:
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    removed, live = 0, set()
    for e in _checked(store.entries, "keys"):
        m = _manifest(_checked(store.read, e.rel)) if e.rel.endswith(".json") else None
        young = cutoff is not None and e.mtime >= cutoff
        if m is not None and (m.get("key") in keep_keys or young):
            live.update(_objects_of(m))
        else:
            _checked(store.delete, e.rel)
            removed += 1
    for e in _checked(store.entries, "objects"):
        if e.rel.rsplit("/", 1)[-1] not in live and not (cutoff is not None and e.mtime >= cutoff):
            _checked(store.delete, e.rel)
            removed += 1
    return removed


def _checked(fn, *args):
    """A maintenance call on a store: a failing remote is an error the user sees (exit 2), not a warning."""
    from mlqpipe.build.store import RemoteUnavailable
    from mlqpipe.errors import MlqpipeError

    try:
        return fn(*args)
    except RemoteUnavailable as e:
        raise MlqpipeError(f"remote cache: {e.reason}") from None


def _is_tree(manifest) -> bool:
    return isinstance(manifest, dict) and manifest.get("kind") == "tree"


def _tree_of(manifest: dict) -> str:
    return tree_digest(TreeFile(rel, e["object"], e["size"]) for rel, e in manifest["files"].items())


def _object_sizes(manifest: dict) -> list[tuple[str, int]]:
    """(digest, size) of an entry's objects, as its manifest records them (a bundle's pack excluded)."""
    try:
        if _is_tree(manifest):
            return [(e["object"], int(e["size"])) for e in manifest["files"].values()]
        return [(manifest["object"], int(manifest["size"]))]
    except (KeyError, TypeError, ValueError, AttributeError):
        return []


def _objects_of(manifest: dict) -> set[str]:
    """The objects an entry needs: its one object, or each file's of a directory entry, or a bundle's pack."""
    if manifest.get("kind") == "bundle":
        pack = manifest.get("pack")
        return {pack["object"]} if isinstance(pack, dict) and isinstance(pack.get("object"), str) else set()
    if _is_tree(manifest):
        return {e["object"] for e in manifest.get("files", {}).values() if isinstance(e, dict)}
    return {manifest["object"]} if isinstance(manifest.get("object"), str) else set()


# --- where the cache is: a directory, or a URL with a local layer in front -------------------------------


def local_dir(options) -> str:
    """The local directory of the cache in `options`: the cache itself, or a URL cache's local layer
    ($MLQPIPE_LOCAL_CACHE, default .mlqpipe-cache). Evaluations of float models are kept here."""
    if is_url(options.cache_dir):
        return os.environ.get("MLQPIPE_LOCAL_CACHE") or LOCAL_CACHE
    return options.cache_dir


def evaluation_dir(options) -> str | None:
    """Where float-output evaluations are cached: the local directory, None when it must not be written
    (a read-only plain-path cache; a read-only URL cache still writes its local layer)."""
    if options.read_only_cache and not is_url(options.cache_dir):
        return None
    return local_dir(options)


def open_cache(options, prefetch: bool = True) -> Cache:
    """The cache `options` names: a directory (`--cache DIR`), or a URL (`--cache s3://bucket/prefix`, any
    fsspec protocol) behind its local layer; `read_only_cache` then leaves only the remote unwritten.
    `prefetch`: a build's first opening starts copying what the lock file says it reads (maintenance
    commands and searches do not)."""
    where = options.cache_dir
    if not is_url(where):
        return Cache(Path(where), options.read_only_cache)
    from mlqpipe.build.store import FsspecStore, Remote

    remote = Remote(FsspecStore(where), getattr(options, "state_dir", ".mlqpipe-state"), read_only=options.read_only_cache)
    cache = Cache(store=LocalStore(Path(local_dir(options))), remote=remote)
    if prefetch and remote.claim("prefetch"):  # once per run (asked first: every action opens the cache)
        locked = locked_keys(options)  # what the lock file says this checkout's build reads
        keys = [k for k in locked if not cache.store.exists(_key_rel(k))]
        if keys:
            cache.prefetch_in_background(keys, bundle_of=locked)
    return cache


def locked_keys(options) -> list[str]:
    """The final stage key of each output the lock file records (of this shard, when sharded), in order."""
    shard = getattr(options, "shard", None)
    outputs = {}
    # a shard's fresh checkout holds the merged lock file, not the shard's partial one
    from mlqpipe.build.lock import LOCK_FILE, in_shard

    for path in [options.lock_file] + ([LOCK_FILE] if shard is not None else []):
        try:
            outputs = json.loads(Path(path).read_text(encoding="utf-8")).get("outputs", {})
            break
        except (TypeError, OSError, ValueError, AttributeError):
            continue
    if shard is not None:
        outputs = {o: e for o, e in outputs.items() if in_shard(o, shard)}
    # the final entry of each output holds the output and every stage's report rows: all a warm build reads
    return [k for e in outputs.values() if isinstance(e, dict) for k in (e.get("stage_keys") or [])[-1:] if isinstance(k, str)]


def check_cache_location(where) -> None:
    """Fail early (MlqpipeError, exit 2) when a URL cache cannot be opened here (fsspec or its protocol
    package missing), instead of once per build task."""
    if is_url(where):
        from mlqpipe.build.store import check_installed

        check_installed(where)
