"""The remote cache: fsspec URLs behind a local layer, verified on read, create-if-absent writes, and a build
that never fails because the remote does — against moto's real S3 server on 127.0.0.1 (fake credentials,
no other network), with memory:// for the quick store tests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlqpipe.build import store as store_mod
from mlqpipe.build.cache import Cache, open_cache
from mlqpipe.build.store import FsspecStore, Remote, RemoteUnavailable, forget_remote_failures
from mlqpipe.build.tasks import BuildOptions
from mlqpipe.cli import main
from mlqpipe.errors import MlqpipeError
from tests.conftest import REPO

fsspec = pytest.importorskip("fsspec")

KEY_ID, SECRET = "AKIAMLQPIPETESTKEY01", "mlqpipe-test-secret-never-printed"
BUCKET = "mlq-cache"
DATA = b"stage output bytes"
KEY = "ab" + "0" * 62


@pytest.fixture(autouse=True)
def _fresh_remote_state():
    store_mod._DOWN.clear()
    store_mod._CLAIMED.clear()
    store_mod._FILESYSTEMS.clear()
    yield
    store_mod._DOWN.clear()
    store_mod._CLAIMED.clear()
    store_mod._FILESYSTEMS.clear()


def _memory_url(tmp_path) -> str:
    return f"memory://mlq-tests/{tmp_path.name}"


def _layered(tmp_path, local: str, url: str, read_only=False) -> Cache:
    options = BuildOptions(cache_dir=url, read_only_cache=read_only, state_dir=str(tmp_path / "state"), lock_file=None)
    os.environ["MLQPIPE_LOCAL_CACHE"] = str(tmp_path / local)
    try:
        return open_cache(options)
    finally:
        del os.environ["MLQPIPE_LOCAL_CACHE"]


# --- the store and the layering, on memory:// -------------------------------------------------------------


def test_memory_store_reads_writes_lists_and_deletes(tmp_path):
    s = FsspecStore(_memory_url(tmp_path))
    s.write("objects/ab/x", b"one")
    s.write("objects/ab/x", b"two", if_absent=True)  # content-addressed: present stays as it is
    assert s.read("objects/ab/x") == b"one" and s.exists("objects/ab/x") and not s.exists("objects/ab/y")
    with pytest.raises(FileNotFoundError):
        s.read("objects/ab/y")
    assert [(e.rel, e.size) for e in s.entries("objects")] == [("objects/ab/x", 3)]
    s.delete("objects/ab/x")
    assert s.entries("objects") == []


def test_a_second_local_layer_fills_from_the_remote_byte_for_byte(tmp_path):
    url = _memory_url(tmp_path)
    first = _layered(tmp_path, "a", url)
    first.put(KEY, DATA, {"stage": "s"})
    first.put_tree("cd" + "1" * 62, {"m/weight.bin": b"w" * 10, "Manifest.json": b"{}"})
    second = _layered(tmp_path, "b", url)
    assert second.get_artifact(KEY) == DATA
    assert second.get_artifact("cd" + "1" * 62) == {"m/weight.bin": b"w" * 10, "Manifest.json": b"{}"}
    a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert a == b and len(a) == 5  # 2 manifests + 3 objects, the plain directory layout
    manifests = sum(len(v) for k, v in a.items() if k.parts[0] == "keys")
    assert second.remote_bytes_read == len(DATA) + 12 + manifests  # each object and manifest read once
    again = _layered(tmp_path, "b", url)
    assert again.get_artifact(KEY) == DATA and again.remote_bytes_read == 0  # now local
    assert second.problems == [] and again.stats()["keys"] == 2 and again.verify() == []


def test_a_corrupt_remote_object_is_reported_ignored_and_rewritten(tmp_path):
    url = _memory_url(tmp_path)
    _layered(tmp_path, "a", url).put(KEY, DATA)
    remote = FsspecStore(url)
    obj = f"objects/{hashlib.sha256(DATA).hexdigest()[:2]}/{hashlib.sha256(DATA).hexdigest()}"
    remote.write(obj, DATA[:5])  # truncated behind the cache's back
    cache = _layered(tmp_path, "b", url)
    assert cache.verify() == [f"{url}/{obj}: bytes do not match their digest"]
    assert cache.get(KEY) is None
    assert cache.problems == [f"{url}/{obj}: cached bytes do not match their digest; rebuilding"]
    assert not (tmp_path / "b" / obj).exists()  # bad bytes are never copied into the local layer
    cache.put(KEY, DATA)  # the build recomputed it
    assert remote.read(obj) == DATA and cache.verify() == []


def test_read_only_leaves_the_remote_unwritten_but_fills_local(tmp_path):
    url = _memory_url(tmp_path)
    cache = _layered(tmp_path, "a", url, read_only=True)
    cache.put(KEY, DATA)
    assert FsspecStore(url).entries("keys") == [] and cache.store.exists(f"keys/ab/{KEY}.json")
    assert cache.get(KEY) == DATA


def test_prune_removes_unreferenced_entries_in_both_layers(tmp_path):
    url = _memory_url(tmp_path)
    cache = _layered(tmp_path, "a", url)
    cache.put(KEY, DATA)
    cache.put("ef" + "2" * 62, b"other")
    assert cache.prune({KEY}, older_than_days=1) == 0  # everything is younger than a day
    assert cache.prune({KEY}) == 4  # a manifest and an object in each layer
    assert cache.stats() == {"root": url, "keys": 1, "objects": 1, "bytes": len(DATA)}
    assert [p.name for p in (tmp_path / "a" / "keys").rglob("*.json")] == [f"{KEY}.json"]


class _Dead:
    """A remote store that always fails, counting the calls it saw."""

    shown, url, calls = "s3://dead-bucket/p", "s3://dead-bucket/p", 0

    def _fail(self, *args, **kwargs):
        _Dead.calls += 1
        raise RemoteUnavailable("EndpointConnectionError: Could not connect")

    read = exists = write = entries = delete = _fail

    def describe(self, rel):
        return f"{self.shown}/{rel}"


def test_a_failing_remote_warns_once_then_the_run_is_local(tmp_path, capsys):
    _Dead.calls = 0
    cache = Cache(store=store_mod.LocalStore(tmp_path / "local"), remote=Remote(_Dead(), tmp_path / "state"))
    cache.put(KEY, DATA)
    assert cache.get(KEY) == DATA and cache.get("ff" * 32) is None
    sibling = Cache(store=store_mod.LocalStore(tmp_path / "local"), remote=Remote(_Dead(), tmp_path / "state"))
    assert sibling.get(KEY) == DATA
    assert _Dead.calls == 1 and cache.problems == []
    assert capsys.readouterr().err == ("mlqpipe: warning: remote cache s3://dead-bucket/p: EndpointConnectionError: "
                                       "Could not connect; building with the local cache only\n")
    with pytest.raises(MlqpipeError, match="remote cache: EndpointConnectionError"):
        sibling.stats()  # maintenance on a dead remote is an error, not a warning
    forget_remote_failures(tmp_path / "state")  # a new build tries the remote again
    assert Remote(_Dead(), tmp_path / "state").up


def test_credentials_never_show(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s = FsspecStore(f"memory://{KEY_ID}:{SECRET}@mlq/x")
    assert s.shown == "memory://mlq/x" and SECRET not in s.describe("keys/a")
    reason = store_mod._reason(RuntimeError(f"denied for {SECRET} and {KEY_ID}"), f"s3://{KEY_ID}:{SECRET}@b")
    assert SECRET not in reason and KEY_ID not in reason


def test_a_url_without_the_extra_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "stats", "--cache", "s3://bucket/prefix"]) == 2
    assert capsys.readouterr().err == ("mlqpipe: error: cache s3://bucket/prefix: a URL cache needs fsspec, which is not "
                                       "installed; run pip install 'mlqpipe[remote]', or give --cache a directory\n")
    monkeypatch.setitem(sys.modules, "fsspec", fsspec)
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(MlqpipeError, match=r"protocol gs:// is not available; install gcsfs"):
        FsspecStore("gs://bucket/prefix").fs
    monkeypatch.setenv("MLQPIPE_CACHE", "gs://bucket/prefix")
    assert main(["build"]) == 2 and "install gcsfs" in capsys.readouterr().err  # once, before any task


def test_plain_paths_never_import_fsspec(tmp_path):
    code = ("import sys; from mlqpipe.build.cache import open_cache; from mlqpipe.build.tasks import BuildOptions; "
            f"c = open_cache(BuildOptions(cache_dir={str(tmp_path)!r})); c.put('ab' * 32, b'x'); assert c.get('ab' * 32) == b'x'; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'botocore', 'aiobotocore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# --- against a real S3 server on 127.0.0.1 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with a bucket; fake credentials, the endpoint in AWS_ENDPOINT_URL."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        state = {"server": server, "port": port, "module": moto_server}
        yield state
        state["server"].stop()


def _stop(s3):
    s3["server"].stop()


def _restart(s3):
    s3["server"] = s3["module"].ThreadedMotoServer(ip_address="127.0.0.1", port=s3["port"], verbose=False)
    s3["server"].start()  # moto keeps its buckets in this process: the restarted server holds the same data


def _checkout(tmp_path, name: str, lock: Path | None = None) -> Path:
    """A fresh clone: the example recipes and models, and the committed lock file when given."""
    root = tmp_path / name
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    if lock is not None:
        shutil.copy(lock, root / "mlqpipe.lock.json")
    return root


def _outputs(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "build").rglob("*")) if p.is_file()}


def _build(root, monkeypatch, capfd, url, *args) -> tuple[str, str]:
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLQPIPE_CACHE", url)
    assert main(["build", *args]) == 0, capfd.readouterr()
    return capfd.readouterr()


def _summary(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("mlqpipe build:"))


def _no_secrets(root: Path, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text and KEY_ID not in text
    for p in root.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".yaml", ".txt", ".html"):
            body = p.read_text(encoding="utf-8", errors="replace")
            assert SECRET not in body and KEY_ID not in body, p


def test_two_checkouts_share_the_remote_and_corruption_is_healed(s3, tmp_path, monkeypatch, capfd):
    url = f"s3://{BUCKET}/shared"
    a = _checkout(tmp_path, "a")
    out, err = _build(a, monkeypatch, capfd, url)
    assert _summary(out).startswith("mlqpipe build: 15 built, 0 from cache") and "warning" not in err
    b = _checkout(tmp_path, "b", a / "mlqpipe.lock.json")  # another machine: an empty local layer
    out, err = _build(b, monkeypatch, capfd, url)
    assert _summary(out).startswith("mlqpipe build: 0 built, 15 from cache") and err == ""
    assert _outputs(b) == _outputs(a) and (b / "mlqpipe.lock.json").read_bytes() == (a / "mlqpipe.lock.json").read_bytes()
    _no_secrets(b, out, err)
    assert "shared" not in (b / "mlqpipe.lock.json").read_text()  # the cache location is not recorded either

    import boto3

    client = boto3.client("s3")
    lock = json.loads((a / "mlqpipe.lock.json").read_text())
    entry = next(e for e in lock["outputs"].values() if len(e["stage_keys"]) == 1)
    key = entry["stage_keys"][0]
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"shared/keys/{key[:2]}/{key}.json")["Body"].read())
    digest = manifest.get("object") or next(iter(manifest["files"].values()))["object"]
    obj = f"shared/objects/{digest[:2]}/{digest}"
    client.put_object(Bucket=BUCKET, Key=obj, Body=b"corrupted behind the cache's back")
    from mlqpipe.build.cache import bundle_key

    finals = [e["stage_keys"][-1] for e in lock["outputs"].values()]
    pack = json.loads(client.get_object(Bucket=BUCKET, Key=f"shared/keys/{bundle_key(finals)[:2]}/{bundle_key(finals)}.json")["Body"].read())["pack"]["object"]
    client.put_object(Bucket=BUCKET, Key=f"shared/objects/{pack[:2]}/{pack}", Body=b"the pack too")  # else it serves the object
    c = _checkout(tmp_path, "c", a / "mlqpipe.lock.json")
    out, err = _build(c, monkeypatch, capfd, url)
    assert _summary(out).startswith("mlqpipe build: 1 built, 14 from cache")
    for d in (pack, digest):
        assert f"  cache: {url}/objects/{d[:2]}/{d}: cached bytes do not match their digest; rebuilding" in err.splitlines()
    assert _outputs(c) == _outputs(a)
    body = client.get_object(Bucket=BUCKET, Key=obj)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == digest  # rewritten
    assert main(["cache", "verify"]) == 0 and f"{url}: OK" in capfd.readouterr().out


def test_the_server_stopped_mid_build_then_restarted(s3, tmp_path, monkeypatch, capfd):
    url = f"s3://{BUCKET}/outage"
    reference = _checkout(tmp_path, "reference")
    _build(reference, monkeypatch, capfd, str(tmp_path / "plain-cache"))
    writes = {"n": 0}
    real_write = FsspecStore.write

    def write_then_die(self, rel, data, **kw):
        writes["n"] += 1
        if writes["n"] == 6:
            _stop(s3)  # the server goes away in the middle of the build
        return real_write(self, rel, data, **kw)

    monkeypatch.setattr(FsspecStore, "write", write_then_die)
    c = _checkout(tmp_path, "c")
    out, err = _build(c, monkeypatch, capfd, url)
    monkeypatch.setattr(FsspecStore, "write", real_write)
    assert _summary(out).startswith("mlqpipe build: 15 built")
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"mlqpipe: warning: remote cache {url}: ")
    assert warnings[0].endswith("; building with the local cache only") and "Could not connect" in warnings[0]
    assert _outputs(c) == _outputs(reference)
    _no_secrets(c, out, err)

    _restart(s3)
    d = _checkout(tmp_path, "d")  # the next build (a new process, as in CI) uses the remote again
    env = {**os.environ, "MLQPIPE_CACHE": url, "MLQPIPE_LOCAL_CACHE": str(d / "local")}
    proc = subprocess.run([sys.executable, "-m", "mlqpipe.cli", "build"], cwd=d, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = _summary(proc.stdout)
    assert "0 from cache" not in summary and "warning" not in proc.stderr  # what reached the remote before it died
    assert _outputs(d) == _outputs(reference)
    e = _checkout(tmp_path, "e")
    out, err = _build(e, monkeypatch, capfd, url)
    assert _summary(out).startswith("mlqpipe build: 0 built, 15 from cache") and err == "", err
    assert _outputs(e) == _outputs(reference)


def test_two_checkouts_building_at_once_share_one_remote(s3, tmp_path, monkeypatch, capfd):
    """Create-if-absent writes of content-addressed objects: two cold builds racing on one prefix both
    succeed, write the same bytes, and a third checkout then builds nothing."""
    url = f"s3://{BUCKET}/race"
    procs = []
    for name in ("x", "y"):
        root = _checkout(tmp_path, name)
        env = {**os.environ, "MLQPIPE_CACHE": url, "MLQPIPE_LOCAL_CACHE": str(root / "local")}
        procs.append((root, subprocess.Popen([sys.executable, "-m", "mlqpipe.cli", "build"], cwd=root, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for root, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "warning" not in err, err
    (x, _), (y, _) = procs
    assert _outputs(x) == _outputs(y) and (x / "mlqpipe.lock.json").read_bytes() == (y / "mlqpipe.lock.json").read_bytes()
    z = _checkout(tmp_path, "z", x / "mlqpipe.lock.json")
    out, err = _build(z, monkeypatch, capfd, url)
    assert _summary(out).startswith("mlqpipe build: 0 built, 15 from cache") and err == ""
    assert main(["cache", "verify"]) == 0


def test_an_unreachable_remote_warns_once_across_worker_processes(tmp_path, monkeypatch, capfd):
    """Nothing listens at the endpoint: a -j 2 build of a checkout with a lock file finishes on its local
    layer with one warning line in all (the prefetch process or the first worker to fail marks the remote
    down for the others), the outputs as a plain cache's."""
    pytest.importorskip("s3fs")
    reference = _checkout(tmp_path, "reference")
    _build(reference, monkeypatch, capfd, str(tmp_path / "plain-cache"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    root = _checkout(tmp_path, "offline", reference / "mlqpipe.lock.json")  # with a lock: the prefetch process meets it first
    env = {**os.environ, "MLQPIPE_CACHE": f"s3://{KEY_ID}:{SECRET}@{BUCKET}/offline", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.run([sys.executable, "-m", "mlqpipe.cli", "build", "-j", "2"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"mlqpipe: warning: remote cache s3://{BUCKET}/offline: "), proc.stderr
    assert _summary(proc.stdout).startswith("mlqpipe build: 15 built")
    assert _outputs(root) == _outputs(reference)
    _no_secrets(root, proc.stdout, proc.stderr)


def test_a_warm_remote_checkout_reads_only_each_outputs_final_entry(s3, tmp_path, monkeypatch, capfd):
    """What crosses the network for a checkout of a committed lock file: the final entry of each output (the
    output and its report rows), its manifest from the bundle the cold build's lock task left; no
    intermediate stage's model. Without the bundle, each final manifest is read by itself."""
    from mlqpipe.build import prefetch
    from mlqpipe.build.cache import bundle_key

    url = f"s3://{BUCKET}/final-only"
    a = _checkout(tmp_path, "a")
    _build(a, monkeypatch, capfd, url)
    import boto3

    client = boto3.client("s3")

    def manifest(key):
        return json.loads(client.get_object(Bucket=BUCKET, Key=f"final-only/keys/{key[:2]}/{key}.json")["Body"].read())

    def objects(m):
        return {f"objects/{d[:2]}/{d}" for d in ([m["object"]] if "object" in m else [e["object"] for e in m["files"].values()])}

    lock = json.loads((a / "mlqpipe.lock.json").read_text())["outputs"]
    finals = [e["stage_keys"][-1] for e in lock.values()]
    earlier = {k for e in lock.values() for k in e["stage_keys"][:-1]} - set(finals)
    assert earlier  # the examples have outputs of several stages
    bundle = manifest(bundle_key(finals))
    assert bundle["kind"] == "bundle" and bundle["entries"] == {k: manifest(k) for k in finals}
    data = {rel for k in finals for rel in objects(manifest(k))}
    pack = bundle["pack"]  # the examples' outputs are small: all of them packed, end to end
    assert sorted(f"objects/{d[:2]}/{d}" for d in pack["index"]) == sorted(data)
    assert pack["size"] == sum(size for _, size in pack["index"].values())
    pack_rel = f"objects/{pack['object'][:2]}/{pack['object']}"
    read = []
    real_read, real_many = FsspecStore.read, FsspecStore.read_many
    monkeypatch.setattr(FsspecStore, "read", lambda self, rel: read.append(rel) or real_read(self, rel))
    monkeypatch.setattr(FsspecStore, "read_many", lambda self, rels: read.extend(rels) or real_many(self, rels))

    def warm(name, wanted):
        read.clear()
        monkeypatch.setitem(prefetch.STATS, "read", [])
        root = _checkout(tmp_path, name, a / "mlqpipe.lock.json")
        out, err = _build(root, monkeypatch, capfd, url)
        assert _summary(out).startswith("mlqpipe build: 0 built, 15 from cache") and err == ""
        seen = read + prefetch.STATS["read"]  # the build's own reads, and what the prefetch process reported
        assert prefetch.STATS["read"] and set(seen) == wanted and len(seen) == len(wanted)  # each once
        assert _outputs(root) == _outputs(a)

    bundle_rel = f"keys/{bundle_key(finals)[:2]}/{bundle_key(finals)}.json"
    warm("b", {bundle_rel, pack_rel})  # two requests in all
    client.delete_object(Bucket=BUCKET, Key=f"final-only/{bundle_rel}")
    warm("c", data | {f"keys/{k[:2]}/{k}.json" for k in finals})
    assert main(["cache", "verify"]) == 0
    client.head_object(Bucket=BUCKET, Key=f"final-only/{bundle_rel}")  # c's lock task wrote it again
    assert main(["cache", "prune"]) == 0
    client.head_object(Bucket=BUCKET, Key=f"final-only/{bundle_rel}")  # the lock file references it: kept
    client.head_object(Bucket=BUCKET, Key=f"final-only/{pack_rel}")  # and so its pack


def test_a_shard_of_a_fresh_checkout_prefetches_its_own_outputs_from_the_merged_lock(s3, tmp_path, monkeypatch, capfd):
    """CI shards fill the remote and write partial locks; the merged lock is committed. A fresh runner's
    shard has only the merged lock: it prefetches its own outputs' final entries, through the bundle its
    shard's cold build left."""
    from mlqpipe.build import prefetch
    from mlqpipe.build.cache import bundle_key
    from mlqpipe.build.lock import in_shard

    url = f"s3://{BUCKET}/sharded"
    a = _checkout(tmp_path, "a")
    for i in (1, 2):
        _build(a, monkeypatch, capfd, url, "--shard", f"{i}/2")
    assert main(["lock", "merge", "mlqpipe.lock.shard-1-of-2.json", "mlqpipe.lock.shard-2-of-2.json", "-o", "mlqpipe.lock.json"]) == 0
    capfd.readouterr()
    lock = json.loads((a / "mlqpipe.lock.json").read_text())["outputs"]
    mine = [e["stage_keys"][-1] for out, e in lock.items() if in_shard(out, (1, 2))]
    assert 0 < len(mine) < len(lock)
    monkeypatch.setitem(prefetch.STATS, "read", [])
    b = _checkout(tmp_path, "b", a / "mlqpipe.lock.json")
    out, err = _build(b, monkeypatch, capfd, url, "--shard", "1/2")
    assert _summary(out).startswith(f"mlqpipe build: 0 built, {len(mine)} from cache") and err == ""
    read = prefetch.STATS["read"]
    assert read[0] == f"keys/{bundle_key(mine)[:2]}/{bundle_key(mine)}.json" and len(read) == 2  # the bundle, its pack


def test_large_outputs_stay_out_of_the_pack(s3, tmp_path, monkeypatch, capfd):
    """Only objects up to PACK_OBJECT_MAX go into a lock's pack; a fresh checkout reads the larger ones by
    themselves (one request each), and everything else from the bundle and the pack."""
    from mlqpipe.build import cache as cache_mod
    from mlqpipe.build import prefetch
    from mlqpipe.build.cache import bundle_key

    url = f"s3://{BUCKET}/large"
    a = _checkout(tmp_path, "a")
    monkeypatch.setattr(cache_mod, "PACK_OBJECT_MAX", 20_000)  # the examples' outputs are 2 KB to 200 KB
    _build(a, monkeypatch, capfd, url)
    import boto3

    client = boto3.client("s3")

    def manifest(key):
        return json.loads(client.get_object(Bucket=BUCKET, Key=f"large/keys/{key[:2]}/{key}.json")["Body"].read())

    finals = [e["stage_keys"][-1] for e in json.loads((a / "mlqpipe.lock.json").read_text())["outputs"].values()]
    sizes = {d: n for k in finals for d, n in cache_mod._object_sizes(manifest(k))}
    bundle = manifest(bundle_key(finals))
    large = {d for d, n in sizes.items() if n > 20_000}
    assert large and set(bundle["pack"]["index"]) == set(sizes) - large
    monkeypatch.setitem(prefetch.STATS, "read", [])
    b = _checkout(tmp_path, "b", a / "mlqpipe.lock.json")
    out, err = _build(b, monkeypatch, capfd, url)
    assert _summary(out).startswith("mlqpipe build: 0 built, 15 from cache") and err == ""
    pack = bundle["pack"]["object"]
    assert sorted(prefetch.STATS["read"]) == sorted([f"keys/{bundle_key(finals)[:2]}/{bundle_key(finals)}.json", f"objects/{pack[:2]}/{pack}"]
                                                    + [f"objects/{d[:2]}/{d}" for d in large])
    assert _outputs(b) == _outputs(a)
