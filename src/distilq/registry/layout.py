"""The registry's layout and the checks every reader of a version makes: where each file
lives, what a reference may look like, and a sealed manifest and its files verified.

Layout under the registry root (a directory or an fsspec URI)::

    versions/<version>/model/          config, tokenizer files, INT8 weights
    versions/<version>/report.md
    versions/<version>/reference/      the FP32 checkpoint, with `quantize --keep-reference`
    versions/<version>/audits/<run>.json  each scoring run's FP32 audit (not in the manifest)
    versions/<version>/manifest.sha256 the manifest's sha256, checked on every read
    versions/<version>/manifest.json   written last: a version exists once it is there
    aliases/production.json
    aliases/history.jsonl              every alias move: when, from, to, why, by which command
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

from distilq.errors import InputError, IntegrityError
from distilq.manifest import VersionManifest, read_version_manifest
from distilq.storage.store import sha256_file

PRODUCTION = "production"
MANIFEST = "manifest.json"
# The manifest's sha256, written by `publish` just before the manifest and checked on every
# read: a manifest edited after publishing is refused.
MANIFEST_SHA256 = "manifest.sha256"
HISTORY = "history.jsonl"
REFERENCE_PREFIX = "reference/"  # a kept FP32 checkpoint (see distilq.score.audit)
AUDITS = "audits"
# A reference is an alias name or a plain version id: one path component, never a path.
PLAIN_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
