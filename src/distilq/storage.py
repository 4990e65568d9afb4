"""The few filesystem facts and writes the registry, sources and scoring share."""

from __future__ import annotations

import contextlib
import os
import tempfile

import fsspec


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a local path or fsspec URI. Other processes write to the
    same store (workers, concurrent runs), so cached directory listings are never used."""
    return fsspec.core.url_to_fs(uri, use_listings_cache=False)


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's main protocol name (`file`, `s3`, `memory`, ...)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether paths on `fs` are this machine's own files."""
    return protocol(fs) in ("file", "local")


def temporary_prefix(final: str) -> str:
    """How a temporary file written before becoming `final` starts: hidden, and named after
    it, so a later run can tell its own leftovers from a user's files."""
    return f".{os.path.basename(final)}."


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the old content or the new, never part: on disk a hidden `.tmp` file in
    the same directory, fsynced, then renamed; on object stores one PUT."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are for readers
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class WriteConflict(Exception):
    """Another writer changed the object after we read it; read again and retry."""


def read_for_update(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes | None, str | None]:
    """The content of `path` (None if missing) and a token for `write_if_unchanged`: the
    ETag on S3, None elsewhere (callers lock local files instead). `fs` comes from
    `url_to_fs`, so `info` asks the store itself, not a cached listing."""
    try:
        if protocol(fs) != "s3":
            return fs.cat_file(path), None
        # ETag first: if the object changes before we read it, our write is refused.
        etag = fs.info(path)["ETag"]
        return fs.cat_file(path), etag
    except FileNotFoundError:
        return None, None


def write_if_unchanged(
    fs: fsspec.AbstractFileSystem, path: str, data: bytes, token: str | None
) -> str | None:
    """Write `path` unless it changed since `read_for_update` gave `token`; return the token
    of what we wrote.

    On S3 a conditional PUT (If-Match the ETag, or If-None-Match for a new object) raises
    WriteConflict when another writer got there first. Elsewhere it is `write_atomic`, and
    the caller holds a lock.
    """
    if protocol(fs) != "s3":
        write_atomic(fs, path, data)
        return None
    try:
        if token is None:
            response = fs.pipe_file(path, data, mode="create")
        else:
            response = fs.pipe_file(path, data, IfMatch=token)
    except FileExistsError as e:
        raise WriteConflict(path) from e
    except OSError as e:
        if "pre-condition" in str(e) or "ConditionalRequestConflict" in str(e):
            raise WriteConflict(path) from e
        raise
    if isinstance(response, dict) and response.get("ETag"):  # a single PUT says it
        return response["ETag"]
    return fs.info(path)["ETag"]
