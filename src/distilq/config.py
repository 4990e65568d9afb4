"""Typed, validated configuration shared by the library, the tasks and the CLI."""

from __future__ import annotations

import importlib.util
import os
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from distilq.quantize.recipes import DEFAULT_RECIPE, RECIPE_NAMES

DEFAULT_SOURCE = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
DEFAULT_REGISTRY = "./registry"

# Every bound and default below is declared once; the configs, the batching policy and the
# scoring options all take theirs from here.
BatchSize = Annotated[int, Field(ge=1, le=4096)]
MaxLength = Annotated[int, Field(ge=8, le=4096)]  # tokens, special tokens included
Fraction = Annotated[float, Field(ge=0, le=1)]
Confidence = Annotated[float, Field(gt=0, lt=1)]
AtLeastOne = Annotated[int, Field(ge=1)]
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_LENGTH = 512
DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_MAX_ACCURACY_DROP = 0.01
DEFAULT_CONFIDENCE = 0.95
DEFAULT_WINDOW_BATCHES = 32
DEFAULT_SHARD_ROWS = 200_000
DEFAULT_PASS_PROBABILITY = 0.9
# Rows drawn from a Parquet validation dataset: about 2,100 of them confirm, where 0.99 is
# certified at 95% with up to 13 flips.
DEFAULT_VALIDATION_ROWS = 3000
DEFAULT_AUDIT_RATE = 0.01
DEFAULT_AUDIT_MAX_ROWS = 10_000


class BatchingPolicy(BaseModel):
    """How rows are grouped into batches.

    Dynamic INT8 quantizes activations with one scale per batch, so outputs depend on which
    rows share a batch: the same policy must be used to validate and to score.
    """

    model_config = ConfigDict(frozen=True)

    batch_size: BatchSize = DEFAULT_BATCH_SIZE
    sort_by_length: bool = True
    max_length: MaxLength = DEFAULT_MAX_LENGTH

    def capped(self, positions: int | None) -> BatchingPolicy:
        """This policy with `max_length` at most the model's token positions (a longer text
        would overflow them); unchanged when the model does not say how many it has."""
        if not positions or positions >= self.max_length:
            return self
        return self.model_copy(update={"max_length": positions})


class GateThresholds(BaseModel):
    """What an INT8 candidate must reach to be promoted.

    With `confidence`, a set passes agreement when the one-sided Clopper-Pearson lower
    bound of its agreement reaches `min_agreement`; None (versions gated before bounds)
    compares the measured agreement itself.
    """

    model_config = ConfigDict(frozen=True)

    min_agreement: Fraction = DEFAULT_MIN_AGREEMENT
    max_accuracy_drop: Fraction = DEFAULT_MAX_ACCURACY_DROP
    confidence: Confidence | None = DEFAULT_CONFIDENCE
    check_accuracy: bool = True  # False: --no-accuracy-check, gated on agreement alone


def default_source() -> str:
    """The checkpoint a run uses when none is given: DISTILQ_SOURCE, else the hub model."""
    return os.environ.get("DISTILQ_SOURCE") or DEFAULT_SOURCE


def default_registry() -> str:
    """The registry used when none is given: DISTILQ_REGISTRY, else ./registry."""
    return os.environ.get("DISTILQ_REGISTRY") or DEFAULT_REGISTRY


# One validation spec or several: deployments made before sets could repeat, and Prefect's
# parameter forms, pass a single string; it is read as a list of one.
ValidationSpecs = Annotated[
    list[str],
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ]
        }
    ),
]


def _from_env(env: str):
    """An optional setting that, when not given (or given as null, as a deployment's
    parameters may), is the environment variable `env`, else None."""
    return Annotated[
        str | None,
        AfterValidator(lambda value: value or os.environ.get(env) or None),
        Field(validate_default=True),
    ]


MlflowTrackingUri = _from_env("DISTILQ_MLFLOW_TRACKING_URI")
MlflowModel = _from_env("DISTILQ_MLFLOW_MODEL")
MLFLOW_TRACKING_URI_HELP = (
    "MLflow tracking server (env DISTILQ_MLFLOW_TRACKING_URI); needs the mlflow extra"
)


MLFLOW_PREFIX = "mlflow:"  # `--model mlflow:NAME@ALIAS` or `mlflow:NAME/VERSION`
MLFLOW_MISSING = (
    "the MLflow mirror needs MLflow, which is not installed: pip install 'distilq[mlflow]'"
)


def check_mlflow(uri: str | None, model: str | None) -> None:
    """Refuse, before any work, MLflow settings that cannot work: a tracking URI without a
    model (or the other way round), or MLflow not installed."""
    if bool(uri) != bool(model):
        raise ValueError(
            "--mlflow-tracking-uri and --mlflow-model go together (env "
            "DISTILQ_MLFLOW_TRACKING_URI, DISTILQ_MLFLOW_MODEL): give both, or neither"
        )
    if uri:
        check_mlflow_installed()


def check_mlflow_installed() -> None:
    """Refuse MLflow settings where MLflow is not installed, naming the extra."""
    if importlib.util.find_spec("mlflow") is None:
        raise ValueError(MLFLOW_MISSING)


RecipeName = Literal[RECIPE_NAMES]  # type: ignore[valid-type]  (built from the registry)
REGISTRY_HELP = "Registry directory or fsspec URI (env DISTILQ_REGISTRY)"


class QuantizeConfig(BaseModel):
    """Parameters of `quantize_and_promote` (a form in the Prefect UI, flags in the CLI:
    these fields are the one source of their defaults and help)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        default_factory=default_source,
        description="Hub id, local directory or fsspec URI of the FP32 checkpoint "
        "(env DISTILQ_SOURCE)",
    )
    revision: str | None = Field(
        None, description="Hub revision: branch, tag or commit (default main); hub sources only"
    )
    recipe: RecipeName = Field(DEFAULT_RECIPE, description="How to quantize (see the recipes)")
    validation: ValidationSpecs = Field(
        ["builtin:sst2-gate"],
        min_length=1,
        description="Validation sets, each a TSV/CSV/JSONL file, a Parquet file, directory, "
        "glob or fsspec URI (hive partitions become columns), or a datasets spec "
        "NAME[:CONFIG][@SPLIT]; repeat to gate on several sets (say short sentences and long "
        "reviews): each must pass on its own. The default is GLUE SST-2 sentences shipped "
        "with distilq",
    )
    validation_rows: AtLeastOne | None = Field(
        None,
        description="Rows drawn from each validation set by a hash of the text, streamed "
        f"(default: {DEFAULT_VALIDATION_ROWS} from a Parquet dataset, every row of a file)",
    )
    text_column: str = Field("text", description="Text column of the validation data")
    label_column: str | None = Field(
        None, description="Label column; default: `label` when the data has one"
    )
    label_map: dict[str, str] = Field(
        default_factory=dict,
        description="DATA=MODEL,...: the model's class for each label of the data, e.g. "
        "neg=NEGATIVE,pos=POSITIVE (default: labels are matched to the model's by name, any "
        "case; integers are class ids when the data has as many classes as the model)",
    )
    no_accuracy_check: bool = Field(
        False,
        description="Ignore the data's labels and gate on agreement alone (when they cannot "
        "be placed in the model's classes)",
    )
    min_agreement: Fraction = Field(
        DEFAULT_MIN_AGREEMENT, description="Agreement with FP32 every set must certify"
    )
    max_accuracy_drop: Fraction = Field(
        DEFAULT_MAX_ACCURACY_DROP, description="Absolute; checked when the data has labels"
    )
    confidence: Confidence = Field(
        DEFAULT_CONFIDENCE,
        description="A set passes when the one-sided Clopper-Pearson lower bound of its "
        "agreement, at this confidence, reaches min-agreement",
    )
    pass_probability: Annotated[float, Field(gt=0, lt=1)] = Field(
        DEFAULT_PASS_PROBABILITY,
        description="auto keeps the fewest FP32 layers whose predicted probability of passing "
        "the gate on the confirmation part, from the tuning part's flips, is at least this",
    )
    batch_size: BatchSize = Field(
        DEFAULT_BATCH_SIZE,
        description="Batching policy for validation and scoring; rows are sorted by token length",
    )
    registry: str = Field(default_factory=default_registry, description=REGISTRY_HELP)
    dry_run: bool = Field(False, description="Validate and report; publish nothing")
    keep_reference: bool = Field(
        False,
        description="Copy the FP32 checkpoint into the version (hashed like the rest), for "
        "scoring audits on workers that cannot reach the source",
    )
    mlflow_tracking_uri: MlflowTrackingUri = Field(
        None,
        description=MLFLOW_TRACKING_URI_HELP + ": each published version is mirrored there, "
        "and MLflow's production alias follows distilq's",
    )
    mlflow_model: MlflowModel = Field(
        None, description="Registered model in MLflow (env DISTILQ_MLFLOW_MODEL)"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_margin(cls, data):
        if isinstance(data, dict) and "margin" in data:
            raise ValueError(
                "margin is gone: auto now aims at a predicted probability of passing the gate; "
                "set pass_probability (--pass-probability, default "
                f"{DEFAULT_PASS_PROBABILITY}) instead"
            )
        return data

    @field_validator("validation", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("label_map", mode="before")
    @classmethod
    def _pairs(cls, value):
        """`neg=NEGATIVE,pos=POSITIVE` as the CLI gives it, or a mapping."""
        if not isinstance(value, str):
            return value
        pairs = [[side.strip() for side in p.split("=")] for p in value.split(",") if p.strip()]
        if not pairs or any(len(p) != 2 or "" in p for p in pairs):
            raise ValueError(f"--label-map wants DATA=MODEL pairs separated by commas: {value!r}")
        return dict(pairs)

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.min_agreement >= 1:
            raise ValueError("--min-agreement 1 cannot be certified: a lower bound never reaches 1")
        if self.no_accuracy_check and (self.label_map or self.label_column):
            raise ValueError(
                "--no-accuracy-check ignores labels: drop --label-map and --label-column, or it"
            )
        check_mlflow(self.mlflow_tracking_uri, self.mlflow_model)
        return self

    @property
    def thresholds(self) -> GateThresholds:
        return GateThresholds(
            min_agreement=self.min_agreement,
            max_accuracy_drop=self.max_accuracy_drop,
            confidence=self.confidence,
            check_accuracy=not self.no_accuracy_check,
        )

    @property
    def batching(self) -> BatchingPolicy:
        return BatchingPolicy(batch_size=self.batch_size)


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
    registry: str = Field(default_factory=default_registry, description=REGISTRY_HELP)
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
        description="The audit fails (exit 3) when the lower bound of its agreement is below "
        "this (default: the version's min_agreement)",
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
