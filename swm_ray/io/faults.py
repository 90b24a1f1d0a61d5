"""Storage failures as one-line user errors: an exception from s3fs, botocore, pyarrow or the OS is
classified (missing, denied, unreachable, credentials) and named with its path, bucket and endpoint."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from swm_ray.errors import UserError
from swm_ray.io.remote import bucket_of, endpoint_url, is_remote

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


def without_userinfo(url: str) -> str:
    """`url` for messages, without any user:password part it might carry."""
    return re.sub(r"//[^/@]*@", "//", url)


def _endpoint_label() -> str:
    """The endpoint for messages, without any user:password part a URL might carry."""
    url = endpoint_url()
    return without_userinfo(url) if url else "AWS default"


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
    if isinstance(exc, IsADirectoryError):
        return "folder"
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


def error_message(category: str, path: str, doing: str, missing: str | None, exc: BaseException | None = None) -> str:
    """The one-line message for a classified failure; never includes credentials."""
    detail = f"{getattr(exc, 'strerror', None) or type(exc).__name__}: {getattr(exc, 'filename', None) or path}"
    if category == "local":
        return f"{doing} {path} failed on local disk: {detail}"
    if not is_remote(path):
        if category == "folder":
            plan = os.path.join(path, "plan.json")
            hint = f" (a plan: {plan})" if os.path.isfile(plan) else ""
            return f"{path} is a folder where a file is expected while {doing} it: give the file in it{hint}"
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
        "bucket": f"no such bucket {bucket_of(path)!r} for {path} (S3 endpoint {ep}): check the bucket name and "
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
    return UserError(" ".join(error_message(category, str(path), doing, missing, exc).split()))


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


def raise_missing(fs, url: str, message: str) -> None:
    """Not found: say whether the bucket or the object is missing (s3fs `exists` reports both as False)."""
    if not bucket_exists(fs, bucket_of(url)):
        raise UserError(error_message("bucket", url, "", None))
    raise UserError(message)


def bucket_exists(fs, bucket: str) -> bool:
    """True unless S3 says the bucket does not exist (a HEAD we may not do is not proof of absence)."""
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    return True
