"""Parameters of the `score_parquet` flow (`ScoreConfig`) and the options one scoring run
resolves them to (`ScoreOptions`)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distilq.config.shared import (
    DEFAULT_AUDIT_MAX_ROWS,
    DEFAULT_AUDIT_RATE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_SHARD_ROWS,
    DEFAULT_WINDOW_BATCHES,
    MLFLOW_PREFIX,
    MLFLOW_TRACKING_URI_HELP,
    REGISTRY_HELP,
    AtLeastOne,
    BatchingPolicy,
    BatchSize,
    Fraction,
    MaxLength,
    MlflowTrackingUri,
    RegistryRef,
    check_mlflow_installed,
)


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ScoreConfig(BaseModel):
    """Parameters of `score_parquet` (a form in the Prefect UI, flags in the CLI: these
    fields are the one source of their defaults and help)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(
        min_length=1, description="Parquet file, directory, glob or fsspec URI; repeat for more"
    )
    output: str = Field(description="Directory or URI for the results and _manifest.json")
    text_column: str = Field("text", description="Column holding the texts")
    id_columns: list[str] = Field(
        default_factory=list,
        description="Keep only these input columns (repeat); default: all but the text",
    )
    keep_text: bool = Field(False, description="Keep the text column too")
    probabilities: bool = Field(False, description="Add prob_<label> for every class")
    model: str = Field(
        "production",
        description="Registry version or alias, or an MLflow model version mirrored from the "
        "registry: mlflow:NAME@ALIAS or mlflow:NAME/VERSION (with --mlflow-tracking-uri)",
    )
    registry: RegistryRef = Field(None, description=REGISTRY_HELP)
    batch_size: BatchSize | None = Field(
        None, description="Default: the batching policy the gate validated"
    )
    max_length: MaxLength | None = Field(
        None,
        description="Tokens; longer texts are truncated and counted (default: the model's "
        f"policy, {DEFAULT_MAX_LENGTH}, or fewer if the model has fewer positions; more than it "
        "has is refused)",
    )
    shard_rows: AtLeastOne = Field(
        DEFAULT_SHARD_ROWS, description="Files with more rows are split into shards by row group"
    )
    window_batches: AtLeastOne = Field(
        DEFAULT_WINDOW_BATCHES,
        description="Rows are sorted by length within windows of this many batches",
    )
    runner: Literal["local", "process", "dask"] = Field(
        "local", description="Where shards run: this process, a process pool, or Dask"
    )
    workers: int = Field(1, ge=1, le=256, description="Worker processes (process, dask)")
    threads: int = Field(
        default_factory=available_cores,
        ge=1,
        le=1024,
        description="Torch threads in all, split over workers; the default is the cores this "
        "process may use",
    )
    dask_address: str | None = Field(
        None, description="tcp://host:port of a running Dask scheduler (with --runner dask)"
    )
    overwrite: bool = Field(False, description="Replace an output holding other results")
    allow_unattested: bool = Field(
        False, description="Score even if the model fails its self-check on a worker's platform"
    )
    audit_rate: Fraction = Field(
        DEFAULT_AUDIT_RATE,
        description="Share of rows, chosen by a hash of the text, re-run through the FP32 "
        "model the version was gated against; 0 switches the audit off",
    )
    audit_max_rows: AtLeastOne | None = Field(
        DEFAULT_AUDIT_MAX_ROWS,
        description="At most this many rows audited in a whole output (the rate is lowered to fit)",
    )
    min_audit_agreement: Fraction | None = Field(
        None,
        description="The bar the audit judges (default: the version's min_agreement): "
        "certified when the lower bound of its agreement reaches it, failed when the upper "
        "bound is below it, consistent otherwise",
    )
    audit_fail_on: Literal["failed", "uncertified"] = Field(
        "failed",
        description="When the audit raises the alarm (exit 3, tag audit-failed, event): on "
        "evidence that the version is below the bar (failed), or whenever the sample cannot "
        "certify it (uncertified, the strict rule)",
    )
    require_audit: bool = Field(
        False,
        description="Refuse to score (exit 2) when the FP32 model cannot be had, instead of "
        "scoring without an audit",
    )
    mlflow_tracking_uri: MlflowTrackingUri = Field(
        None, description=MLFLOW_TRACKING_URI_HELP + ", for --model mlflow:..."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ScoreConfig:
        if self.model.startswith(MLFLOW_PREFIX):
            if not self.mlflow_tracking_uri:
                raise ValueError(f"--model {self.model} needs --mlflow-tracking-uri")
            check_mlflow_installed()
        if self.require_audit and self.audit_rate == 0:
            raise ValueError("--require-audit needs an --audit-rate above 0")
        if self.dask_address and self.runner != "dask":
            raise ValueError("--dask-address needs --runner dask")
        if self.dask_address and self.workers != 1:
            raise ValueError(
                f"--workers {self.workers} sizes the Dask cluster distilq starts; with "
                "--dask-address the scheduler's own workers run the shards: drop --workers "
                "(--threads is then each remote worker's torch threads)"
            )
        if self.runner == "local" and self.workers != 1:
            raise ValueError(
                "--runner local is one process; use --runner process or dask for workers"
            )
        if self.workers > self.threads:
            raise ValueError(
                f"--workers {self.workers} exceeds --threads {self.threads}: every worker needs a "
                "thread"
            )
        return self

    @property
    def threads_per_worker(self) -> int:
        """Torch threads per worker, so workers x threads never exceed `threads`."""
        return max(1, self.threads // self.workers)


class ScoreOptions(BaseModel):
    """What to read, what to write, and how to batch: a `ScoreConfig` resolved against the
    model's validated batching policy (`distilq.score.scoring.options_for`). Saved in the
    output manifest as `settings`; a run resumes an output only with the same options."""

    text_column: str = "text"
    id_columns: list[str] = Field(default_factory=list)
    keep_text: bool = False
    probabilities: bool = False
    max_length: MaxLength = DEFAULT_MAX_LENGTH
    batch_size: BatchSize = DEFAULT_BATCH_SIZE
    sort_by_length: bool = True
    window_batches: AtLeastOne = DEFAULT_WINDOW_BATCHES
    shard_rows: AtLeastOne = DEFAULT_SHARD_ROWS

    @property
    def window_rows(self) -> int:
        return self.batch_size * self.window_batches

    @property
    def batching(self) -> BatchingPolicy:
        return BatchingPolicy(**self.model_dump(include=set(BatchingPolicy.model_fields)))
