"""The remote cache (issue #20): a fleet of 50 small recipes against moto's S3 server on 127.0.0.1.

    python bench/remote.py   (or through bench/run.py --only remote --json /tmp/r.json --markdown /tmp/r.md)

A cold build fills the remote (s3://mlq-bench/fleet). Then a second checkout — the recipes, models and the
committed lock file, an empty local layer, no doit state — builds against the warm remote, and is compared
with the same fresh checkout building on a warm local cache. Builds run as fresh processes (medians of 3).
The bytes read from the remote are counted by one more warm build in this process with the store's reads
wrapped (the same code path). Needs `moto[server]`, s3fs and fsspec; fake credentials, no other network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from build_timing import RECIPE, make_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdict import print_targets  # noqa: E402  (bench/verdict.py)

N, REPEAT = 50, 3
BUCKET = "mlq-bench"
ENV = {"AWS_ACCESS_KEY_ID": "AKIABENCHFAKEKEY0001", "AWS_SECRET_ACCESS_KEY": "bench-fake-secret", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit("moto_server did not start")


def fleet(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "recipes").mkdir()
    for i in range(N):
        (root / "models" / f"m{i:02d}.mlmodel").write_bytes(make_model(i))
        (root / "recipes" / f"r{i:02d}.yaml").write_text(RECIPE.format(i=i, nbits=8))
    return root


def checkout(source: Path, dest: Path) -> Path:
    """What a fresh clone holds: models, recipes and the committed lock file; no outputs, no state."""
    for d in ("models", "recipes"):
        shutil.copytree(source / d, dest / d)
    shutil.copy(source / "mlqpipe.lock.json", dest / "mlqpipe.lock.json")
    return dest


def build(cwd: Path, env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlqpipe.cli", "build", "recipes/*.yaml"], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("mlqpipe build:"))
    return elapsed, summary + (f" [stderr: {proc.stderr.strip()}]" if proc.stderr.strip() else "")


def counted_build(cwd: Path, url: str) -> dict:
    """One warm-remote build in this process, the remote store's reads counted (bytes and requests)."""
    import contextlib
    import io

    from mlqpipe.build import store
    from mlqpipe.cli import main

    seen = {"bytes": 0, "reads": 0, "writes": 0, "rels": []}
    read, read_many, write = store.FsspecStore.read, store.FsspecStore.read_many, store.FsspecStore.write

    def counted_read(self, rel):
        data = read(self, rel)
        seen["bytes"] += len(data)
        seen["reads"] += 1
        seen["rels"].append(rel)
        return data

    def counted_many(self, rels):
        out = read_many(self, rels)
        seen["bytes"] += sum(len(v) for v in out.values())
        seen["reads"] += len(out)
        seen["rels"] += list(out)
        return out

    def counted_write(self, rel, data, **kw):
        seen["writes"] += 1
        return write(self, rel, data, **kw)

    store.FsspecStore.read, store.FsspecStore.read_many, store.FsspecStore.write = counted_read, counted_many, counted_write
    old = (os.getcwd(), dict(os.environ))
    try:
        os.chdir(cwd)
        os.environ["MLQPIPE_CACHE"] = url
        os.environ["MLQPIPE_LOCAL_CACHE"] = str(cwd / ".mlqpipe-cache")
        with contextlib.redirect_stdout(io.StringIO()) as out:
            status = main(["build", "recipes/*.yaml"])
    finally:
        store.FsspecStore.read, store.FsspecStore.read_many, store.FsspecStore.write = read, read_many, write
        os.chdir(old[0])
        os.environ.clear()
        os.environ.update(old[1])
    from mlqpipe.build import prefetch

    seen["bytes"] += prefetch.STATS["bytes"]  # the prefetch process's reads, as it reported them
    seen["reads"] += len(prefetch.STATS["read"])
    seen["rels"] += prefetch.STATS["read"]
    seen["summary"] = next(line for line in out.getvalue().splitlines() if line.startswith("mlqpipe build:"))
    seen["status"] = status
    return seen


def needed_bytes(local: Path, lock: dict) -> dict:
    """What the build must read at least once: the final entry of each output in the lock (its manifest,
    which keeps every stage's report rows, and the objects it names: the output), each once. The
    manifests of the stages before are counted too, for the table."""
    manifests, earlier, objects = 0, 0, {}
    for entry in lock["outputs"].values():
        for key in entry["stage_keys"][:-1]:
            earlier += (local / "keys" / key[:2] / f"{key}.json").stat().st_size
        key = entry["stage_keys"][-1]
        data = (local / "keys" / key[:2] / f"{key}.json").read_bytes()
        manifests += len(data)
        m = json.loads(data)
        for o in [m["object"]] if "object" in m else [e["object"] for e in m["files"].values()]:
            objects[o] = (local / "objects" / o[:2] / o).stat().st_size
    return {"manifest_bytes": manifests, "earlier_manifest_bytes": earlier, "object_bytes": sum(objects.values()), "objects": len(objects)}


def bench(log=print) -> dict:
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ModuleNotFoundError as e:
        return {"skipped": f"{e.name} is not installed (pip install 'mlqpipe[dev]')"}
    server, endpoint = start_server()
    saved = dict(os.environ)
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    env = dict(os.environ)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/fleet"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ci = fleet(tmp / "ci")
            cold, cold_summary = build(ci, {**env, "MLQPIPE_CACHE": url, "MLQPIPE_LOCAL_CACHE": str(ci / ".mlqpipe-cache")})
            log(f"remote: cold build {cold:.2f} s ({cold_summary})")
            lock = json.loads((ci / "mlqpipe.lock.json").read_text())
            outputs = sum(p.stat().st_size for p in (ci / "out").glob("*.mlmodel"))  # the models, not their reports
            need = needed_bytes(ci / ".mlqpipe-cache", lock)
            warm_local_cache = tmp / "warm-local"
            shutil.copytree(ci / ".mlqpipe-cache", warm_local_cache)
            remote_runs, local_runs, summaries = [], [], []
            for i in range(REPEAT):
                d = checkout(ci, tmp / f"remote{i}")
                t, s = build(d, {**env, "MLQPIPE_CACHE": url, "MLQPIPE_LOCAL_CACHE": str(d / ".mlqpipe-cache")})
                remote_runs.append(t)
                summaries.append(s)
                d = checkout(ci, tmp / f"local{i}")
                t, s = build(d, {**env, "MLQPIPE_CACHE": str(warm_local_cache)})
                local_runs.append(t)
                summaries.append(s)
            log(f"remote: warm remote {statistics.median(remote_runs):.2f} s, warm local {statistics.median(local_runs):.2f} s")
            counted = counted_build(checkout(ci, tmp / "counted"), url)
            same = all(hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256((ci / "out" / p.name).read_bytes()).digest()
                       for p in (tmp / "remote0" / "out").iterdir())
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.terminate()
        server.wait()
    return {"recipes": N, "cold_s": cold, "warm_remote_s": statistics.median(remote_runs), "warm_local_s": statistics.median(local_runs),
            "warm_remote_runs_s": remote_runs, "warm_local_runs_s": local_runs, "summaries": summaries,
            "remote_bytes_read": counted["bytes"], "remote_reads": counted["reads"], "remote_writes": counted["writes"],
            "counted_summary": counted["summary"], "output_bytes": outputs, **need, "outputs_identical": same}


def targets(r: dict) -> list[dict]:
    if "skipped" in r:
        return [{"target": "remote cache benchmark", "value": r["skipped"], "goal": "runs", "pass": False}]
    out = []

    def target(name, value, ok, goal):
        out.append({"target": name, "value": value, "goal": goal, "pass": bool(ok)})

    no_stage = all(" 0 built, 50 from cache" in s for s in r["summaries"] + [r["counted_summary"]])
    target("remote: warm-remote checkout runs no stage (50 recipes)", r["counted_summary"], no_stage and r["outputs_identical"],
           "0 built, identical outputs")
    literal = r["output_bytes"] + r["manifest_bytes"]
    target("remote: bytes read from the remote <= output models + their manifests (final entries only)", r["remote_bytes_read"],
           r["remote_bytes_read"] <= literal, f"<= {literal}")
    target("remote: nothing written to a warm remote", r["remote_writes"], r["remote_writes"] == 0, "0 writes")
    ratio = r["warm_remote_s"] / r["warm_local_s"]
    target("remote: warm-remote build time / warm-local build time (fresh checkouts)", ratio, ratio <= 1.5, "<= 1.5x")
    return out


def report_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return ["## Remote cache", "", f"Skipped: {r['skipped']}.", ""]
    return ["## Remote cache (moto S3 on 127.0.0.1, 50 recipes, fresh processes)", "",
            "| measurement | value |", "|---|---|",
            f"| cold build, filling the remote | {r['cold_s']:.2f} s |",
            f"| fresh checkout, empty local layer, warm remote (median of {REPEAT}) | {r['warm_remote_s']:.2f} s |",
            f"| fresh checkout, warm local cache (median of {REPEAT}) | {r['warm_local_s']:.2f} s |",
            f"| bytes read from the remote | {r['remote_bytes_read']} in {r['remote_reads']} objects |",
            f"| stage results the build reads (the final entry of each output) | {r['object_bytes']} in {r['objects']} objects |",
            f"| their manifests (with every stage's report rows) | {r['manifest_bytes']} |",
            f"| manifests of earlier stages (not read) | {r['earlier_manifest_bytes']} |",
            f"| output models | {r['output_bytes']} |", ""]


def main() -> int:
    r = bench(log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({k: v for k, v in r.items() if k != "summaries"}, indent=2))
    return print_targets(targets(r))


if __name__ == "__main__":
    sys.exit(main())
