"""The lock file, `mlqpipe.lock.json`: what a build shipped and from exactly what. This module alone reads
and writes it; `mlqpipe verify` and `mlqpipe diff` read it.

Format (lock_format 2; stable key order, no timestamps, no measured values — float sums differ across CPUs
and BLAS builds, and a lock must be byte-identical across machines):

    {"lock_format": 2,
     "versions": {"mlqpipe", "numpy", "protobuf", "kernel"},
     "outputs": {OUTPUT: {
         "status": "passed" | "failed",      # failed: a gate failed or the build of this output failed
         "failure": "gates" | "error",       # only when failed
         "output_sha256": str | null,        # null when failed (nothing is left at the output path)
         "inputs": {MODEL: sha256},
         "recipe": RECIPE,                   # the recipe naming this output
         "recipe_files": {FILE: sha256},     # the recipe and every file of its `extends:` chain
         "data": {FILE: sha256},             # evaluation data
         "stage_keys": [cache key per stage],
         "gates": [{"gate", "threshold", "passed" | "applied": false}],
         "reports": [REPORT FILE, ...]}}}

Paths are relative to the project root, with forward slashes. The file is rewritten only when what it
records changes, atomically, under an advisory lock (parallel build processes update their entries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from mlqpipe.errors import MlqpipeError

LOCK_FORMAT = 2


class LockError(MlqpipeError):
    """A lock file that cannot be used: missing, unreadable, or written by another mlqpipe format."""


def file_sha256(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def artifact_sha256(path) -> str | None:
    """The digest to record for a model, output or data artifact: a file's is its sha256 (equal to
    file_sha256), a directory's (an ML program) its tree digest (mlqpipe.artifacts); None when missing or
    unusable as an artifact."""
    from mlqpipe.artifacts import ArtifactError, digest

    try:
        return digest(path)
    except (OSError, ArtifactError):
        return None


def current_versions(kernel: int) -> dict:
    import numpy
    from google.protobuf import __version__ as protobuf_version

    from mlqpipe import __version__

    return {"mlqpipe": __version__, "numpy": numpy.__version__, "protobuf": protobuf_version, "kernel": kernel}


def read_lock(path) -> dict:
    """The whole lock document; LockError with what to do when it cannot be used."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LockError(f"{path}: no such lock file; run `mlqpipe build` first") from None
    except (OSError, ValueError) as e:
        raise LockError(f"{path}: not a readable mlqpipe lock file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), dict):
        raise LockError(f"{path}: not an mlqpipe lock file (no outputs)")
    found = doc.get("lock_format")
    if found != LOCK_FORMAT:
        raise LockError(f"{path}: lock format {found}, written by {'an older' if isinstance(found, int) and found < LOCK_FORMAT else 'another'} "
                        f"mlqpipe (this one writes format {LOCK_FORMAT}); run `mlqpipe build` to rewrite it")
    return doc


def outputs_or_empty(path) -> dict:
    """The recorded outputs, for a build that is about to rewrite the lock: any format, {} when none."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return doc["outputs"] if isinstance(doc.get("outputs"), dict) else {}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def render(outputs: dict, versions: dict) -> str:
    doc = {"lock_format": LOCK_FORMAT, "versions": versions, "outputs": dict(sorted(outputs.items()))}
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


@contextlib.contextmanager
def _exclusive(state_dir):
    """An advisory lock serialising read-modify-write of the lock file between build processes."""
    try:
        import fcntl
    except ImportError:  # Windows: builds there run one writer at a time (doit -n uses processes too; rare)
        yield
        return
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(state_dir) / "lock.flock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_lock(lock_path, state_dir, versions: dict, put: dict | None = None, keep=None) -> bool:
    """Replace the entries in `put`, drop entries for which `keep(output, entry)` is False, and write the
    lock only if its text changes. Returns whether it was written."""
    from mlqpipe.fileio import atomic_write

    with _exclusive(state_dir):
        try:
            known = Path(lock_path).read_text(encoding="utf-8")
        except OSError:
            known = None
        outputs = outputs_or_empty(lock_path) if known is not None and _format_of(known) == LOCK_FORMAT else {}
        outputs.update(put or {})
        if keep is not None:
            outputs = {out: e for out, e in outputs.items() if keep(out, e)}
        text = render(outputs, versions)
        if text == known:
            return False
        atomic_write(lock_path, text.encode())
        return True


def _format_of(text: str):
    try:
        return json.loads(text).get("lock_format")
    except (ValueError, AttributeError):
        return None


# --- shards and merging their partial locks ----------------------------------------------------------


def shard_of(output, count: int) -> int:
    """The shard (1..count) an output belongs to: by a hash of its project-relative path, so adding or
    removing an unrelated recipe moves no other output between shards."""
    from mlqpipe.fileio import posix_path

    return int(hashlib.sha256(posix_path(output).encode()).hexdigest()[:16], 16) % count + 1


def in_shard(output, shard) -> bool:
    return shard is None or shard_of(output, shard[1]) == shard[0]


LOCK_FILE = "mlqpipe.lock.json"  # the lock file a build writes and a checkout commits


def shard_lock_file(shard: tuple[int, int]) -> str:
    """The partial lock file of a shard (`mlqpipe lock merge` combines them into mlqpipe.lock.json)."""
    return f"mlqpipe.lock.shard-{shard[0]}-of-{shard[1]}.json"



def merge(paths) -> str:
    """The lock file of a whole build from its shards' partial locks: the union of their outputs. Refused
    (LockError) when they were written by different versions, or record one output differently — partials
    of one build never overlap, so that means they come from different builds. The text equals what one
    unsharded build of the same recipes writes."""
    outputs: dict = {}
    versions = None
    owner: dict = {}
    for path in paths:
        doc = read_lock(path)
        if versions is None:
            versions, first = doc.get("versions"), path
        elif doc.get("versions") != versions:
            raise LockError(f"{path}: written by {doc.get('versions')}, {first} by {versions}; merge the partial locks of "
                            "one build (every shard with the same mlqpipe, numpy and protobuf)")
        for out, entry in doc["outputs"].items():
            if out in outputs and outputs[out] != entry:
                raise LockError(f"{path}: {out} is recorded differently in {owner[out]}; these partial locks come from "
                                "different builds (rebuild the shards from one commit)")
            outputs[out], owner[out] = entry, path
    if versions is None:
        raise LockError("no partial lock files to merge")
    return render(outputs, versions)


# --- verify and diff ------------------------------------------------------------------------------------


def verify(lock_path, kernel: int | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings): every way the lock and the files on disk now disagree. Problems: an output
    that failed, is missing or differs; a model, recipe or data file that changed or is gone. Warnings:
    other tool versions than the ones that wrote the lock (identical outputs prove the result anyway)."""
    doc = read_lock(lock_path)
    problems, warnings = [], []
    for out, entry in sorted(doc["outputs"].items()):
        if entry.get("status") != "passed":
            failed = [g["gate"] for g in entry.get("gates", []) if g.get("passed") is False]
            why = f"gates failed: {', '.join(failed)}" if failed else "its build failed"
            problems.append(f"{out}: not shippable ({why}); see its report")
            continue
        got = file_sha256(out)
        if got is None:
            problems.append(f"{out}: missing")
        elif got != entry.get("output_sha256"):
            problems.append(f"{out}: content differs from the lock file (sha256 {got[:12]}…, locked {str(entry.get('output_sha256'))[:12]}…)")
        for kind, files in (("input", entry.get("inputs", {})), ("recipe file", entry.get("recipe_files", {})),
                            ("data file", entry.get("data", {}))):
            for path, digest in sorted(files.items()):
                now = file_sha256(path)
                if now != digest:
                    problems.append(f"{out}: {kind} {path} {'is missing' if now is None else 'changed since the build'}")
    if kernel is not None:
        now = current_versions(kernel)
        for name, recorded in sorted(doc.get("versions", {}).items()):
            if now.get(name) != recorded:
                warnings.append(f"written with {name} {recorded}, this is {now.get(name)} (outputs still verified byte for byte)")
    return problems, warnings


def diff(a_path, b_path) -> list[str]:
    """Readable differences between two lock files (for reviewing a pull request)."""
    a, b = read_lock(a_path)["outputs"], read_lock(b_path)["outputs"]
    lines = []
    for out in sorted(set(a) | set(b)):
        if out not in b:
            lines.append(f"- {out} (removed)")
        elif out not in a:
            lines.append(f"+ {out} (added)")
        else:
            ea, eb = a[out], b[out]
            what = []
            if ea.get("status") != eb.get("status"):
                what.append(f"status {ea.get('status')} -> {eb.get('status')}")
            if ea.get("inputs") != eb.get("inputs"):
                what.append("inputs changed")
            if ea.get("recipe_files") != eb.get("recipe_files"):
                what.append("recipe changed")
            if ea.get("data") != eb.get("data"):
                what.append("evaluation data changed")
            if ea.get("gates") != eb.get("gates"):
                what.append("gates changed")
            changed_stages = [i + 1 for i, (x, y) in enumerate(zip(ea.get("stage_keys", []), eb.get("stage_keys", []))) if x != y]
            if len(ea.get("stage_keys", [])) != len(eb.get("stage_keys", [])):
                what.append("number of stages changed")
            elif changed_stages:
                what.append(f"stage keys changed from stage {changed_stages[0]}")
            if ea.get("output_sha256") != eb.get("output_sha256"):
                what.append("output bytes changed")
            if what:
                lines.append(f"~ {out}: {', '.join(what)}")
    return lines
