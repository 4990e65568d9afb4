"""Scoring one shard: stream its record batches through a classifier and write the scored
Parquet file whole (`output` holds the directory, `inputs` the shards)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distilq.config.score import ScoreConfig, ScoreOptions
from distilq.errors import InputError
from distilq.manifest import ShardAudit
from distilq.score.audit import AuditPlan, ShardSampler
from distilq.score.inputs import Shard, copied_to_output
from distilq.storage.parquet import open_parquet
from distilq.storage.store import Store


@dataclass
class ShardStats:
    """What scoring one shard did."""

    output: str
    rows_read: int = 0
    rows_written: int = 0
    rows_error: int = 0
    rows_truncated: int = 0
    seconds: float = 0.0
    labels: dict[str, int] = field(default_factory=dict)
    score_sum: float = 0.0
    audit: ShardAudit | None = None  # None: the audit is off
    audit_rows: list[dict] = field(default_factory=list)  # one per audited row


def options_for(config: ScoreConfig, registry, version: str) -> ScoreOptions:
    """Scoring options from a ScoreConfig and the model's validated batching policy.

    `--max-length` defaults to the policy's (at most the model's positions); a longer one
    than the model has positions for is refused here, before any file is scored.
    """
    batching = registry.manifest(version).recipe.batching
    positions = registry.model_config(version).get("max_position_embeddings")
    limit = batching.capped(positions).max_length
    if config.max_length is not None and positions and config.max_length > positions:
        raise InputError(
            f"--max-length {config.max_length} exceeds the {positions} token positions of model "
            f"{version}; use at most {positions} (longer texts are truncated and counted)"
        )
    return ScoreOptions(
        text_column=config.text_column,
        id_columns=config.id_columns,
        keep_text=config.keep_text,
        probabilities=config.probabilities,
        max_length=config.max_length or limit,
        batch_size=config.batch_size or batching.batch_size,
        sort_by_length=batching.sort_by_length,
        window_batches=config.window_batches,
        shard_rows=config.shard_rows,
    )


def score_window(
    classifier, values: list, options: ScoreOptions
) -> tuple[np.ndarray, list[str | None], int]:
    """Probabilities for the values (NaN rows where a value cannot be scored; rows sorted by
    length inside the window), the error of every row, and how many texts were truncated."""
    probs, errors, lengths = classifier.score(values, options.batching)
    return probs, errors, sum(n > options.max_length for n in lengths)


def top_labels(
    probs: np.ndarray, errors: list[str | None], labels: list[str]
) -> tuple[list[str | None], np.ndarray, np.ndarray]:
    """Per row: the most probable label (None where the value could not be scored), its
    probability (float32, NaN there) and whether the row could be scored."""
    best = np.nan_to_num(probs, nan=-1).argmax(axis=1)
    score = probs[np.arange(len(best)), best].astype(np.float32)
    ok = np.array([e is None for e in errors], dtype=bool)
    return [labels[b] if o else None for b, o in zip(best, ok, strict=True)], score, ok


class _ShardWriter:
    """The output columns of one shard, built batch by batch; counts what it wrote."""

    def __init__(
        self,
        classifier,
        shard: Shard,
        input_schema: pa.Schema,
        options: ScoreOptions,
        sampler: ShardSampler | None = None,
    ):
        self.classifier, self.shard, self.options = classifier, shard, options
        self.sampler = sampler
        self.labels = classifier.labels
        names = list(input_schema.names)
        names += [k for k in shard.partitions if k not in input_schema.names]
        self.kept = [c for c in names if copied_to_output(c, options)]
        self.read = [
            c for c in dict.fromkeys([*self.kept, options.text_column]) if c in input_schema.names
        ]
        self.schema = self._output_schema(input_schema)
        self.stats = ShardStats(shard.output)

    def _output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        fields = [input_schema.field(c) for c in self.kept if c in input_schema.names]
        fields += [pa.field(k, pa.string()) for k in self.kept if k not in input_schema.names]
        fields += [pa.field("label", pa.string()), pa.field("score", pa.float32())]
        if self.options.probabilities:
            fields += [pa.field(f"prob_{label}", pa.float32()) for label in self.labels]
        fields += [pa.field("model_version", pa.string()), pa.field("error", pa.string())]
        return pa.schema(fields)

    def table(self, batch: pa.RecordBatch, first_row: int) -> pa.Table:
        """The scored rows of one record batch (`first_row`: the index of its first row in
        the input file), in input order; the audit's sample taken from them."""
        n, options = batch.num_rows, self.options
        texts = batch.column(options.text_column).to_pylist()
        probs, errors, truncated = score_window(self.classifier, texts, options)
        if self.sampler:
            self.sampler.offer(batch, texts, errors, probs, first_row)
        columns = {}
        for name in self.kept:
            if name in batch.schema.names:
                columns[name] = batch.column(name)
            else:  # a hive partition value
                columns[name] = pa.array([self.shard.partitions[name]] * n, pa.string())
        best, score, ok = top_labels(probs, errors, self.labels)
        columns["label"] = pa.array(best, pa.string())
        columns["score"] = pa.array(score, pa.float32(), mask=~ok)
        if options.probabilities:
            for j, label in enumerate(self.labels):
                columns[f"prob_{label}"] = pa.array(probs[:, j], pa.float32(), mask=~ok)
        columns["model_version"] = pa.array([self.classifier.version] * n, pa.string())
        columns["error"] = pa.array(errors, pa.string())
        self._count(n, [b for b in best if b is not None], score[ok], truncated)
        return pa.Table.from_pydict(columns, schema=self.schema)

    def _count(self, n: int, labels: list[str], score: np.ndarray, truncated: int) -> None:
        stats = self.stats
        stats.rows_read += n
        stats.rows_written += n
        stats.rows_error += n - len(labels)
        stats.rows_truncated += truncated
        for label in labels:
            stats.labels[label] = stats.labels.get(label, 0) + 1
        stats.score_sum += float(score.sum())


def score_shard(
    classifier,
    shard: Shard,
    output_dir: str,
    options: ScoreOptions,
    on_progress: Callable[[int], None] | None = None,
    audit: AuditPlan | None = None,
) -> ShardStats:
    """Score one shard into `output_dir/<shard.output>`, streaming record batches; with an
    active `audit`, its sampled rows then go through FP32 (see `distilq.score.audit`).

    Rows keep their order. The file appears under its name only when complete (see
    `Store.staged_file`): a killed run leaves no partial output.
    """
    start = time.perf_counter()
    sampler = ShardSampler(audit, shard, options.id_columns) if audit and audit.active else None
    with open_parquet(shard.uri) as parquet, Store(output_dir).staged_file(shard.output) as sink:
        writer = _ShardWriter(classifier, shard, parquet.schema_arrow, options, sampler)
        groups = shard.row_groups or (0,)
        row = sum(parquet.metadata.row_group(i).num_rows for i in range(groups[0]))
        with pq.ParquetWriter(sink, writer.schema) as out:
            batches = parquet.iter_batches(
                batch_size=options.window_rows, row_groups=shard.row_groups, columns=writer.read
            )
            for batch in batches:
                out.write_table(writer.table(batch, row))
                row += batch.num_rows
                if on_progress:
                    on_progress(batch.num_rows)
        if sampler:  # before the file is committed: a shard is done with its audit
            writer.stats.audit, writer.stats.audit_rows = sampler.audit(
                classifier, options.batching
            )
    writer.stats.seconds = time.perf_counter() - start
    return writer.stats
