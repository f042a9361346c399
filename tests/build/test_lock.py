"""build/lock.py on a temporary directory: render (stable text), update_lock (writes only on change, put and
keep), verify (every disagreement between the lock and the files) and diff (what changed between two locks)."""

import hashlib
import json

import pytest

from mlqpipe.build.lock import LOCK_FORMAT, LockError, diff, read_lock, render, update_lock, verify

VERSIONS = {"mlqpipe": "0.1.0", "numpy": "1.0", "protobuf": "7.0", "kernel": 1}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """out/m.q.bin built from m.bin by r.yaml with data.npz; paths relative to the project root (the cwd)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    files = {"m.bin": b"model", "r.yaml": b"version: 1\n", "data.npz": b"data", "out/m.q.bin": b"quantized"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def _entry(**changes):
    entry = {
        "status": "passed", "output_sha256": _sha(b"quantized"), "inputs": {"m.bin": _sha(b"model")}, "recipe": "r.yaml",
        "recipe_files": {"r.yaml": _sha(b"version: 1\n")}, "data": {"data.npz": _sha(b"data")},
        "stage_keys": ["k1", "k2"], "gates": [{"gate": "min_snr_db", "threshold": 20, "passed": True}], "reports": [],
    }
    entry.update(changes)
    return entry


def test_render_is_sorted_stable_json():
    text = render({"z.bin": {"b": 1, "a": 2}, "a.bin": {}}, VERSIONS)
    doc = json.loads(text)
    assert doc == {"lock_format": LOCK_FORMAT, "versions": VERSIONS, "outputs": {"a.bin": {}, "z.bin": {"a": 2, "b": 1}}}
    assert text == json.dumps(doc, sort_keys=True, indent=2) + "\n"
    assert text.index('"a.bin"') < text.index('"z.bin"') and text.index('"a": 2') < text.index('"b": 1')
    assert render({"a.bin": {}, "z.bin": {"a": 2, "b": 1}}, dict(reversed(list(VERSIONS.items())))) == text


def test_update_writes_only_when_the_text_changes(project):
    lock, state = project / "mlqpipe.lock.json", project / ".state"
    assert update_lock(lock, state, VERSIONS, put={"out/m.q.bin": _entry()}) is True
    text = lock.read_text()
    assert text == render({"out/m.q.bin": _entry()}, VERSIONS)
    mtime = lock.stat().st_mtime_ns
    assert update_lock(lock, state, VERSIONS, put={"out/m.q.bin": _entry()}) is False
    assert lock.stat().st_mtime_ns == mtime and lock.read_text() == text
    # another output is added beside the first; keep drops one
    assert update_lock(lock, state, VERSIONS, put={"out/b.bin": _entry(stage_keys=["x"])}) is True
    assert sorted(read_lock(lock)["outputs"]) == ["out/b.bin", "out/m.q.bin"]
    assert update_lock(lock, state, VERSIONS, keep=lambda out, e: out != "out/b.bin") is True
    assert lock.read_text() == text
    # new versions rewrite it
    assert update_lock(lock, state, {**VERSIONS, "numpy": "2.0"}) is True
    assert read_lock(lock)["versions"]["numpy"] == "2.0"


def test_update_replaces_a_lock_of_another_format(project):
    lock = project / "mlqpipe.lock.json"
    lock.write_text(json.dumps({"lock_format": 1, "versions": {}, "outputs": {"old.bin": {}}}))
    assert update_lock(lock, project / ".state", VERSIONS, put={"out/m.q.bin": _entry()}) is True
    assert list(read_lock(lock)["outputs"]) == ["out/m.q.bin"]  # the old format's entries are not carried over


def test_verify_clean(project):
    lock = project / "mlqpipe.lock.json"
    update_lock(lock, project / ".state", VERSIONS, put={"out/m.q.bin": _entry()})
    assert verify(lock) == ([], [])


@pytest.mark.parametrize("change, problem", [
    (lambda p: (p / "out/m.q.bin").write_bytes(b"other"), "out/m.q.bin: content differs from the lock file"),
    (lambda p: (p / "out/m.q.bin").unlink(), "out/m.q.bin: missing"),
    (lambda p: (p / "m.bin").write_bytes(b"new model"), "out/m.q.bin: input m.bin changed since the build"),
    (lambda p: (p / "m.bin").unlink(), "out/m.q.bin: input m.bin is missing"),
    (lambda p: (p / "r.yaml").write_bytes(b"version: 1\n# edited\n"), "out/m.q.bin: recipe file r.yaml changed since the build"),
    (lambda p: (p / "data.npz").write_bytes(b"other data"), "out/m.q.bin: data file data.npz changed since the build"),
])
def test_verify_finds_each_disagreement(project, change, problem):
    lock = project / "mlqpipe.lock.json"
    update_lock(lock, project / ".state", VERSIONS, put={"out/m.q.bin": _entry()})
    change(project)
    problems, warnings = verify(lock)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    assert warnings == []


def test_verify_failed_outputs_are_not_shippable(project):
    lock = project / "mlqpipe.lock.json"
    gates = [{"gate": "min_snr_db", "threshold": 40, "passed": False}, {"gate": "min_accuracy", "threshold": 0.9, "passed": True}]
    update_lock(lock, project / ".state", VERSIONS, put={
        "out/m.q.bin": _entry(status="failed", failure="gates", output_sha256=None, gates=gates),
        "out/e.bin": _entry(status="failed", failure="error", output_sha256=None, gates=[]),
    })
    problems, _ = verify(lock)
    assert problems == ["out/e.bin: not shippable (its build failed); see its report",
                        "out/m.q.bin: not shippable (gates failed: min_snr_db); see its report"]


def test_verify_warns_about_other_versions(project):
    lock = project / "mlqpipe.lock.json"
    update_lock(lock, project / ".state", {**VERSIONS, "numpy": "0.0.1"}, put={"out/m.q.bin": _entry()})
    problems, warnings = verify(lock, kernel=1)
    assert problems == []
    assert any(w.startswith("written with numpy 0.0.1, this is ") for w in warnings)
    assert not any("kernel" in w for w in warnings)


@pytest.mark.parametrize("text, message", [
    (None, "no such lock file"),
    ("{not json", "not a readable mlqpipe lock file"),
    ('{"lock_format": 2}', "not an mlqpipe lock file (no outputs)"),
    ('{"lock_format": 1, "outputs": {}}', "lock format 1, written by an older mlqpipe"),
    ('{"lock_format": 99, "outputs": {}}', "lock format 99, written by another mlqpipe"),
])
def test_unusable_locks_are_refused(project, text, message):
    lock = project / "mlqpipe.lock.json"
    if text is not None:
        lock.write_text(text)
    with pytest.raises(LockError, match=message.replace("(", r"\(").replace(")", r"\)")):
        verify(lock)


def test_diff(project):
    a, b = project / "a.lock.json", project / "b.lock.json"
    a.write_text(render({"gone.bin": _entry(), "same.bin": _entry(), "changed.bin": _entry()}, VERSIONS))
    b.write_text(render({
        "new.bin": _entry(), "same.bin": _entry(),
        "changed.bin": _entry(status="failed", inputs={"m.bin": "0" * 64}, recipe_files={}, data={}, gates=[],
                              stage_keys=["k1", "k3"], output_sha256=None),
    }, VERSIONS))
    assert diff(a, b) == [
        "~ changed.bin: status passed -> failed, inputs changed, recipe changed, evaluation data changed, gates changed, "
        "stage keys changed from stage 2, output bytes changed",
        "- gone.bin (removed)",
        "+ new.bin (added)",
    ]
    assert diff(a, a) == []
    b.write_text(render({"same.bin": _entry(stage_keys=["k1"])}, VERSIONS))
    assert "~ same.bin: number of stages changed" in diff(a, b)
