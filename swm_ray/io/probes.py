"""Preflight probes of storage: read and write access to inputs, outputs and the cache, checked before a run
loads anything."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from swm_ray.errors import UserError
from swm_ray.io.faults import bucket_exists, error_message, raise_missing, storage_errors
from swm_ray.io.outputs import check_output_path
from swm_ray.io.remote import bucket_of, is_remote, s3fs_filesystem, split_s3_url


def check_storage(path: str, write: bool) -> None:
    """Preflight for `path`, cheap enough to run before any model loads: raises a UserError if it cannot be read
    (`write=False`: the file or folder exists and is readable) or written (`write=True`: the bucket exists and a
    probe object can be put and deleted beside the output, where the staging prefix will go; local: a probe file
    in the nearest existing folder). Whether an existing output may be replaced is `check_output_path`'s job.
    """
    doing = "checking write access to" if write else "checking read access to"
    with storage_errors(path, doing):
        if is_remote(path):
            (_check_s3_write if write else _check_s3_read)(path)
        else:
            (_check_local_write if write else _check_local_read)(Path(path))


def _check_s3_read(url: str) -> None:
    fs = s3fs_filesystem()
    fs.invalidate_cache(url)
    if not fs.exists(url):  # a HEAD (object) or a LIST (folder): needs the same rights as reading it
        raise_missing(fs, url, f"not found on S3: {url}")


def _check_s3_write(url: str) -> None:
    fs = s3fs_filesystem()
    parent, name = split_s3_url(url)
    if not bucket_exists(fs, bucket_of(url)):
        raise UserError(error_message("bucket", url, "", None))
    probe = f"{parent}/.{name}.tmp-probe-{secrets.token_hex(4)}"
    fs.pipe(probe, b"")
    fs.rm(probe)


def _check_local_read(p: Path) -> None:
    if not p.exists():
        raise UserError(f"not found: {p}")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise UserError(f"cannot read {p}: permission denied")


def _check_local_write(p: Path) -> None:
    folder = p.resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {p}: {folder} is a file, not a folder")
    with tempfile.NamedTemporaryFile(prefix=".swm-ray-probe-", dir=folder):
        pass


def check_run_paths(out: str | None, overwrite: bool, reads: list[str | None] = ()) -> None:
    """Before any model loads: the output may be written (and replaced only when it is ours and `overwrite`),
    and every remote input (model, data) is readable. Local inputs are checked where they are opened."""
    if out:
        check_output_path(out, overwrite)
        check_storage(out, write=True)
    for path in reads:
        if path and is_remote(path):
            check_storage(path, write=False)
