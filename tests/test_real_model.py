"""On the real fine-tuned SST-2 model in ../shared (skipped where it is absent)."""

from __future__ import annotations

import dataclasses

import pytest

from distilq.config.shared import BatchingPolicy
from distilq.gate.compare import compare
from distilq.gate.data import PACKAGED_VALIDATION, load_validation
from distilq.inference import Predictions, predict
from distilq.quantize.autoquant import quantize_for_gate
from distilq.quantize.checkpoint import load_checkpoint, resolve_checkpoint
from distilq.quantize.int8 import save_int8
from distilq.recipes import RECIPES
from tests.conftest import SHARED_MODEL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SHARED_MODEL.is_dir(), reason=f"the shared model is not at {SHARED_MODEL}"
    ),
]


def test_recipes_on_the_real_model(tmp_path):
    found = resolve_checkpoint(str(SHARED_MODEL))
    model, tokenizer = load_checkpoint(found.path)
    data = load_validation(PACKAGED_VALIDATION, label2id=model.config.label2id)
    policy = BatchingPolicy()
    fp32 = predict(model, tokenizer, data.texts, policy)
    # Every other text for the per-token recipe: without VNNI, torch's integer GEMM runs a
    # reference loop (181 s for all 872 texts on an AVX2 Zen 3; 4 s for dynamic-int8-pc); the others
    # are measured on the same half too, for the comparison.
    half = dataclasses.replace(data, texts=data.texts[::2], labels=data.labels[::2])
    fp32_half = Predictions(fp32.probs[::2], fp32.seconds, fp32.n_batches)
    results, on_half = {}, {}
    for name in ("dynamic-int8", "dynamic-int8-pc", "dynamic-int8-token"):
        texts, reference = (half, fp32_half) if name == "dynamic-int8-token" else (data, fp32)
        candidate = quantize_for_gate(
            model, tokenizer, RECIPES[name], texts, reference, policy, 0.99
        )
        metrics = compare(reference, candidate.predictions, texts, model.config.id2label)
        labels = candidate.predictions.labels[:: 1 if texts is half else 2]
        on_half[name] = float((labels == fp32_half.labels).mean())
        model.config.save_pretrained(tmp_path / name)
        size = save_int8(candidate.model, RECIPES[name], tmp_path / name).stat().st_size
        results[name] = (metrics, size / found.weight_bytes)
    seed, seed_ratio = results["dynamic-int8"]
    pc, pc_ratio = results["dynamic-int8-pc"]
    # INT8 figures move with the CPU's kernels (97.94% agreement on an AVX2-only Zen 1,
    # 97.71% on an AVX-512 VNNI Sapphire Rapids): assert orderings, and bounds with room.
    assert seed.accuracy_fp32 == pytest.approx(0.8865, abs=5e-5)  # the model card's dev accuracy
    assert 0.95 <= seed.agreement < pc.agreement  # the seed's ~96%, improved per-channel
    assert pc.mean_abs_prob_change < seed.mean_abs_prob_change
    assert pc.agreement >= 0.96 and abs(pc.accuracy_drop) <= 0.02
    assert pc_ratio < 0.30 < seed_ratio < 0.70  # bytes on disk, INT8 / FP32
    # Per-token activations with no FP32 layer (the per-token issue's target: >= 99.5% at
    # <= 28% of the FP32 bytes; measured 99.89% on Sapphire Rapids). Its integer GEMM is
    # exact on every CPU; the bound leaves room for FP32 attention rounding elsewhere.
    token, token_ratio = results["dynamic-int8-token"]
    assert token.agreement >= 0.99 and on_half["dynamic-int8-token"] > on_half["dynamic-int8-pc"]
    assert token_ratio <= 0.28
