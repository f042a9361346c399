"""Where the cache's bytes live: a local directory, or an fsspec URL (s3://, gs://, az://, file://, memory://).

The cache (cache.py) sees one small interface — read, write (create-if-absent for content-addressed
objects), exists, entries (with size and mtime, for prune), delete — so the same integrity rules hold for
both. fsspec and the protocol packages are imported only here, and only when a URL is opened: plain paths
never load them (`pip install 'mlqpipe[remote]'` adds them).

A remote store turns every failure that is not "absent" (unreachable, timeout, 5xx, auth) into
RemoteUnavailable, with a one-line reason that never holds credentials; the cache then degrades to its
local layer (see Remote in cache.py).
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlqpipe.errors import MlqpipeError
from mlqpipe.fileio import atomic_write

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
EXTRA = "pip install 'mlqpipe[remote]'"  # fsspec + s3fs; gcsfs / adlfs for gs:// / az://
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# protocols whose single-object put is atomic (the object appears complete or not at all): S3 PutObject and
# multipart completion, GCS uploads (visible on finalize), Azure block blobs (visible on commit), memory
ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"}
# a dead remote costs at most about CONNECT_TIMEOUT * ATTEMPTS once per run (then the run is local only)
CONNECT_TIMEOUT, READ_TIMEOUT, ATTEMPTS = 3, 30, 2


class RemoteUnavailable(Exception):
    """The remote store failed (not "absent"); `reason` is one line without credentials."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Entry:
    rel: str  # "objects/ab/<digest>", "keys/ab/<key>.json"
    size: int
    mtime: float  # seconds since the epoch


def is_url(where) -> bool:
    return isinstance(where, str) and bool(URL.match(where))


def redact(url: str) -> str:
    """A URL as messages show it: user and password (s3://KEY:SECRET@bucket) dropped."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)


class LocalStore:
    """Today's cache directory, byte for byte: atomic renames, plain paths in messages."""

    def __init__(self, root):
        self.root = Path(root)

    def describe(self, rel: str) -> str:
        return str(self.root / rel)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def write(self, rel: str, data: bytes, *, if_absent: bool = False) -> None:
        if not (if_absent and self.exists(rel)):
            atomic_write(self.root / rel, data)

    def entries(self, top: str) -> list[Entry]:
        out = []
        for p in sorted((self.root / top).glob("*/*")):
            st = p.stat()
            out.append(Entry(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return out

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink()


class FsspecStore:
    """A cache under an fsspec URL. Objects are written create-if-absent; where a single put is atomic
    (ATOMIC_PUT) it is used directly, elsewhere the bytes go to a temporary key that is then moved."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.shown = redact(self.url)
        self.protocol = self.url.split("://", 1)[0].lower()
        self._fs = None

    @property
    def fs(self):
        """The fsspec filesystem, made on first use (its import is the costly part; a prefetch thread
        pays it while the build starts)."""
        if self._fs is None:
            self._fs, self._root = _filesystem(self.url, self.protocol, self.shown)
        return self._fs

    @property
    def root(self) -> str:
        self.fs
        return self._root

    def __getstate__(self):  # a worker process opens its own connection
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    def describe(self, rel: str) -> str:
        return f"{self.shown}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def _call(self, method: str, *args, **kwargs):
        """fs.<method>(...), every failure but "absent" (and a missing package) as RemoteUnavailable."""
        try:
            return getattr(self.fs, method)(*args, **kwargs)
        except (FileNotFoundError, MlqpipeError):
            raise
        except Exception as e:  # noqa: BLE001 — any failure of the remote degrades the build, never fails it
            raise RemoteUnavailable(_reason(e, self.url)) from None

    def read(self, rel: str) -> bytes:
        return self._call("cat_file", self._path(rel))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """{rel: bytes} of those of `rels` that exist, fetched concurrently where the protocol can."""
        if not rels:
            return {}
        paths = {self._path(rel): rel for rel in rels}
        found = self._call("cat", list(paths), on_error="return")
        out = {}
        for path, value in found.items():
            rel = paths.get(path) or paths.get(path.lstrip("/")) or paths.get("/" + path)
            if isinstance(value, FileNotFoundError) or rel is None:
                continue
            if isinstance(value, Exception):
                raise RemoteUnavailable(_reason(value, self.url))
            out[rel] = value
        return out

    def exists(self, rel: str) -> bool:
        try:
            self._call("info", self._path(rel))
            return True
        except FileNotFoundError:
            return False

    def write(self, rel: str, data: bytes, *, if_absent: bool = False) -> None:
        if if_absent and self.exists(rel):
            return
        path = self._path(rel)
        if self.protocol in ATOMIC_PUT:
            self._call("pipe_file", path, data)
            return
        parent = path.rsplit("/", 1)[0]
        tmp = f"{parent}/.{rel.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
        self._call("makedirs", parent, exist_ok=True)
        self._call("pipe_file", tmp, data)
        try:
            self._call("mv", tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except Exception:  # noqa: BLE001 — best effort: a stray temporary is never read
                pass
            raise

    def entries(self, top: str) -> list[Entry]:
        base = self._path(top)
        try:
            found = self._call("find", base, detail=True)
        except FileNotFoundError:
            return []
        prefix = f"{self.root}/" if self.root else ""
        out = []
        for path, info in sorted(found.items()):
            rel = path.lstrip("/")[len(prefix.lstrip("/")):] if prefix else path.lstrip("/")
            if rel.count("/") == 2 and not rel.rsplit("/", 1)[-1].startswith("."):
                out.append(Entry(rel, int(info.get("size") or 0), _mtime(info)))
        return out

    def delete(self, rel: str) -> None:
        self._call("rm_file", self._path(rel))


_FILESYSTEMS: dict = {}
_LOCK = threading.Lock()


def _missing(shown: str, protocol: str, detail: str = "") -> MlqpipeError:
    package = PROTOCOL_PACKAGES.get(protocol)
    if package is None:
        return MlqpipeError(f"cache {shown}: protocol {protocol}:// is not available{f' ({detail})' if detail else ''}")
    what = f"{package} ({EXTRA}{'' if package == 's3fs' else f', then pip install {package}'})"
    return MlqpipeError(f"cache {shown}: protocol {protocol}:// is not available; install {what}")


def _no_fsspec(shown: str) -> MlqpipeError:
    return MlqpipeError(f"cache {shown}: a URL cache needs fsspec, which is not installed; run {EXTRA}, or give --cache a directory")


def check_installed(url: str) -> None:
    """Raise the error opening `url` would give when fsspec or its protocol package is missing, without
    importing them (a build checks this once, up front)."""
    from importlib.util import find_spec

    shown, protocol = redact(url), url.split("://", 1)[0].lower()
    if _spec(find_spec, "fsspec") is None:
        raise _no_fsspec(shown)
    package = PROTOCOL_PACKAGES.get(protocol)
    if package and _spec(find_spec, package) is None:
        raise _missing(shown, protocol)


def _spec(find_spec, name):
    try:
        return find_spec(name)
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests), or a broken install
        return None


def _filesystem(url: str, protocol: str, shown: str):
    """(fsspec filesystem, root path) for `url`, one per URL and process (a forked worker makes its own)."""
    key = (url, os.getpid())
    with _LOCK:
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = _open(url, protocol, shown)
    return _FILESYSTEMS[key]


def _open(url: str, protocol: str, shown: str):
    try:
        import fsspec
    except ModuleNotFoundError:
        raise _no_fsspec(shown) from None
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise _missing(shown, protocol, str(e)) from None
    user = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*)@", url)
    kwargs = _options(protocol)
    if user and protocol in ("s3", "s3a"):  # s3://KEY:SECRET@bucket (discouraged; never shown)
        kwargs["key"], _, kwargs["secret"] = user.group(1).partition(":")
    fs = cls(skip_instance_cache=True, **kwargs)
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs' own retry loop, on top of botocore's (ATTEMPTS)
    return fs, cls._strip_protocol(shown).rstrip("/")


def _options(protocol: str) -> dict:
    """Bounded time against a dead remote; credentials and the endpoint (AWS_ENDPOINT_URL for an
    S3-compatible server) come from the protocol library's standard chain."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                                  "retries": {"max_attempts": ATTEMPTS, "mode": "standard"}}}
    return {}


def _reason(e: Exception, url: str) -> str:
    """One line saying why the remote failed, with anything secret-looking removed."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    secrets = [os.environ.get(v, "") for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*)@", url)
    if m:
        secrets += m.group(1).split(":")
    for s in secrets:
        if len(s) >= 4:
            text = text.replace(s, "***")
    return text[:300]


def _mtime(info: dict) -> float:
    for field in ("LastModified", "mtime", "last_modified", "created", "updated"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
    return 0.0


# --- degradation: a failed remote is skipped for the rest of the run, with one warning line ----------------

_DOWN: dict = {}  # (url, run, marker) -> reason, in this process
_CLAIMED: set = set()  # (task, (url, run, marker)) this process asked for once already
MARKER = "remote-cache-down.json"  # in the state directory: the run's other worker processes skip it too


def run_id() -> str:
    """This build's identity across its worker processes: the pid of the process that runs the build."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return str(parent.pid if parent is not None else os.getpid())


def forget_remote_failures(state_dir) -> None:
    """Start a build with every remote up again (build() calls this first; a new process starts so anyway)."""
    _DOWN.clear()
    _CLAIMED.clear()
    for name in (MARKER, "remote-cache-prefetch.json"):
        (Path(state_dir) / name).unlink(missing_ok=True)


class Remote:
    """A remote store that never fails the build: the first failure prints one warning line and marks the
    remote down for the rest of the run (this process, and through a marker file its sibling workers)."""

    def __init__(self, store: FsspecStore, state_dir, *, read_only: bool = False, run: str | None = None):
        self.store, self.read_only = store, read_only
        self.marker = Path(state_dir).resolve() / MARKER
        self.run = run or run_id()  # a helper process (the prefetch) passes its build's

    @property
    def _key(self):
        return (self.store.url, self.run, str(self.marker))

    @property
    def up(self) -> bool:
        if self._key in _DOWN:
            return False
        try:
            import json

            if json.loads(self.marker.read_text(encoding="utf-8")).get("run") == self.run:
                _DOWN[self._key] = "marked down by another worker"
                return False
        except (OSError, ValueError, AttributeError):
            pass
        return True

    def down(self, reason: str) -> None:
        import json
        import sys

        _DOWN[self._key] = reason
        try:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                if json.loads(self.marker.read_text(encoding="utf-8")).get("run") == self.run:
                    return  # a sibling worker warned already
            except (OSError, ValueError, AttributeError):
                pass
            self.marker.unlink(missing_ok=True)  # an older run's marker
            return self.down(reason)
        except OSError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"run": self.run, "url": self.store.shown}, f)
        # doit captures an action's sys.stderr (shown only on failure); this line is for the user now
        stream = sys.__stderr__ if type(sys.stderr).__module__.startswith("doit") else sys.stderr
        print(f"mlqpipe: warning: remote cache {self.store.shown}: {reason}; building with the local cache only",
              file=stream or sys.stderr, flush=True)

    def claim(self, task: str) -> bool:
        """True for the first process of this run to ask (per state directory): it does `task` for all."""
        import json

        path = self.marker.with_name(f"remote-cache-{task}.json")
        if (task, self._key) in _CLAIMED:
            return False
        _CLAIMED.add((task, self._key))
        for _ in range(2):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "x", encoding="utf-8") as f:
                    json.dump({"run": self.run}, f)
                return True
            except FileExistsError:
                try:
                    if json.loads(path.read_text(encoding="utf-8")).get("run") == self.run:
                        return False
                except (OSError, ValueError, AttributeError):
                    pass
                path.unlink(missing_ok=True)  # an older run's
            except OSError:
                return True  # no state directory to coordinate in: this process does it
        return False

    def attempt(self, fn, *args, default=None, **kwargs):
        """fn(store, ...) when the remote is up; `default` when it is down or fails now (marked down)."""
        if not self.up:
            return default
        try:
            return fn(*args, **kwargs)
        except RemoteUnavailable as e:
            self.down(e.reason)
            return default
