"""The model registry: immutable versions, a `production` alias, and its history.

Its layout (which file lives where) and the checks of a version's files are in layout.py;
the alias moves in aliases.py.

Writing the manifest last makes publishing atomic on any store (no rename needed): a
version's files go under its own unique prefix, then the manifest says it is complete.
The alias is a small pointer object. Moving it reads, decides and writes as one step: under
flock on local disks; on S3 the pointer write is conditional (If-Match its ETag) and the
step is retried when another writer moved the alias first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from distilq.errors import InputError, IntegrityError
from distilq.manifest import RunAudit, VersionManifest
from distilq.registry.aliases import AliasMoves
from distilq.registry.layout import (
    AUDITS,
    MANIFEST,
    MANIFEST_SHA256,
    PRODUCTION,
    check_ref,
    manifest_bytes,
    model_files,
    sealed_manifest,
    utc_now,
    verify_files,
)
from distilq.storage.store import Store, WriteConflict, sha256_file

# A temporary file this old was left by a killed writer (writing one takes milliseconds).
STALE_TEMPORARY_SECONDS = 600
MIRROR = "mirror.json"  # where the registry is mirrored (`mirror_target`)
log = logging.getLogger("distilq")


class Registry(AliasMoves):
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
        """The attestation of `version` on platform `key`, if one was written (a damaged one
        is named in a warning and counts as none: the self-check runs again)."""
        check_ref(version, "version")
        where = ("versions", version, "attestations")
        try:
            return self._record(where, f"{key}.json", _attestation)
        except FileNotFoundError:
            return None

    def attestations(self, version: str) -> list[dict]:
        """Every readable attestation of `version` (the gate's own among them when a flow
        published it), by platform key."""
        return self._records(("versions", version, "attestations"), _attestation)

    def _records(self, where: tuple[str, ...], parse) -> list:
        """Each `*.json` record under `where`, parsed by `parse`, in name order; a damaged
        one is named in a warning and skipped: one bad file hides none of the others."""
        names = sorted(n for n in self.store.list(*where) if n.endswith(".json"))
        return [r for r in (self._record(where, n, parse) for n in names) if r is not None]

    def _record(self, where: tuple[str, ...], name: str, parse):
        data = self.store.read(*where, name)
        try:
            return parse(data)
        except ValueError as e:  # not JSON, or not the record's shape (pydantic's errors too)
            reason = str(e).splitlines()[0]
            log.warning("%s/%s: damaged, skipped: %s", self.uri, "/".join((*where, name)), reason)
            return None

    def write_attestation(self, version: str, key: str, record: dict) -> None:
        """Record that `version` passed its self-check on platform `key`. Written once: a
        worker that lost the race to another one leaves the first record."""
        rel = f"versions/{version}/attestations/{key}.json"
        with contextlib.suppress(WriteConflict):
            self.store.write_if_unchanged(
                rel, manifest_bytes({**record, "created_at": utc_now()}), None
            )

    def mirror_target(
        self, tracking_uri: str | None = None, model: str | None = None
    ) -> tuple[str, str] | None:
        """The MLflow mirror to follow: `tracking_uri` and `model` when given (flags), else
        the one this registry's last sync recorded, if any: promotions and rollbacks follow
        it without being told."""
        if tracking_uri:
            return tracking_uri, model
        try:
            return self._record((), MIRROR, _mirror_record)
        except FileNotFoundError:
            return None

    def record_mirror(self, tracking_uri: str, model: str) -> None:
        """Record that this registry is mirrored to `model` at `tracking_uri` (its user name,
        password and query left out: credentials come from the environment)."""
        record = {"tracking_uri": _without_secrets(tracking_uri), "model": model}
        if self.mirror_target() == (record["tracking_uri"], model):
            return
        try:
            self.store.write_atomic(MIRROR, manifest_bytes(record))
        except OSError as e:  # MLflow followed; only later moves lose their guide
            log.warning("%s: could not record its MLflow mirror: %s", self.uri, e)

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
                    self.store.get_file(f"versions/{manifest.version}/{rel}", target)
        verify_files(local, manifest, wanted)
        return local

    def audits(self, version: str) -> list[RunAudit]:
        """Every scoring run's audit of `version` (`versions/<v>/audits/`), oldest first."""
        check_ref(version, "version")
        return self._records(("versions", version, AUDITS), RunAudit.model_validate_json)

    def write_audit(self, record: RunAudit) -> None:
        """Record one scoring run's audit; written once (a conditional create on object
        stores), never over another run's."""
        rel = f"versions/{record.model_version}/{AUDITS}/{record.run_id}.json"
        self.store.write_if_unchanged(rel, manifest_bytes(record.model_dump(mode="json")), None)

    # -- writing --------------------------------------------------------------------------

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


def _without_secrets(uri: str) -> str:
    """`uri` without a user name, password, query or fragment."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _mirror_record(data: bytes) -> tuple[str, str]:
    record = json.loads(data)
    fields = [
        record.get(k) if isinstance(record, dict) else None for k in ("tracking_uri", "model")
    ]
    if not all(isinstance(f, str) and f for f in fields):
        raise ValueError("not a mirror record (no tracking_uri and model)")
    return fields[0], fields[1]


def _attestation(data: bytes) -> dict:
    """An attestation record as `models show` and the self-check read it."""
    record = json.loads(data)
    platform = record.get("platform") if isinstance(record, dict) else None
    if not isinstance(platform, dict) or "key" not in platform or "agreement" not in record:
        raise ValueError("not an attestation record (no platform key or agreement)")
    return record
