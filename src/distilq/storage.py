"""The few filesystem facts and writes the registry, sources and scoring share."""

from __future__ import annotations

import contextlib
import os
import tempfile

import fsspec


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's main protocol name (`file`, `s3`, `memory`, ...)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether paths on `fs` are this machine's own files."""
    return protocol(fs) in ("file", "local")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the old content or the new, never part: on disk a hidden `.tmp` file in
    the same directory, fsynced, then renamed; on object stores one PUT."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
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
