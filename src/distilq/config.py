"""Typed, validated configuration shared by the library, the tasks and the CLI."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

DEFAULT_SOURCE = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
DEFAULT_REGISTRY = "./registry"


class BatchingPolicy(BaseModel):
    """How rows are grouped into batches.

    Dynamic INT8 quantizes activations with one scale per batch, so outputs depend on which
    rows share a batch: the same policy must be used to validate and to score.
    """

    model_config = ConfigDict(frozen=True)

    batch_size: int = Field(32, ge=1, le=4096)
    sort_by_length: bool = True
    max_length: int = Field(512, ge=8, le=4096)


class GateThresholds(BaseModel):
    """What an INT8 candidate must reach to be promoted.

    With `confidence`, a set passes agreement when the one-sided Clopper-Pearson lower
    bound of its agreement reaches `min_agreement`; None (versions gated before bounds)
    compares the measured agreement itself.
    """

    model_config = ConfigDict(frozen=True)

    min_agreement: float = Field(0.99, ge=0, le=1)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    confidence: float | None = Field(0.95, gt=0, lt=1)


def _env_default(name: str, fallback: str):
    # Read when a config is made, never frozen at import time.
    return lambda: os.environ.get(name) or fallback


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


class QuantizeConfig(BaseModel):
    """Parameters of `quantize_and_promote` (a form in the Prefect UI, flags in the CLI)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        default_factory=_env_default("DISTILQ_SOURCE", DEFAULT_SOURCE),
        description="Hub id, local directory or fsspec URI of the FP32 checkpoint",
    )
    revision: str | None = Field(None, description="Hub revision (default main); hub sources only")
    recipe: Literal["auto", "dynamic-int8", "dynamic-int8-pc"] = "auto"
    validation: ValidationSpecs = Field(
        ["builtin:sst2-gate"],
        min_length=1,
        description="Validation sets, each a TSV/CSV/Parquet/JSONL file or URI, or a datasets "
        "spec NAME[:CONFIG][@SPLIT]; the gate holds each set to the thresholds",
    )
    text_column: str = "text"
    label_column: str | None = Field(None, description="Default: `label` when present")
    min_agreement: float = Field(0.99, ge=0, le=1)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    confidence: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Agreement passes when its lower bound at this "
        "confidence reaches min_agreement",
    )
    margin: float = Field(
        0.003,
        ge=0,
        le=0.5,
        description="auto: aims this far above the agreement that would just certify",
    )
    batch_size: int = Field(
        32, ge=1, le=4096, description="Batching policy used to validate and score"
    )
    registry: str = Field(default_factory=_env_default("DISTILQ_REGISTRY", DEFAULT_REGISTRY))
    dry_run: bool = Field(False, description="Validate and report; publish nothing")

    @field_validator("validation", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _target_reachable(self) -> QuantizeConfig:
        if self.min_agreement >= 1:
            raise ValueError("min_agreement 1 cannot be certified: a lower bound never reaches 1")
        if self.recipe == "auto" and self.min_agreement + self.margin > 1:
            raise ValueError(
                f"min_agreement {self.min_agreement} + margin {self.margin} exceeds 1: "
                "auto could never reach it; lower the margin"
            )
        return self

    @property
    def thresholds(self) -> GateThresholds:
        return GateThresholds(
            min_agreement=self.min_agreement,
            max_accuracy_drop=self.max_accuracy_drop,
            confidence=self.confidence,
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
    """Parameters of `score_parquet` (a form in the Prefect UI, flags in the CLI)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="Parquet files, directories, globs or URIs")
    output: str = Field(description="Directory or URI for scored files and _manifest.json")
    text_column: str = "text"
    id_columns: list[str] = Field(default_factory=list, description="Keep only these input columns")
    keep_text: bool = False
    probabilities: bool = Field(False, description="Add prob_<label> for every class")
    model: str = Field("production", description="Registry version or alias")
    registry: str = Field(default_factory=_env_default("DISTILQ_REGISTRY", DEFAULT_REGISTRY))
    batch_size: int | None = Field(None, ge=1, le=4096, description="Default: the model's policy")
    max_length: int | None = Field(
        None, ge=8, le=4096, description="Tokens; default: the model's policy (512) or its limit"
    )
    runner: Literal["local", "process", "dask"] = "local"
    workers: int = Field(1, ge=1, le=256)
    threads: int = Field(default_factory=available_cores, ge=1, le=1024)
    dask_address: str | None = Field(None, description="tcp://host:port of a Dask scheduler")
    overwrite: bool = False
    allow_unattested: bool = Field(
        False, description="Score even if the model fails its self-check on a worker's platform"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ScoreConfig:
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
