"""Quantize a candidate for the gate; `auto` falls back to FP32 on the most sensitive layers.

As Intel Neural Compressor does it: start from the recipe that is faithful and fast on the
CPU (`recipes.resolve_recipe`, given its features by the caller); if agreement on the
validation set is below the target (the gate plus a safety margin), measure each Linear
layer's sensitivity (that layer alone INT8, the rest FP32) and keep the most sensitive
layers in FP32, one more at a time, until the target is met or no layer is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from distilq.config import BatchingPolicy, GateThresholds
from distilq.gate.compare import set_agreements
from distilq.gate.data import ValidationSet
from distilq.gate.stats import agreement_needed
from distilq.manifest import Attempt, FallbackRecord, LayerSensitivity, RecipeRecord
from distilq.quantize.int8 import linear_names, quantize
from distilq.quantize.recipes import Recipe
from distilq.score.inference import Predictions, predict, progress_bar

log = logging.getLogger("distilq")

# How far a long search went: (done, total, what was just done), for a progress display.
Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, note: str) -> None:
    pass


@dataclass
class Candidate:
    """A quantized model with its predictions on the validation set and how it was made."""

    model: nn.Module
    recipe: Recipe
    predictions: Predictions
    fp32_layers: list[str] = field(default_factory=list)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    target_agreement: float | None = None

    @property
    def reached_target(self) -> bool | None:
        if self.target_agreement is None:
            return None
        return self.attempts[-1].agreement >= self.target_agreement

    def recipe_record(self, policy: BatchingPolicy) -> RecipeRecord:
        """What the manifest records under `recipe`."""
        fallback = None
        if self.recipe.fallback:
            fallback = FallbackRecord(
                target_agreement=self.target_agreement,
                reached_target=self.reached_target,
                sensitivity=self.sensitivity,
                attempts=self.attempts,
                base=self.recipe.base,
                base_reason=self.recipe.base_reason,
            )
        return RecipeRecord(
            name=self.recipe.name,
            engine=self.recipe.engine,
            per_channel=self.recipe.per_channel,
            int8_embeddings=self.recipe.int8_embeddings,
            fp32_layers=self.fp32_layers,
            batching=policy,
            activations=self.recipe.activations,
            auto=fallback,
        )


def _attempt(
    fp32_layers: list[str], fp32: Predictions, pred: Predictions, validation: ValidationSet
) -> Attempt:
    # The gate checks every validation set, so the weakest one decides.
    return Attempt(
        fp32_layers=list(fp32_layers),
        agreement=min(set_agreements(fp32, pred, validation)),
        rows_per_second=len(pred.probs) / pred.seconds,
    )


def target_agreement(
    confirmation: ValidationSet, thresholds: GateThresholds, margin: float
) -> float:
    """What `auto` aims for on the tuning part: the agreement that would just certify
    `min_agreement` on the smallest confirmation set, plus `margin`."""
    if thresholds.confidence is None:
        needed = thresholds.min_agreement
    else:
        needed = max(
            agreement_needed(p.stop - p.start, thresholds.min_agreement, thresholds.confidence)
            for p in confirmation.slices()
        )
    return min(1.0, needed + margin)


def boundary_examples(fp32: Predictions, int8: Predictions, n: int) -> np.ndarray:
    """Indices of the `n` examples with the smallest FP32 margin, plus every flipped one."""
    top2 = np.sort(fp32.probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    nearest = np.argsort(margin, kind="stable")[:n]
    flipped = np.flatnonzero(fp32.labels != int8.labels)
    return np.union1d(nearest, flipped)


def layer_sensitivity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    fp32: Predictions,
    recipe: Recipe,
    policy: BatchingPolicy,
    progress: Progress = _no_progress,
) -> list[LayerSensitivity]:
    """Each Linear layer quantized alone, scored on `texts`; most sensitive first."""
    reference = fp32.labels
    rows = np.arange(len(texts))
    table = []
    names = linear_names(model)
    log.info(
        "auto: measuring the sensitivity of %d Linear layers on %d examples", len(names), len(texts)
    )
    for i, name in enumerate(progress_bar(names, "sensitivity", unit="layers"), 1):
        pred = predict(quantize(model, recipe, only=[name]), tokenizer, texts, policy)
        change = np.abs(pred.probs[rows, reference] - fp32.probs[rows, reference])
        flips = int((pred.labels != reference).sum())
        table.append(
            LayerSensitivity(layer=name, flips=flips, mean_abs_prob_change=float(change.mean()))
        )
        progress(i, len(names), f"layer sensitivity measured for {i} of {len(names)} layers")
    return sorted(table, key=lambda s: (-s.flips, -s.mean_abs_prob_change))


def quantize_for_gate(
    model: nn.Module,
    tokenizer,
    recipe: Recipe,
    validation: ValidationSet,
    fp32: Predictions,
    policy: BatchingPolicy,
    target_agreement: float,
    sensitivity_examples: int = 128,
    progress: Progress = _no_progress,
) -> Candidate:
    """Quantize `model` by `recipe` (resolved for a CPU: `recipes.resolve_recipe`) and
    predict the validation set with the result.

    A fallback recipe (`auto`) then keeps Linear layers FP32, most sensitive first, until
    agreement with `fp32` reaches `target_agreement` (or every Linear layer is FP32;
    `reached_target` then says so), telling `progress` how far its search went.
    """
    qmodel = quantize(model, recipe)
    pred = predict(qmodel, tokenizer, validation.texts, policy, progress=f"{recipe.name} INT8")
    candidate = Candidate(
        qmodel,
        recipe,
        pred,
        attempts=[_attempt([], fp32, pred, validation)],
        target_agreement=target_agreement if recipe.fallback else None,
    )
    if recipe.fallback and not candidate.reached_target:
        _fall_back(
            candidate, model, tokenizer, validation, fp32, policy, sensitivity_examples, progress
        )
    return candidate


def _fall_back(
    candidate: Candidate,
    model: nn.Module,
    tokenizer,
    validation: ValidationSet,
    fp32: Predictions,
    policy: BatchingPolicy,
    sensitivity_examples: int,
    progress: Progress,
) -> None:
    """Keep the most sensitive Linear layers FP32, one more at a time, until the candidate
    reaches its target."""
    target, texts = candidate.target_agreement, validation.texts
    log.info(
        "auto: agreement %.4f < target %.4f; measuring layer sensitivity",
        candidate.attempts[0].agreement,
        target,
    )
    subset = boundary_examples(fp32, candidate.predictions, sensitivity_examples)
    sub_fp32 = Predictions(fp32.probs[subset], fp32.seconds, fp32.n_batches)
    candidate.sensitivity = layer_sensitivity(
        model, tokenizer, [texts[i] for i in subset], sub_fp32, candidate.recipe, policy, progress
    )
    ranked = [s.layer for s in candidate.sensitivity]
    for k in range(1, len(ranked) + 1):
        keep = ranked[:k]
        qmodel = quantize(model, candidate.recipe, keep_fp32=keep)
        pred = predict(qmodel, tokenizer, texts, policy, progress=f"auto, {k} FP32")
        candidate.attempts.append(_attempt(keep, fp32, pred, validation))
        candidate.model, candidate.predictions, candidate.fp32_layers = qmodel, pred, keep
        reached = candidate.attempts[-1].agreement
        log.info("auto: %d layer(s) FP32 -> agreement %.4f", k, reached)
        note = f"attempt {k + 1}: {k} layer(s) FP32, agreement {reached:.4f} (target {target:.4f})"
        progress(len(ranked) if candidate.reached_target else k, len(ranked), note)
        if candidate.reached_target:
            return
    log.warning("auto: cannot reach agreement %.4f even with every Linear layer FP32", target)
