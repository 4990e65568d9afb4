"""A scoring run's output directory: scored `*.parquet` files, `_manifest.json` and, when
rows were audited, `_audit.parquet` (see `distilq.score.audit`).

A shard's file appears under its final name by one rename (or one upload), after it is
complete; the manifest records which shards are done, from which inputs, with which model
version and settings, so an interrupted run resumes where it stopped. Files distilq did not
write there are never removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import pyarrow as pa

from distilq.errors import DistilqError, InputError, IntegrityError
from distilq.manifest import OutputRecord, ScoreSummary, ShardRecord, read_output_manifest
from distilq.score.audit import AUDIT_FILE, AuditPlan
from distilq.score.evidence import pooled
from distilq.score.inputs import Plan, Shard
from distilq.storage.lease import LEASE_SECONDS, s3_lease
from distilq.storage.store import Store, WriteConflict, temporary_prefix

log = logging.getLogger("distilq")

MANIFEST = "_manifest.json"
LOCK = "_lock.json"  # an S3 output's lease, held by the run writing it


class ManifestNotSaved(DistilqError):
    """`_manifest.json` could not be written (a full disk, a read-only mount)."""


class OutputManifest:
    """`_manifest.json` of one output, read once and saved after every change."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.store = Store(output_dir)
        self.record: OutputRecord | None = None  # None: no manifest there yet
        self.token: str | None = None  # S3: the ETag of the manifest we last read or wrote
        self.audit_rows: dict[str, list[dict]] = {}  # shard -> its rows in _audit.parquet

    def load(self) -> OutputRecord | None:
        """Read the manifest (None if there is none); refuse one distilq did not write."""
        content, self.token = self.store.read_for_update(MANIFEST)
        where = f"{self.output_dir}/{MANIFEST}"
        try:
            data = json.loads(content) if content else None
            self.record = None if not data else read_output_manifest(data, where)
        except (ValueError, IntegrityError, AttributeError) as e:
            raise InputError(
                f"{where} is not a distilq output manifest (damaged or foreign: {e}); distilq "
                "will not write there. Choose another --output"
            ) from None
        return self.record

    def save(self) -> None:
        """Write atomically. On S3 the write is conditional: a manifest another run changed
        since we read it is never overwritten."""
        content = (json.dumps(self.record.model_dump(), indent=2, sort_keys=True) + "\n").encode()
        try:
            self.token = self.store.write_if_unchanged(MANIFEST, content, self.token)
        except WriteConflict:
            raise InputError(
                f"output {self.output_dir}: another run changed {MANIFEST} while this one was "
                "writing; two runs must not write to one output at once"
            ) from None
        except OSError as e:
            raise ManifestNotSaved(
                f"could not save {self.output_dir}/{MANIFEST} ({e.strerror or e}); the scored "
                "files are kept, and a re-run once this is fixed rewrites those it did not "
                "record"
            ) from e

    def record_shard(self, shard: Shard, stats) -> None:
        """Mark a shard done (`stats`: its `ShardStats`) and save; its audited rows go to
        `_audit.parquet` first, and only once they are there is the shard recorded (rows of
        a shard the manifest does not list are replaced when it is scored again)."""
        before = self.audit_rows.get(shard.output)
        if stats.audit_rows or before:
            if stats.audit_rows:
                self.audit_rows[shard.output] = stats.audit_rows
            else:
                del self.audit_rows[shard.output]
            try:
                self._save_audit_rows()
            except OSError as e:  # unrecorded, on disk and here: a re-run redoes the shard
                if before is None:
                    self.audit_rows.pop(shard.output, None)
                else:
                    self.audit_rows[shard.output] = before
                raise ManifestNotSaved(
                    f"could not save {self.output_dir}/{AUDIT_FILE} ({e.strerror or e}); "
                    "a re-run once this is fixed rewrites the files it did not record"
                ) from e
        self.record.failed.pop(shard.name, None)
        fields = {k: v for k, v in asdict(stats).items() if k not in ("output", "audit_rows")}
        self.record.shards[shard.output] = ShardRecord(
            input=shard.uri,
            identity=shard.identity,
            row_groups=list(shard.row_groups) if shard.row_groups is not None else None,
            **fields,
        )
        self.save()

    def load_audit_rows(self) -> None:
        """The audited rows of the shards the manifest lists, from `_audit.parquet`."""
        import pyarrow.parquet as pq

        self.audit_rows = {}
        if not self.store.exists(AUDIT_FILE):
            return
        try:
            rows = pq.read_table(pa.BufferReader(self.store.read(AUDIT_FILE))).to_pylist()
        except (OSError, pa.ArrowException) as e:
            where = f"{self.output_dir}/{AUDIT_FILE}"
            log.warning("%s is unreadable (%s); it is written anew", where, e)
            return
        for row in rows:
            if row.get("shard") in self.record.shards:
                self.audit_rows.setdefault(row["shard"], []).append(row)

    def _save_audit_rows(self) -> None:
        import pyarrow.parquet as pq

        rows = [row for name in sorted(self.audit_rows) for row in self.audit_rows[name]]
        if not rows:
            self.store.remove(AUDIT_FILE)
            return
        # Every column of every row (rows audited before a column was added lack it):
        # from_pylist would keep only the first row's.
        columns = dict.fromkeys(key for row in rows for key in row)
        table = pa.Table.from_pydict({c: [row.get(c) for row in rows] for c in columns})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.store.write_atomic(AUDIT_FILE, sink.getvalue().to_pybytes())

    def record_failure(self, name: str, error: str) -> None:
        """Record an input file (or shard of one, by `Shard.name`) that failed, and save."""
        self.record.failed[name] = error
        self.save()

    def finalize(
        self, seconds: float, this_run: set[str], audit: AuditPlan | None = None
    ) -> ScoreSummary:
        """Totals over every shard scored into this output (this run or before), also saved
        as `summary`, with the audit pooled over them by `audit`'s bar; `seconds` is this
        run's wall time, `this_run` the shards (by output name) it set out to score: the
        others were skipped, already done."""
        shards = self.record.shards.values()
        scored = [s for name, s in self.record.shards.items() if name in this_run]
        skipped = [s for name, s in self.record.shards.items() if name not in this_run]
        labels: Counter[str] = Counter()
        for s in shards:
            labels.update(s.labels)
        labelled = sum(labels.values())
        by_name = [self.record.shards[name] for name in sorted(self.record.shards)]
        summary = ScoreSummary(
            model_version=self.record.model_version,
            output=self.output_dir,
            files=len(self.record.shards),
            failed=dict(self.record.failed),
            rows_read=sum(s.rows_read for s in shards),
            rows_written=sum(s.rows_written for s in shards),
            rows_error=sum(s.rows_error for s in shards),
            rows_truncated=sum(s.rows_truncated for s in shards),
            labels=dict(sorted(labels.items())),
            mean_score=(sum(s.score_sum for s in shards) / labelled) if labelled else None,
            seconds=round(seconds, 3),
            files_scored=len(scored),
            rows_scored=sum(s.rows_written for s in scored),
            files_skipped=len(skipped),
            rows_skipped=sum(s.rows_written for s in skipped),
            audit=pooled(by_name, audit) if audit else None,
        )
        self.record.summary, self.record.audit = summary, summary.audit
        self.save()
        return summary


def is_temporary(name: str) -> bool:
    """A shard or manifest file a killed run left half-written (see `Store.staged_file`)."""
    ours = name.startswith(temporary_prefix(MANIFEST)) or ".parquet." in name
    return name.startswith(".") and name.endswith(".tmp") and ours


def prepare_output(
    output_dir: str, plan: Plan, model_version: str, settings: dict, overwrite: bool
) -> tuple[OutputManifest, list[Shard]]:
    """Check the output directory against this run, save its manifest, and return it with
    the shards still to score.

    Refuses results of another model version, other inputs or other settings unless
    `overwrite`, which removes them. Files distilq did not write there (not in
    `_manifest.json`) are never removed: an output holding any is refused, overwrite or not.
    """
    manifest = OutputManifest(output_dir)
    existing = manifest.load()
    files = manifest.store.list()
    problems = _check_output(output_dir, files, existing, plan, model_version, settings, overwrite)
    store = manifest.store
    store.makedirs()
    for name in files:
        if is_temporary(name) or ((problems or overwrite) and name not in (MANIFEST, LOCK)):
            store.remove(name)
    manifest.record = OutputRecord(
        model_version=model_version,
        settings=settings,
        shards=_still_done(store, existing, problems, overwrite),
    )
    manifest.load_audit_rows()
    manifest.save()
    return manifest, [s for s in plan.shards if s.output not in manifest.record.shards]


def pending_shards(
    output_dir: str, plan: Plan, model_version: str, settings: dict, overwrite: bool
) -> list[Shard]:
    """The shards a run would score, read without changing anything: those this model has
    not scored into the output yet with these inputs and settings (all of them if the output
    holds anything else and `overwrite`). Refuses what `prepare_output` refuses."""
    manifest = OutputManifest(output_dir)
    existing = manifest.load()
    files = manifest.store.list()
    problems = _check_output(output_dir, files, existing, plan, model_version, settings, overwrite)
    done = _still_done(manifest.store, existing, problems, overwrite)
    return [s for s in plan.shards if s.output not in done]


def _still_done(
    store: Store, existing: OutputRecord | None, problems: list[str], overwrite: bool
) -> dict[str, ShardRecord]:
    """The shards recorded done whose files are still there; none if the results there are
    to be replaced."""
    if problems or overwrite or existing is None:
        return {}
    return {name: shard for name, shard in existing.shards.items() if store.exists(name)}


def _check_output(
    output_dir: str,
    files: list[str],
    existing: OutputRecord | None,
    plan: Plan,
    model_version: str,
    settings: dict,
    overwrite: bool,
) -> list[str]:
    """Refuse an output this run must not write to; return why its results cannot be
    resumed (to be replaced: `overwrite` is set)."""
    _refuse_foreign_files(output_dir, files, existing, plan)
    problems = _conflicts(existing, plan, model_version, settings)
    if problems and not overwrite:
        raise InputError(
            f"output {output_dir}: {'; '.join(problems)}. Use another --output, or --overwrite "
            "to replace distilq's results there"
        )
    return problems


def _refuse_foreign_files(
    output_dir: str, files: list[str], existing: OutputRecord | None, plan: Plan
) -> None:
    # A distilq output's own files: recorded shards, and shards of this plan that a killed
    # run finished but had not recorded yet.
    ours = set()
    if existing:
        ours = set(existing.shards) | {s.output for s in plan.shards} | {AUDIT_FILE}
    own = (MANIFEST, LOCK)
    foreign = [f for f in files if f not in own and f not in ours and not is_temporary(f)]
    if foreign:
        raise InputError(
            f"output {output_dir} holds files distilq did not write there "
            f"({', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}); distilq "
            "never removes them, not even with --overwrite. Choose another --output"
        )


def _conflicts(
    existing: OutputRecord | None, plan: Plan, model_version: str, settings: dict
) -> list[str]:
    """Why the results already there cannot be resumed by this run."""
    if existing is None:
        return []
    problems = []
    if existing.model_version != model_version:
        problems.append(f"it holds results of model version {existing.model_version}")
    recorded = dict(existing.settings)
    asked = {k: v for k, v in settings.items() if k != "audit" or "audit" in recorded}
    audit_then, audit_now = recorded.pop("audit", None), asked.pop("audit", None)
    if recorded != asked:
        problems.append("it was written with other settings (columns, batching or max length)")
    elif audit_then != audit_now:  # (outputs written before audit settings were kept: none)
        problems.append(
            f"it was audited with other settings ({_audit_settings(audit_then)}; this run: "
            f"{_audit_settings(audit_now)})"
        )
    wanted = {s.output: s for s in plan.shards}
    for name, entry in existing.shards.items():
        shard = wanted.get(name)
        if shard is None or entry.input != shard.uri or entry.identity != shard.identity:
            problems.append(f"{name} comes from another input ({entry.input})")
            break
    return problems


def refuse_if_locked(output_dir: str) -> None:
    """Refuse now, before a model is loaded, an output another run holds (`output_lock`);
    an output that does not exist yet is held by no one, and is not created here."""
    if Store(output_dir).exists():
        with output_lock(output_dir):
            pass


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Refuse a second run writing to the same output directory at the same time, before
    it changes anything there (its `--overwrite` removals, `_audit.parquet`): on disk by
    flock, on S3 by a lease (`_lock.json`, see `distilq.storage.lease`). The manifest's
    conditional writes stay the backstop (`OutputManifest.save`)."""
    store = Store(output_dir)
    if store.protocol == "s3":
        hold, how = (
            s3_lease(store, LOCK),
            f" (its lease {LOCK} expires {LEASE_SECONDS} s after it stops)",
        )
    else:
        hold, how = store.lock("", wait=False), ""
    with hold as held:
        if not held:
            raise InputError(
                f"output {output_dir} is being written by another distilq run{how}; wait "
                "for it or choose another --output"
            )
        yield


def _audit_settings(settings: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(settings.items()))
