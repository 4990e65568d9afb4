"""Quantize a candidate for the gate; `auto` falls back to FP32 on the most sensitive layers.

As Intel Neural Compressor does it: start from the recipe that is faithful and fast on the
CPU (`recipes.resolve_recipe`, given its features by the caller); if that candidate is not
likely enough to pass the gate, measure each Linear layer's sensitivity (that layer alone
INT8, the rest FP32) and keep sensitive layers in FP32, one more at a time.

"Likely enough" models what the tuning part can tell (`PassTarget`): its flips give a
posterior of the flip rate, hence a predicted number of flips on the confirmation part,
and `auto` takes the cheapest candidate (fewest FP32 layers, then fewest bytes) whose
predicted probability of passing the confirmation gate reaches `--pass-probability`. A
point target instead (the agreement that just certifies, plus a margin) asks for zero flips
on a few hundred tuning texts, and buys FP32 layers to chase single examples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from torch import nn

from distilq.config.shared import BatchingPolicy, GateThresholds
from distilq.gate.compare import set_flips
from distilq.gate.data import ValidationSet
from distilq.gate.stats import flips_allowed, pass_probability
from distilq.inference import Predictions, predict, progress_bar
from distilq.manifest import Attempt, FallbackRecord, LayerSensitivity, RecipeRecord
from distilq.quantize.int8 import int8_bytes, linear_names, quantize, rows_independent
from distilq.recipes import Recipe, auto_choices

log = logging.getLogger("distilq")

# Layers tried at each step of the search: the most sensitive ones not yet kept FP32. More
# finds cheaper candidates (no single layer may fix a flip that a pair fixes) at one
# tuning-part prediction each.
SEARCH_WIDTH = 4

PASS_RULE = (
    "pass-probability: the cheapest attempt (fewest FP32 layers, then fewest bytes) whose "
    "predicted probability of passing the confirmation gate is at least pass_probability; "
    "each step adds to the layers kept FP32 the likeliest of the "
    f"{SEARCH_WIDTH} most sensitive others; from each set's tuning "
    "flips, a Beta(1/2 + flips, 1/2 + agreeing) posterior of the flip rate and the "
    "beta-binomial predictive flips on its confirmation part, against the most flips that "
    "still certify"
)

# How far a long search went: (done, total, what was just done), for a progress display.
Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, note: str) -> None:
    pass


@dataclass(frozen=True)
class PassTarget:
    """What `auto` aims for: a predicted probability of at least `probability` that every
    set's confirmation part passes the gate. Built from the confirmation part's sizes only
    (`for_gate`): nothing it holds can influence the choice."""

    probability: float
    confirmation_sizes: tuple[int, ...]  # rows of each set's confirmation part
    allowed: tuple[int, ...]  # the most flips each can show and still pass

    @classmethod
    def for_gate(
        cls, confirmation: ValidationSet, thresholds: GateThresholds, probability: float
    ) -> PassTarget:
        sizes = tuple(p.stop - p.start for p in confirmation.slices())
        allowed = tuple(
            flips_allowed(n, thresholds.min_agreement, thresholds.confidence) for n in sizes
        )
        return cls(probability, sizes, allowed)

    def predicted(self, flips: list[int], tuning_sizes: list[int]) -> float:
        """Probability that every set passes, from each set's tuning flips (sets are
        independent samples, so the probabilities multiply)."""
        return math.prod(
            pass_probability(f, n, m, allowed)
            for f, n, m, allowed in zip(
                flips, tuning_sizes, self.confirmation_sizes, self.allowed, strict=True
            )
        )


@dataclass
class Candidate:
    """A quantized model with its predictions on the validation set and how it was made."""

    model: nn.Module
    recipe: Recipe
    predictions: Predictions
    fp32_layers: list[str] = field(default_factory=list)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    target: PassTarget | None = None
    chosen: int = 0  # index in `attempts` of the one kept

    @property
    def reached_target(self) -> bool | None:
        if self.target is None:
            return None
        return self.attempts[self.chosen].predicted_pass_probability >= self.target.probability

    def recipe_record(self, policy: BatchingPolicy) -> RecipeRecord:
        """What the manifest records under `recipe`."""
        independent = rows_independent(self.model)
        if self.recipe.activations == "per-token" and not independent:
            # What per-token is for (and `auto` on a VNNI CPU starts from): never shipped.
            raise RuntimeError(
                f"{self.recipe.name}: a per-token model whose rows depend on the batch"
            )
        fallback = None
        if self.recipe.fallback:
            fallback = FallbackRecord(
                rule=PASS_RULE,
                pass_probability=self.target.probability,
                reached_target=self.reached_target,
                sensitivity=self.sensitivity,
                attempts=self.attempts,
                base=self.recipe.base,
                base_reason=self.recipe.base_reason,
            )
        onnx = None
        if self.recipe.engine == "onnxruntime":
            from distilq.quantize.onnx.build import onnx_record

            onnx = onnx_record(self.model, self.recipe)
        return RecipeRecord(
            name=self.recipe.name,
            engine=self.recipe.engine,
            per_channel=self.recipe.per_channel,
            int8_embeddings=self.recipe.int8_embeddings,
            fp32_layers=self.fp32_layers,
            batching=policy,
            activations=self.recipe.activations,
            auto=fallback,
            batch_independent=independent,
            onnx=onnx,
        )


def _attempt(
    qmodel: nn.Module,
    recipe: Recipe,
    fp32_layers: list[str],
    fp32: Predictions,
    pred: Predictions,
    tuning: ValidationSet,
    target: PassTarget | None,
) -> Attempt:
    flips = set_flips(fp32, pred, tuning)
    sizes = [p.stop - p.start for p in tuning.slices()]
    return Attempt(
        fp32_layers=list(fp32_layers),
        # The gate checks every validation set, so the weakest one is shown.
        agreement=min(1 - f / n if n else 1.0 for f, n in zip(flips, sizes, strict=True)),
        rows_per_second=len(pred.probs) / pred.seconds,
        tuning_flips=sum(flips),
        predicted_pass_probability=None if target is None else target.predicted(flips, sizes),
        size_bytes=int8_bytes(qmodel, recipe),
        recipe=recipe.base or recipe.name,
    )


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
    tuning: ValidationSet,
    fp32: Predictions,
    policy: BatchingPolicy,
    target: PassTarget | None,
    sensitivity_examples: int = 128,
    progress: Progress = _no_progress,
) -> Candidate:
    """Quantize `model` by `recipe` (resolved for a CPU: `recipes.resolve_recipe`) and
    predict the tuning part with the result.

    A fallback recipe (`auto`) then keeps Linear layers FP32, most sensitive first, until
    the predicted probability of passing the gate reaches `target` (if no attempt reaches
    it, the likeliest is kept and `reached_target` says so), telling `progress` how far its
    search went. Every attempt is recorded with its tuning flips, predicted pass probability
    and bytes.
    """
    if recipe.fallback and target is None:
        raise ValueError(f"{recipe.name} searches: it needs a PassTarget")
    target = target if recipe.fallback else None
    tried = [
        _measured(model, tokenizer, choice, tuning, fp32, policy, target)
        for choice in auto_choices(recipe)
    ]
    candidate = tried[0] if len(tried) == 1 else _fastest_likely(tried, target)
    if target is not None:
        log.info("auto: %s", _said(candidate.attempts[0], target))
        if not candidate.reached_target:
            _fall_back(
                candidate, model, tokenizer, tuning, fp32, policy, sensitivity_examples, progress
            )
    return candidate


def _measured(model, tokenizer, recipe, tuning, fp32, policy, target) -> Candidate:
    """`model` quantized by `recipe`, its tuning predictions and first attempt (timed after
    a warm-up batch, so a session's start is not counted as its speed)."""
    qmodel = quantize(model, recipe)
    predict(qmodel, tokenizer, tuning.texts[: policy.batch_size], policy)
    pred = predict(
        qmodel, tokenizer, tuning.texts, policy, progress=f"{recipe.base or recipe.name} INT8"
    )
    attempt = _attempt(qmodel, recipe, [], fp32, pred, tuning, target)
    return Candidate(qmodel, recipe, pred, attempts=[attempt], target=target)


def _fastest_likely(tried: list[Candidate], target: PassTarget) -> Candidate:
    """Of `auto`'s first candidates, the fastest predicted to pass (else the likeliest);
    it carries every candidate's attempt, and says why it was kept."""
    first = [c.attempts[0] for c in tried]
    likely = [c for c in tried if c.attempts[0].predicted_pass_probability >= target.probability]
    if likely:
        kept = max(likely, key=lambda c: c.attempts[0].rows_per_second)
        rule = "the fastest on the tuning part of those predicted to pass"
    else:
        kept = max(
            tried,
            key=lambda c: (c.attempts[0].predicted_pass_probability, c.attempts[0].rows_per_second),
        )
        rule = "none was predicted to pass; the likeliest (then the fastest)"
    measured = ", ".join(
        f"{a.recipe} {a.rows_per_second:.0f} rows/s, pass probability "
        f"{a.predicted_pass_probability:.3f}"
        for a in first
    )
    kept.recipe = replace(
        kept.recipe, base_reason=f"{kept.recipe.base_reason}; {rule} ({measured})"
    )
    kept.attempts = [kept.attempts[0], *(a for a in first if a is not kept.attempts[0])]
    return kept


def _said(attempt: Attempt, target: PassTarget) -> str:
    return (
        f"{len(attempt.fp32_layers)} layer(s) FP32, {attempt.tuning_flips} tuning flip(s): "
        f"predicted pass probability {attempt.predicted_pass_probability:.3f} "
        f"(target {target.probability:.2f})"
    )


def _fall_back(
    candidate: Candidate,
    model: nn.Module,
    tokenizer,
    tuning: ValidationSet,
    fp32: Predictions,
    policy: BatchingPolicy,
    sensitivity_examples: int,
    progress: Progress,
) -> None:
    """Keep Linear layers FP32, one more at a time, until an attempt's predicted pass
    probability reaches the target (the cheapest such attempt is kept); else keep the
    likeliest attempt.

    Each step tries adding each of the SEARCH_WIDTH most sensitive layers not yet kept, and
    goes on from the likeliest of them (ties: fewer bytes, then the more sensitive)."""
    target, texts, recipe = candidate.target, tuning.texts, candidate.recipe
    log.info("auto: below target; measuring layer sensitivity")
    subset = boundary_examples(fp32, candidate.predictions, sensitivity_examples)
    sub_fp32 = Predictions(fp32.probs[subset], fp32.seconds, fp32.n_batches)
    candidate.sensitivity = layer_sensitivity(
        model, tokenizer, [texts[i] for i in subset], sub_fp32, recipe, policy, progress
    )
    remaining, kept = [s.layer for s in candidate.sensitivity], []
    total = len(remaining)
    while remaining:
        k = len(kept) + 1
        tried = []
        for layer in remaining[:SEARCH_WIDTH]:
            layers = [*kept, layer]
            qmodel = quantize(model, recipe, keep_fp32=layers)
            pred = predict(qmodel, tokenizer, texts, policy, progress=f"auto, {k} FP32")
            attempt = _attempt(qmodel, recipe, layers, fp32, pred, tuning, target)
            candidate.attempts.append(attempt)
            tried.append((attempt, len(candidate.attempts) - 1, qmodel, pred, layer))
            log.info("auto: %s (%s)", _said(attempt, target), layer)
        passing = [t for t in tried if t[0].predicted_pass_probability >= target.probability]
        if passing:
            best = min(passing, key=lambda t: t[0].size_bytes)
        else:
            best = max(tried, key=lambda t: (t[0].predicted_pass_probability, -t[0].size_bytes))
        attempt, index, qmodel, pred, layer = best
        if attempt.predicted_pass_probability > (
            candidate.attempts[candidate.chosen].predicted_pass_probability
        ):  # the likeliest so far is kept
            candidate.model, candidate.predictions = qmodel, pred
            candidate.fp32_layers, candidate.chosen = attempt.fp32_layers, index
        kept.append(layer)
        remaining.remove(layer)
        done = total if candidate.reached_target else len(kept)
        progress(done, total, f"attempt {len(candidate.attempts)}: {_said(attempt, target)}")
        if candidate.reached_target:
            return
    log.warning(
        "auto: no attempt reaches pass probability %.2f, even with every Linear layer FP32; "
        "keeping the likeliest (%d layer(s) FP32)",
        target.probability,
        len(candidate.fp32_layers),
    )
