"""The FP32 audit of a scoring run: a sample of the rows it scores, chosen by a hash of the
text, re-run through the FP32 model the version was gated against, labels compared.

The sample depends on the texts and the plan only (never on the runner, the order shards
finish in, or a resume), so every run over the same inputs audits the same rows. The FP32
model is the version's own copy (`distilq quantize --keep-reference`) or its recorded
source, its weight files checked against the sha256 the gate recorded. What the audited
rows are evidence of (each distinct text once, the verdict) is evidence.py.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distilq.config.score import ScoreConfig
from distilq.config.shared import DEFAULT_CONFIDENCE
from distilq.errors import DistilqError, InputError
from distilq.gate.draw import text_hash
from distilq.manifest import ShardAudit, VersionManifest

AUDIT_SALT = "distilq-audit:"  # apart from the gate's split and draw hashes
AUDIT_FILE = "_audit.parquet"
REFERENCE_DIR = "reference"  # the FP32 checkpoint kept in a version
TEXT_SHOWN = 160  # characters of a flipped row's text kept in the manifest


class ReferenceUnavailable(DistilqError):
    """The FP32 model of a version cannot be had here (gone, unreachable, or changed)."""


def audit_key(text: str) -> float:
    """Where a text falls in [0, 1): it is audited at rates above this."""
    return text_hash(AUDIT_SALT, text) / 2**64


def text_key(key: float) -> str:
    """A text's name in the pooled records: its audit key as 16 hex digits (no text kept)."""
    return f"{int(key * 2**64):016x}"


def apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, in integers summing to it (largest
    remainders first, ties to the earlier)."""
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass(frozen=True)
class Reference:
    """Where a version's FP32 model is: `kept` in the version itself, or its source (a
    `local` directory, the `hub` at a commit, a `uri`), with its weight files' sha256."""

    kind: str
    location: str
    revision: str
    sha256: dict[str, str]

    def describe(self) -> str:
        if self.kind == "kept":
            return f"the FP32 copy kept in the version ({self.location})"
        at = f"@{self.revision}" if self.kind == "hub" else ""
        return f"the version's source {self.location}{at}"


@dataclass(frozen=True)
class AuditPlan:
    """How a run audits: the rate asked and the one sampled at (lower when `max_rows`
    caps it), each shard's share of `max_rows`, the bar and the FP32 model (None, with
    `reason`, when this run audits nothing)."""

    rate: float
    sampling_rate: float
    max_rows: int | None
    caps: dict[str, int] | None  # shard output -> most rows audited there
    threshold: float
    confidence: float
    reference: Reference | None
    reason: str | None
    required: bool
    registry: str
    version: str
    fail_on: str = "failed"

    @property
    def active(self) -> bool:
        return self.reference is not None and self.sampling_rate > 0

    def cap(self, shard_output: str) -> int | None:
        return None if self.caps is None else self.caps.get(shard_output, 0)


def plan_audit(config: ScoreConfig, registry, manifest: VersionManifest, shards) -> AuditPlan:
    """The audit of a run over `shards` (every shard of the inputs, done or not: the sample
    must not depend on what a resume skips). The FP32 model is only located here; its
    hashes are checked where it is loaded, unless `--require-audit` asks it before scoring
    (then a missing or changed model is a usage error)."""
    thresholds = manifest.decision.thresholds
    threshold = config.min_audit_agreement
    threshold = thresholds.min_agreement if threshold is None else threshold
    confidence = thresholds.confidence or DEFAULT_CONFIDENCE
    rows = [s.rows for s in shards]
    rate, cap = config.audit_rate, config.audit_max_rows
    sampling = min(rate, cap / sum(rows)) if cap and sum(rows) else rate
    caps = dict(zip([s.output for s in shards], apportion(cap, rows), strict=True)) if cap else None
    reference, reason = None, None
    if rate == 0:
        reason = "--audit-rate 0"
    else:
        try:
            reference = locate_reference(registry, manifest)
            if config.require_audit:
                fetch_reference(reference, registry.uri, manifest.version)
        except ReferenceUnavailable as e:
            if config.require_audit:
                raise InputError(f"--require-audit: {e}") from None
            reason = str(e)
    return AuditPlan(
        rate, sampling, cap, caps, threshold, confidence, reference, reason,
        config.require_audit, registry.uri, manifest.version, config.audit_fail_on,
    )  # fmt: skip


def locate_reference(registry, manifest: VersionManifest) -> Reference:
    """The version's FP32 model, found without reading it: the copy kept in the version,
    else its source if it can be seen from here (a hub source is only tried on load)."""
    kept = {rel: sha for rel, sha in manifest.files.items() if rel.startswith(REFERENCE_DIR + "/")}
    if kept:
        return Reference("kept", registry.uri, manifest.source.revision, kept)
    source = manifest.source
    if source.kind == "local" and not Path(source.id).expanduser().is_dir():
        raise ReferenceUnavailable(
            f"the FP32 source directory {source.id} of {manifest.version} is not on this "
            "machine (quantize with --keep-reference to keep a copy in the version)"
        )
    if source.kind == "uri":
        from distilq.storage.store import Store

        try:
            found = Store(source.id).exists()
        except OSError as e:
            raise ReferenceUnavailable(f"cannot reach the FP32 source {source.id}: {e}") from e
        if not found:
            raise ReferenceUnavailable(f"the FP32 source {source.id} no longer exists")
    return Reference(source.kind, source.id, source.revision, dict(source.sha256))


def fetch_reference(reference: Reference, registry_uri: str, version: str) -> Path:
    """A local directory holding the FP32 checkpoint, every weight file's sha256 checked
    against the one the gate recorded."""
    from distilq.quantize.checkpoint import resolve_checkpoint
    from distilq.registry.registry import Registry

    try:
        if reference.kind == "kept":
            local = Registry(registry_uri).fetch_files(version, REFERENCE_DIR + "/")
            return local / REFERENCE_DIR
        revision = reference.revision if reference.kind == "hub" else None
        found = resolve_checkpoint(reference.location, revision)
    except (DistilqError, OSError) as e:
        raise ReferenceUnavailable(f"cannot load {reference.describe()}: {e}") from e
    if found.weight_sha256 != reference.sha256:
        changed = sorted(
            name
            for name in set(reference.sha256) | set(found.weight_sha256)
            if reference.sha256.get(name) != found.weight_sha256.get(name)
        )
        raise ReferenceUnavailable(
            f"the FP32 source {reference.location} changed since {version} was gated "
            f"({', '.join(changed)}: sha256 differs from the one recorded); refusing to audit "
            "against another model"
        )
    return found.path


_fp32_models: dict[tuple[str, str], object] = {}  # one FP32 model per process and version
_unavailable: dict[tuple[str, str], tuple[float, ReferenceUnavailable]] = {}
RETRY_SECONDS = 60  # a long-lived worker tries a missing FP32 model again after this


def fp32_model(plan: AuditPlan):
    """The plan's FP32 model, loaded once per process; raises ReferenceUnavailable when it
    cannot be had (the next shards of the same minute are told so without trying again)."""
    from distilq.quantize.checkpoint import load_model

    key = (plan.registry, plan.version)
    if key in _fp32_models:
        return _fp32_models[key]
    failed_at, error = _unavailable.get(key, (-math.inf, None))
    if time.monotonic() - failed_at < RETRY_SECONDS:
        raise error
    try:
        path = fetch_reference(plan.reference, plan.registry, plan.version)
        _fp32_models[key] = load_model(path)
    except (DistilqError, OSError) as e:
        error = e if isinstance(e, ReferenceUnavailable) else ReferenceUnavailable(str(e))
        _unavailable[key] = (time.monotonic(), error)
        raise error from None
    return _fp32_models[key]


class ShardSampler:
    """The audited rows of one shard, gathered while it is scored: those whose `audit_key`
    is below the sampling rate, at most the shard's cap (the smallest keys)."""

    def __init__(self, plan: AuditPlan, shard, id_columns: list[str]):
        self.plan, self.shard, self.id_columns = plan, shard, id_columns
        self.cap = plan.cap(shard.output)
        self._heap: list[tuple] = []  # (-key, row, ids, text, int8 probabilities)
        self._copies: dict[float, int] = {}  # key of a text in the heap -> its sampled copies

    def offer(self, batch, texts: list, errors: list, probs: np.ndarray, first_row: int) -> None:
        """Rows of one scored record batch (`first_row`: the first one's index in its file).
        A text is audited once, at its first row; its later copies are counted, not re-run."""
        for i, text in enumerate(texts):
            if errors[i] is not None:
                continue
            key = audit_key(text)
            if key >= self.plan.sampling_rate:
                continue
            if key in self._copies:
                self._copies[key] += 1
                continue
            item = (-key, first_row + i, self._ids(batch, i, first_row), text, probs[i].copy())
            if self.cap is None or len(self._heap) < self.cap:
                heapq.heappush(self._heap, item)
            elif self.cap and item > self._heap[0]:
                del self._copies[-heapq.heapreplace(self._heap, item)[0]]
            else:
                continue
            self._copies[key] = 0

    def _ids(self, batch, i: int, first_row: int) -> dict:
        if not self.id_columns:
            return {"file": self.shard.uri, "index": first_row + i}
        ids = {}
        for name in self.id_columns:
            if name in batch.schema.names:
                ids[name] = batch.column(name)[i].as_py()
            else:  # a hive partition value
                ids[name] = self.shard.partitions[name]
        return ids

    def audit(self, classifier, policy) -> tuple[ShardAudit, list[dict]]:
        """Run the sampled rows through FP32 in batches of their own; the shard's audit
        and one record per audited row. A FP32 model that cannot be had is said in the
        audit's reason (or raised, when the audit is required)."""
        from distilq.inference import predict

        items = sorted(self._heap, key=lambda item: item[1])  # file order
        if not items:
            return ShardAudit(), []
        start = time.perf_counter()
        try:
            model = fp32_model(self.plan)
        except ReferenceUnavailable as e:
            if self.plan.required:
                raise
            return ShardAudit(reason=str(e)), []
        texts = [item[3] for item in items]
        fp32 = predict(model, classifier.tokenizer, texts, policy).probs
        seconds = time.perf_counter() - start
        labels = classifier.labels
        records, flipped, keys = [], [], {}
        for (key, _, ids, text, int8), ref in zip(items, fp32, strict=True):
            a, b = int(ref.argmax()), int(int8.argmax())
            record = {
                **ids,
                "fp32_label": labels[a],
                "fp32_score": float(ref[a]),
                "int8_label": labels[b],
                "int8_score": float(int8[b]),
                "copies": self._copies[-key],  # other sampled rows with this text
                "shard": self.shard.output,
            }
            records.append(record)
            keys[text_key(-key)] = a == b
            if a != b:
                shown = text if len(text) <= TEXT_SHOWN else text[: TEXT_SHOWN - 3] + "..."
                copies = record["copies"]
                flipped.append(
                    {**_json_ids(ids), "text": shown, "copies": copies, **_scores(record)}
                )
        audit = ShardAudit(
            rows=len(records),
            agreeing=len(records) - len(flipped),
            copies=sum(self._copies.values()),
            texts=keys,
            flipped=flipped,
            seconds=seconds,
        )
        return audit, records


def _json_ids(ids: dict) -> dict:
    """A row's ids as the JSON of a manifest can hold them: timestamps and dates in ISO 8601,
    decimals as their digits, bytes as hex (`_audit.parquet` keeps them as they were)."""
    import datetime
    import decimal

    def safe(value):
        if isinstance(value, (datetime.date, datetime.time)):
            return value.isoformat()
        if isinstance(value, decimal.Decimal):
            return str(value)
        if isinstance(value, (bytes, bytearray)):
            return value.hex()
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return str(value)  # anything else Arrow gives (a duration, a list): its text

    return {name: safe(value) for name, value in ids.items()}


def _scores(record: dict) -> dict:
    keys = ("fp32_label", "fp32_score", "int8_label", "int8_score")
    return {k: record[k] for k in keys}
