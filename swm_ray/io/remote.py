"""Where a path lives: local or `s3://`, and the one place that builds the s3fs and pyarrow filesystems
(endpoint from `AWS_ENDPOINT_URL`, bounded timeouts and retries)."""

from __future__ import annotations

import os
from pathlib import Path

from swm_ray.errors import UserError

# Fail fast: a wrong endpoint should fail in seconds, not after minutes of retries. botocore retries a failed
# request (max_attempts counts the first try); s3fs retries timeouts and throttling on top.
_S3_CONNECT_TIMEOUT_S = 4
_S3_READ_TIMEOUT_S = 30
_S3_MAX_ATTEMPTS = 3
_S3FS_RETRIES = 3


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def endpoint_url() -> str | None:
    """S3-compatible endpoint (MinIO, moto, ...) from `SWM_RAY_S3_ENDPOINT` or `AWS_ENDPOINT_URL`."""
    return os.environ.get("SWM_RAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3fs_filesystem():
    """An s3fs filesystem honouring the endpoint setting (credentials come from the usual AWS chain).

    Short connect timeouts and few retries (see above). s3fs caches instances by these arguments, so calling
    this again is cheap and shares connections and listings.
    """
    import s3fs

    config = {"connect_timeout": _S3_CONNECT_TIMEOUT_S, "read_timeout": _S3_READ_TIMEOUT_S,
              "retries": {"max_attempts": _S3_MAX_ATTEMPTS, "mode": "standard"}}
    kwargs = {"config_kwargs": config}
    if endpoint_url():
        kwargs["endpoint_url"] = endpoint_url()
    fs = s3fs.S3FileSystem(**kwargs)
    fs.retries = _S3FS_RETRIES  # a class attribute, not a constructor argument
    return fs


def arrow_filesystem(path: str):
    """(pyarrow filesystem, path inside it) for `path`. pyarrow ignores AWS_ENDPOINT_URL: pass it explicitly."""
    import pyarrow.fs as pafs

    if is_remote(path):
        kwargs = {"connect_timeout": _S3_CONNECT_TIMEOUT_S,
                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_MAX_ATTEMPTS)}
        if endpoint_url():
            url = endpoint_url()
            scheme, _, rest = url.partition("://")
            kwargs.update(endpoint_override=rest or url, scheme=scheme if rest else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), str(path)[len("s3://") :]
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def bucket_of(url: str) -> str:
    return url[len("s3://") :].split("/", 1)[0]


def split_s3_url(url: str) -> tuple[str, str]:
    """(parent, name) of an S3 output; a whole bucket is refused (its staging sibling would have no place)."""
    parent, sep, name = url.rstrip("/").rpartition("/")
    if not sep or parent == "s3:/" or not name:
        raise UserError(f"output path {url} names a whole bucket: give a folder inside it, "
                        f"e.g. s3://{bucket_of(url) or 'bucket'}/out")
    return parent, name
