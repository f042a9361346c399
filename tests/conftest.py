"""Shared test helpers: where the real models live, and small model builders using our own messages."""

from __future__ import annotations

import fnmatch
import functools
import os
import subprocess
import time
from pathlib import Path

import pytest

# Hypothesis: deterministic in CI (the same examples every run, so a red CI is reproducible); random locally,
# where new examples are the point. MLQPIPE_HYPOTHESIS=ci|dev picks one explicitly.
from hypothesis import settings as _hypothesis_settings

_hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
_hypothesis_settings.register_profile("dev")
_hypothesis_settings.load_profile(os.environ.get("MLQPIPE_HYPOTHESIS") or ("ci" if os.environ.get("CI") else "dev"))

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
COREML_VALIDATE = REPO.parent / "shared" / "tools" / "coreml-validate"


def real_model_paths():
    return sorted(SHARED_MODELS.glob("*.mlmodel")) if SHARED_MODELS.is_dir() else []


@pytest.fixture(params=[p.name for p in real_model_paths()] or ["<absent>"])
def real_model(request) -> Path:
    if request.param == "<absent>":
        pytest.skip("../shared/models is absent")
    return SHARED_MODELS / request.param


def _inputs() -> list[Path]:
    files = sorted((REPO / "pipelines").rglob("*.mlmodel")) + sorted((REPO / "pipelines").rglob("*.npz"))
    return files + (sorted(SHARED_MODELS.iterdir()) if SHARED_MODELS.is_dir() else [])


def _fingerprint(path: Path):
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.fixture(autouse=True)
def inputs_are_never_modified():
    """Every test: the repository's and shared/ input models and data are byte-for-byte unchanged after it."""
    import hashlib

    before = {p: (_fingerprint(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in _inputs()} if not _HASHES else _HASHES
    _HASHES.update(before)
    yield
    for p, (stat, digest) in before.items():
        assert p.exists(), f"input {p} was removed"
        if _fingerprint(p) != stat:  # touched: the bytes must still be the same
            assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, f"input {p} was modified"


_HASHES: dict = {}


# Core ML's own validator as an oracle on every model a test writes ------------------------------------


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "invalid_models(*globs, reason): models this test writes on purpose that Core ML rejects (globs on "
        "paths relative to the temporary directories the test made); every other model it writes must pass "
        "coreml-validate",
    )


@functools.cache
def _validator() -> str | None:
    """The validator when it can run on this machine, else None. Its `--help` prints the usage line and
    exits 0 (the tools README says 2: that is its exit without arguments); a binary built for another
    machine fails to start or exits 126/127 with a loader error, never with the usage line."""
    if not os.access(COREML_VALIDATE, os.X_OK):
        return None
    try:
        done = subprocess.run([str(COREML_VALIDATE), "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    usage = (done.stdout + done.stderr).startswith("usage: coreml-validate")
    return str(COREML_VALIDATE) if done.returncode in (0, 2) and usage else None


def validate_models(paths) -> dict[Path, str | None]:
    """coreml-validate on all `paths` in one call: path -> None when Core ML accepts it, else its message."""
    paths = [Path(p) for p in paths]
    if not paths:
        return {}
    out = subprocess.run([_validator(), *map(str, paths)], capture_output=True, text=True, errors="replace", timeout=600).stdout
    if len(paths) == 1:  # a lone model's verdict has no "PATH: " prefix
        return {paths[0]: _verdict(out)}
    # one verdict per argument, in argument order: "PATH: OK" or "PATH: <message>" (a message may wrap)
    starts = []
    pos = 0
    for p in paths:
        at = out.find(f"{p}: ", pos)
        starts.append(at)
        pos = at + 1 if at >= 0 else pos
    verdicts = {}
    for i, p in enumerate(paths):
        if starts[i] < 0:
            verdicts[p] = f"no verdict from coreml-validate (its output: {out.strip()[:300]!r})"
            continue
        end = next((s for s in starts[i + 1 :] if s >= 0), len(out))
        verdicts[p] = _verdict(out[starts[i] + len(f"{p}: ") : end])
    return verdicts


def _verdict(text: str) -> str | None:
    """None for "OK" and "OK (warning ...)" (Core ML loads the model), else the validator's message."""
    text = text.strip()
    return None if text == "OK" or text.startswith("OK (warning") else text


@pytest.fixture
def coreml_validate():
    """`validate_models`, or skip the test when Core ML's validator cannot run here."""
    if _validator() is None:
        pytest.skip("coreml-validate is absent or cannot run on this machine")
    return validate_models


def _written_models(root: Path) -> list[Path]:
    """*.mlmodel files and *.mlpackage directories under `root`; symlinks are neither followed nor checked
    (some tests make loops)."""
    found = []
    for top, dirs, files in os.walk(root, followlinks=False):
        for d in list(dirs):
            if d.endswith(".mlpackage"):
                dirs.remove(d)
                if not os.path.islink(os.path.join(top, d)):
                    found.append(Path(top, d))
        found += [Path(top, f) for f in files if f.endswith(".mlmodel") and not os.path.islink(os.path.join(top, f))]
    return sorted(found)


_CHECKED_TMP: set[str] = set()  # entries of the session's base temp directory already checked
_ORACLE = {"models": 0, "seconds": 0.0}


@pytest.fixture(autouse=True)
def core_ml_accepts_written_models(request, tmp_path_factory):
    """After each test, every model written under the temporary directories made since the previous test
    ended (its tmp_path, tmp_path_factory directories, module-scoped fixtures set up for it) must pass Core
    ML's own validator, except files the test names with @pytest.mark.invalid_models."""
    yield
    if _validator() is None:
        return
    started = time.perf_counter()
    try:
        _judge_written_models(request, tmp_path_factory.getbasetemp())
    finally:
        _ORACLE["seconds"] += time.perf_counter() - started


def _judge_written_models(request, base: Path) -> None:
    names = [name for name in sorted(os.listdir(base)) if name not in _CHECKED_TMP]
    _CHECKED_TMP.update(names)
    new = [base / name for name in names if not (base / name).is_symlink()]  # pytest's "...current" links
    models = {m: d for d in new for m in _written_models(d)}
    _ORACLE["models"] += len(models)
    marks = list(request.node.iter_markers("invalid_models"))
    problems = [f"@pytest.mark.invalid_models{m.args} needs reason=... (why Core ML must reject them)" for m in marks if not m.kwargs.get("reason")]
    globs = [g for m in marks for g in m.args]
    rejected = {m: msg for m, msg in validate_models(models).items() if msg is not None}
    meant = {g: [m for m in rejected if fnmatch.fnmatchcase(m.relative_to(models[m]).as_posix(), g)] for g in globs}
    expected = {m for ms in meant.values() for m in ms}
    problems += [f"{m.relative_to(base)}: {msg}" for m, msg in rejected.items() if m not in expected]
    problems += [f"invalid_models({g!r}) names no model Core ML rejected: narrow or remove it" for g, ms in meant.items() if not ms]
    if problems:
        pytest.fail(
            "models this test wrote, judged by Core ML's validator (coreml-validate; name a model rejected on "
            "purpose with @pytest.mark.invalid_models('glob', reason=...)):\n  " + "\n  ".join(problems),
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter):
    if _ORACLE["models"]:
        terminalreporter.write_line(
            f"coreml-validate: {_ORACLE['models']} written models judged in {_ORACLE['seconds']:.2f} s"
        )


@pytest.fixture(autouse=True)
def _not_in_ci(monkeypatch):
    """`mlqpipe build` keeps going after a failure when $CI is set: tests decide that themselves."""
    monkeypatch.delenv("CI", raising=False)


# --- a whole-suite run collects every test file --------------------------------------------------------

_COLLECTED_FILES: set = set()


def pytest_collectreport(report):
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".py") and report.outcome in ("passed", "skipped"):  # a module skipped whole counts too
        _COLLECTED_FILES.add(path)


def pytest_collection_finish(session):
    """pytest's default norecursedirs once hid tests/build from every whole-suite run; a file left out again,
    for whatever reason, stops the run instead of passing unnoticed."""
    if any(not a.startswith("-") for a in session.config.invocation_params.args):
        return  # a subset was asked for (paths, or a -k / -m expression)
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("test_*.py")}
    missing = sorted(on_disk - _COLLECTED_FILES)
    if missing:
        raise pytest.UsageError(f"test files not collected by the whole-suite run: {', '.join(missing)}")
