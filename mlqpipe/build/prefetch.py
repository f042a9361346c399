"""The remote-cache prefetch, in a process of its own beside the build.

A warm build on a fresh checkout reads the final entry of every output the lock file records. The remote's
client (s3fs, botocore) costs CPU per request — about 10 ms to sign and parse each one, measured against
moto — and its import and session set-up nearly a second more: in a thread that work holds the build's GIL.
In a process it runs on another core. It copies entries into the local layer (atomic writes, objects before
their manifests, as every cache write) and says on stdout which keys are done, so that the build's reads of
those keys wait for it rather than fetching them a second time; anything it fails to copy is read as usual.

    python -m mlqpipe.build.prefetch < {"url", "local", "state_dir", "run", "keys", "batch", "bundle_of"} (JSON)
    -> one JSON line per batch: {"done": [keys], "read": [rels read from the remote], "bytes": n}
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import threading
from pathlib import Path

STATS: dict = {"bytes": 0, "read": [], "bundles": set()}  # what prefetch processes of this process read (the
# benchmark counts it), and the bundles they found whole (the lock task need not ask the remote for them again)


def start(url: str, local: Path, state_dir, run: str, keys: list[str], pending: dict, rel_of, batch: int = 32,
          bundle_of: list[str] = ()) -> None:
    """Start the prefetch process for `keys`; `pending`: {rel_of(key): Event}, each set when its batch is
    done (or the process ended without it: the build then reads the key itself). `bundle_of`: the keys
    whose bundle of manifests (Cache.put_bundle) is read first."""
    request = {"url": url, "local": str(local), "state_dir": str(state_dir), "run": run, "keys": keys, "batch": batch,
               "bundle_of": list(bundle_of)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mlqpipe.build.prefetch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=None, text=True)
    except OSError:  # no process to spare: the build reads every key itself
        _release(pending)
        return
    atexit.register(_stop, proc)

    def follow():
        try:
            proc.stdin.write(json.dumps(request))
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                STATS["bytes"] += report.get("bytes", 0)
                STATS["read"] += report.get("read", [])
                STATS["bundles"].update(report.get("bundles", []))
                for key in report.get("done", []):
                    event = pending.get(rel_of(key))
                    if event is not None:
                        event.set()
        except (OSError, ValueError):
            pass
        finally:
            _release(pending)
            proc.wait()

    threading.Thread(target=follow, name="mlqpipe-cache-prefetch", daemon=True).start()


def _release(pending: dict) -> None:
    for event in pending.values():
        event.set()


def _stop(proc) -> None:
    """A build that ends before its prefetch does not leave it running (its writes are atomic)."""
    if proc.poll() is None:
        proc.terminate()


def batches(keys: list[str], batch: int) -> list[list[str]]:
    """A small first batch (the build's first outputs need not wait for a whole one), then `batch` each."""
    starts = [0, *range(min(8, batch), len(keys), batch)]
    return [keys[i:j] for i, j in zip(starts, [*starts[1:], len(keys)]) if i < j]


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
