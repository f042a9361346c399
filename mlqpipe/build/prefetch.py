"""The remote-cache prefetch, in a process of its own beside the build.

A warm build on a fresh checkout reads the final entry of every output the lock file records. The remote's
client (s3fs, botocore) costs CPU per request — about 10 ms to sign and parse each one, measured against
moto — and its import and session set-up nearly a second more: in a thread that work holds the build's GIL.
In a process it runs on another core. It copies entries into the local layer (atomic writes, objects before
their manifests, as every cache write) and says on stdout which keys are done, so that the build's reads of
those keys wait for it rather than fetching them a second time; anything it fails to copy is read as usual.

This module is the build's side (start the process, follow its reports); prefetch_process.py is the process:

    python -m mlqpipe.build.prefetch_process < {"url", "local", "state_dir", "run", "keys", "batch", "bundle_of"}
    -> one JSON line per batch: {"done": [keys], "read": [rels read from the remote], "bytes": n, "bundles": [...]}
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
        proc = subprocess.Popen([sys.executable, "-m", "mlqpipe.build.prefetch_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
