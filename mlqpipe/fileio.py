"""Atomic file writes, shared by model outputs, the cache and build state (no heavy imports)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def shown_path(path) -> str:
    """A path as messages show it: relative to the working directory where possible."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


MODEL_SUFFIXES = (".mlmodel", ".mlpackage")  # what a model path ends with; reports go beside it without it


def without_model_suffix(name: str) -> str:
    """'out/m.q.mlmodel' -> 'out/m.q' (also .mlpackage): the base of a model's report paths."""
    for suffix in MODEL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def posix_path(path) -> str:
    """A path as lock files, reports and task names record it: relative, with forward slashes."""
    return Path(shown_path(path)).as_posix()


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _sweep_stale(path: Path) -> None:
    """Remove temporaries of `path` left by writers that were killed (their pid is in the name and the
    process is gone); a live writer's temporary (a concurrent build) is left alone."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:
                pass


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its file
    return True


def atomic_write(path, data: bytes, *, fsync: bool | None = None) -> None:
    """Write to a temporary file beside `path`, then rename it into place: readers, and a build killed at
    any point, never see a partial file. Flushing to disk before the rename (`fsync`, or MLQPIPE_FSYNC=1)
    also covers power cuts on filesystems that do not order the rename after the data themselves; it is
    off by default because it dominates the write time of large models."""
    if fsync is None:
        fsync = os.environ.get("MLQPIPE_FSYNC", "") not in ("", "0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get what a normally created file gets
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                getattr(os, "fdatasync", os.fsync)(f.fileno())  # data (and size) durable before the rename
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
