"""The per-node download cache: a remote file or folder is downloaded once per node and per version of its
content, under an inter-process lock, into a staging folder that is renamed into place with the owner mark
inside. An entry is keyed by the URL and a signature of one listing of it (each file's path, size and ETag), so
an object rewritten on S3 is downloaded again into a new entry. A complete entry is never deleted."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from swm_ray.errors import UserError
from swm_ray.io.faults import raise_missing, storage_errors
from swm_ray.io.fs import OWNER_MARK
from swm_ray.io.remote import s3fs_filesystem

# ---------------------------------------------------------------------------------------------------------------
# The node-local cache


def cache_root() -> Path:
    """Where converted models and downloaded objects live (`SWM_RAY_CACHE`, else ~/.cache/swm-ray)."""
    root = Path(os.environ.get("SWM_RAY_CACHE", Path.home() / ".cache" / "swm-ray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold the exclusive lock `name`, shared by every process and thread on this node that uses this cache.

    An flock belongs to an open file description, and each acquisition opens the file anew: two threads of one
    process exclude each other exactly as two processes do. The kernel drops the lock when its holder dies, so a
    crash never leaves it held. Lock files are never deleted (a waiter would then hold a lock nobody else sees).
    """
    path = cache_root() / "locks" / f"{_lock_file_stem(name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_file_stem(name: str) -> str:
    """A file name for any lock name: readable, and distinct for names that sanitise alike ("a/b", "a_b")."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def download_to_cache(url: str) -> Path:
    """Mirror an `s3://` file or folder into the cache; returns the local path (`<entry>/data`).

    Each call lists the URL once (fresh, not from s3fs's listing cache) and signs the listing: every file's
    relative path, size and ETag (LastModified where S3 gives no ETag). The entry is named by the URL and that
    signature, so the content is downloaded once per node while it is unchanged, and again, into a new entry,
    once it was replaced on S3. Concurrent callers (processes or threads) of one URL queue on one lock per URL:
    the first downloads, the others then find the complete entry. Complete means the owner mark is inside.

    A complete entry is never deleted, also not when a newer version of its URL arrives: another caller may
    still be loading it, and nothing here can tell when it is done. Old versions stay on disk until someone
    removes `cache_root()/s3/<url key>.*` while no job runs. Exactly the listed files are downloaded, and the
    URL is listed again afterwards: if it changed meanwhile, the download is discarded and done again (a few
    times, then a one-line error). Each real download appends a line to `cache_root()/downloads.log`.
    """
    url = url.rstrip("/")
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    missing = f"not found on S3: {url}"
    for _ in range(_ATTEMPTS):
        with storage_errors(url, "listing", missing=missing):
            files = _listing(url)
        target = cache_root() / "s3" / f"{url_key}.{_signature(files)}"
        if (target / OWNER_MARK).exists():  # complete: no need to wait for the lock
            return target / "data"
        with cache_lock(f"s3-{url_key}"):
            if (target / OWNER_MARK).exists():
                return target / "data"
            with storage_errors(url, "downloading", missing=missing):
                if _download(url, files, target):
                    return target / "data"
    raise UserError(f"{url} changed on S3 during each of {_ATTEMPTS} downloads: run again once nothing is "
                    f"writing it")


_ATTEMPTS = 3


def _listing(url: str) -> dict[str, dict]:
    """{relative path ("" for a single file): s3fs info} of every file at `url`, listed fresh from S3."""
    fs = s3fs_filesystem()
    fs.invalidate_cache(url)  # a listing cached before someone uploaded or replaced it would be stale
    path = fs._strip_protocol(url).rstrip("/")
    found = fs.find(url, detail=True)  # a folder's files; for a single file, its own info (a HEAD)
    if set(found) == {path}:
        return {"": found[path]}
    files = {name[len(path) + 1 :]: info for name, info in found.items()
             if name.startswith(path + "/") and not name.endswith("/")}  # "dir/" keys: folder placeholders
    if not files:
        raise_missing(fs, url, f"not found on S3: {url}")
    return files


def _signature(files: dict[str, dict]) -> str:
    """A short hash of (relative path, size, ETag or else LastModified) for every listed file."""
    rows = sorted((rel, int(info.get("size") or 0),
                   str(info.get("ETag") or info.get("LastModified") or "")) for rel, info in files.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _download(url: str, files: dict[str, dict], target: Path) -> bool:
    """Fetch the listed `files` of `url` into a staging folder beside `target`, and rename it into place unless
    `url` changed meanwhile (then False, nothing kept). The caller holds the URL's lock."""
    fs = s3fs_filesystem()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Under the lock, anything here without the mark is a leftover of a caller that died: nobody writes it now.
    for leftover in [target, *target.parent.glob(f".{target.name}.dl-*")]:
        if leftover.exists():
            shutil.rmtree(leftover)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.dl-", dir=target.parent))
    try:
        if set(files) == {""}:
            local = {"": staging / "data"}
            fs.get(url, str(local[""]))
        else:
            local = {rel: staging / "data" / rel for rel in files}
            for path in local.values():
                path.parent.mkdir(parents=True, exist_ok=True)
            base = fs._strip_protocol(url).rstrip("/")
            rels = sorted(files)
            fs.get([f"{base}/{rel}" for rel in rels], [str(local[rel]) for rel in rels])
        unchanged = (all(local[rel].stat().st_size == int(info.get("size") or 0) for rel, info in files.items())
                     and _signature(_listing(url)) == _signature(files))
        if not unchanged:
            shutil.rmtree(staging)
            return False
        (staging / OWNER_MARK).write_text(f"{url}\n{_signature(files)}\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(cache_root() / "downloads.log", "a") as f:
        f.write(f"{stamp}\t{url}\n")
    return True
