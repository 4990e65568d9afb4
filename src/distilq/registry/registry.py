"""The model registry: immutable versions, a `production` alias, and its history.

Layout under the registry root (a directory or an fsspec URI)::

    versions/<version>/model/          config, tokenizer files, INT8 weights
    versions/<version>/report.md
    versions/<version>/reference/      the FP32 checkpoint, with `quantize --keep-reference`
    versions/<version>/audits/<run>.json  each scoring run's FP32 audit (not in the manifest)
    versions/<version>/manifest.sha256 the manifest's sha256, checked on every read
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
import hashlib
import json
import logging
import random
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from distilq.errors import DistilqError, InputError, IntegrityError
from distilq.gate.decide import decide_manifest
from distilq.manifest import RunAudit, VersionManifest, read_version_manifest
from distilq.quantize.checkpoint import sha256_file
from distilq.registry.store import Store, WriteConflict

PRODUCTION = "production"
MANIFEST = "manifest.json"
# The manifest's sha256, written by `publish` just before the manifest and checked on every
# read: a manifest edited after publishing is refused.
MANIFEST_SHA256 = "manifest.sha256"
HISTORY = "history.jsonl"
REFERENCE_PREFIX = "reference/"  # a kept FP32 checkpoint (see distilq.score.audit)
AUDITS = "audits"
CONFLICT_RETRIES = 20
# A temporary file this old was left by a killed writer (writing one takes milliseconds).
STALE_TEMPORARY_SECONDS = 600
# A reference is an alias name or a plain version id: one path component, never a path.
PLAIN_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
T = TypeVar("T")
log = logging.getLogger("distilq")


def is_plain_ref(ref: object) -> bool:
    """Whether `ref` can name a version or alias: no path separator, no `..`, not absolute."""
    return isinstance(ref, str) and bool(PLAIN_REF.fullmatch(ref)) and ".." not in ref


def check_ref(ref: str, what: str = "version or alias") -> str:
    """`ref`, or InputError if it is not a plain name (it could point outside the registry)."""
    if not is_plain_ref(ref):
        raise InputError(
            f"{ref!r} is not a {what}: a reference is an alias name (production) or a version "
            "id, never a path"
        )
    return ref


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
        self.store = Store(self.uri)

    # -- reading --------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        names = self.store.list("versions")
        return [n for n in names if self.store.exists("versions", n, MANIFEST)]

    def exists(self) -> bool:
        """Whether the registry's root is there at all."""
        return self.store.exists()

    def check_writable(self) -> None:
        """Refuse, before any work, a registry that cannot be written here (read-only, not
        creatable, not a directory)."""
        problem = self.store.writable_problem("versions", "aliases")
        if problem:
            raise InputError(f"registry {self.uri} {problem}; choose a --registry you can write to")

    def manifest(self, version: str) -> VersionManifest:
        """The manifest of `version`, refused if it changed since it was published."""
        data, seal = self.sealed(version)
        return sealed_manifest(data, seal, self.store.uri_of("versions", version), version)

    def sealed(self, version: str) -> tuple[bytes, str | None]:
        """The manifest of `version` as published, and its seal (None: published before
        manifests were sealed); unchecked: `manifest` checks them."""
        check_ref(version, "version")
        try:
            data = self.store.read("versions", version, MANIFEST)
        except FileNotFoundError:
            raise InputError(f"registry {self.uri}: no version {version!r}") from None
        try:
            seal = self.store.read("versions", version, MANIFEST_SHA256).decode().strip()
        except FileNotFoundError:
            seal = None
        return data, seal

    def model_config(self, version: str) -> dict:
        """The version's transformers config.json (checked against its manifest)."""
        manifest = self.manifest(version)
        rel = "model/config.json"
        data = self.store.read("versions", version, rel)
        if hashlib.sha256(data).hexdigest() != manifest.files.get(rel):
            raise IntegrityError(f"{self.uri}: {rel} of {version} does not match its manifest")
        return json.loads(data)

    def attestation(self, version: str, key: str) -> dict | None:
        """The attestation of `version` on platform `key`, if one was written."""
        check_ref(version, "version")
        try:
            return json.loads(self.store.read("versions", version, "attestations", f"{key}.json"))
        except FileNotFoundError:
            return None

    def attestations(self, version: str) -> list[dict]:
        """Every attestation of `version` (the gate's own among them when a flow published
        it), by platform key."""
        where = ("versions", version, "attestations")
        names = [n for n in self.store.list(*where) if n.endswith(".json")]
        return [json.loads(self.store.read(*where, n)) for n in names]

    def write_attestation(self, version: str, key: str, record: dict) -> None:
        """Record that `version` passed its self-check on platform `key`. Written once: a
        worker that lost the race to another one leaves the first record."""
        rel = f"versions/{version}/attestations/{key}.json"
        with contextlib.suppress(WriteConflict):
            self.store.write_if_unchanged(
                rel, manifest_bytes({**record, "created_at": utc_now()}), None
            )

    def alias(self, name: str = PRODUCTION) -> str | None:
        """The version an alias points to, or None."""
        pointer, _ = self._read_alias(name)
        return pointer.get("version")

    def resolve(self, ref: str = PRODUCTION) -> str:
        """A version name from a version or an alias."""
        check_ref(ref)
        if ref == PRODUCTION:
            version = self.alias(ref)
            if version is None:
                raise InputError(f"registry {self.uri}: nothing is in production yet")
            return version
        if not self.store.exists("versions", ref, MANIFEST):
            raise InputError(f"registry {self.uri}: no version or alias {ref!r}")
        return ref

    def find_run(self, run_key: str) -> VersionManifest | None:
        """The newest manifest made from the same inputs (`run_key`), if any."""
        for version in reversed(self.versions()):
            try:
                manifest = self.manifest(version)
            except IntegrityError as e:
                log.warning("skipping version %s: %s", version, e)
                continue
            if manifest.run_key == run_key:
                return manifest
        return None

    def history(self) -> list[dict]:
        """Every alias move, oldest first (by move number; entries without one come first).

        A line a crash cut short cannot be read: it is skipped, with a warning.
        """
        path = self.store.uri_of("aliases", HISTORY)
        try:
            data = self.store.read("aliases", HISTORY)
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not _is_move(entry):
                log.warning(
                    "%s line %d is damaged (cut off by a crash, or not a move between "
                    "versions); skipped: %.80s",
                    path,
                    number,
                    line,
                )
                continue
            entries.append(entry)
        return sorted(entries, key=lambda e: e.get("seq", 0))

    def fetch(
        self, ref: str = PRODUCTION, cache_dir: str | Path | None = None
    ) -> tuple[Path, VersionManifest]:
        """A local directory holding the version's files, every sha256 checked; and its
        manifest. A kept FP32 reference (`reference/`) is left out: only audits read it
        (`fetch_files`)."""
        manifest = self.manifest(self.resolve(ref))
        return self._fetch(manifest, model_files(manifest), cache_dir), manifest

    def fetch_files(self, version: str, prefix: str, cache_dir: str | Path | None = None) -> Path:
        """A local directory holding the version's files under `prefix`, sha256 checked."""
        manifest = self.manifest(version)
        wanted = {rel for rel in manifest.files if rel.startswith(prefix)}
        return self._fetch(manifest, wanted, cache_dir)

    def _fetch(self, manifest: VersionManifest, wanted: set[str], cache_dir) -> Path:
        local = self.store.local_path("versions", manifest.version)
        if local is None:  # an object store: download what the cache lacks
            base = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "distilq" / "registry"
            local = base / manifest.version
            for rel in sorted(wanted):
                target = local / rel
                if not target.exists() or sha256_file(target) != manifest.files[rel]:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.store.get_file(f"versions/{manifest.version}/{rel}", target)
        verify_files(local, manifest, wanted)
        return local

    def audits(self, version: str) -> list[RunAudit]:
        """Every scoring run's audit of `version` (`versions/<v>/audits/`), oldest first."""
        check_ref(version, "version")
        where = ("versions", version, AUDITS)
        names = sorted(n for n in self.store.list(*where) if n.endswith(".json"))
        return [RunAudit.model_validate_json(self.store.read(*where, n)) for n in names]

    def write_audit(self, record: RunAudit) -> None:
        """Record one scoring run's audit; written once (a conditional create on object
        stores), never over another run's."""
        rel = f"versions/{record.model_version}/{AUDITS}/{record.run_id}.json"
        self.store.write_if_unchanged(rel, manifest_bytes(record.model_dump(mode="json")), None)

    # -- writing --------------------------------------------------------------------------

    def _alias_step(self, step: Callable[[], T]) -> T:
        """Run `step` (read the alias, decide, write it) as one: under the store's lock on
        disk; on object stores retried while another writer's conditional write wins first."""
        if not self.exists():
            raise InputError(f"registry {self.uri} does not exist")
        self.check_writable()
        with self.store.lock("aliases/.lock"):
            return self._retry_on_conflict(step, "the alias")

    def _retry_on_conflict(self, step: Callable[[], T], what: str) -> T:
        """Run `step` until its conditional write is not beaten by another writer."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return step()
            except WriteConflict:
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
        raise DistilqError(f"registry {self.uri}: {what} kept changing; try again")

    def _read_alias(self, name: str = PRODUCTION, repair: bool = False) -> tuple[dict, str | None]:
        """The alias pointer ({} if none) and the token its conditional rewrite needs.

        A damaged pointer (not a pointer to a plain version id, or to a version that is not
        in the registry) is an error naming the file, or with `repair` (a promotion or
        rollback, which rewrites it) read as no pointer, with a warning.
        """
        check_ref(name, "alias")
        path = self.store.uri_of("aliases", f"{name}.json")
        data, token = self.store.read_for_update("aliases", f"{name}.json")
        if data is None:
            return {}, token
        try:
            pointer = json.loads(data)
        except ValueError:
            pointer = None
        target = pointer.get("version") if isinstance(pointer, dict) else None
        if not is_plain_ref(target):
            problem = "is damaged (not a pointer to a version)"
        elif not self.store.exists("versions", target, MANIFEST):
            problem = f"points at version {target!r}, which is not in the registry (deleted?)"
        else:
            return pointer, token
        if repair:
            log.warning("%s %s; rewriting it", path, problem)
            return {}, token
        raise IntegrityError(
            f"{path} {problem}; repair it with `distilq models promote VERSION` or "
            "`distilq models rollback`"
        )

    def publish(
        self, staging: str | Path, manifest: VersionManifest, attestations: dict | None = None
    ) -> str:
        """Copy a staged version (files listed in the manifest) in, with `attestations` (the
        gate's own, by platform key); the manifest goes last.

        Versions are immutable: publishing a version that exists fails. On disk, the
        version's directory is locked while it is written, and partial versions whose
        publisher died (killed mid-copy) are removed first.
        """
        version = manifest.version
        if self.store.exists("versions", version, MANIFEST):
            raise InputError(f"registry {self.uri}: version {version} exists and is immutable")
        staging = Path(staging)
        verify_files(staging, manifest)
        self.remove_partial_versions()
        with self.store.lock(f"versions/{version}/"):
            for rel in manifest.files:
                self.store.put_file(staging / rel, f"versions/{version}/{rel}")
            for key, record in (attestations or {}).items():
                self.write_attestation(version, key, record)
            data = manifest_bytes(manifest.dump())
            seal = (hashlib.sha256(data).hexdigest() + "\n").encode()
            self.store.write_atomic(f"versions/{version}/{MANIFEST_SHA256}", seal)
            self.store.write_atomic(f"versions/{version}/{MANIFEST}", data)
        return version

    def remove_partial_versions(self) -> list[str]:
        """Remove version directories without a manifest whose publisher is gone (no one
        holds their lock), and attestation temporaries older than a few minutes; return the
        versions removed. Local registries only: on an object store a partial version
        cannot be told from one being uploaded, and stays invisible (it has no manifest)."""
        if self.store.local_path() is None:
            return []
        removed = []
        for name in self.store.list("versions"):
            if self.store.exists("versions", name, MANIFEST):
                self.store.remove_stale_temporaries(
                    "versions", name, "attestations", older_than=STALE_TEMPORARY_SECONDS
                )
                continue
            with self.store.lock(f"versions/{name}/", wait=False) as free:
                if free and not self.store.exists("versions", name, MANIFEST):
                    self.store.remove_tree("versions", name)
                    removed.append(name)
        if removed:
            log.warning("removed partial version(s) left by a killed run: %s", ", ".join(removed))
        return removed

    def _append_history(self, entry: dict) -> None:
        """Append one line to the history (the alias lock is held)."""
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        rel = f"aliases/{HISTORY}"
        self._retry_on_conflict(lambda: self.store.append(rel, line), rel)

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
        seq = max(current.get("seq", 0), *(e.get("seq", 0) for e in self.history()), 0) + 1
        pointer = {
            "alias": PRODUCTION,
            "version": version,
            "updated_at": at,
            "id": uuid.uuid4().hex,
            "seq": seq,
        }
        self.store.write_if_unchanged(f"aliases/{PRODUCTION}.json", manifest_bytes(pointer), token)
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

        A version the gate rejects is refused unless `force` (recorded in the history); the
        decision is derived again from the version's metrics, not read from its manifest.
        `newer_only` (automatic promotion) never moves production to an older version, so
        two publishes racing leave it on the newer one. A damaged pointer (or one whose
        version was deleted) never blocks a promotion: it is reported and rewritten.
        """
        manifest = self.manifest(version)
        decision = decide_manifest(manifest)
        if not decision.approved and not force:
            raise InputError(
                f"version {version} was rejected by the gate "
                f"({'; '.join(decision.reasons)}); use --force to promote it anyway"
            )
        if not decision.approved:
            reason = f"{reason} (forced over a rejected gate)"
        command = command or command_line()

        def step() -> dict | None:
            current, token = self._read_alias(repair=True)
            if current.get("version") == version:
                return None
            if newer_only and current:
                if self.manifest(current["version"]).created_at > manifest.created_at:
                    return None
            return self._move(version, "promote", reason, command, current, token)

        return self._alias_step(step)

    def rollback(self, reason: str = "rollback", command: str | None = None) -> dict:
        """Point `production` back at the version it had before the current one (found in
        the history, so a damaged pointer is rewritten)."""
        command = command or command_line()
        self._rollback_target()  # refused before anything is written (or locked)

        def step() -> dict:
            current, token = self._read_alias(repair=True)
            return self._move(self._rollback_target(), "rollback", reason, command, current, token)

        return self._alias_step(step)

    def _rollback_target(self) -> str:
        stack: list[str] = []
        for entry in self.history():
            if entry.get("alias", PRODUCTION) != PRODUCTION:
                continue
            if entry.get("action") == "promote":
                stack.append(entry["to"])
            elif entry.get("action") == "rollback" and stack:
                stack.pop()
        if len(stack) < 2:
            raise InputError(f"registry {self.uri}: no earlier production version to roll back to")
        target = stack[-2]
        if not self.store.exists("versions", target, MANIFEST):
            raise InputError(
                f"registry {self.uri}: the production version before this one, {target}, is no "
                "longer in the registry; promote a version with `distilq models promote VERSION`"
            )
        return target


def _is_move(entry: object) -> bool:
    """Whether a history line is an alias move between plain version ids."""
    if not isinstance(entry, dict) or not is_plain_ref(entry.get("to")):
        return False
    return entry.get("from") is None or is_plain_ref(entry.get("from"))


def model_files(manifest: VersionManifest) -> set[str]:
    """The files a loaded model reads and checks: all the version's files but a kept FP32
    reference (only audits read that)."""
    return {rel for rel in manifest.files if not rel.startswith(REFERENCE_PREFIX)}


def sealed_manifest(data: bytes, seal: str | None, where: str, version: str) -> VersionManifest:
    """The manifest of `version` in `data` (read from the directory `where`), refused if its
    sha256 is not `seal` (written beside it when it was published; None: published unsealed)."""
    if seal is not None and hashlib.sha256(data).hexdigest() != seal:
        raise IntegrityError(
            f"{where}/{MANIFEST} was changed after it was published (its sha256 is not the "
            f"one in {MANIFEST_SHA256}); refusing to trust version {version}"
        )
    try:
        parsed = json.loads(data)
    except ValueError as e:
        raise IntegrityError(f"{where}/{MANIFEST} is not valid JSON: {e}") from e
    return read_version_manifest(parsed, f"{where}/{MANIFEST}")


def manifest_bytes(data: dict) -> bytes:
    """Stable, readable JSON."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def verify_files(
    directory: str | Path, manifest: VersionManifest, only: set[str] | None = None
) -> None:
    """Check every file listed in the manifest (or those of them in `only`) against its
    sha256; refuse any mismatch."""
    directory = Path(directory)
    for rel, expected in manifest.files.items():
        if only is not None and rel not in only:
            continue
        path = directory / rel
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in the manifest of {manifest.version})")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path}: sha256 {actual[:16]}... is not the manifest's {expected[:16]}...; "
                "the file was changed or corrupted, refusing to load it"
            )
