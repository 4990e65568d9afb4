"""FP32 against INT8: agreement, accuracies, flips, and both models' warm speed."""

from __future__ import annotations

import numpy as np

from distilq.config.shared import BatchingPolicy
from distilq.gate.data import ValidationSet
from distilq.gate.stats import agreement_lower_bound, paired_difference_interval
from distilq.inference import Predictions, predict, token_lengths
from distilq.metrics import Flip, Metrics, SetMetrics, Speed


def best_rows_per_second(
    models: dict, tokenizer, texts: list[str], policy: BatchingPolicy, passes: int = 3
) -> dict[str, float]:
    """Best of `passes` interleaved timed passes per model, so machine noise hits all alike
    and the first, cold pass does not count."""
    lengths = token_lengths(tokenizer, texts, policy.max_length)
    best = dict.fromkeys(models, 0.0)
    for _ in range(passes):
        for name, model in models.items():
            pred = predict(model, tokenizer, texts, policy, lengths=lengths)
            best[name] = max(best[name], len(texts) / pred.seconds)
    return best


def measure_speed(
    fp32_model, int8_model, tokenizer, texts: list[str], policy: BatchingPolicy, rows: int = 256
) -> Speed:
    """Warm rows/s of both models on an even sample of `texts` (every set represented)."""
    from distilq.hardware import describe_cpu

    sample = texts[:: max(1, len(texts) // rows)][:rows]
    passes = 3
    best = best_rows_per_second(
        {"fp32": fp32_model, "int8": int8_model}, tokenizer, sample, policy, passes
    )
    return Speed(
        rows=len(sample),
        passes=passes,
        cpu=describe_cpu(),
        rows_per_second_fp32=best["fp32"],
        rows_per_second_int8=best["int8"],
    )


def set_metrics(
    name: str, a: np.ndarray, b: np.ndarray, truth: np.ndarray | None, confidence: float | None
) -> SetMetrics:
    """Agreement and accuracies of FP32 labels `a` and INT8 labels `b` against `truth`, with
    the agreement's lower bound and the drop's interval at `confidence`."""
    n, agree = len(a), int((a == b).sum())
    accuracy_fp32 = accuracy_int8 = drop = interval = None
    if truth is not None:
        correct_fp32, correct_int8 = int((a == truth).sum()), int((b == truth).sum())
        accuracy_fp32, accuracy_int8 = correct_fp32 / n, correct_int8 / n
        drop = (correct_fp32 - correct_int8) / n  # from counts, so 0.01 is exactly 0.01
        if confidence:
            only_fp32 = int(((a == truth) & (b != truth)).sum())
            only_int8 = int(((b == truth) & (a != truth)).sum())
            interval = paired_difference_interval(only_fp32, only_int8, n, confidence)
    return SetMetrics(
        name=name,
        n_examples=n,
        agreement=agree / n,
        flips=n - agree,
        accuracy_fp32=accuracy_fp32,
        accuracy_int8=accuracy_int8,
        accuracy_drop=drop,
        agreement_lower_bound=agreement_lower_bound(agree, n, confidence) if confidence else None,
        accuracy_drop_interval=interval,
    )


def set_flips(fp32: Predictions, int8: Predictions, validation: ValidationSet) -> list[int]:
    """How many labels the two models disagree on, in each validation set."""
    a, b = fp32.labels, int8.labels
    return [int((a[p.start : p.stop] != b[p.start : p.stop]).sum()) for p in validation.slices()]


def _flips(
    fp32: Predictions, int8: Predictions, validation: ValidationSet, id2label: dict[int, str]
) -> list[Flip]:
    """Every example whose label differs between the two models, with both scores."""
    a, b = fp32.labels, int8.labels
    return [
        Flip(
            index=int(i),
            text=validation.texts[i],
            label=None if validation.labels is None else id2label[validation.labels[i]],
            fp32_label=id2label[int(a[i])],
            fp32_score=float(fp32.probs[i, a[i]]),
            int8_label=id2label[int(b[i])],
            int8_score=float(int8.probs[i, b[i]]),
        )
        for i in np.flatnonzero(a != b)
    ]


def compare(
    fp32: Predictions,
    int8: Predictions,
    validation: ValidationSet,
    id2label: dict[int, str],
    speed: Speed | None = None,
    confidence: float | None = None,
) -> Metrics:
    """Agreement, accuracies, probability changes and flipped examples of INT8 vs FP32.

    Speed figures come from `speed` (see `measure_speed`) when given, else from the two
    prediction passes themselves (one cold pass each: noisy)."""
    n = len(validation.texts)
    a, b = fp32.labels, int8.labels
    change = np.abs(int8.probs[np.arange(n), a] - fp32.probs[np.arange(n), a])
    flipped = _flips(fp32, int8, validation, id2label)
    truth = None if validation.labels is None else np.asarray(validation.labels)
    overall = set_metrics(validation.name, a, b, truth, confidence)
    sets = [
        set_metrics(
            p.name,
            a[p.start : p.stop],
            b[p.start : p.stop],
            None if truth is None else truth[p.start : p.stop],
            confidence,
        )
        for p in validation.slices()
    ]
    fp32_rps = speed.rows_per_second_fp32 if speed else n / fp32.seconds
    int8_rps = speed.rows_per_second_int8 if speed else n / int8.seconds
    rows_per_batch = n / fp32.n_batches
    return Metrics(
        **overall.model_dump(exclude={"name", "agreement_lower_bound", "accuracy_drop_interval"}),
        confidence=confidence,
        agreement_lower_bound=(min(m.agreement_lower_bound for m in sets) if confidence else None),
        flipped=flipped,
        mean_abs_prob_change=float(change.mean()),
        max_abs_prob_change=float(change.max()),
        latency_ms_per_batch_fp32=1000 * rows_per_batch / fp32_rps,
        latency_ms_per_batch_int8=1000 * rows_per_batch / int8_rps,
        rows_per_second_fp32=fp32_rps,
        rows_per_second_int8=int8_rps,
        sets=sets,
        speed=speed,
    )
