"""The per-node download cache: a remote folder is downloaded once per node, under an inter-process lock,
into a staging folder that is renamed into place with the owner mark inside. A complete folder is never deleted."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

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
    """Mirror an `s3://` file or folder into the cache once per node; returns the local path (`<target>/data`).

    Concurrent callers (processes or threads) queue on one lock per URL: the first downloads, the others then
    find the complete folder. Complete means the owner mark is inside; such a folder is never deleted, since
    another caller may be loading it. Each real download appends a line to `cache_root()/downloads.log`.
    """
    url = url.rstrip("/")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_root() / "s3" / key
    if (target / OWNER_MARK).exists():  # complete: no need to wait for the lock
        return target / "data"
    with cache_lock(f"s3-{key}"):
        if not (target / OWNER_MARK).exists():
            with storage_errors(url, "downloading", missing=f"not found on S3: {url}"):
                _download(url, target)
    return target / "data"


def _download(url: str, target: Path) -> None:
    """Fetch `url` into a staging folder beside `target` and rename it into place (caller holds the lock)."""
    fs = s3fs_filesystem()
    fs.invalidate_cache(url)  # a listing cached before someone uploaded it would say "missing"
    if not fs.exists(url):
        raise_missing(fs, url, f"not found on S3: {url}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Under the lock, anything here without the mark is a leftover of a caller that died: nobody writes it now.
    for leftover in [target, *target.parent.glob(f".{target.name}.dl-*")]:
        if leftover.exists():
            shutil.rmtree(leftover)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.dl-", dir=target.parent))
    try:
        if fs.isdir(url):
            fs.get(url + "/", str(staging / "data"), recursive=True)
        else:
            fs.get(url, str(staging / "data"))
        (staging / OWNER_MARK).write_text(url + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(cache_root() / "downloads.log", "a") as f:
        f.write(f"{stamp}\t{url}\n")
