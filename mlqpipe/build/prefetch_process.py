"""The remote-cache prefetch process (see prefetch.py): copies the entries it is given from the remote into
the local layer, batch by batch, reporting each batch on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlqpipe.build.prefetch import batches


def main() -> int:
    from mlqpipe.build.cache import Cache, bundle_key
    from mlqpipe.build.store import FsspecStore, LocalStore, Remote

    request = json.loads(sys.stdin.read())
    remote = Remote(FsspecStore(request["url"]), request["state_dir"], run=request["run"])
    cache = Cache(store=LocalStore(Path(request["local"])), remote=remote)
    read: list[str] = []  # what this process asked the remote for, reported with each batch
    real_read, real_read_many = remote.store.read, remote.store.read_many

    def counted_read(rel):
        data = real_read(rel)  # an absent one (FileNotFoundError) is not a read
        read.append(rel)
        return data

    def counted_read_many(rels):
        found = real_read_many(rels)
        read.extend(found)
        return found

    remote.store.read, remote.store.read_many = counted_read, counted_read_many
    before, bundle = 0, {}
    if request["bundle_of"]:  # the lock's final manifests and small objects, when the build that wrote it left them
        try:
            bundle = cache.read_bundle(request["bundle_of"])
        except Exception:  # noqa: BLE001 — without it, each manifest and object is read by itself
            pass
    _log_problems(request["state_dir"], cache)
    for chunk in batches(request["keys"], request["batch"]):
        try:
            cache.prefetch(chunk, bundle)
        except Exception:  # noqa: BLE001 — a failed prefetch only means the build's own reads do the work
            pass
        print(json.dumps({"done": chunk, "read": read, "bytes": cache.remote_bytes_read - before,
                          "bundles": [bundle_key(request["bundle_of"])] if bundle else []}), flush=True)
        read, before = [], cache.remote_bytes_read
    _log_problems(request["state_dir"], cache)
    return 0


def _log_problems(state_dir, cache) -> None:
    """Corrupt remote objects this process met, into the build's event log (its summary lists them)."""
    lines = "".join(json.dumps({"event": "cache-problem", "message": p}, sort_keys=True) + "\n" for p in cache.problems)
    cache.problems.clear()
    if lines:
        with open(Path(state_dir) / "run.jsonl", "a", encoding="utf-8") as f:
            f.write(lines)


if __name__ == "__main__":
    sys.exit(main())
