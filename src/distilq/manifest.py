"""The manifests everything else reads, typed: a registry version's `manifest.json` and a
scored output's `_manifest.json`.

Each carries `schema_version`. `read_version_manifest` and `read_output_manifest` are the one
way in: they upgrade what older distilq versions wrote (fields added since get the meaning
they had then) and refuse what a newer distilq wrote. Writers build these models and dump
them; nobody reads a manifest by string keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distilq.config.shared import BatchingPolicy, GateThresholds
from distilq.errors import IntegrityError
from distilq.metrics import Metrics, SetMetrics

VERSION_SCHEMA = 2  # 1: before schema versions (certified gate, platforms, split optional)
OUTPUT_SCHEMA = 1


class _Record(BaseModel):
    # Fields an older or newer writer added are kept, not refused: reading never fails on
    # them, and they are dumped again as read.
    model_config = ConfigDict(extra="allow")


class SourceRecord(_Record):
    """Where the FP32 checkpoint came from."""

    id: str
    kind: str
    revision: str
    sha256: dict[str, str]


class LayerSensitivity(BaseModel):
    """Effect of quantizing one Linear layer alone, on the examples nearest the boundary."""

    layer: str
    flips: int
    mean_abs_prob_change: float


class Attempt(BaseModel):
    """One candidate tried by a fallback recipe, on the tuning part: which layers stayed
    FP32, what it reached, how likely it was to pass the gate, and its bytes on disk (the
    last three are None in versions made before the pass-probability rule)."""

    fp32_layers: list[str]
    agreement: float  # on the weakest validation set
    rows_per_second: float
    tuning_flips: int | None = None  # over every set's tuning part
    predicted_pass_probability: float | None = None
    size_bytes: int | None = None  # of the INT8 weights file it would ship
    recipe: str | None = None  # the recipe it quantized by (None: the record's base)


# How `auto` chose before the pass-probability rule (read in old manifests only).
MARGIN_RULE = (
    "margin: the first attempt whose agreement on the tuning part reaches target_agreement, "
    "the agreement that just certifies the gate on the confirmation part plus a margin"
)


class FallbackRecord(BaseModel):
    """How a fallback recipe (`auto`) chose its FP32 layers: by `rule`, aiming at
    `pass_probability` (or, in versions made before it, at `target_agreement`)."""

    rule: str = MARGIN_RULE
    pass_probability: float | None = None
    target_agreement: float | None = None
    reached_target: bool | None
    sensitivity: list[LayerSensitivity]
    attempts: list[Attempt]
    base: str | None = None  # the recipe it started from (None: dynamic-int8-pc, before)
    base_reason: str | None = None  # why, on the CPU it ran on


class OnnxRecord(_Record):
    """What runs an ONNX Runtime version, as the gate ran it: the graph, how it was made,
    and the session options scoring opens it with."""

    onnxruntime: str
    opset: int
    graph_sha256: str
    exporter: str
    execution_provider: str
    optimization_level: str
    disabled_optimizers: list[str]
    signed_weights: bool  # uint8 x int8 products (VNNI) or uint8 x uint8 (exact anywhere)


class RecipeRecord(_Record):
    """How the INT8 model was made, and the batching policy it was validated with."""

    name: str
    engine: str
    per_channel: bool
    int8_embeddings: bool
    fp32_layers: list[str]
    batching: BatchingPolicy
    activations: str = "per-tensor"  # or "per-token"
    auto: FallbackRecord | None = None
    # Whether a row's answer is the same in any batch (None: made before it was recorded;
    # read `rows_independent`).
    batch_independent: bool | None = None
    onnx: OnnxRecord | None = None  # engine onnxruntime only

    @property
    def rows_independent(self) -> bool:
        """Whether a row's answer is the same in any batch. For versions made before it was
        recorded: per-token with no FP32 layer was; FP32 layers then ran torch's float GEMM,
        whose sums depend on the rows per call."""
        if self.batch_independent is not None:
            return self.batch_independent
        return self.activations == "per-token" and not self.fp32_layers


class DrawnRecord(BaseModel):
    """How a validation set's rows were drawn from a larger source (a Parquet dataset)."""

    rule: str
    rows_read: int
    files: dict[str, dict[str, Any]]  # file -> size and mtime or ETag, as read
    rows_without_text: int = 0  # of rows_read: null or blank texts, skipped


class SetRecord(_Record):
    """One validation set: its size (the rows drawn, when drawn), and how much of it the
    gate confirmed on."""

    name: str
    n_examples: int
    sha256: str
    n_confirmation: int | None = None
    drawn: DrawnRecord | None = None  # None: every row of its source


class SplitRecord(BaseModel):
    """How the validation set was split into tuning and confirmation parts."""

    rule: str
    tuning: int  # rows on the tuning side (copies of a text there included)
    confirmation: int  # distinct texts the gate confirmed on
    confirmation_copies: int = 0  # rows left out of it as copies of a text counted already


class ValidationRecord(_Record):
    """The validation data the gate measured on."""

    name: str
    sha256: str
    labels: bool
    sets: list[SetRecord] = Field(default_factory=list)
    split: SplitRecord | None = None  # None: tuned and measured on the same rows


class VersionMetrics(Metrics):
    """The gate's metrics and the bytes on disk of both models' weight files."""

    size_bytes_fp32: int
    size_bytes_int8: int


class Decision(BaseModel):
    """Whether a candidate may be promoted, with the numbers behind it."""

    approved: bool
    reasons: list[str]
    thresholds: GateThresholds


class PlatformRecord(_Record):
    """Where INT8 outputs were measured (see `distilq.hardware.platform_record`)."""

    architecture: str
    vendor: str
    cpu: str
    features: list[str]
    torch_cpu_capability: str
    quantized_engine: str
    torch: str
    key: str
    onnxruntime: str | None = None  # engine onnxruntime only: MLAS picks kernels by ISA


class VersionManifest(_Record):
    """A registry version: what it is made of, how it was gated, and every file's sha256."""

    schema_version: int = VERSION_SCHEMA
    version: str
    created_at: str
    run_key: str
    source: SourceRecord
    recipe: RecipeRecord
    validation: ValidationRecord
    metrics: VersionMetrics
    decision: Decision
    software: dict[str, str]
    platform: PlatformRecord | None = None  # None: published before platforms were recorded
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256

    def dump(self) -> dict[str, Any]:
        """The JSON-ready form that is written and printed."""
        return self.model_dump(mode="json")


def read_version_manifest(data: dict, where: str = "manifest") -> VersionManifest:
    """A version manifest as any distilq version wrote it, upgraded to this schema."""
    schema = data.get("schema_version", 1)
    if not isinstance(schema, int) or schema > VERSION_SCHEMA:
        raise IntegrityError(
            f"{where}: schema_version {schema!r} is newer than this distilq reads "
            f"({VERSION_SCHEMA}); upgrade distilq"
        )
    if schema == 1:
        data = _upgrade_version_1(data)
    try:
        return VersionManifest.model_validate(data)
    except ValueError as e:
        raise IntegrityError(f"{where} is not a distilq version manifest: {e}") from e


def _upgrade_version_1(data: dict) -> dict:
    """Schema 1 (no `schema_version`): thresholds had no confidence (the gate compared the
    measured agreement), and the oldest versions had no per-set metrics."""
    data = {**data, "schema_version": VERSION_SCHEMA}
    decision = dict(data.get("decision", {}))
    decision["thresholds"] = {"confidence": None, **decision.get("thresholds", {})}
    data["decision"] = decision
    metrics = dict(data.get("metrics", {}))
    if not metrics.get("sets"):  # one set: the whole validation set
        fields = {k: metrics.get(k) for k in SetMetrics.model_fields if k != "name"}
        metrics["sets"] = [{**fields, "name": data.get("validation", {}).get("name", "validation")}]
    data["metrics"] = metrics
    return data


class ShardAudit(BaseModel):
    """The audit of one shard: its sampled rows re-run in FP32 (`rows`, of which `agreeing`
    kept their label), the rows that flipped, or why it was not audited."""

    rows: int = 0  # distinct texts: a copy of a text is no new evidence (one row, one answer)
    agreeing: int = 0
    copies: int = 0  # sampled rows that were copies of a text counted already
    texts: dict[str, bool] = Field(default_factory=dict)  # text key -> it agreed (pooling)
    flipped: list[dict[str, Any]] = Field(default_factory=list)  # ids, text cut, both labels
    reason: str | None = None  # not audited: why
    seconds: float = 0.0  # loading FP32 and running the sampled rows through it


Verdict = Literal["certified", "consistent", "failed", "too few rows"]


class AuditFigures(BaseModel):
    """What an audit measured and concluded: `agreeing` of `rows` distinct texts kept their
    FP32 label, both bounds at `confidence`, and the `verdict` against `threshold`:
    `certified` (the lower bound reaches it), `failed` (the upper bound is below it: evidence
    that the version agrees less often than promised), `consistent` (neither bound decides),
    `too few rows` (even with no flip the lower bound could not reach it), None when not
    audited. `passed` is kept for readers of records written before verdicts: True for
    certified, False for failed, None otherwise (then it meant: the lower bound is below)."""

    rows: int
    agreeing: int
    agreement: float | None
    agreement_lower_bound: float | None
    confidence: float
    threshold: float
    passed: bool | None
    reason: str | None = None
    agreement_upper_bound: float | None = None  # None: written before verdicts
    verdict: Verdict | None = None
    copies: int = 0  # audited rows that were copies of a text counted already


class AuditRecord(AuditFigures):
    """The FP32 audit of an output (its manifest's `audit`), pooled over every shard in it."""

    rate: float  # as asked; `sampling_rate` is lower when --audit-max-rows capped it
    sampling_rate: float
    max_rows: int | None
    fail_on: Literal["failed", "uncertified"] = "failed"  # --audit-fail-on

    @property
    def alarm(self) -> bool:
        """Whether the run raises the alarm (exit 3, the tag, the event): on `failed`, or with
        `--audit-fail-on uncertified` on anything but `certified` that had rows enough.
        A record written before verdicts alarmed when `passed` was False."""
        if self.verdict is None:
            return self.passed is False
        return self.verdict == "failed" or (
            self.fail_on == "uncertified" and self.verdict == "consistent"
        )

    reference: str | None = None  # where the FP32 model came from
    flipped: list[dict[str, Any]] = Field(default_factory=list)
    file: str | None = None  # the audited rows, one per row (`_audit.parquet`)
    seconds: float = 0.0  # what the audit cost: FP32 loaded and run, over every shard


class RunAudit(AuditFigures):
    """`versions/<v>/audits/<run-id>.json`: one scoring run's audit of an output. The
    figures are the output's, pooled as the run ended; `run_rows` / `run_agreeing` are the
    rows this run audited itself (a resume's earlier rows are the earlier run's)."""

    model_config = ConfigDict(extra="allow")  # as every record: newer fields are kept

    run_id: str
    created_at: str
    model_version: str
    output: str
    run_rows: int
    run_agreeing: int
    # Every distinct text of the output's audit (key -> agreed), so the live record counts
    # a text once over all runs; None: written before, counted by its run_rows.
    texts: dict[str, bool] | None = None


class ShardRecord(_Record):
    """A scored shard in an output: its input, which rows, and what scoring it did."""

    input: str
    identity: dict[str, Any]  # size and mtime or ETag of the input, to recognise it on resume
    row_groups: list[int] | None
    rows_read: int
    rows_written: int
    rows_error: int
    rows_truncated: int
    seconds: float
    labels: dict[str, int]
    score_sum: float
    audit: ShardAudit | None = None  # None: scored with the audit off (or before audits)


class ScoreSummary(BaseModel):
    """Totals over every shard in an output (this run's or before); `seconds` is the last
    run's wall time, and the `*_scored` / `*_skipped` counts say what the last run did:
    shards it scored, and shards it found already done (a resume)."""

    model_version: str
    output: str
    files: int
    failed: dict[str, str]
    rows_read: int
    rows_written: int
    rows_error: int
    rows_truncated: int
    labels: dict[str, int]
    mean_score: float | None
    seconds: float
    files_scored: int = 0
    rows_scored: int = 0
    files_skipped: int = 0
    rows_skipped: int = 0
    audit: AuditRecord | None = None


class OutputRecord(_Record):
    """`_manifest.json` of a scored output: the model, the settings, the shards done."""

    schema_version: int = OUTPUT_SCHEMA
    model_version: str
    settings: dict[str, Any]  # ScoreOptions as used; another run must use the same
    shards: dict[str, ShardRecord] = Field(default_factory=dict)
    failed: dict[str, str] = Field(default_factory=dict)  # input (or shard) -> why
    summary: ScoreSummary | None = None
    audit: AuditRecord | None = None


def read_output_manifest(data: dict, where: str) -> OutputRecord:
    """An output manifest as any distilq version wrote it (they had no schema_version)."""
    schema = data.get("schema_version", OUTPUT_SCHEMA)
    if not isinstance(schema, int) or schema > OUTPUT_SCHEMA:
        raise IntegrityError(
            f"{where}: schema_version {schema!r} is newer than this distilq reads; upgrade distilq"
        )
    return OutputRecord.model_validate(data)
