"""Local and S3 storage against a real S3 endpoint on loopback (moto's threaded server)."""

import contextlib
import hashlib
import json
import multiprocessing
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.cache import cache_lock, cache_root, download_to_cache
from swm_ray.io.faults import as_user_error, storage_errors
from swm_ray.io.outputs import atomic_output_dir, check_output_path, open_output
from swm_ray.io.probes import check_storage


def test_parquet_calibration_from_s3(s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from swm_ray.io.data import load_rows

    rows = np.arange(40).reshape(5, 8).tolist()
    with s3.open("bucket/data/tokens.parquet", "wb") as f:
        pq.write_table(pa.table({"input_ids": rows}), f)
    assert load_rows("s3://bucket/data/tokens.parquet") == rows
    with s3.open("bucket/data/text.jsonl", "wb") as f:
        f.write(b'{"text": "hello"}\n{"text": "world"}\n')
    assert load_rows("s3://bucket/data/text.jsonl") == ["hello", "world"]


def test_atomic_output_to_s3_and_refusals(s3):
    with atomic_output_dir("s3://bucket/out/run1") as d:
        (d / "a.json").write_text(json.dumps({"x": 1}))
    assert json.loads(s3.cat("bucket/out/run1/a.json")) == {"x": 1}
    assert s3.exists(f"bucket/out/run1/{storage.OWNER_MARK}")
    with pytest.raises(UserError, match="--overwrite"):
        check_output_path("s3://bucket/out/run1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir("s3://bucket/out/run2") as d:
            (d / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not s3.exists("bucket/out/run2")
    s3.pipe("bucket/foreign/file.txt", b"keep")
    with pytest.raises(UserError, match="not written by swm-ray"):
        check_output_path("s3://bucket/foreign")


def test_model_folder_from_s3_is_cached(s3, tiny_llama_dir):
    from swm_ray.io.models import resolve_model_path

    s3.put(str(tiny_llama_dir) + "/", "bucket/models/tiny/", recursive=True)
    local = resolve_model_path("s3://bucket/models/tiny")
    assert (storage.Path(local) / "config.json").exists()
    assert resolve_model_path("s3://bucket/models/tiny") == local  # second time: from the cache
    with pytest.raises(UserError, match="not found on S3"):
        resolve_model_path("s3://bucket/models/missing")


def test_local_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError):
        with atomic_output_dir(str(out)) as d:
            (d / "x").write_text("partial")
            raise ValueError("fail")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "cache"]


def test_local_outputs_are_readable_by_others(tmp_path):
    """Outputs are staged in private temporary folders; the finished folder is 0755 whichever way it was
    filled (files opened in place, or a folder copied in)."""
    with open_output(str(tmp_path / "streamed")) as sink:
        with sink.open("a.txt") as f:
            f.write(b"x")
    staged = tmp_path / "staged"
    staged.mkdir(mode=0o700)
    (staged / "b.txt").write_text("y")
    with open_output(str(tmp_path / "copied")) as sink:
        sink.put_dir(staged)
    assert (tmp_path / "streamed").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "copied").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _local_tree(root) -> dict[str, str]:
    """{relative path: sha256} of every file under a local folder."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _s3_tree(fs, prefix: str) -> dict[str, str]:
    """{relative key: sha256} of every object under an S3 prefix ("bucket/..."), read fresh from the server."""
    fs.invalidate_cache()
    if not fs.exists(prefix):
        return {}
    return {p[len(prefix) + 1 :]: hashlib.sha256(fs.cat(p)).hexdigest() for p in sorted(fs.find(prefix))}


def _staging_left(fs, parent: str) -> list[str]:
    fs.invalidate_cache()
    return [p for p in fs.ls(parent) if ".tmp-" in p.rsplit("/", 1)[-1]] if fs.exists(parent) else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_old_output(url_or_path: str) -> None:
    with open_output(url_or_path) as sink:
        sink.write_bytes("weights.bin", b"old weights" * 1000)
        sink.write_text("stale.txt", "only in the old output")


# ---------------------------------------------------------------------------------------------------------------
# cache_lock and download_to_cache


def test_cache_lock_excludes_threads_of_one_process():
    inside, most, lock = [0], [0], threading.Lock()

    def critical():
        with cache_lock("model/with:odd chars"):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=critical) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    (lock_file,) = (cache_root() / "locks").iterdir()
    assert lock_file.name.startswith("model_with_odd_chars-")


def _download_in_threads(url: str, n: int, barrier, results) -> None:
    """Start `n` threads that pass `barrier` together, then call download_to_cache; append (path, tree)."""

    def one():
        barrier.wait(timeout=120)
        try:
            path = download_to_cache(url)
            results.append((str(path), _local_tree(path)))
        except Exception as e:  # reported to the parent, which fails the test
            results.append((repr(e), {}))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _download_worker(url: str, barrier, queue) -> None:
    """A separate process (spawned): two threads download the same URL."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    results: list = []
    _download_in_threads(url, 2, barrier, results)
    queue.put(results)


def test_download_once_per_node_across_processes_and_threads(s3):
    rng = np.random.default_rng(0)
    source = {f"shard-{i}.bin": rng.bytes(300_000) for i in range(6)} | {"sub/config.json": b'{"a": 1}'}
    s3.pipe({f"bucket/dl/model/{k}": v for k, v in source.items()})
    url = "s3://bucket/dl/model/"
    expected = {k: hashlib.sha256(v).hexdigest() for k, v in source.items()}

    ctx = multiprocessing.get_context("spawn")
    n_procs, threads_here = 4, 2
    barrier = ctx.Barrier(n_procs * 2 + threads_here)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_download_worker, args=(url, barrier, queue)) for _ in range(n_procs)]
    for p in procs:
        p.start()
    here: list = []
    _download_in_threads(url, threads_here, barrier, here)  # this process's threads take part too
    results = here + [r for _ in procs for r in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    assert len(results) == n_procs * 2 + threads_here
    assert {path for path, _ in results} == {here[0][0]}, results
    assert all(tree == expected for _, tree in results)
    lines = (cache_root() / "downloads.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("\ts3://bucket/dl/model")


def test_download_replaces_partial_leftover_and_keeps_complete_target(s3):
    s3.pipe({"bucket/dl2/model/a.bin": b"a" * 1000, "bucket/dl2/model/b.bin": b"b" * 10})
    url = "s3://bucket/dl2/model"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = download_to_cache(url).parent  # where this URL's current content goes
    shutil.rmtree(target)  # ... now left as a caller that died mid-download would leave it:
    (target / "data").mkdir(parents=True)
    (target / "data" / "a.bin").write_bytes(b"truncat")  # a partial leftover: no owner mark
    (target.parent / f".{target.name}.dl-crashed").mkdir()  # the staging folder of a caller that died

    local = download_to_cache(url)
    assert local == target / "data"
    assert _local_tree(local) == _s3_tree(s3, "bucket/dl2/model")
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    inode = (local / "a.bin").stat().st_ino

    # Another caller holds the lock (say, for a download that is still running): a complete target is returned
    # at once, and nothing touches it.
    got = []
    with cache_lock(f"s3-{key}"):
        t = threading.Thread(target=lambda: got.append(download_to_cache(url + "/")))
        t.start()
        t.join(timeout=10)
        assert got == [local]
    with open(local / "a.bin", "rb") as held:  # a caller is loading it while others ask again
        for _ in range(3):
            assert download_to_cache(url) == local
        assert held.read() == b"a" * 1000
    assert (local / "a.bin").stat().st_ino == inode
    assert len((cache_root() / "downloads.log").read_text().splitlines()) == 2  # the first, and the repair


def _downloads() -> int:
    log = cache_root() / "downloads.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_download_follows_a_folder_replaced_on_s3(s3):
    """The cache is keyed by the URL and the listing's (path, size, ETag): a folder rewritten on S3 (say
    `compress --out s3://... --overwrite`) is downloaded again, an unchanged one is not."""
    old = {"model.bin": b"old weights", "config.json": b'{"v": 1}', "stale.txt": b"only in the old output"}
    s3.pipe({f"bucket/rw/model/{k}": v for k, v in old.items()})
    url = "s3://bucket/rw/model"
    first = download_to_cache(url)
    assert _local_tree(first) == _s3_tree(s3, "bucket/rw/model")
    assert download_to_cache(url + "/") == first and _downloads() == 1  # unchanged: from the cache

    s3.rm("bucket/rw/model", recursive=True)  # same names and sizes, other bytes; one file gone
    s3.pipe({"bucket/rw/model/model.bin": b"new weights", "bucket/rw/model/config.json": b'{"v": 2}'})
    second = download_to_cache(url)
    assert second != first
    assert _local_tree(second) == _s3_tree(s3, "bucket/rw/model")
    assert (second / "model.bin").read_bytes() == b"new weights" and not (second / "stale.txt").exists()
    assert (first / "model.bin").read_bytes() == b"old weights"  # the old copy is left to whoever loads it
    assert download_to_cache(url) == second and _downloads() == 2


def test_download_follows_a_file_replaced_on_s3(s3):
    s3.pipe("bucket/rw/tokens.jsonl", b'{"text": "old"}\n')
    url = "s3://bucket/rw/tokens.jsonl"
    first = download_to_cache(url)
    assert first.read_bytes() == b'{"text": "old"}\n'
    assert download_to_cache(url) == first and _downloads() == 1
    s3.pipe("bucket/rw/tokens.jsonl", b'{"text": "new"}\n')  # same size
    second = download_to_cache(url)
    assert second.read_bytes() == b'{"text": "new"}\n'
    assert download_to_cache(url) == second and _downloads() == 2


def test_download_of_an_object_replaced_meanwhile_is_done_again(s3, monkeypatch):
    """Replaced on S3 while it is being downloaded: that copy is discarded and the download done again; an
    object that keeps changing is a one-line error, with nothing left behind."""
    import s3fs

    real, writes = s3fs.S3FileSystem._get_file, []

    async def get_file(self, rpath, lpath, **kwargs):
        await real(self, rpath, lpath, **kwargs)
        if len(writes) < limit[0]:  # a writer replaces the object just after we read it
            writes.append(rpath)
            await self._pipe_file(rpath, f"version {len(writes)}".encode())

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", get_file)
    s3.pipe("bucket/mid/config.json", b"version 0")
    limit = [1]
    local = download_to_cache("s3://bucket/mid/config.json")
    assert local.read_bytes() == b"version 1" and _downloads() == 1  # the discarded copy is not logged
    assert download_to_cache("s3://bucket/mid/config.json") == local  # unchanged since: no download
    s3.pipe("bucket/mid/config.json", b"replaced again")
    limit = [100]
    with pytest.raises(UserError, match=r"^s3://bucket/mid/config.json changed on S3 during each of 3") as info:
        download_to_cache("s3://bucket/mid/config.json")
    assert "\n" not in str(info.value) and len(writes) == 4
    assert not [p for p in local.parent.parent.iterdir() if ".dl-" in p.name]
    assert _downloads() == 1


def test_model_resolved_again_after_overwrite_on_s3(s3, tiny_llama_dir):
    from swm_ray.io.models import resolve_model_path

    s3.put(str(tiny_llama_dir) + "/", "bucket/models/rw/", recursive=True)
    first = resolve_model_path("s3://bucket/models/rw")
    config = json.loads(s3.cat("bucket/models/rw/config.json"))
    s3.pipe("bucket/models/rw/config.json", json.dumps({**config, "swm_marker": 1}).encode())
    second = resolve_model_path("s3://bucket/models/rw")
    assert json.loads((Path(second) / "config.json").read_text())["swm_marker"] == 1
    assert "swm_marker" not in json.loads((Path(first) / "config.json").read_text())
    assert resolve_model_path("s3://bucket/models/rw") == second and _downloads() == 2


# ---------------------------------------------------------------------------------------------------------------
# open_output / atomic_output_dir


def _spy_copies(monkeypatch) -> list[tuple[str, str]]:
    """Record ("start" | "end", destination) of every server-side copy s3fs makes."""
    import s3fs

    real, events = s3fs.S3FileSystem._cp_file, []

    async def cp_file(self, path1, path2, **kwargs):
        events.append(("start", path2))
        await real(self, path1, path2, **kwargs)
        events.append(("end", path2))

    monkeypatch.setattr(s3fs.S3FileSystem, "_cp_file", cp_file)
    return events


def test_open_output_to_s3_streams_and_replaces_completely(s3, tmp_path, monkeypatch):
    url, final = "s3://bucket/stream/run", "bucket/stream/run"
    _write_old_output(url)
    old = _s3_tree(s3, final)
    tok = tmp_path / "tok"
    (tok / "nested").mkdir(parents=True)
    (tok / "tokenizer.json").write_text("{}")
    (tok / "nested" / "vocab.txt").write_text("a\nb\n")
    chunk = np.random.default_rng(1).bytes(2**20)
    big = hashlib.sha256()

    with open_output(url, overwrite=True) as sink:
        with sink.open("model.bin") as f:
            for _ in range(12):  # 12 MB, more than one s3fs block
                f.write(chunk)
                big.update(chunk)
            assert getattr(f, "mpu", None)  # parts already went up before close: not staged whole anywhere
        sink.write_bytes("plots/a.png", b"\x89PNG")
        sink.write_text("config.json", '{"x": 1}')
        sink.put_dir(tok)
        assert _s3_tree(s3, final) == old  # nothing new at the final prefix before success
        copies = _spy_copies(monkeypatch)

    tree = _s3_tree(s3, final)
    assert tree["model.bin"] == big.hexdigest()
    assert set(tree) == {"model.bin", "plots/a.png", "config.json", "tokenizer.json", "nested/vocab.txt",
                         storage.OWNER_MARK}  # the old files are gone
    assert _staging_left(s3, "bucket/stream") == []
    mark_start = copies.index(("start", f"{final}/{storage.OWNER_MARK}"))
    others = {f"{final}/{name}" for name in tree if name != storage.OWNER_MARK}
    assert {p for e, p in copies[:mark_start] if e == "end"} == others  # the mark is copied once all is there


def test_s3_switch_failing_after_removing_the_old_output_keeps_the_new_one(s3, monkeypatch):
    import s3fs

    url, final = "s3://bucket/switch/run", "bucket/switch/run"
    _write_old_output(url)

    real_cp_file, calls = s3fs.S3FileSystem._cp_file, []

    async def flaky_copy(self, path1, path2, **kwargs):  # the first copy works, the others fail
        calls.append(path2)
        if len(calls) > 1:
            raise RuntimeError("copy failed")
        await real_cp_file(self, path1, path2, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cp_file", flaky_copy)
    with pytest.raises(UserError, match="already removed and the complete new one is kept at") as info:
        with open_output(url, overwrite=True) as sink:
            sink.write_text("config.json", "{}")
            sink.write_text("more.json", "{}")
    (staging,) = _staging_left(s3, "bucket/switch")
    assert f"s3://{staging}" in str(info.value) and "\n" not in str(info.value)
    assert set(_s3_tree(s3, staging)) == {"config.json", "more.json", storage.OWNER_MARK}  # complete, marked
    assert not s3.exists(final)  # no partial copy without a mark: a rerun is not refused
    s3.rm(staging, recursive=True)
    calls.clear()
    with pytest.raises(RuntimeError):  # a new output (nothing to replace): nothing is kept anywhere
        with open_output(url) as sink:
            sink.write_text("config.json", "{}")
            sink.write_text("more.json", "{}")
    assert not s3.exists(final) and _staging_left(s3, "bucket/switch") == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_open_output_to_s3_failure_keeps_old_output(s3, error):
    url, final = f"s3://bucket/fail-{error.__name__}/run", f"bucket/fail-{error.__name__}/run"
    _write_old_output(url)
    old = _s3_tree(s3, final)
    with pytest.raises(error):
        with open_output(url, overwrite=True) as sink:
            sink.write_text("config.json", "{}")
            f = sink.open("model.bin")
            f.write(b"\0" * (9 * 2**20))  # a multipart upload is under way, the file still open
            raise error("interrupted")
    assert _s3_tree(s3, final) == old
    assert _staging_left(s3, f"bucket/fail-{error.__name__}") == []
    assert not s3.call_s3("list_multipart_uploads", Bucket="bucket").get("Uploads")  # aborted, no orphaned parts


@pytest.mark.parametrize("error", [None, RuntimeError, KeyboardInterrupt])
def test_open_output_locally(tmp_path, error):
    out = tmp_path / "out" / "run"
    _write_old_output(str(out))
    old = _local_tree(out)
    with pytest.raises(error) if error else contextlib.nullcontext():
        with open_output(str(out), overwrite=True) as sink:
            with sink.open("model.bin") as f:
                f.write(b"new" * 1000)
            sink.write_text("plots/a.txt", "p")
            assert _local_tree(out) == old  # nothing new at the final path before success
            if error:
                raise error("stop")
    assert [p.name for p in out.parent.iterdir()] == ["run"]  # no staging or old folder left beside it
    if error:
        assert _local_tree(out) == old
    else:
        assert set(_local_tree(out)) == {"model.bin", "plots/a.txt", storage.OWNER_MARK}


def test_open_output_checks_the_path_first(s3, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    with pytest.raises(UserError, match="not written by swm-ray"):
        with open_output(str(tmp_path / "foreign"), overwrite=True):
            pass
    _write_old_output(str(tmp_path / "ours"))
    with pytest.raises(UserError, match="--overwrite"):
        with open_output(str(tmp_path / "ours")):
            pass
    with pytest.raises(UserError, match="whole bucket"):
        with open_output("s3://bucket", overwrite=True):
            pass
    with pytest.raises(ValueError):
        with open_output(str(tmp_path / "new")) as sink:
            sink.write_text("../escape.txt", "x")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["body", "upload"])
def test_atomic_output_dir_to_s3_overwrite_failure_keeps_old_output(s3, monkeypatch, where):
    import s3fs

    url, final = f"s3://bucket/atomic-{where}/run", f"bucket/atomic-{where}/run"
    _write_old_output(url)
    old = _s3_tree(s3, final)
    real_put_file, calls = s3fs.S3FileSystem._put_file, []

    async def flaky_put_file(self, lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise RuntimeError("connection dropped mid-upload")
        return await real_put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", flaky_put_file)
    with pytest.raises(RuntimeError):
        with atomic_output_dir(url, overwrite=True) as d:
            for name in ("a.bin", "b.bin", "c.bin"):
                (d / name).write_bytes(name.encode() * 100)
            if where == "body":
                raise RuntimeError("failed before the upload")
    assert len(calls) == (0 if where == "body" else 3)
    assert _s3_tree(s3, final) == old
    assert _staging_left(s3, f"bucket/atomic-{where}") == []


# ---------------------------------------------------------------------------------------------------------------
# storage errors


@pytest.fixture
def closed_endpoint(monkeypatch):
    import s3fs

    endpoint = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.delenv("SWM_RAY_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRETKEY123")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def _enter(cm):
    with cm:
        pass


def test_closed_endpoint_is_a_fast_one_line_user_error(closed_endpoint):
    url = "s3://bucket/some/model"
    calls = {"read_bytes": lambda: storage.read_bytes(url + "/config.json"),
             "exists": lambda: storage.exists(url),
             "check_read": lambda: check_storage(url, write=False),
             "check_write": lambda: check_storage(url, write=True),
             "check_output_path": lambda: check_output_path(url),
             "download": lambda: download_to_cache(url),
             "open_output": lambda: _enter(open_output(url))}

    def timed(call):
        start = time.monotonic()
        try:
            call()
        except Exception as e:
            return e, time.monotonic() - start
        return None, time.monotonic() - start

    with ThreadPoolExecutor(len(calls)) as pool:  # concurrently: the test takes one timeout, not seven
        outcomes = dict(zip(calls, pool.map(timed, calls.values())))
    for op, (error, seconds) in outcomes.items():
        assert isinstance(error, UserError), (op, error)
        message = str(error)
        assert "\n" not in message and closed_endpoint in message and "cannot reach" in message, (op, message)
        assert "SECRET" not in message
        assert seconds < 15, (op, seconds)


def test_unknown_bucket_names_the_bucket(s3):
    url = "s3://no-such-bucket-here/models/m"
    for call in (lambda: storage.read_bytes(url + "/config.json"),
                 lambda: check_storage(url, write=False),
                 lambda: check_storage(url, write=True),
                 lambda: download_to_cache(url),
                 lambda: check_output_path(url),
                 lambda: _enter(open_output(url))):
        with pytest.raises(UserError, match="no such bucket 'no-such-bucket-here'") as info:
            call()
        assert "\n" not in str(info.value)


def test_check_storage_passes_and_leaves_nothing(s3, tmp_path):
    s3.pipe("bucket/chk/model/config.json", b"{}")
    check_storage("s3://bucket/chk/model", write=False)
    check_storage("s3://bucket/chk/model/config.json", write=False)
    check_storage("s3://bucket/chk/out", write=True)
    assert _s3_tree(s3, "bucket/chk") == {"model/config.json": hashlib.sha256(b"{}").hexdigest()}
    with pytest.raises(UserError, match="not found on S3: s3://bucket/chk/missing"):
        check_storage("s3://bucket/chk/missing", write=False)
    check_storage(str(tmp_path / "a" / "b" / "out"), write=True)
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"]
    with pytest.raises(UserError, match="not found"):
        check_storage(str(tmp_path / "missing"), write=False)


def test_missing_credentials_and_access_denied_are_user_errors(s3, monkeypatch, tmp_path):
    import botocore.exceptions
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UserError, match="no AWS credentials found for s3://bucket/x"):
        storage.read_bytes("s3://bucket/x")

    # What s3fs raises for a 403: a PermissionError caused by botocore's ClientError.
    denied = s3fs.errors.translate_boto_error(botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject"))
    with pytest.raises(UserError, match=r"^access denied while reading s3://bucket/x \(S3 endpoint http"):
        with storage_errors("s3://bucket/x", "reading"):
            raise denied
    odd = s3fs.errors.translate_boto_error(botocore.exceptions.ClientError(
        {"Error": {"Code": "InvalidBucketName", "Message": "The specified bucket is not valid."}}, "PutObject"))
    message = str(as_user_error(odd, "s3://B_d/x", "writing"))
    assert message.startswith("S3 refused writing s3://B_d/x (endpoint http")
    assert message.endswith("InvalidBucketName: The specified bucket is not valid.")
    assert as_user_error(ValueError("unrelated"), "s3://bucket/x") is None
    assert as_user_error(FileNotFoundError("my own"), "s3://bucket/x", trust_plain=False) is None
