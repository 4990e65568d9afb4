"""The model registry: immutable versions, a `production` alias, and its history.

Layout under the registry root (a directory or an fsspec URI)::

    versions/<version>/model/          config, tokenizer files, INT8 weights
    versions/<version>/report.md
    versions/<version>/manifest.json   written last: a version exists once it is there
    aliases/production.json
    aliases/history.jsonl              every alias move: when, from, to, why, by which command

Writing the manifest last makes publishing atomic on any store (no rename needed): a
version's files go under its own unique prefix, then the manifest says it is complete.
The alias is a small pointer object. Moving it reads, decides and writes as one step: under
flock on local disks; on S3 the pointer write is conditional (If-Match its ETag) and the
step is retried when another writer moved the alias first.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from distilq.checkpoint import sha256_file
from distilq.errors import DistilqError, InputError, IntegrityError
from distilq.storage import (
    WriteConflict,
    is_local,
    read_for_update,
    url_to_fs,
    write_atomic,
    write_if_unchanged,
)

PRODUCTION = "production"
MANIFEST = "manifest.json"
CONFLICT_RETRIES = 20
T = TypeVar("T")


def utc_now() -> str:
    """The current UTC time, ISO 8601 with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def command_line() -> str:
    """Who ran what, for the alias history."""
    return f"{getpass.getuser()}: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}"


class Registry:
    """A registry rooted at a local directory or fsspec URI."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self.fs, self.root = url_to_fs(self.uri)
        self.is_local = is_local(self.fs)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # -- reading --------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        try:
            entries = self.fs.ls(self._path("versions"), detail=False)
        except FileNotFoundError:
            return []
        names = sorted(Path(e).name for e in entries)
        return [n for n in names if self.fs.exists(self._path("versions", n, MANIFEST))]

    def manifest(self, version: str) -> dict:
        """The manifest of `version`."""
        try:
            with self.fs.open(self._path("versions", version, MANIFEST), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            raise InputError(f"registry {self.uri}: no version {version!r}") from None

    def alias(self, name: str = PRODUCTION) -> str | None:
        """The version an alias points to, or None."""
        try:
            with self.fs.open(self._path("aliases", f"{name}.json"), "rb") as f:
                return json.load(f)["version"]
        except FileNotFoundError:
            return None

    def resolve(self, ref: str = PRODUCTION) -> str:
        """A version name from a version or an alias."""
        if ref == PRODUCTION:
            version = self.alias(ref)
            if version is None:
                raise InputError(f"registry {self.uri}: nothing is in production yet")
            return version
        if not self.fs.exists(self._path("versions", ref, MANIFEST)):
            raise InputError(f"registry {self.uri}: no version or alias {ref!r}")
        return ref

    def find_run(self, run_key: str) -> dict | None:
        """The newest manifest made from the same inputs (`run_key`), if any."""
        for version in reversed(self.versions()):
            manifest = self.manifest(version)
            if manifest.get("run_key") == run_key:
                return manifest
        return None

    def history(self) -> list[dict]:
        """Every alias move, oldest first (by move number; entries without one come first)."""
        try:
            data = self.fs.cat_file(self._path("aliases", "history.jsonl"))
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in data.decode().splitlines() if line]
        return sorted(entries, key=lambda e: e.get("seq", 0))

    def fetch(
        self, ref: str = PRODUCTION, cache_dir: str | Path | None = None
    ) -> tuple[Path, dict]:
        """A local directory holding the version's files, every sha256 checked; and its manifest."""
        version = self.resolve(ref)
        manifest = self.manifest(version)
        if self.is_local:
            local = Path(self._path("versions", version))
        else:
            base = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "distilq" / "registry"
            local = base / version
            for rel in manifest["files"]:
                target = local / rel
                if not target.exists() or sha256_file(target) != manifest["files"][rel]:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get(self._path("versions", version, rel), str(target))
        verify_files(local, manifest)
        return local, manifest

    # -- writing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _alias_lock(self) -> Iterator[None]:
        import fcntl

        os.makedirs(self._path("aliases"), exist_ok=True)
        with open(self._path("aliases", ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _alias_step(self, step: Callable[[], T]) -> T:
        """Run `step` (read the alias, decide, write it) as one: under flock on disk; on
        object stores retried while another writer's conditional write wins first."""
        if self.is_local:
            with self._alias_lock():
                return step()
        return self._retry_on_conflict(step, "the alias")

    def _retry_on_conflict(self, step: Callable[[], T], what: str) -> T:
        """Run `step` until its conditional write is not beaten by another writer."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return step()
            except WriteConflict:
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
        raise DistilqError(f"registry {self.uri}: {what} kept changing; try again")

    def _read_alias(self) -> tuple[dict, str | None]:
        """The production pointer ({} if none) and the token its conditional rewrite needs."""
        data, token = read_for_update(self.fs, self._path("aliases", f"{PRODUCTION}.json"))
        return (json.loads(data) if data else {}), token

    def publish(self, staging: str | Path, manifest: dict) -> str:
        """Copy a staged version (files listed in the manifest) in; the manifest goes last.

        Versions are immutable: publishing a version that exists fails.
        """
        version = manifest["version"]
        if self.fs.exists(self._path("versions", version, MANIFEST)):
            raise InputError(f"registry {self.uri}: version {version} exists and is immutable")
        staging = Path(staging)
        verify_files(staging, manifest)
        for rel in manifest["files"]:
            target = self._path("versions", version, rel)
            self.fs.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.put_file(str(staging / rel), target)
        write_atomic(self.fs, self._path("versions", version, MANIFEST), manifest_bytes(manifest))
        return version

    def _append_history(self, entry: dict) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        path = self._path("aliases", "history.jsonl")
        if self.is_local:  # the alias lock is held
            with open(path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            return

        def append() -> None:  # object stores cannot append: rewrite it
            old, token = read_for_update(self.fs, path)
            write_if_unchanged(self.fs, path, (old or b"") + line, token)

        self._retry_on_conflict(append, path)

    def _move(
        self,
        version: str,
        action: str,
        reason: str,
        command: str,
        current: dict,
        token: str | None,
    ) -> dict:
        at = utc_now()
        # Each move is numbered: on object stores two movers' history appends may land in
        # either order, and `history()` sorts by this number.
        seq = current.get("seq", 0) + 1
        pointer = {
            "alias": PRODUCTION,
            "version": version,
            "updated_at": at,
            "id": uuid.uuid4().hex,
            "seq": seq,
        }
        path = self._path("aliases", f"{PRODUCTION}.json")
        write_if_unchanged(self.fs, path, manifest_bytes(pointer), token)
        entry = {
            "at": at,
            "alias": PRODUCTION,
            "action": action,
            "from": current.get("version"),
            "to": version,
            "reason": reason,
            "command": command,
            "seq": seq,
        }
        self._append_history(entry)
        return entry

    def promote(
        self,
        version: str,
        reason: str,
        command: str | None = None,
        force: bool = False,
        newer_only: bool = False,
    ) -> dict | None:
        """Point `production` at `version`; return the history entry (None if nothing moved).

        A version the gate rejected is refused unless `force` (recorded in the history).
        `newer_only` (automatic promotion) never moves production to an older version, so
        two publishes racing leave it on the newer one.
        """
        manifest = self.manifest(version)
        approved = manifest["decision"]["approved"]
        if not approved and not force:
            raise InputError(
                f"version {version} was rejected by the gate "
                f"({'; '.join(manifest['decision']['reasons'])}); use --force to promote it anyway"
            )
        if not approved:
            reason = f"{reason} (forced over a rejected gate)"
        command = command or command_line()

        def step() -> dict | None:
            current, token = self._read_alias()
            if current.get("version") == version:
                return None
            if newer_only and current:
                if self.manifest(current["version"])["created_at"] > manifest["created_at"]:
                    return None
            return self._move(version, "promote", reason, command, current, token)

        return self._alias_step(step)

    def rollback(self, reason: str = "rollback", command: str | None = None) -> dict:
        """Point `production` back at the version it had before the current one."""
        command = command or command_line()

        def step() -> dict:
            current, token = self._read_alias()
            stack: list[str] = []
            for entry in self.history():
                if entry["alias"] != PRODUCTION:
                    continue
                if entry["action"] == "promote":
                    stack.append(entry["to"])
                elif entry["action"] == "rollback" and stack:
                    stack.pop()
            if len(stack) < 2:
                raise InputError(
                    f"registry {self.uri}: no earlier production version to roll back to"
                )
            return self._move(stack[-2], "rollback", reason, command, current, token)

        return self._alias_step(step)


def manifest_bytes(data: dict) -> bytes:
    """Stable, readable JSON."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def verify_files(directory: str | Path, manifest: dict) -> None:
    """Check every file listed in the manifest against its sha256; refuse any mismatch."""
    directory = Path(directory)
    for rel, expected in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise IntegrityError(
                f"{path}: missing (listed in the manifest of {manifest['version']})"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path}: sha256 {actual[:16]}... is not the manifest's {expected[:16]}...; "
                "the file was changed or corrupted, refusing to load it"
            )
