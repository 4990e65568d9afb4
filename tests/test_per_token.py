"""The per-token recipe: one row, one answer, whatever its batch; and where `auto` starts."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import distilq
from distilq.config.score import ScoreConfig
from distilq.config.shared import BatchingPolicy
from distilq.errors import InputError
from distilq.hardware import cpu_features
from distilq.inference import predict
from distilq.pipelines.quantize import quantize_and_promote
from distilq.pipelines.score import score_dataset
from distilq.quantize.checkpoint import load_checkpoint
from distilq.quantize.int8 import quantize
from distilq.quantize.kernels.exact_linear import ExactLinear
from distilq.quantize.kernels.per_token import batch_independent
from distilq.quantize.kernels.token_linear import (
    TOKEN_KERNELS,
    Int8TokenLinear,
    TokenKernels,
    token_linear,
    token_linear_float,
)
from distilq.recipes import (
    INTEGER_GEMM_FEATURES,
    RECIPES,
    auto_choices,
    get_recipe,
    resolve_recipe,
)
from distilq.report.render import render_report
from tests.conftest import SENSITIVE_LAYER, make_texts, run, tiny_config

# Lengths from 3 to 14 words: every batch below pads most of its rows.
TEXTS = make_texts(60, seed=31)


def _probs(model, tokenizer, texts, batch_size, sort):
    policy = BatchingPolicy(batch_size=batch_size, sort_by_length=sort)
    return predict(model, tokenizer, texts, policy).probs


def test_a_row_gets_the_same_answer_alone_and_in_any_batch(tiny_checkpoint):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    token = quantize(model, "dynamic-int8-token")
    alone = _probs(token, tokenizer, TEXTS, 1, False)
    for batch_size, sort in ((7, False), (32, True), (60, False)):
        batched = _probs(token, tokenizer, TEXTS, batch_size, sort)
        assert np.array_equal(batched, alone), (batch_size, sort)
    # The check can fail: per-tensor activations take one scale per batch.
    per_tensor = quantize(model, "dynamic-int8-pc")
    moved = _probs(per_tensor, tokenizer, TEXTS, 32, True) - _probs(
        per_tensor, tokenizer, TEXTS, 1, False
    )
    assert np.abs(moved).max() > 0


def test_a_scored_row_is_what_predict_says_of_its_text_alone(
    tiny_checkpoint, tiny_validation, tmp_path
):
    registry = tmp_path / "reg"
    config = tiny_config(tiny_checkpoint, tiny_validation, registry, recipe="dynamic-int8-token")
    result = quantize_and_promote(config)
    assert result.promoted and result.manifest.recipe.activations == "per-token"
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")

    def scored(batch_size: int) -> np.ndarray:
        out = tmp_path / f"out-{batch_size}"
        config = ScoreConfig(
            inputs=[str(tmp_path / "in.parquet")],
            output=str(out),
            registry=str(registry),
            batch_size=batch_size,
            probabilities=True,
        )
        score_dataset(config)
        table = pq.read_table(out / "in.parquet")
        return np.stack([table["prob_NEGATIVE"].to_numpy(), table["prob_POSITIVE"].to_numpy()], 1)

    one = scored(1)
    for batch_size in (7, 32):
        assert np.array_equal(scored(batch_size), one), batch_size
    classifier = distilq.load(registry)
    for text, row in zip(TEXTS[:12], one, strict=False):
        alone = classifier.predict([text])[0]["probabilities"]
        assert [alone["NEGATIVE"], alone["POSITIVE"]] == row.tolist()


@pytest.fixture(scope="module")
def compiled_kernel():
    if shutil.which("g++") is None:
        pytest.skip("torch.compile needs a C++ compiler")
    kernels = TokenKernels()
    assert kernels.compile(), "the compiled kernel failed or did not give eager's bits"
    return kernels.compiled


def test_the_compiled_kernel_gives_every_row_the_answer_eager_gives(
    tiny_checkpoint, compiled_kernel, monkeypatch
):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    token = quantize(model, "dynamic-int8-token")
    try:
        TOKEN_KERNELS.choose(["avx512_vnni"])  # the integer kernel, which was compiled
        eager = {size: _probs(token, tokenizer, TEXTS, size, True) for size in (1, 7)}
        monkeypatch.setattr(TOKEN_KERNELS, "linear", compiled_kernel)
        for size, probs in eager.items():
            assert np.array_equal(_probs(token, tokenizer, TEXTS, size, True), probs), size
    finally:
        monkeypatch.undo()
        TOKEN_KERNELS.choose()


def test_long_inputs_run_in_chunks_that_change_no_bit():
    torch.manual_seed(0)
    layer = Int8TokenLinear.from_float(torch.nn.Linear(48, 40))
    x = torch.randn(3, 2000, 48) * torch.rand(3, 2000, 1) * 10  # 6,000 rows: 3 chunks
    with torch.inference_mode():
        chunked = layer(x)
        whole = token_linear(x.reshape(-1, 48), layer.weight_t, layer.weight_scale, layer.bias)
    assert len(x.reshape(-1, 48)) > 2 * Int8TokenLinear.CHUNK_ROWS
    assert torch.equal(chunked, whole.reshape(3, 2000, 40))


def test_without_vnni_float_gemms_give_the_integer_gemms_bits(tiny_checkpoint):
    # The CPU is a value: the integer GEMM where it is fast, exact float32 GEMMs elsewhere.
    vnni, avx2 = TokenKernels(), TokenKernels()
    vnni.choose(["avx2", "avx512_vnni"])
    avx2.choose(["avx2"])
    assert (vnni.linear, vnni.float_weights) == (token_linear, False)
    assert (avx2.linear, avx2.float_weights) == (token_linear_float, True)
    # Model-sized layers (inputs past one exact float slice too), then whole texts.
    gen = torch.Generator().manual_seed(5)
    for width in (384, 1536, 3072):
        rows = torch.randn(64, width, generator=gen) * 4
        rows[:, 7] *= 60  # an outlier feature: small values round to few levels
        weight = torch.randint(-127, 128, (width, 48), dtype=torch.int8, generator=gen)
        scale, bias = torch.rand(48, generator=gen) / 50, torch.randn(48, generator=gen)
        with torch.inference_mode():
            exact = token_linear(rows, weight, scale, bias)
            assert torch.equal(token_linear_float(rows, weight.float(), scale, bias), exact)
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    token = quantize(model, "dynamic-int8-token")
    answers = []
    try:
        for features in (["avx512_vnni"], ["avx2"]):
            TOKEN_KERNELS.choose(features)
            answers.append(_probs(token, tokenizer, TEXTS, 7, True))
    finally:
        TOKEN_KERNELS.choose()  # this CPU's again
    assert np.array_equal(*answers)


def test_the_kernel_is_compiled_only_when_asked(compiled_kernel, monkeypatch):
    monkeypatch.delenv("DISTILQ_COMPILE", raising=False)
    default = TokenKernels()
    default.choose(["avx512_vnni"])
    assert default.kernel() is token_linear and default.compiled is None
    monkeypatch.setenv("DISTILQ_COMPILE", "1")
    asked = TokenKernels()
    assert asked.compiled is None  # not before a per-token layer runs
    assert asked.kernel() is asked.compiled is not None


def test_auto_starts_from_the_recipe_that_is_faithful_and_fast_on_the_cpu():
    vnni = resolve_recipe("auto", ["avx2", "avx512f", "avx512_vnni"])
    assert vnni.base == "dynamic-int8-token" and "avx512_vnni" in vnni.base_reason
    assert vnni.activations == "per-token" and vnni.name == "auto" and vnni.fallback
    assert [r.name for r in vnni.alternatives] == ["ort-int8-token"]
    # Without VNNI, INT8 runs on ONNX Runtime (exact uint8 x uint8 products) where installed.
    avx2 = resolve_recipe("auto", ["avx2"])
    assert avx2.base == "ort-int8-token" and "no VNNI" in avx2.base_reason
    assert not avx2.signed_weights and avx2.alternatives == () and avx2.fallback
    bare = resolve_recipe("auto", ["avx2"], engines=("torch",))
    assert bare.base == "dynamic-int8-token" and "pip install" in bare.base_reason
    # A fixed recipe is itself on every CPU, never searched.
    assert resolve_recipe("dynamic-int8-token", ["avx2"]) == RECIPES["dynamic-int8-token"]


@pytest.mark.parametrize("retired", ["dynamic-int8-pc", "dynamic-int8"])
def test_the_torch_ao_recipes_make_no_new_version(retired, tmp_path):
    from distilq.config.quantize import QuantizeConfig

    with pytest.raises(InputError, match=f"recipe {retired} is retired: .*deprecates"):
        resolve_recipe(retired, ["avx2"])
    with pytest.raises(ValueError, match=f"recipe {retired} is retired: .*still load and score"):
        QuantizeConfig(source=str(tmp_path), recipe=retired)


def test_recipe_fields_are_typed():
    with pytest.raises(InputError, match="activations 'per-tokn' is not one of"):
        dataclasses.replace(RECIPES["dynamic-int8-token"], activations="per-tokn")
    with pytest.raises(InputError, match="auto is a search"):
        get_recipe("auto")


def test_auto_records_where_it_started_and_why(tiny_checkpoint, tiny_validation, tmp_path):
    result = quantize_and_promote(
        tiny_config(tiny_checkpoint, tiny_validation, tmp_path / "reg", recipe="auto")
    )
    # With ONNX Runtime installed (the dev extra) auto measures ort-int8-token, and on a
    # VNNI CPU torch's per-token too, and keeps the faster likely one.
    choices = {c.base: c for c in auto_choices(resolve_recipe("auto", cpu_features()))}
    torch_too = {"dynamic-int8-token"} if _has_vnni() else set()  # no VNNI: ONNX Runtime only
    assert set(choices) == {"ort-int8-token", *torch_too}
    record = result.manifest.recipe
    chosen = choices[record.auto.base]
    assert record.name == "auto" and record.activations == chosen.activations
    assert record.auto.base_reason.startswith(chosen.base_reason)
    for name in choices:  # both measured, with their speed, in the reason and the attempts
        assert re.search(rf"{name} \d+ rows/s, pass probability", record.auto.base_reason)
        assert any(a.recipe == name and not a.fp32_layers for a in record.auto.attempts)
    assert record.engine == chosen.engine and (record.onnx is not None) == (
        chosen.engine == "onnxruntime"
    )
    shown = f"`auto` started from `{record.auto.base}`: {record.auto.base_reason}"
    assert shown in render_report(result.manifest)


def _has_vnni() -> bool:
    return any(f in cpu_features() for f in INTEGER_GEMM_FEATURES)


VNNI = ["avx2", "avx512f", "avx512_vnni"]


@pytest.fixture(scope="module")
def vnni_auto_version(wide_sensitive_checkpoint, tiny_validation, tmp_path_factory):
    """An `auto` version made as on a VNNI CPU (per-token start), which must keep the planted
    sensitive layer FP32 to pass its gate."""
    registry = tmp_path_factory.mktemp("vnni-auto") / "reg"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("distilq.pipelines.quantize.cpu_features", lambda: VNNI)
        config = tiny_config(
            wide_sensitive_checkpoint, tiny_validation, registry, recipe="auto", min_agreement=0.9
        )
        result = quantize_and_promote(config)
    recipe = result.manifest.recipe
    assert result.promoted and recipe.activations == "per-token" and recipe.fp32_layers
    assert recipe.batch_independent is True
    return registry, result.manifest


def test_an_auto_version_with_fp32_layers_gives_a_row_one_answer_in_any_batch(
    vnni_auto_version,
):
    # Kept FP32 layers ran torch's float GEMM, whose sums depend on the rows per call; the
    # next per-token layer rounded those last bits into answers up to 4e-3 apart.
    registry, manifest = vnni_auto_version
    classifier = distilq.load(registry)
    answers = {
        size: classifier.predict_proba(TEXTS, BatchingPolicy(batch_size=size))
        for size in (1, 7, 32)
    }
    assert np.array_equal(answers[1], answers[7]) and np.array_equal(answers[1], answers[32])
    assert "batch-independent: yes" in render_report(manifest)


def test_fp32_layers_of_a_per_token_model_are_summed_exactly(wide_sensitive_checkpoint):
    # torch's float GEMM sums a row by how many rows the call has and how many threads run
    # it; the exact layer sums integers, so neither changes a bit, and it stays FP32-close.
    model, _ = load_checkpoint(wide_sensitive_checkpoint)
    layer = model.get_submodule(SENSITIVE_LAYER)
    exact = ExactLinear.from_float(layer)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, layer.in_features, generator=gen) * torch.rand(300, 1, generator=gen)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        reference = exact(x)
        for start, rows in ((0, 1), (5, 7), (20, 64), (100, 129)):
            assert torch.equal(exact(x[start : start + rows]), reference[start : start + rows])
        torch.set_num_threads(1)
        try:
            assert torch.equal(exact(x), reference)
        finally:
            torch.set_num_threads(threads)
        fp32 = layer(x)
    scale = fp32.abs().max()
    assert (reference - fp32).abs().max() < 1e-5 * scale
    assert batch_independent(quantize(model, "dynamic-int8-token", keep_fp32=[SENSITIVE_LAYER]))
    assert not batch_independent(quantize(model, "dynamic-int8-pc"))


@pytest.mark.slow
def test_distilq_score_of_an_auto_version_gives_equal_probabilities_at_any_batch_size(
    vnni_auto_version, tmp_path
):
    registry, _ = vnni_auto_version
    pq.write_table(pa.table({"text": TEXTS * 3}), tmp_path / "in.parquet")

    def scored(batch_size: int) -> np.ndarray:
        out = tmp_path / f"out-{batch_size}"
        done = run(
            "score", "--input", str(tmp_path / "in.parquet"), "--output", str(out),
            "--registry", str(registry), "--batch-size", str(batch_size), "--probabilities",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        table = pq.read_table(out / "in.parquet")
        return np.stack([table["prob_NEGATIVE"].to_numpy(), table["prob_POSITIVE"].to_numpy()], 1)

    one = scored(1)
    assert np.array_equal(scored(7), one) and np.array_equal(scored(32), one)
