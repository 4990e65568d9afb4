"""`auto`: sensitivity analysis and FP32 fallback on a model with one planted sensitive layer."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from distilq.config.shared import BatchingPolicy
from distilq.gate.data import combine, load_validation
from distilq.gate.stats import pass_probability
from distilq.inference import predict
from distilq.quantize.autoquant import PassTarget, quantize_for_gate
from distilq.quantize.checkpoint import load_checkpoint
from distilq.quantize.int8 import linear_names, save_int8
from distilq.recipes import get_recipe, resolve_recipe
from tests.conftest import SENSITIVE_LAYER

# `auto` starts per token on CPUs with VNNI, per tensor on the others: both run here, on
# any CPU, by passing the features in. Torch alone: the search itself is what these test
# (measured against ONNX Runtime in tests/test_onnx.py).
CPUS = {"avx2": ["avx2"], "vnni": ["avx2", "avx512f", "avx512_vnni"]}
auto_on_each_cpu = pytest.mark.parametrize(
    "auto", [resolve_recipe("auto", f, engines=("torch",)) for f in CPUS.values()], ids=list(CPUS)
)


# A confirmation part of 1,000 rows on which at most 80 flips pass: on the tiny models'
# 200 tuning texts that asks for about 5% flips or fewer.
TARGET = PassTarget(probability=0.9, confirmation_sizes=(1000,), allowed=(80,))


def _setup(checkpoint, validation):
    model, tokenizer = load_checkpoint(checkpoint)
    data = load_validation(str(validation), label2id=model.config.label2id)
    policy = BatchingPolicy()
    return model, tokenizer, data, policy, predict(model, tokenizer, data.texts, policy)


@auto_on_each_cpu
def test_auto_keeps_the_sensitive_layer_fp32(
    sensitive_checkpoint, tiny_validation, caplog, capsys, auto, tmp_path
):
    model, tokenizer, data, policy, fp32 = _setup(sensitive_checkpoint, tiny_validation)
    told = []
    with caplog.at_level(logging.INFO, logger="distilq"):
        candidate = quantize_for_gate(
            model, tokenizer, auto, data, fp32, policy, TARGET,
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
    # The cheapest attempt whose predicted pass probability reaches the target is kept
    # (fewest FP32 layers, then fewest bytes), and its figures are what its flips and its
    # file say.
    chosen = candidate.attempts[candidate.chosen]
    assert candidate.reached_target and chosen.fp32_layers == candidate.fp32_layers
    assert chosen.predicted_pass_probability >= 0.9
    for other in candidate.attempts:
        if other.predicted_pass_probability >= 0.9:
            cost = (len(other.fp32_layers), other.size_bytes)
            assert cost >= (len(chosen.fp32_layers), chosen.size_bytes)
    flips = int((candidate.predictions.labels != fp32.labels).sum())
    n = len(data.texts)
    assert chosen.tuning_flips == flips and chosen.agreement == 1 - flips / n
    assert chosen.predicted_pass_probability == pass_probability(flips, n, 1000, 80)
    tmp = tmp_path / "kept"
    assert chosen.size_bytes == save_int8(candidate.model, auto, tmp).stat().st_size
    assert candidate.attempts[0].size_bytes < chosen.size_bytes  # FP32 layers weigh more
    assert linear_names(candidate.model) == candidate.fp32_layers  # exactly those stayed float
    record = candidate.recipe_record(policy).model_dump()
    assert record["name"] == "auto" and record["fp32_layers"] == candidate.fp32_layers
    assert record["activations"] == get_recipe(auto.base).activations
    assert record["auto"]["base"] == auto.base and record["auto"]["base_reason"]
    assert record["auto"]["sensitivity"][0]["layer"] == SENSITIVE_LAYER
    assert record["auto"]["reached_target"] is True and record["auto"]["pass_probability"] == 0.9
    assert record["auto"]["rule"].startswith("pass-probability")


@auto_on_each_cpu
def test_auto_stops_at_the_start_when_it_already_passes(tiny_checkpoint, tiny_validation, auto):
    model, tokenizer, data, policy, fp32 = _setup(tiny_checkpoint, tiny_validation)
    candidate = quantize_for_gate(model, tokenizer, auto, data, fp32, policy, TARGET)
    assert candidate.attempts[0].predicted_pass_probability >= 0.9
    assert candidate.fp32_layers == [] and candidate.sensitivity == []
    assert len(candidate.attempts) == 1 and candidate.reached_target


@pytest.mark.parametrize("recipe", ["dynamic-int8-token", "dynamic-int8-pc"])
def test_static_recipes_never_fall_back(sensitive_checkpoint, tiny_validation, recipe):
    model, tokenizer, data, policy, fp32 = _setup(sensitive_checkpoint, tiny_validation)
    candidate = quantize_for_gate(model, tokenizer, get_recipe(recipe), data, fp32, policy, TARGET)
    assert candidate.fp32_layers == [] and len(candidate.attempts) == 1
    assert candidate.reached_target is None and candidate.recipe_record(policy).auto is None


@auto_on_each_cpu
def test_auto_predicts_every_validation_set_passing(sensitive_checkpoint, tiny_validation, auto):
    model, tokenizer = load_checkpoint(sensitive_checkpoint)
    whole = load_validation(str(tiny_validation), label2id=model.config.label2id)
    # The same rows as two sets of 150 and 50: each must pass, so the chances multiply.
    head = dataclasses.replace(
        whole, name="head", texts=whole.texts[:150], labels=whole.labels[:150]
    )
    tail = dataclasses.replace(
        whole, name="tail", texts=whole.texts[150:], labels=whole.labels[150:]
    )
    data, policy = combine([head, tail]), BatchingPolicy()
    fp32 = predict(model, tokenizer, data.texts, policy)
    target = PassTarget(0.9, confirmation_sizes=(1000, 400), allowed=(80, 32))
    candidate = quantize_for_gate(model, tokenizer, auto, data, fp32, policy, target)
    sets = (slice(0, 150), slice(150, 200))
    flips = [int((fp32.labels[s] != candidate.predictions.labels[s]).sum()) for s in sets]
    per_set = [1 - f / n for f, n in zip(flips, (150, 50), strict=True)]
    chance = pass_probability(flips[0], 150, 1000, 80) * pass_probability(flips[1], 50, 400, 32)
    chosen = candidate.attempts[candidate.chosen]
    assert candidate.reached_target and chosen.predicted_pass_probability == chance
    assert chosen.agreement == min(per_set) and chosen.tuning_flips == sum(flips)
