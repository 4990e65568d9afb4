"""Exceptions that carry what went wrong and what to do; the CLI maps them to exit codes."""

from __future__ import annotations

import errno
import socket


class DistilqError(Exception):
    """Base class of every error distilq raises on purpose."""


class InputError(DistilqError):
    """Bad parameters or input, found before any work is lost (CLI exit code 2)."""


class SourceUnavailable(DistilqError):
    """A checkpoint source could not be reached; worth retrying."""


class IntegrityError(DistilqError):
    """A file does not match the sha256 recorded in its manifest."""


class Unattested(DistilqError):
    """A version failed its self-check on this platform (CLI exit code 3)."""


class GateRejected(DistilqError):
    """The INT8 candidate failed the agreement gate (CLI exit code 3); `manifest` is the
    rejected version's."""

    def __init__(self, message: str, manifest):
        super().__init__(message)
        self.manifest = manifest


class ScoringFailed(DistilqError):
    """Some input files could not be scored; the others were (`summary` counts them)."""

    def __init__(self, message: str, summary):
        super().__init__(message)
        self.summary = summary


class AuditFailed(DistilqError):
    """A scoring run's FP32 audit certified less agreement than its bar; the scored files
    are kept (`summary`)."""

    def __init__(self, message: str, summary):
        super().__init__(message)
        self.summary = summary


class PromotionFailed(DistilqError):
    """A version was published but `production` could not be moved to it."""


# errno values that say "not now" (a retry may pass) and "never" (it will not).
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EAGAIN,
}
# A host name the resolver says does not exist (a typo, or a machine with no network): a
# second try would only delay the message. EAI_AGAIN ("temporary failure") stays transient.
_NAME_UNKNOWN = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
_REFUSAL_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOENT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EFBIG,
    errno.ENAMETOOLONG,
}


def worth_retrying(error: BaseException) -> bool:
    """Whether a failed step may pass on a second try: an unreachable source or store, a
    timeout, a server error or throttling. Never a refusal, wherever it sits in the chain
    of causes: permissions, a read-only or full disk, a missing file, bad input, an HTTP 4xx
    other than 408 and 429."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(_refusal(e) for e in chain):
        return False
    return any(_transient(e) for e in chain)


def _http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return getattr(response, "status_code", None)  # requests, httpx


def _refusal(error: BaseException) -> bool:
    if isinstance(error, DistilqError) and not isinstance(error, SourceUnavailable):
        return True
    if isinstance(error, socket.gaierror):
        return error.errno in _NAME_UNKNOWN  # the resolver answered: no such host
    if isinstance(error, OSError) and error.errno in _REFUSAL_ERRNOS:
        return True
    status = _http_status(error)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _transient(error: BaseException) -> bool:
    if isinstance(error, SourceUnavailable | ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    status = _http_status(error)
    if status is not None:
        return status >= 500 or status in (408, 429)
    # Clients' own connection errors (botocore's EndpointConnectionError, httpx's
    # ConnectError, ReadTimeout ...) subclass no builtin one: known by name.
    return any("Connect" in c.__name__ or "Timeout" in c.__name__ for c in type(error).__mro__)
