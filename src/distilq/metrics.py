"""What the gate measures: FP32-vs-INT8 metrics, overall and per validation set.

Plain pydantic models, no torch: the registry and the gate read them from manifests.
"""

from __future__ import annotations

from pydantic import BaseModel


class Flip(BaseModel):
    """An example whose predicted label differs between FP32 and INT8."""

    index: int
    text: str
    label: str | None  # the true label, when the validation set has labels
    fp32_label: str
    fp32_score: float
    int8_label: str
    int8_score: float


class SetMetrics(BaseModel):
    """Agreement and accuracy on one validation set (one `Part`)."""

    name: str
    n_examples: int
    agreement: float
    flips: int
    accuracy_fp32: float | None
    accuracy_int8: float | None
    accuracy_drop: float | None
    # At `Metrics.confidence`: what the agreement certifies, and the drop's two-sided range.
    agreement_lower_bound: float | None = None
    accuracy_drop_interval: tuple[float, float] | None = None


class Speed(BaseModel):
    """Rows/s of FP32 and INT8, warm: the best of interleaved passes over the same rows, so
    noise from other work on the machine hits both alike."""

    rows: int
    passes: int
    cpu: str  # model, the ISA features that matter, threads
    rows_per_second_fp32: float
    rows_per_second_int8: float


class Metrics(BaseModel):
    """How the INT8 model compares with FP32 on the same examples and batches.

    The top-level figures are over every example; `sets` has them per validation set, and
    the gate checks each set.
    """

    n_examples: int
    agreement: float
    flips: int
    flipped: list[Flip]
    accuracy_fp32: float | None
    accuracy_int8: float | None
    accuracy_drop: float | None
    mean_abs_prob_change: float  # of the probability of FP32's predicted class
    max_abs_prob_change: float
    latency_ms_per_batch_fp32: float
    latency_ms_per_batch_int8: float
    rows_per_second_fp32: float
    rows_per_second_int8: float
    sets: list[SetMetrics]
    confidence: float | None = None  # of the bounds below and in `sets`
    agreement_lower_bound: float | None = None  # the weakest set's
    speed: Speed | None = None  # where the rows/s figures came from; None: one cold pass
