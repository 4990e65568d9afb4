"""One storage interface for the registry, checkpoint sources and scored outputs: a local
directory or an fsspec object store behind the same methods.

Everything that differs between the two lives here: atomic writes (temp file and rename
on disk, one PUT on object stores), conditional writes (an S3 ETag, or the lock on disk),
locks (flock on disk; S3 relies on conditional writes, and a run that must hold a whole
directory takes a lease built on them, lease.py), files that must appear whole, and which
object stores cannot be written safely at all (`unguarded`: all but S3). A new backend is
a new branch in these methods.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import fsspec

from distilq.errors import DistilqError, InputError


class WriteConflict(DistilqError):
    """Another writer changed the object after we read it; read again and retry."""


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a local path or fsspec URI. Other processes write to the
    same store (workers, concurrent runs), so cached directory listings are never used."""
    return fsspec.core.url_to_fs(uri, use_listings_cache=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temporary_prefix(final: str) -> str:
    """How a temporary file written before becoming `final` starts: hidden, and named after
    it, so a later run can tell its own leftovers from a user's files."""
    return f".{PurePosixPath(final).name}."


class Store:
    """A directory (local path or fsspec URI); paths given to methods are relative to it."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self.fs, self.root = url_to_fs(self.uri)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.protocol = protocol
        self._local = protocol in ("file", "local")
        self._s3 = protocol == "s3"

    def path(self, *parts: str) -> str:
        """The store's own path of `parts` (for the fsspec filesystem)."""
        return "/".join([self.root.rstrip("/"), *[p for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        """A URI (or local path) another process can open."""
        return self.to_uri(self.path(*parts))

    def to_uri(self, fs_path: str) -> str:
        """The URI (or local path) of a path on this store's filesystem (from `fs.glob` ...)."""
        return fs_path if self._local else f"{self.protocol}://{fs_path.lstrip('/')}"

    def canonical(self) -> str:
        """One spelling per place: local paths with links resolved, URIs as protocol://path."""
        if self._local:
            return os.path.realpath(self.root)
        return f"{self.protocol}://{self.root.strip('/')}"

    def local_path(self, *parts: str) -> Path | None:
        """The path on this machine, when the store is local; None for object stores."""
        return Path(self.path(*parts)) if self._local else None

    # -- reading --------------------------------------------------------------------------

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read(self, *parts: str) -> bytes:
        """The content of a file; FileNotFoundError if it is not there."""
        return self.fs.cat_file(self.path(*parts))

    def list(self, *parts: str) -> list[str]:
        """Names in a directory ([] if it is not there; object stores have no empty ones)."""
        try:
            return sorted(
                PurePosixPath(p).name for p in self.fs.ls(self.path(*parts), detail=False)
            )
        except FileNotFoundError:
            return []

    def read_for_update(self, *parts: str) -> tuple[bytes | None, str | None]:
        """The content (None if missing) and a token for `write_if_unchanged`: the ETag on
        S3, None elsewhere (writers hold `lock` instead)."""
        path = self.path(*parts)
        try:
            if not self._s3:
                return self.fs.cat_file(path), None
            # ETag first: if the object changes before we read it, our write is refused.
            etag = self.fs.info(path)["ETag"]
            return self.fs.cat_file(path), etag
        except FileNotFoundError:
            return None, None

    def get_file(self, rel: str, target: str | Path) -> None:
        """Download one file to a local path, where it appears whole: written under a private
        temporary name beside it, then renamed. Workers share download caches, and one must
        never hash (or load) another's half-written file."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=temporary_prefix(target.name), suffix=".tmp"
        )
        os.close(fd)
        try:
            self.fs.get_file(self.path(rel), tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # -- writing --------------------------------------------------------------------------

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def remove(self, *parts: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(*parts))

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Readers see the old content or the new, never part."""
        with self.staged_file(rel) as tmp:
            Path(tmp).write_bytes(data)

    def put_file(self, source: str | Path, rel: str) -> None:
        """Copy a local file in, whole (see `staged_file`)."""
        if not self._local:
            self.fs.put_file(str(source), self.path(rel))
            return
        with self.staged_file(rel) as tmp:
            shutil.copyfile(source, tmp)  # streamed: weight files can be large

    @contextlib.contextmanager
    def staged_file(self, rel: str) -> Iterator[str]:
        """A local path to write to; its content appears at `rel` only once complete.

        On disk: a hidden `.tmp` file beside the target (see `temporary_prefix`), fsynced and
        renamed over it. On object stores (no rename): a local temporary file, then one
        upload; S3 makes an object visible only when its upload completes.
        """
        final = self.path(rel)
        directory = os.path.dirname(final) if self._local else None
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=temporary_prefix(final), suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            if self._local:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are for readers
                os.replace(tmp, final)  # atomic on one filesystem
            else:
                self.fs.put_file(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_if_unchanged(self, rel: str, data: bytes, token: str | None) -> str | None:
        """Write `rel` unless it changed since `read_for_update` gave `token` (None: it did
        not exist); return the token of what we wrote.

        On S3 a conditional PUT (If-Match the ETag, or If-None-Match for a new object)
        raises WriteConflict when another writer got there first. On disk it is
        `write_atomic`, and the caller holds `lock`.
        """
        if not self._s3:
            self._refuse_unguarded()
            self.write_atomic(rel, data)
            return None
        path = self.path(rel)
        try:
            if token is None:
                response = self.fs.pipe_file(path, data, mode="create")
            else:
                response = self.fs.pipe_file(path, data, IfMatch=token)
        except FileExistsError as e:
            raise WriteConflict(path) from e
        except OSError as e:
            if _precondition_failed(e):
                raise WriteConflict(path) from e
            raise
        if isinstance(response, dict) and response.get("ETag"):  # a single PUT says it
            return response["ETag"]
        return self.fs.info(path)["ETag"]

    def append(self, rel: str, line: bytes) -> None:
        """Append a line; a line a crash cut short is ended first, so none is glued onto it.
        On disk the caller holds `lock`; object stores cannot append, so the file is
        rewritten conditionally (WriteConflict: read again and retry)."""
        if self._local:
            with open(self.path(rel), "a+b") as f:
                if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    f.write(b"\n")
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            return
        old, token = self.read_for_update(rel)
        old = old or b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        self.write_if_unchanged(rel, old + line, token)

    @contextlib.contextmanager
    def lock(self, rel: str, wait: bool = True) -> Iterator[bool]:
        """Hold an exclusive lock on `rel` (a file or directory, made if missing) on disk;
        yields False instead of waiting when `wait` is False and another process holds it.
        Object stores have no locks: there conditional writes detect a concurrent writer,
        and this yields True at once."""
        if not self._local:
            self._refuse_unguarded()
            yield True
            return
        import fcntl

        path = self.path(rel)
        directory = not rel or rel.endswith("/") or os.path.isdir(path)
        while True:
            try:
                if directory:
                    os.makedirs(path, exist_ok=True)
                    fd = os.open(path, os.O_RDONLY)
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # removed between making and opening it: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            if _same_file(fd, path):
                break
            os.close(fd)  # what we locked was removed meanwhile (stale-version removal)
        try:
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def _refuse_unguarded(self) -> None:
        problem = self.unguarded()
        if problem:
            raise InputError(f"{self.uri} {problem}")

    def remove_tree(self, *parts: str) -> None:
        """Remove a directory and everything in it (local stores only)."""
        shutil.rmtree(self.path(*parts), ignore_errors=True)

    def remove_stale_temporaries(self, *parts: str, older_than: float) -> None:
        """Remove temporary files (see `staged_file`) that a killed writer left in a
        directory more than `older_than` seconds ago (local stores only: a temporary file
        on an object store is never seen by others)."""
        directory = self.local_path(*parts)
        if directory is None or not directory.is_dir():
            return
        cutoff = time.time() - older_than
        for path in directory.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    def unguarded(self) -> str | None:
        """Why two writers of this store could overwrite each other's updates unseen, if
        they could: an object store other than S3 (gs://, az://, ...), where distilq has
        neither a lock nor a conditional write. Reading from one is fine."""
        if self._local or self._s3:
            return None
        return (
            f"is on {self.protocol}://, where distilq has no lock and no conditional write, "
            "so two runs could overwrite each other's updates unseen; write registries and "
            "outputs to a local or shared path or to s3:// (any S3-compatible store); "
            f"{self.protocol}:// inputs and checkpoint sources are read as usual"
        )

    def writable_problem(self, *subdirs: str) -> str | None:
        """Why this directory (and those of `subdirs` that exist) cannot be made or written
        here, if it cannot: found by writing a probe file, so a read-only mount, a full
        disk's quota or missing permissions show before any work. S3 answers only when
        written: None; other object stores are refused (`unguarded`)."""
        if not self._local:
            return self.unguarded()
        target = Path(self.root)
        if target.exists() and not target.is_dir():
            return "is an existing file, not a directory"
        existing = next(p for p in [target, *target.parents] if p.exists())
        if not existing.is_dir():
            return f"cannot be created: {existing} is a file"
        places = [existing, *(target / d for d in subdirs if (target / d).is_dir())]
        for place in places:
            try:
                fd, probe = tempfile.mkstemp(dir=place, prefix=".distilq-probe-")
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                verb = "created" if place == existing != target else "written"
                return f"cannot be {verb}: {place} is not writable ({e.strerror})"
        return None


def _same_file(fd: int, path: str) -> bool:
    """Whether `fd` is still the file at `path` (it was not removed and made anew)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _precondition_failed(error: OSError) -> bool:
    """Whether an S3 write was refused because its condition (If-Match/If-None-Match) failed:
    HTTP 412, or 409 ConditionalRequestConflict, read from botocore's response."""
    cause = error.__cause__ or error.__context__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
