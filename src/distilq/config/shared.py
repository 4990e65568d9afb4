"""Settings every part shares: the bounds and defaults of every option, the batching policy,
the gate's thresholds, and where a run's source, registry and MLflow settings come from
when none are given."""

from __future__ import annotations

import importlib.util
import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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


# The registry: given, or when not (or given as null, as a deployment's parameters may)
# `default_registry()`, read when the config is made: on a worker, the worker's.
RegistryRef = Annotated[
    str | None,
    AfterValidator(lambda value: value or default_registry()),
    Field(validate_default=True),
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


REGISTRY_HELP = "Registry directory or fsspec URI (env DISTILQ_REGISTRY)"
