"""Atomic outputs, local or on S3.

Outputs (`open_output`, `atomic_output_dir`) are written into a staging sibling of the final path and switched
into place only when complete; on any failure the staging copy is removed and an earlier output is untouched.
- local: `<parent>/.<name>.tmp-<random>/`, renamed onto `<parent>/<name>` (an old output renamed aside first).
- S3: `s3://bucket/<parent>/.<name>.tmp-<random>/`, a sibling prefix in the same bucket, so the final copy is
  server-side and needs no other permissions. The owner mark is written there last; only then is the old
  output removed and the staging prefix copied to the final one (mark last) and deleted. S3 has no rename:
  during that copy the final prefix has no mark, i.e. reads as incomplete. A process killed outright leaves
  its staging prefix behind: nothing reads it, it may be deleted.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from swm_ray.errors import UserError
from swm_ray.io.faults import as_user_error, bucket_exists, error_message, storage_errors
from swm_ray.io.fs import OWNER_MARK
from swm_ray.io.remote import bucket_of, is_remote, s3fs_filesystem, split_s3_url

log = logging.getLogger(__name__)
_MARK_TEXT = b"written by swm-ray\n"
STREAM_BLOCK_SIZE = 8 * 2**20  # S3 part size of a streamed file: what one open file buffers (S3 minimum: 5 MiB)


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def check_output_path(path: str, overwrite: bool = False) -> None:
    """Refuse an output path that exists and is not ours (or is ours but `overwrite` is off)."""
    with storage_errors(path, "checking the output path"):
        if is_remote(path):
            found = _s3_output_state(path)
        else:
            found = _local_output_state(path)
    if found is None:
        return
    ours, empty = found
    if empty:
        return
    if not ours:
        raise UserError(f"output path {path} exists and was not written by swm-ray: choose another --out")
    if not overwrite:
        raise UserError(f"output path {path} already exists: pass --overwrite or choose another --out")


def _s3_output_state(url: str) -> tuple[bool, bool] | None:
    """(ours, empty) for an S3 output path, or None when nothing is there (after checking the bucket exists)."""
    split_s3_url(url)
    fs = s3fs_filesystem()
    fs.invalidate_cache(url.rstrip("/"))  # another process may have written it since we last listed
    if not fs.exists(url):
        if not bucket_exists(fs, bucket_of(url)):
            raise UserError(error_message("bucket", url, "", None))
        return None
    ours = fs.exists(url.rstrip("/") + "/" + OWNER_MARK)
    empty = fs.isdir(url) and not fs.ls(url)
    return ours, empty


def _local_output_state(path: str) -> tuple[bool, bool] | None:
    p = Path(path)
    if not p.exists():
        return None
    if not p.is_dir():
        raise UserError(f"output path {path} exists and is a file: choose another --out")
    return (p / OWNER_MARK).exists(), not any(p.iterdir())


def _relative_name(name: str) -> str:
    """A file name inside an output ("plots/a.png"); refuses absolute paths, `..` and the owner mark."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or str(p) in (".", OWNER_MARK):
        raise ValueError(f"not a file name inside an output folder: {name!r}")
    return str(p)


class OutputSink:
    """What `open_output` yields: files written through it land in a staging copy that becomes the output only
    when the `with` block ends without an exception."""

    path: str  # the final output path, as given
    local_dir: Path | None = None  # the local staging folder (None on S3): what a reload check can read

    def open(self, name: str) -> BinaryIO:
        """A writable binary file `name` (may contain "/") in the output; use it as a context manager."""
        raise NotImplementedError

    def put_dir(self, local_dir: Path) -> None:
        """Add every file of a local folder (for libraries that only write folders, e.g. save_pretrained)."""
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as f:
            f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def _commit(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


class _LocalSink(OutputSink):
    """Files go to `<parent>/.<name>.tmp-<random>/`, renamed onto the final folder on success."""

    def __init__(self, path: str):
        self.path = path
        self.final = Path(path).resolve()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        self.root.chmod(0o755)  # mkdtemp makes it private; an output folder is meant to be shared
        self.local_dir = self.root
        self._files: list[BinaryIO] = []

    def open(self, name: str) -> BinaryIO:
        target = self.root / _relative_name(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(target, "wb")
        self._files.append(f)
        return f

    def put_dir(self, local_dir: Path) -> None:
        shutil.copytree(local_dir, self.root, dirs_exist_ok=True)
        self.root.chmod(0o755)  # copytree copies the (private) mode of a temporary source folder

    def _commit(self) -> None:
        for f in self._files:
            f.close()  # a file the body left open is complete now
        (self.root / OWNER_MARK).write_bytes(_MARK_TEXT)
        if not self.final.exists():
            self.root.rename(self.final)
            return
        old = self.final.with_name(f".{self.final.name}.old-{secrets.token_hex(4)}")
        self.final.rename(old)
        try:
            self.root.rename(self.final)
        except BaseException:
            old.rename(self.final)  # put the old output back: never leave nothing
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()
        shutil.rmtree(self.root, ignore_errors=True)


class _S3Sink(OutputSink):
    """Files stream to the staging prefix `s3://bucket/<parent>/.<name>.tmp-<random>/`; on success the old output
    is removed and the staging prefix copied onto the final one server-side, the owner mark last."""

    def __init__(self, url: str):
        self.path = url
        self.fs = s3fs_filesystem()
        parent, name = split_s3_url(url)
        self.final = self.fs._strip_protocol(f"{parent}/{name}")
        self.staging = self.fs._strip_protocol(f"{parent}/.{name}.tmp-{secrets.token_hex(4)}")
        self.keep_staging = False  # set while the staging prefix is the only complete copy
        self._files: list = []

    def open(self, name: str) -> BinaryIO:
        # s3fs uploads a part each time a block fills: memory holds one block, local disk nothing.
        f = self.fs.open(f"{self.staging}/{_relative_name(name)}", "wb", block_size=STREAM_BLOCK_SIZE)
        self._files.append(f)
        return f

    def put_dir(self, local_dir: Path) -> None:
        names = {p.relative_to(local_dir).as_posix(): p for p in sorted(Path(local_dir).rglob("*")) if p.is_file()}
        names.pop(OWNER_MARK, None)  # written at the end, once the output is complete
        if names:
            self.fs.put([str(p) for p in names.values()], [f"{self.staging}/{_relative_name(n)}" for n in names])

    def _commit(self) -> None:
        for f in self._files:
            f.close()  # a file the body left open is complete now
        self.fs.pipe(f"{self.staging}/{OWNER_MARK}", _MARK_TEXT)  # last into staging: it is complete
        self.fs.invalidate_cache(self.staging)
        mark = f"{self.staging}/{OWNER_MARK}"
        sources = [p for p in self.fs.find(self.staging) if p != mark] + [mark]  # the mark is copied last
        self.fs.invalidate_cache(self.final)
        replacing = self.fs.exists(self.final)
        self.keep_staging = replacing
        try:
            if replacing:
                self.fs.rm(self.final, recursive=True)
            for batch in (sources[:-1], sources[-1:]):
                if batch:  # server-side copies, concurrent within a batch
                    self.fs.copy(batch, [self.final + p[len(self.staging) :] for p in batch], on_error="raise")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.fs.rm(self.final, recursive=True)  # a partial copy without the mark would block a rerun
            if replacing and isinstance(exc, Exception):
                raise self._switch_failed(exc) from exc
            raise
        self.keep_staging = False
        self._discard()

    def _switch_failed(self, exc: Exception) -> UserError:
        """The old output is gone and the copy failed: say where the complete new one is (kept, not deleted)."""
        cause = as_user_error(exc, "s3://" + self.final, "publishing") or exc
        first = (str(cause).splitlines() or [type(exc).__name__])[0]
        return UserError(f"{first}; the old output s3://{self.final} was already removed and the complete new one "
                         f"is kept at s3://{self.staging}: copy it to s3://{self.final} or rerun")

    def _discard(self) -> None:
        for f in self._files:
            if not f.closed:
                with contextlib.suppress(Exception):
                    f.discard()  # abort its multipart upload: no orphaned parts
                f.closed = True
        if self.keep_staging:
            log.warning("kept s3://%s: it is the only complete copy of the output %s", self.staging, self.path)
            return
        try:
            self.fs.rm(self.staging, recursive=True)
        except FileNotFoundError:
            pass  # nothing was written
        except Exception as exc:
            log.warning("could not remove the staging prefix s3://%s: %s", self.staging, exc)


@contextlib.contextmanager
def open_output(path: str, overwrite: bool = False) -> Iterator[OutputSink]:
    """Write an output folder (local or s3://) file by file, streaming: it appears only when complete.

    Yields an `OutputSink` (`open`, `write_bytes`, `write_text`, `put_dir`). On success the staging copy becomes
    `path` (see the module docstring for where staging lives and how S3 switches); on any exception,
    KeyboardInterrupt included, the staging copy is removed and an existing output is left as it was. `path` is
    checked first like `check_output_path` does.
    """
    check_output_path(path, overwrite)
    with storage_errors(path, "writing"):
        sink = _S3Sink(path) if is_remote(path) else _LocalSink(path)
    try:
        yield sink
    except BaseException as exc:
        sink._discard()
        # Only library exceptions are mapped: a FileNotFoundError of the caller's own code is not about `path`.
        err = as_user_error(exc, path, "writing", trust_plain=False) if isinstance(exc, Exception) else None
        if err is None or err is exc:
            raise
        raise err from exc
    try:
        with storage_errors(path, "writing"):
            sink._commit()
    except BaseException:
        sink._discard()
        raise


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a local staging folder; on success it becomes `path` (renamed locally, uploaded to S3).

    On any exception nothing is left at `path` and an existing folder there is untouched. For S3 the folder is
    uploaded to a staging prefix and switched like `open_output`; prefer `open_output` for large files, which
    it streams instead of holding them on local disk.
    """
    with open_output(path, overwrite) as sink:
        if isinstance(sink, _LocalSink):
            yield sink.root
        else:
            with tempfile.TemporaryDirectory(prefix="swm-ray-out-") as local:
                yield Path(local)
                sink.put_dir(Path(local))
