"""`auto`: sensitivity analysis and FP32 fallback on a model with one planted sensitive layer."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from distilq.config import BatchingPolicy
from distilq.gate.compare import set_agreements
from distilq.gate.data import combine, load_validation
from distilq.quantize.autoquant import quantize_for_gate
from distilq.quantize.checkpoint import load_checkpoint
from distilq.quantize.int8 import linear_names
from distilq.quantize.recipes import get_recipe, resolve_recipe
from distilq.score.inference import predict
from tests.conftest import SENSITIVE_LAYER

# `auto` starts per token on CPUs with VNNI, per tensor on the others: both run here, on
# any CPU, by passing the features in.
CPUS = {"avx2": ["avx2"], "vnni": ["avx2", "avx512f", "avx512_vnni"]}
auto_on_each_cpu = pytest.mark.parametrize(
    "auto", [resolve_recipe("auto", f) for f in CPUS.values()], ids=list(CPUS)
)


def _setup(checkpoint, validation):
    model, tokenizer = load_checkpoint(checkpoint)
    data = load_validation(str(validation), label2id=model.config.label2id)
    policy = BatchingPolicy()
    return model, tokenizer, data, policy, predict(model, tokenizer, data.texts, policy)


@auto_on_each_cpu
def test_auto_keeps_the_sensitive_layer_fp32(
    sensitive_checkpoint, tiny_validation, caplog, capsys, auto
):
    model, tokenizer, data, policy, fp32 = _setup(sensitive_checkpoint, tiny_validation)
    told = []
    with caplog.at_level(logging.INFO, logger="distilq"):
        candidate = quantize_for_gate(
            model, tokenizer, auto, data, fp32, policy, target_agreement=0.95,
            progress=lambda done, total, note: told.append((done, total, note)),
        )  # fmt: skip
    # The long phase says what it does, in the logs and with a progress bar on stderr.
    n = len(linear_names(model))
    assert f"measuring the sensitivity of {n} Linear layers" in caplog.text
    assert re.search(rf"sensitivity: .*\d+/{n} .*layers/s", capsys.readouterr().err)
    # ... and tells a progress display, layer by layer, then attempt by attempt.
    assert told[:n] == [(i, n, f"layer sensitivity measured for {i} of {n} layers")
                        for i in range(1, n + 1)]  # fmt: skip
    done, total, note = told[-1]
    assert done == total and note.startswith(f"attempt {len(candidate.attempts)}: ")
    start = candidate.attempts[0]
    assert start.fp32_layers == [] and start.agreement < 0.8  # per-channel alone fails badly
    assert candidate.sensitivity[0].layer == SENSITIVE_LAYER
    assert candidate.fp32_layers[0] == SENSITIVE_LAYER
    assert len(candidate.fp32_layers) <= 3
    assert candidate.reached_target
    agreement = float((candidate.predictions.labels == fp32.labels).mean())
    assert agreement >= 0.95 and agreement == candidate.attempts[-1].agreement
    assert linear_names(candidate.model) == candidate.fp32_layers  # exactly those stayed float
    record = candidate.recipe_record(policy).model_dump()
    assert record["name"] == "auto" and record["fp32_layers"] == candidate.fp32_layers
    assert record["activations"] == get_recipe(auto.base).activations
    assert record["auto"]["base"] == auto.base and record["auto"]["base_reason"]
    assert record["auto"]["sensitivity"][0]["layer"] == SENSITIVE_LAYER
    assert record["auto"]["reached_target"] is True


@auto_on_each_cpu
def test_auto_stops_at_the_start_when_it_already_passes(tiny_checkpoint, tiny_validation, auto):
    model, tokenizer, data, policy, fp32 = _setup(tiny_checkpoint, tiny_validation)
    candidate = quantize_for_gate(model, tokenizer, auto, data, fp32, policy, target_agreement=0.9)
    assert candidate.attempts[0].agreement >= 0.9
    assert candidate.fp32_layers == [] and candidate.sensitivity == []


@pytest.mark.parametrize("recipe", ["dynamic-int8", "dynamic-int8-pc"])
def test_static_recipes_never_fall_back(sensitive_checkpoint, tiny_validation, recipe):
    model, tokenizer, data, policy, fp32 = _setup(sensitive_checkpoint, tiny_validation)
    candidate = quantize_for_gate(
        model, tokenizer, get_recipe(recipe), data, fp32, policy, target_agreement=0.99
    )
    assert candidate.fp32_layers == [] and len(candidate.attempts) == 1
    assert candidate.reached_target is None and candidate.recipe_record(policy).auto is None


@auto_on_each_cpu
def test_auto_aims_every_validation_set_at_the_target(sensitive_checkpoint, tiny_validation, auto):
    model, tokenizer = load_checkpoint(sensitive_checkpoint)
    whole = load_validation(str(tiny_validation), label2id=model.config.label2id)
    # The same rows as two sets of 150 and 50: the target holds for each, not just overall.
    head = dataclasses.replace(
        whole, name="head", texts=whole.texts[:150], labels=whole.labels[:150]
    )
    tail = dataclasses.replace(
        whole, name="tail", texts=whole.texts[150:], labels=whole.labels[150:]
    )
    data, policy = combine([head, tail]), BatchingPolicy()
    fp32 = predict(model, tokenizer, data.texts, policy)
    candidate = quantize_for_gate(model, tokenizer, auto, data, fp32, policy, 0.97)
    per_set = set_agreements(fp32, candidate.predictions, data)
    assert candidate.reached_target and min(per_set) >= 0.97
    assert candidate.attempts[-1].agreement == min(per_set)
