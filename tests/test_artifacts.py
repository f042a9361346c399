"""Artifacts (a file or a directory tree): the tree digest, atomic directory writes under kill -9 at every
step, healing the leftovers of killed writers, and cache and lock entries for trees.

Trees here are laid out like an .mlpackage but named neither *.mlpackage nor *.mlmodel inside: their contents are not
real ML programs, and the suite hands every written .mlpackage and .mlmodel to Core ML's validator."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from mlqpipe import artifacts
from mlqpipe.artifacts import ArtifactError, digest, heal, leftovers, tree_files, write_tree
from mlqpipe.build.cache import Cache
from mlqpipe.build.lock import artifact_sha256, file_sha256
from tests.conftest import REPO

OLD = {"Manifest.json": b'{"old": 1}', "Data/com.apple.CoreML/model.proto": b"old model",
       "Data/com.apple.CoreML/weights/weight.bin": b"o" * 5000}
NEW = {"Manifest.json": b'{"new": 2}', "Data/com.apple.CoreML/model.proto": b"new model",
       "Data/com.apple.CoreML/extra/notes.txt": b"only in the new tree"}


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def _make(root, files):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _hidden(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- digest ---------------------------------------------------------------------------------------------


def test_a_file_digest_is_its_content_sha256(tmp_path):
    (tmp_path / "m.mlmodel.bin").write_bytes(b"bytes")
    expected = hashlib.sha256(b"bytes").hexdigest()
    assert digest(tmp_path / "m.mlmodel.bin") == expected == file_sha256(tmp_path / "m.mlmodel.bin")
    assert artifact_sha256(tmp_path / "m.mlmodel.bin") == expected
    assert artifact_sha256(tmp_path / "absent") is None and file_sha256(tmp_path / "absent") is None


def test_tree_digest_is_the_documented_formula(tmp_path):
    _make(tmp_path / "t", OLD)
    listing = b"".join(hashlib.sha256(OLD[rel]).hexdigest().encode() + b" " + rel.encode() + b"\0"
                       for rel in sorted(OLD))
    assert digest(tmp_path / "t") == hashlib.sha256(b"mlqpipe-tree 1\0" + listing).hexdigest()
    assert artifacts.mapping_digest(OLD) == digest(tmp_path / "t") == artifact_sha256(tmp_path / "t")


def test_tree_digest_ignores_names_mtimes_modes_order_and_empty_directories(tmp_path):
    a = _make(tmp_path / "a", OLD)
    b = tmp_path / "other-name"
    _make(b, dict(reversed(list(OLD.items()))))  # created in another order
    os.utime(b / "Manifest.json", (1, 1))
    os.chmod(b / "Manifest.json", 0o600)
    (b / "empty" / "dirs").mkdir(parents=True)
    assert digest(a) == digest(b)


def test_tree_digest_sees_content_paths_and_moves(tmp_path):
    base = digest(_make(tmp_path / "a", OLD))
    variants = [
        {**OLD, "Manifest.json": b'{"old": 2}'},  # content
        {**{k: v for k, v in OLD.items() if k != "Manifest.json"}, "manifest.json": OLD["Manifest.json"]},  # name
        {**{k: v for k, v in OLD.items() if k != "Manifest.json"}, "Data/Manifest.json": OLD["Manifest.json"]},  # move
        {**OLD, "Data/new.bin": b""},  # an empty file counts
    ]
    digests = [digest(_make(tmp_path / f"v{i}", v)) for i, v in enumerate(variants)]
    assert len({base, *digests}) == len(variants) + 1


def test_links_inside_a_tree_are_refused(tmp_path):
    t = _make(tmp_path / "t", OLD)
    os.symlink(tmp_path / "elsewhere", t / "link")
    with pytest.raises(ArtifactError, match="symbolic link"):
        digest(t)
    assert artifact_sha256(t) is None


def test_tree_files_lists_files_sorted_for_doit(tmp_path):
    t = _make(tmp_path / "t", OLD)
    assert tree_files(t) == [t / rel for rel in sorted(OLD)]
    (tmp_path / "f").write_bytes(b"x")
    assert tree_files(tmp_path / "f") == [tmp_path / "f"]


# --- atomic directory write ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exchange", "move-aside"])
def test_write_tree_creates_and_replaces_whole_trees(tmp_path, monkeypatch, mode):
    if mode == "move-aside":
        monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    target = tmp_path / "out" / "model.tree"
    assert write_tree(target, OLD) == digest(target) == artifacts.mapping_digest(OLD)
    assert write_tree(target, NEW) == digest(target)
    assert artifacts.read_tree(target) == NEW  # nothing of the old tree is left inside
    assert _hidden(target.parent) == []
    (target.parent / "file").write_bytes(b"a file where a tree goes")
    write_tree(target.parent / "file", OLD)
    assert artifacts.read_tree(target.parent / "file") == OLD and _hidden(target.parent) == []


def test_the_exchange_is_real_on_linux(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    _make(tmp_path / "a", {"x": b"a"})
    _make(tmp_path / "b", {"y": b"b"})
    assert artifacts._exchange(tmp_path / "a", tmp_path / "b")
    assert os.listdir(tmp_path / "a") == ["y"] and os.listdir(tmp_path / "b") == ["x"]


def test_write_tree_follows_the_umask(tmp_path, umask_022):
    write_tree(tmp_path / "a", OLD)
    modes = {p.name: _mode(p) for p in [tmp_path / "a", *(tmp_path / "a").rglob("*")]}
    assert set(modes.values()) == {0o755, 0o644} and modes["a"] == modes["Data"] == 0o755
    os.umask(0o077)
    write_tree(tmp_path / "b", OLD, fsync=True)
    assert {_mode(p) for p in [tmp_path / "b", *(tmp_path / "b").rglob("*")]} == {0o700, 0o600}


def test_bad_tree_paths_are_refused_and_leave_nothing(tmp_path):
    write_tree(tmp_path / "t", OLD)
    for bad in ("../escape", "/abs", "a//b", "./a", ""):
        with pytest.raises(ArtifactError, match="not a relative path"):
            write_tree(tmp_path / "t", {"ok": b"1", bad: b"2"})
    assert artifacts.read_tree(tmp_path / "t") == OLD and _hidden(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["t"]


def test_fsync_from_the_environment(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(artifacts, "_fsync_dir", lambda d: calls.append(d))
    monkeypatch.setenv("MLQPIPE_FSYNC", "1")
    write_tree(tmp_path / "t", OLD)
    assert tmp_path in calls and len(calls) >= 4  # the tree's directories, then the parent after the swap
    calls.clear()
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    write_tree(tmp_path / "t", NEW)
    assert calls.count(tmp_path) == 2 and artifacts.read_tree(tmp_path / "t") == NEW  # each move-aside rename
    calls.clear()
    monkeypatch.setenv("MLQPIPE_FSYNC", "0")
    write_tree(tmp_path / "t", NEW)
    assert calls == []


# --- kill -9 at every step ---------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from mlqpipe import artifacts
    target, files, step, nth, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    seen = {}
    def kill_at(name):
        seen[name] = seen.get(name, 0) + 1
        if name == step and seen[name] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    artifacts._step = kill_at
    if mode == "move-aside":
        artifacts._exchange = lambda a, b: False
    artifacts.write_tree(target, {k: v.encode() for k, v in files.items()})
""")

STEPS = {
    "fresh": [("file", 1), ("file", 2), ("filled", 1)],
    "exchange": [("file", 2), ("filled", 1), ("exchanged", 1), ("removing", 1), ("removing", 2)],
    "move-aside": [("file", 2), ("filled", 1), ("renamed-new", 1), ("moved-old", 1), ("swapped", 1), ("doomed", 1),
                   ("removing", 2)],
}
CASES = [(mode, step, nth) for mode, steps in STEPS.items() for step, nth in steps]


def _killed_write(target, files, mode, step, nth):
    arg = json.dumps({k: v.decode() for k, v in files.items()})
    done = subprocess.run([sys.executable, "-c", CHILD, str(target), arg, step, str(nth), mode],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr  # the writer reached the step and died there


def _state(target) -> str:
    if not os.path.lexists(target):
        return "absent"
    return {artifacts.mapping_digest(OLD): "old", artifacts.mapping_digest(NEW): "new"}.get(digest(target), "PARTIAL")


@pytest.mark.parametrize("recovery", ["heal", "next write"])
@pytest.mark.parametrize(("mode", "step", "nth"), CASES)
def test_a_killed_directory_write_leaves_the_old_or_the_new_tree(tmp_path, mode, step, nth, recovery):
    if mode == "exchange" and not artifacts._exchange(*(_make(tmp_path / n, {"f": b""}) for n in ("p", "q"))):
        pytest.skip("no atomic exchange on this system")
    target = tmp_path / "model.tree"
    if mode != "fresh":
        write_tree(target, OLD)
    _killed_write(target, NEW, mode, step, nth)
    after_kill = _state(target)
    window = mode == "move-aside" and step == "moved-old"  # between two renames: no target until healed
    old = "absent" if mode == "fresh" else "old"
    assert after_kill == "absent" if window else after_kill in {old, "new"}  # never a partial tree
    assert leftovers(target)  # the dead writer left something beside the target
    if recovery == "heal":
        heal(target)
        healed = _state(target)
        assert healed == ("new" if window else after_kill)
        assert healed != "absent" or mode == "fresh"
    else:
        write_tree(target, OLD)
        assert _state(target) == "old"
    assert leftovers(target) == [] and _hidden(tmp_path) == []


# --- leftovers of other writers -------------------------------------------------------------------------------


def test_stale_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    stale = [_make(tmp_path / f".t.{dead}.abc.tmp", {"partial": b"x"}), _make(tmp_path / f".t.{dead}.def.new", NEW),
             _make(tmp_path / f".t.{dead}.def.old", OLD)]
    live = _make(tmp_path / f".t.{os.getpid()}.ghi.tmp", {"writing": b"x"})  # a concurrent writer (this process)
    other = _make(tmp_path / f".u.{dead}.abc.tmp", {"partial": b"x"})  # another target's: not this write's business
    a_file = tmp_path / f".t.{dead}.jkl.tmp"  # a file temporary (fileio's), not a tree's
    a_file.write_bytes(b"x")
    write_tree(tmp_path / "t", NEW)
    assert not any(p.exists() for p in stale) and live.exists() and other.exists() and a_file.exists()
    assert artifacts.read_tree(tmp_path / "t") == NEW


@pytest.mark.parametrize(("present", "target", "result"), [
    (("new", "old"), False, "new"),  # killed between moving the old tree aside and renaming the new one in
    (("old",), False, "old"),  # the target removed by hand while the old tree was aside: restore it
    (("new",), True, "old"),  # killed before moving the old tree aside: it stays
    (("old",), True, "new"),  # killed after the swap: the old tree goes
    (("tmp",), True, "old"),
])
def test_heal_restores_or_removes_by_what_is_complete(tmp_path, present, target, result):
    dead = _dead_pid()
    contents = {"new": NEW, "old": OLD, "tmp": {"partial": b"x"}}
    for state in present:
        _make(tmp_path / f".m.{dead}.r4nd.{state}", contents[state])
    if target:
        _make(tmp_path / "m", NEW if present == ("old",) else OLD)
    actions = heal(tmp_path / "m")
    assert actions and _state(tmp_path / "m") == result and _hidden(tmp_path) == []


# --- cache and lock entries for trees -------------------------------------------------------------------------


def test_cache_stores_and_returns_trees_verified(tmp_path):
    src = _make(tmp_path / "src", OLD)
    cache = Cache(tmp_path / "cache")
    assert cache.put_tree("k" * 64, src, {"made_by": "test"}) == digest(src)
    files = cache.get_tree("k" * 64)
    assert files == OLD and cache.problems == [] and cache.verify() == []
    write_tree(tmp_path / "restored", files)
    assert digest(tmp_path / "restored") == digest(src)
    assert cache.get("k" * 64) is None and cache.problems == []  # a tree entry is not bytes: a plain miss
    cache.put("f" * 64, b"file bytes")
    assert cache.get_tree("f" * 64) is None and cache.get("f" * 64) == b"file bytes"
    manifest = json.loads(next((tmp_path / "cache" / "keys").glob("ff/*.json")).read_text())
    assert set(manifest) == {"format", "key", "object", "size"}  # file entries keep their format
    assert cache.put_tree("m" * 64, NEW) == artifacts.mapping_digest(NEW)


def test_a_corrupted_tree_entry_is_reported_and_rebuilt(tmp_path):
    cache = Cache(tmp_path / "cache")
    cache.put_tree("k" * 64, OLD)
    weight = hashlib.sha256(OLD["Data/com.apple.CoreML/weights/weight.bin"]).hexdigest()
    obj = tmp_path / "cache" / "objects" / weight[:2] / weight
    obj.write_bytes(b"flipped")
    assert cache.get_tree("k" * 64) is None
    assert len(cache.problems) == 1 and "do not match their digest" in cache.problems[0] and str(obj) in cache.problems[0]
    assert cache.verify() == [f"{obj}: bytes do not match their digest"]
    cache.put_tree("k" * 64, OLD)  # the build's rewrite heals it
    assert cache.get_tree("k" * 64) == OLD and cache.verify() == []
    key = next((tmp_path / "cache" / "keys").glob("kk/*.json"))
    manifest = json.loads(key.read_text())
    manifest["files"]["Manifest.json"], manifest["files"]["Data/com.apple.CoreML/model.proto"] = (
        manifest["files"]["Data/com.apple.CoreML/model.proto"], manifest["files"]["Manifest.json"])  # swapped names
    key.write_text(json.dumps(manifest))
    fresh = Cache(tmp_path / "cache")
    assert fresh.get_tree("k" * 64) is None and "tree digest" in fresh.problems[0]
    assert any("tree digest" in p for p in fresh.verify())
    os.unlink(obj)
    assert any("is missing" in p for p in fresh.verify())


def test_cache_prune_keeps_the_objects_of_kept_trees(tmp_path):
    cache = Cache(tmp_path / "cache")
    cache.put_tree("a" * 64, OLD)
    cache.put_tree("b" * 64, NEW)
    cache.put("c" * 64, b"file")
    removed = cache.prune({"a" * 64, "c" * 64})
    assert removed == 1 + len(NEW)  # b's manifest and its files (none shared with OLD)
    assert cache.get_tree("a" * 64) == OLD and cache.get("c" * 64) == b"file" and cache.verify() == []


def test_read_only_cache_writes_no_tree(tmp_path):
    cache = Cache(tmp_path / "cache", read_only=True)
    assert cache.put_tree("a" * 64, OLD) == artifacts.mapping_digest(OLD)
    assert not (tmp_path / "cache").exists()


WRITER = textwrap.dedent("""
    import sys
    from mlqpipe import artifacts
    files = {"Manifest.json": sys.argv[2].encode(), "Data/w.bin": sys.argv[2].encode() * 1000}
    for _ in range(40):
        artifacts.write_tree(sys.argv[1], files)
""")


def test_two_writers_of_one_tree_at_once(tmp_path):
    if not artifacts._exchange(*(_make(tmp_path / n, {"f": b""}) for n in ("p", "q"))):
        pytest.skip("no atomic exchange on this system: concurrent writers of one tree may fail (documented)")
    target = tmp_path / "out" / "model.tree"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), tag], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    written = {artifacts.mapping_digest({"Manifest.json": t, "Data/w.bin": t * 1000}) for t in (b"a", b"b")}
    assert digest(target) in written and _hidden(target.parent) == []
