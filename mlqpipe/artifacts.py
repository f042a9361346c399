"""Artifacts: what a build reads and writes is a file or a directory tree (an ML program's `.mlpackage`).

One digest, one atomic write and one file list serve both, so the cache, the lock and doit need not care
which kind a model is. Like fileio, this module imports nothing of mlqpipe but errors (no heavy imports).

Digest (`digest`). A file's digest is the sha256 of its bytes, so locks and caches of files are unchanged.
A directory's digest ("tree digest", format 1) is the sha256 of

    b"mlqpipe-tree 1\\0" + for each regular file under it, sorted by the bytes of its relative path:
        <sha256 of its content, 64 lowercase hex digits> b" " <relative POSIX path, os.fsencode'd> b"\\0"

Only regular files count: their paths (relative, "/"-separated, so the directory's own name and the
platform do not matter) and their bytes. Modes, owners and mtimes do not (permissions follow the umask of
whoever wrote the tree, so they cannot be part of a reproducible digest); empty directories do not (doit
and the cache track files; Core ML needs none). A symbolic link, socket or device inside a tree is an
ArtifactError: following it would digest something outside the artifact. A NUL cannot occur in a path and
the hex digest has a fixed length, so the encoding is unambiguous.

Atomic directory write (`write_tree`): the new tree is built in `.NAME.PID.RAND.tmp` beside the target,
then swapped in. States of one write, and what `heal` (run before every write, or on its own) does with
the leftovers of a writer that died (its pid is gone; a live writer's are never touched). One write's
.tmp, .new and .old share the name `.NAME.PID.RAND`; each row: the step, what a kill right after it leaves,
what heal does.

    exchange (Linux renameat2(RENAME_EXCHANGE), macOS renamex_np(RENAME_SWAP)); target always complete:
      1 fill .tmp              killed: partial .tmp              -> heal removes it
      2 exchange target<->.tmp killed: .tmp holds the old tree   -> heal removes it
      3 remove .tmp (old)      killed: partly removed .tmp       -> heal removes it
    no target yet: fill .tmp, rename(.tmp, target)               -> as above
    move aside (no exchange on this system, or the filesystem answers ENOSYS/EINVAL/ENOTSUP):
      1 fill .tmp              killed: partial .tmp              -> removed
      2 rename .tmp -> .new    killed: .new complete, target old -> .new removed (the old tree stays)
      3 rename target -> .old  killed: .new and .old complete,
                               no target                         -> .new renamed to target (rolled
                                                                    forward), .old removed
      4 rename .new -> target  killed: .old complete, target new -> .old removed
      5 rename .old -> .tmp    (a name that only means garbage)
      6 remove .tmp            killed: partly removed .tmp       -> removed
    (.old complete and no target, .new gone: only if someone removed the target; heal restores .old.)

So after a kill at any point the target is the complete old tree or the complete new one (in the
move-aside window between 3 and 4 there is no target at all until the next write or heal rolls forward).
Two writers of one directory at once are safe with exchange; with move-aside one of them may fail with an
error (never a partial tree).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlqpipe.errors import MlqpipeError
from mlqpipe.fileio import current_umask, process_alive  # shared with file writes: one rule for temporaries

TREE_HEADER = b"mlqpipe-tree 1\0"
_CHUNK = 1 << 20


class ArtifactError(MlqpipeError):
    """A directory that cannot be an artifact (a link or special file inside it), or a bad tree path."""


@dataclass(frozen=True)
class TreeFile:
    """One regular file of a tree: its relative POSIX path and the sha256 of its bytes."""

    path: str
    sha256: str
    size: int


# --- digests and file lists ----------------------------------------------------------------------------


def is_tree(path) -> bool:
    return Path(path).is_dir()


def file_digest(path) -> str:
    """sha256 of a file's bytes, read in chunks (a 200 MB weight.bin need not be in memory at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _path_key(rel: str) -> bytes:
    return os.fsencode(rel)


def _listing(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every regular file under `root`, sorted by path bytes."""
    found, pending = [], [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for e in entries:
                if e.is_symlink():
                    raise ArtifactError(f"{e.path}: a symbolic link inside a directory artifact; replace it by the file")
                if e.is_dir(follow_symlinks=False):
                    pending.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    found.append(Path(e.path))
                else:
                    raise ArtifactError(f"{e.path}: not a regular file or directory; a directory artifact holds only files")
    pairs = [(p.relative_to(root).as_posix(), p) for p in found]
    return sorted(pairs, key=lambda pair: _path_key(pair[0]))


def tree_files(root) -> list[Path]:
    """The files of a tree, sorted: doit's file_dep and targets for a directory artifact (doit checks
    files, not directories). A plain file is its own list."""
    root = Path(root)
    return [p for _, p in _listing(root)] if root.is_dir() else [root]


def tree_entries(root) -> list[TreeFile]:
    return [TreeFile(rel, file_digest(p), p.stat().st_size) for rel, p in _listing(Path(root))]


def tree_digest(entries: Iterable[TreeFile]) -> str:
    """The tree digest (format 1, see the module docstring) of these entries, in any order."""
    h = hashlib.sha256(TREE_HEADER)
    for e in sorted(entries, key=lambda e: _path_key(e.path)):
        h.update(e.sha256.encode("ascii") + b" " + _path_key(e.path) + b"\0")
    return h.hexdigest()


def digest(path) -> str:
    """A file's sha256, or a directory's tree digest. OSError when missing, ArtifactError for bad trees."""
    path = Path(path)
    return tree_digest(tree_entries(path)) if path.is_dir() else file_digest(path)


def mapping_digest(files: Mapping[str, bytes]) -> str:
    """The tree digest a tree of these {relative path: bytes} will have once written."""
    return tree_digest(TreeFile(rel, hashlib.sha256(data).hexdigest(), len(data)) for rel, data in files.items())


def read_tree(root) -> dict[str, bytes]:
    """{relative POSIX path: bytes} of a tree (the form write_tree and the cache take)."""
    return {rel: p.read_bytes() for rel, p in _listing(Path(root))}


# --- atomic directory write ------------------------------------------------------------------------------


def _step(name: str) -> None:
    """A named point in a directory write; tests replace it to kill a writer exactly there."""


def _fsync_wanted(fsync: bool | None) -> bool:
    return os.environ.get("MLQPIPE_FSYNC", "") not in ("", "0") if fsync is None else fsync


def _checked_parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise ArtifactError(f"{rel!r}: not a relative path inside a tree (no '', '.', '..' or leading '/')")
    return parts


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(root: Path, files: Mapping[str, bytes], fsync: bool) -> None:
    """Write the files under `root`; directories and files get the umask's permissions (os.mkdir, open)."""
    for rel in sorted(files, key=_path_key):
        target = root.joinpath(*_checked_parts(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as f:
            f.write(files[rel])
            if fsync:
                f.flush()
                getattr(os, "fdatasync", os.fsync)(f.fileno())
        _step("file")


def write_tree(path, files: Mapping[str, bytes], *, fsync: bool | None = None) -> str:
    """Write a directory artifact atomically: a writer killed at any point leaves the complete old tree or
    the complete new one (see the module docstring for the states). Returns its tree digest. A reader
    walking the tree while it is swapped may read files of both: check its digest (the cache does).
    `fsync` (or MLQPIPE_FSYNC=1) flushes every file and directory before the swap, as atomic_write does."""
    fsync = _fsync_wanted(fsync)
    write_tree_with(path, lambda root: _fill(root, files, fsync), fsync=fsync)
    return mapping_digest(files)


def write_tree_with(path, fill: Callable[[Path], None], *, fsync: bool | None = None) -> None:
    """`write_tree` for trees too large to hold in memory: `fill(root)` writes the files under the empty
    directory `root` itself (streaming), then the tree is swapped in atomically as `write_tree` does (with
    `fsync`, every directory is flushed deepest first before the swap; files are `fill`'s to flush).
    Directories `fill` makes with os.mkdir get the umask's permissions."""
    fsync = _fsync_wanted(fsync)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heal(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a tree gets what os.mkdir would give
        fill(tmp)
        if fsync:
            for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda d: len(d.parts), reverse=True):
                _fsync_dir(d)
            _fsync_dir(tmp)
        _step("filled")
        _swap_in(tmp, path, fsync)
    except BaseException:
        _discard(tmp)
        raise


def _swap_in(tmp: Path, path: Path, fsync: bool) -> None:
    if not os.path.lexists(path):
        try:
            os.rename(tmp, path)
            _synced(path.parent, fsync)
            return
        except OSError:
            if not os.path.lexists(path):
                raise  # a real failure, not a concurrent writer who got there first
    if _exchange(tmp, path):
        _step("exchanged")
        _synced(path.parent, fsync)
        _remove(tmp)  # the old tree, under a name that only means garbage
        return
    _move_aside(tmp, path, fsync)


def _move_aside(tmp: Path, path: Path, fsync: bool) -> None:
    stem = tmp.name[: -len(".tmp")]
    new, old = tmp.with_name(stem + ".new"), tmp.with_name(stem + ".old")
    os.rename(tmp, new)
    _synced(path.parent, fsync)  # the new tree is known complete on disk before the old one moves
    _step("renamed-new")
    try:
        os.rename(path, old)
    except BaseException:
        os.rename(new, tmp)  # the target is untouched; the caller removes the new tree
        raise
    _step("moved-old")
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        os.rename(new, tmp)
        raise
    _step("swapped")
    _synced(path.parent, fsync)
    os.rename(old, tmp)
    _step("doomed")
    _remove(tmp)


def _synced(directory: Path, fsync: bool) -> None:
    if fsync:
        _fsync_dir(directory)  # the rename itself durable


def _remove(path: Path) -> None:
    """Remove a file or a tree (deepest first); the tree is garbage, so a kill midway is harmless."""
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    for top, dirs, names in os.walk(path, topdown=False):
        for name in names:
            os.unlink(os.path.join(top, name))
            _step("removing")
        for name in dirs:
            p = os.path.join(top, name)
            os.unlink(p) if os.path.islink(p) else os.rmdir(p)
    os.rmdir(path)


def remove(path) -> None:
    """Remove a file or directory artifact so that no partial tree is ever visible at `path`: a tree is
    first renamed to a garbage name (`.NAME.PID.RAND.tmp`, which `heal` removes if this is killed)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    garbage = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        os.rename(path, garbage)
    except FileNotFoundError:
        return  # removed meanwhile
    _discard(garbage)


def _discard(path: Path) -> None:
    try:
        _remove(path)
    except OSError:
        pass  # already gone (another healer), or not ours to fight over


# --- swapping: renameat2 / renamex_np through ctypes -------------------------------------------------------

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # Linux <linux/fs.h>
RENAME_SWAP = 2  # macOS <stdio.h>
_RENAMEAT2_SYSCALL = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276,
                      "i386": 353, "i686": 353, "armv7l": 382, "ppc64le": 357, "s390x": 347}
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


@functools.cache
def _exchanger():
    """A function (a: bytes, b: bytes) -> 0 or -1 (errno set) swapping two paths, or None. ctypes is
    imported here: only directory writes need it, and the build's up-to-date path imports this module."""
    import ctypes
    import ctypes.util
    import platform

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform == "darwin":
        fn = getattr(libc, "renamex_np", None)
        if fn is None:
            return None
        fn.argtypes, fn.restype = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint], ctypes.c_int
        return lambda a, b: fn(a, b, RENAME_SWAP)
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b: fn(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    number = _RENAMEAT2_SYSCALL.get(platform.machine().lower())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda a, b: syscall(ctypes.c_long(number), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(a),
                                ctypes.c_int(AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(RENAME_EXCHANGE))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system or filesystem cannot."""
    fn = _exchanger()
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


# --- leftovers of killed writers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Leftover:
    """A hidden entry a directory write leaves beside its target while it runs."""

    path: Path
    pid: int
    stem: str  # `.NAME.PID.RAND`, shared by one write's .tmp, .new and .old
    state: str  # "tmp" (garbage), "new" (the complete new tree), "old" (the complete old tree)


def leftovers(path) -> list[Leftover]:
    path = Path(path)
    found = []
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in sorted(names):
        stem, _, state = name.rpartition(".")
        if not name.startswith(prefix) or state not in ("tmp", "new", "old"):
            continue
        pid = stem[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and (path.parent / name).is_dir():
            found.append(Leftover(path.parent / name, int(pid), stem, state))
    return found


_RECOVERED = {"new": "completed the interrupted write (a killed writer)", "old": "restored the previous tree"}


def heal(path) -> list[str]:
    """Finish or undo the directory writes at `path` whose writers died (see the module docstring):
    roll a complete new tree forward or restore a complete old one when the target is missing, remove the
    rest. Live writers' entries are left alone. Returns what was done, one line per action."""
    path = Path(path)
    done, writes = [], {}
    for lo in leftovers(path):
        if not process_alive(lo.pid):
            writes.setdefault(lo.stem, {})[lo.state] = lo.path
    for states in writes.values():
        for state in ("new", "old"):  # the new tree first: a write killed between its renames completes
            if state in states and not os.path.lexists(path):
                try:
                    os.rename(states.pop(state), path)
                    done.append(f"{path}: {_RECOVERED[state]}")
                except OSError:
                    pass  # another healer or writer got there first
        for p in states.values():
            _discard(p)
            done.append(f"{p}: removed (left by a killed writer)")
    return done
