"""Reading a Parquet dataset on any store, shared by the gate's draw and scoring: find its
files (files, directories, globs, fsspec URIs), open one, and read its hive partitions."""

from __future__ import annotations

import contextlib
import glob as globlib
from collections.abc import Iterator
from pathlib import PurePosixPath

import pyarrow.parquet as pq

from distilq.errors import InputError
from distilq.storage.store import Store


@contextlib.contextmanager
def open_parquet(uri: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file on any store, closed after."""
    store = Store(uri)
    with store.fs.open(store.root, "rb") as f:
        yield pq.ParquetFile(f)


def _identity(info: dict) -> dict:
    ident = {"size": int(info.get("size") or 0)}
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            ident["version"] = str(info[key])
            break
    return ident


def _is_data(path: str, root: str) -> bool:
    """The rule pyarrow and Spark keep: below what the user named, a file or directory whose
    name starts with `_` or `.` is not data (an output's `_audit.parquet`, a hidden
    temporary file)."""
    return not any(part.startswith(("_", ".")) for part in path[len(root) :].split("/"))


def discover_inputs(
    inputs: list[str], flag: str = "--input"
) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """Every Parquet file named by `inputs` (files, directories, globs, fsspec URIs), with
    the name relative to what the user gave and the file's identity; and the directories
    the inputs walk (given directories, roots of `**` globs). Files a directory or a glob
    holds whose names start with `_` or `.` are not data (`_is_data`); a file named as
    itself is read. Missing inputs fail, said of `flag`."""
    found: list[tuple[str, str, dict]] = []
    walked: list[str] = []
    for spec in inputs:
        store = Store(spec)
        fs, path = store.fs, store.root
        if globlib.has_magic(path):
            root = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            matched = sorted(p for p in fs.glob(path) if fs.isfile(p))
            paths = [p for p in matched if _is_data(p, root)]
            if not matched:
                raise InputError(f"{flag} {spec!r} matches no file")
            if not paths:
                skipped = ", ".join(p[len(root) :].lstrip("/") for p in matched[:5])
                raise InputError(
                    f"{flag} {spec!r} matches no data file (names starting with _ or . are "
                    f"not data: {skipped})"
                )
            if "**" in path:
                walked.append(store.to_uri(root))
        elif fs.isdir(path):
            root = path.rstrip("/")
            paths = sorted(p for p in fs.find(path) if p.endswith(".parquet") and _is_data(p, root))
            if not paths:
                raise InputError(f"{flag} {spec!r} is a directory with no *.parquet file")
            walked.append(store.to_uri(root))
        elif fs.isfile(path):
            root, paths = path.rsplit("/", 1)[0] if "/" in path else "", [path]
        else:
            raise InputError(f"{flag} {spec!r} does not exist")
        for p in paths:
            relative = p[len(root) :].lstrip("/") if root else p
            found.append((store.to_uri(p), relative, _identity(fs.info(p))))
    uris = [u for u, _, _ in found]
    duplicates = {u for u in uris if uris.count(u) > 1}
    if duplicates:
        raise InputError(f"inputs name these files more than once: {', '.join(sorted(duplicates))}")
    return found, walked


def partitions_of(uri: str, relative: str) -> dict[str, str]:
    """The hive `key=value` directories of a file's path; a key given twice with two values
    is refused (which one would the rows hold?)."""
    partitions: dict[str, str] = {}
    for part in PurePosixPath(relative).parts[:-1]:
        if "=" not in part or part.startswith("="):
            continue
        key, value = part.split("=", 1)
        if partitions.get(key, value) != value:
            raise InputError(
                f"{uri}: the hive partition {key!r} is given twice in its path, as "
                f"{partitions[key]!r} and {value!r}; rename a directory"
            )
        partitions[key] = value
    return partitions
