"""The lock file: what a build produced and from what — `mlqpipe verify` and `mlqpipe diff` read it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import MlqpipeError


def read_lock(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return doc["outputs"] if isinstance(doc.get("outputs"), dict) else {}
    except FileNotFoundError:
        raise MlqpipeError(f"{path}: no such lock file; run `mlqpipe build` first") from None
    except (OSError, ValueError, AttributeError) as e:
        raise MlqpipeError(f"{path}: not a readable mlqpipe lock file ({e})") from None


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def verify(lock_path) -> list[str]:
    """Every way the files on disk differ from what the lock file records (empty: verified)."""
    problems = []
    for out, entry in sorted(read_lock(lock_path).items()):
        got = _sha(Path(out))
        if got is None:
            problems.append(f"{out}: missing")
        elif got != entry.get("output_sha256"):
            problems.append(f"{out}: content differs from the lock file (sha256 {got[:12]}…, locked {entry.get('output_sha256', '')[:12]}…)")
        for inp, digest in sorted(entry.get("inputs", {}).items()):
            now = _sha(Path(inp))
            if now != digest:
                problems.append(f"{out}: input {inp} {'is missing' if now is None else 'changed since the build'}")
        if not Path(entry.get("recipe", "")).is_file():
            problems.append(f"{out}: recipe {entry.get('recipe')} is missing")
    return problems


def diff(a_path, b_path) -> list[str]:
    """Readable differences between two lock files (for reviewing a pull request)."""
    a, b = read_lock(a_path), read_lock(b_path)
    lines = []
    for out in sorted(set(a) | set(b)):
        if out not in b:
            lines.append(f"- {out} (removed)")
        elif out not in a:
            lines.append(f"+ {out} (added)")
        else:
            ea, eb = a[out], b[out]
            what = []
            if ea.get("inputs") != eb.get("inputs"):
                what.append("inputs changed")
            if ea.get("recipe_sha256") != eb.get("recipe_sha256"):
                what.append("recipe changed")
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
