"""Parameters of the `quantize_and_promote` flow: `QuantizeConfig`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from distilq.config.shared import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONFIDENCE,
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_PASS_PROBABILITY,
    DEFAULT_VALIDATION_ROWS,
    MLFLOW_TRACKING_URI_HELP,
    REGISTRY_HELP,
    AtLeastOne,
    BatchingPolicy,
    BatchSize,
    Confidence,
    Fraction,
    GateThresholds,
    MlflowModel,
    MlflowTrackingUri,
    RegistryRef,
    check_mlflow,
    default_source,
)
from distilq.recipes import DEFAULT_RECIPE, RECIPE_NAMES, recipe_problem

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


RecipeName = Literal[RECIPE_NAMES]  # type: ignore[valid-type]  (built from the registry)


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
    registry: RegistryRef = Field(None, description=REGISTRY_HELP)
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
        problem = recipe_problem(self.recipe)
        if problem:
            raise ValueError(problem)
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
