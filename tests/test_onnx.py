"""The onnxruntime engine: export, the INT8 rewrites, exact integer products, one row one
answer, and a version of it gated, recorded, loaded and scored like any other."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import distilq
from distilq import recipes
from distilq.config.quantize import QuantizeConfig
from distilq.config.score import ScoreConfig
from distilq.config.shared import BatchingPolicy
from distilq.errors import IntegrityError
from distilq.gate.data import PACKAGED_VALIDATION, load_validation
from distilq.hardware import cpu_features
from distilq.inference import predict
from distilq.pipelines.quantize import quantize_and_promote
from distilq.pipelines.score import score_dataset
from distilq.quantize.autoquant import PassTarget, quantize_for_gate
from distilq.quantize.checkpoint import load_checkpoint
from distilq.quantize.int8 import linear_names, load_int8, quantize, save_int8
from distilq.quantize.onnx import rewrite
from distilq.quantize.onnx.build import float_graph
from distilq.quantize.onnx.export import graph_inputs
from distilq.quantize.onnx.graph import WEIGHT_SUFFIX
from distilq.quantize.onnx.session import GRAPH_FILE, open_session, run_graph
from distilq.recipes import RECIPES, for_cpu, resolve_recipe
from distilq.report.render import render_report
from tests.conftest import SHARED_MODEL, make_texts, tiny_config

TEXTS = make_texts(60, seed=31)  # 3 to 14 words: every batch pads most of its rows
VNNI, AVX2 = ["avx2", "avx512f", "avx512_vnni"], ["avx2"]


def _classifier(kind: str, classes: int):
    """A tiny random BERT, RoBERTa or DistilBERT sequence classifier."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    made = {
        "distilbert": lambda: DistilBertForSequenceClassification(
            DistilBertConfig(
                vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=classes
            )  # fmt: skip
        ),
        "bert": lambda: BertForSequenceClassification(
            BertConfig(vocab_size=99, hidden_size=32, num_labels=classes, **small)
        ),
        "roberta": lambda: RobertaForSequenceClassification(
            RobertaConfig(
                vocab_size=99, hidden_size=32, num_labels=classes, pad_token_id=1, **small
            )  # fmt: skip
        ),
    }
    return made[kind]().eval()


def _feeds(names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 6:], mask[2, 2:] = 0, 0  # padded rows
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = (np.arange(11)[None, :] > 4).astype(np.int64).repeat(3, 0)
    return feeds


@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("kind", ["distilbert", "bert", "roberta"])
def test_the_exported_graph_finds_every_linear_and_gives_torchs_logits(kind, classes):
    model = _classifier(kind, classes)
    graph = float_graph(model)
    operands = {n.input[1] for n in graph.graph.node if n.op_type == "MatMul"}
    assert {name + WEIGHT_SUFFIX for name in linear_names(model)} <= operands
    feeds = _feeds(graph_inputs(model))
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    got = run_graph(graph, feeds)
    assert got.shape == (3, classes)
    np.testing.assert_allclose(got[:, :], expected, rtol=0, atol=1e-4)
    # A padded row's logits are those of its tokens alone (the mask is honoured).
    alone = {k: v[1:2, :6] for k, v in feeds.items()}
    np.testing.assert_allclose(run_graph(graph, alone)[0], got[1], rtol=0, atol=1e-4)


def _probs(model, tokenizer, texts, batch_size, sort):
    return predict(
        model, tokenizer, texts, BatchingPolicy(batch_size=batch_size, sort_by_length=sort)
    ).probs


@pytest.mark.parametrize("cpu", [VNNI, AVX2], ids=["vnni", "avx2"])
def test_per_token_on_onnx_runtime_gives_a_row_one_answer_in_any_batch(tiny_checkpoint, cpu):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    recipe = resolve_recipe("ort-int8-token", cpu)  # uint8 weights for AVX2: exact anywhere
    for kept in ([], ["distilbert.transformer.layer.1.ffn.lin1"]):
        token = quantize(model, recipe, keep_fp32=kept)
        assert token.batch_independent
        alone = _probs(token, tokenizer, TEXTS, 1, False)
        for batch_size, sort in ((7, False), (32, True), (60, False)):
            assert np.array_equal(_probs(token, tokenizer, TEXTS, batch_size, sort), alone)
    # The check can fail: ONNX Runtime's own dynamic INT8 takes one scale per batch.
    per_batch = quantize(model, resolve_recipe("ort-int8-pc", cpu))
    assert not per_batch.batch_independent
    moved = _probs(per_batch, tokenizer, TEXTS, 32, True) - _probs(
        per_batch, tokenizer, TEXTS, 1, False
    )
    assert np.abs(moved).max() > 0


def test_onnx_runtime_weights_are_signed_only_where_mlas_multiplies_them_exactly():
    token = RECIPES["ort-int8-token"]
    assert for_cpu(token, VNNI).signed_weights and for_cpu(token, ["avx_vnni"]).signed_weights
    assert not for_cpu(token, AVX2).signed_weights
    assert not for_cpu(token, ["avx2", "avx512f", "avx512bw"]).signed_weights  # no VNNI
    assert for_cpu(RECIPES["dynamic-int8-token"], AVX2) == RECIPES["dynamic-int8-token"]


def _integer_product(a_u8: np.ndarray, w: np.ndarray, signed: bool) -> np.ndarray:
    """What the per-token rewrite's MatMulIntegerToFloat gives for uint8 activations
    `a_u8` (zero point 128) and int8 weight values `w`, with unit scales."""
    from onnx import TensorProto, helper, numpy_helper

    values, zero = rewrite._stored(w, signed)
    k, n = w.shape
    node = helper.make_node(
        "MatMulIntegerToFloat", ["a", "w", "one", "ones", "zp", "wz"], ["y"],
        domain="com.microsoft",
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "product",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [
            numpy_helper.from_array(values, "w"),
            numpy_helper.from_array(zero, "wz"),
            numpy_helper.from_array(np.float32(1), "one"),
            numpy_helper.from_array(np.ones(n, np.float32), "ones"),
            numpy_helper.from_array(np.uint8(rewrite.ZERO_POINT), "zp"),
        ],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    return open_session(proto.SerializeToString(), 2).run(None, {"a": a_u8})[0]


@pytest.mark.parametrize("width", [384, 768, 1536, 3072])
def test_the_integer_products_this_cpu_runs_are_exact_at_model_widths(width):
    """Against an exact int64 reference, with the operands that saturate VPMADDUBSW's int16
    pair sums (255 x 127 twice) where a CPU without VNNI ran uint8 x int8."""
    rng = np.random.default_rng(width)
    a = np.full((8, width), 255, np.uint8)
    a[4:] = rng.choice(np.array([1, 255], np.uint8), size=(4, width))
    w = np.where(rng.random((width, 16)) < 0.5, -127, 127).astype(np.float64)
    w[:, :4] = 127  # every pair at its largest
    exact = ((a.astype(np.int64) - rewrite.ZERO_POINT) @ w.astype(np.int64)).astype(np.float32)
    signed = for_cpu(RECIPES["ort-int8-token"], cpu_features()).signed_weights
    assert np.array_equal(_integer_product(a, w, signed), exact)
    assert np.array_equal(_integer_product(a, w, False), exact)  # uint8 x uint8: any CPU


def test_a_saved_graph_loads_as_it_ran_and_a_damaged_one_is_named(tiny_checkpoint, tmp_path):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    recipe = resolve_recipe("ort-int8-token", cpu_features())
    token = quantize(model, recipe)
    model.config.save_pretrained(tmp_path)
    path = save_int8(token, recipe, tmp_path)
    assert path.name == GRAPH_FILE and path.read_bytes() == token.graph
    loaded = load_int8(tmp_path)
    assert loaded.activations == "per-token" and loaded.sha256 == token.sha256
    assert np.array_equal(
        _probs(loaded, tokenizer, TEXTS, 32, True), _probs(token, tokenizer, TEXTS, 32, True)
    )
    path.write_bytes(path.read_bytes()[: len(token.graph) // 2])
    with pytest.raises(IntegrityError, match=rf"{GRAPH_FILE}: unreadable ONNX graph"):
        load_int8(tmp_path)


def test_an_onnx_runtime_version_is_gated_recorded_loaded_and_scored_as_it_ran(
    tiny_checkpoint, tiny_validation, tmp_path
):
    registry = tmp_path / "reg"
    config = tiny_config(tiny_checkpoint, tiny_validation, registry, recipe="ort-int8-token")
    manifest = quantize_and_promote(config).manifest
    record, here = manifest.recipe, f"models/{manifest.version}"
    assert record.engine == "onnxruntime" and record.batch_independent is True
    graph = registry / "versions" / manifest.version / "model" / GRAPH_FILE
    digest = hashlib.sha256(graph.read_bytes()).hexdigest()
    assert record.onnx.graph_sha256 == digest == manifest.files[f"model/{GRAPH_FILE}"], here
    assert record.onnx.onnxruntime == onnxruntime.__version__ and record.onnx.opset == 18
    assert record.onnx.execution_provider == "CPUExecutionProvider"
    assert manifest.metrics.size_bytes_int8 == graph.stat().st_size
    assert manifest.platform.onnxruntime == onnxruntime.__version__
    assert f"ONNX Runtime {onnxruntime.__version__}, opset 18" in render_report(manifest)
    # Scored through `distilq score`'s pipeline, a row is what the version says of it alone.
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    score_dataset(
        ScoreConfig(
            inputs=[str(tmp_path / "in.parquet")],
            output=str(out),
            registry=str(registry),
            probabilities=True,
        )  # fmt: skip
    )
    table = pq.read_table(out / "in.parquet")
    scored = np.stack([table["prob_NEGATIVE"].to_numpy(), table["prob_POSITIVE"].to_numpy()], 1)
    classifier = distilq.load(registry)
    assert classifier.attestation  # attested here as gated
    assert np.array_equal(classifier.predict_proba(TEXTS), scored)
    for text, row in zip(TEXTS[:5], scored, strict=False):
        assert classifier.predict_proba([text])[0].tolist() == row.tolist()


def test_auto_measures_onnx_runtime_against_torch_and_keeps_the_fastest_likely(
    sensitive_checkpoint, tiny_validation
):
    model, tokenizer = load_checkpoint(sensitive_checkpoint)
    data = load_validation(str(tiny_validation), label2id=model.config.label2id)
    policy = BatchingPolicy()
    fp32 = predict(model, tokenizer, data.texts, policy)
    target = PassTarget(probability=0.9, confirmation_sizes=(1000,), allowed=(80,))
    auto = resolve_recipe("auto", VNNI)
    candidate = quantize_for_gate(model, tokenizer, auto, data, fp32, policy, target)
    first = {a.recipe: a for a in candidate.attempts if not a.fp32_layers}
    assert set(first) == {"dynamic-int8-token", "ort-int8-token"}
    likely = [a for a in first.values() if a.predicted_pass_probability >= 0.9]
    kept = candidate.recipe.base
    if likely:
        assert first[kept].rows_per_second == max(a.rows_per_second for a in likely)
    else:
        assert first[kept].predicted_pass_probability == max(
            a.predicted_pass_probability for a in first.values()
        )
    assert candidate.recipe.name == "auto" and "rows/s" in candidate.recipe.base_reason
    assert candidate.attempts[candidate.chosen].recipe == kept
    assert candidate.recipe_record(policy).auto.base == kept
    if kept == "ort-int8-token":  # the layers kept FP32 are float MatMuls in its graph
        import onnx

        graph = onnx.load_from_string(candidate.model.graph)
        floats = {n.input[1] for n in graph.graph.node if n.op_type == "MatMul"}
        assert floats & {n + WEIGHT_SUFFIX for n in linear_names(model)} == {
            n + WEIGHT_SUFFIX for n in candidate.fp32_layers
        }
    # Without ONNX Runtime installed, auto measures torch alone.
    assert resolve_recipe("auto", AVX2, engines=("torch",)).alternatives == ()


def test_a_recipe_on_onnx_runtime_without_the_extra_is_refused_with_the_install_line(
    monkeypatch, tiny_checkpoint, tiny_validation, tmp_path
):
    monkeypatch.setattr(recipes, "installed_engines", lambda: ("torch",))
    with pytest.raises(ValueError, match=r"pip install 'distilq\[onnxruntime\]'"):
        QuantizeConfig(source=str(tiny_checkpoint), validation=[str(tiny_validation)],
                       registry=str(tmp_path), recipe="ort-int8-token")  # fmt: skip


@pytest.mark.slow
def test_per_token_on_onnx_runtime_agrees_with_fp32_on_the_real_model():
    if not SHARED_MODEL.is_dir():
        pytest.skip(f"the shared model is not at {SHARED_MODEL}")
    model, tokenizer = load_checkpoint(SHARED_MODEL)
    texts = load_validation(PACKAGED_VALIDATION, label2id=model.config.label2id).texts
    token = quantize(model, resolve_recipe("ort-int8-token", cpu_features()))
    batched = _probs(token, tokenizer, texts, 32, True)
    fp32 = predict(model, tokenizer, texts, BatchingPolicy()).labels
    assert (batched.argmax(1) == fp32).mean() >= 0.995
    fp32_bytes = (SHARED_MODEL / "model.safetensors").stat().st_size
    assert len(token.graph) <= 0.28 * fp32_bytes  # int8 Linear weights and word table
    head = texts[:200]
    alone = _probs(token, tokenizer, head, 1, False)
    assert np.array_equal(alone, batched[:200])
    assert np.array_equal(_probs(token, tokenizer, head, 7, False), alone)


def test_an_onnx_runtime_version_as_an_mlflow_model_scores_as_distilq_does(
    tiny_checkpoint, tiny_validation, tmp_path
):
    import mlflow.pyfunc
    import pandas as pd

    from distilq.integrations.mlflow.logged import pinned_requirements, save_pyfunc
    from distilq.registry.registry import Registry

    registry = tmp_path / "reg"
    quantize_and_promote(
        tiny_config(tiny_checkpoint, tiny_validation, registry, recipe="ort-int8-token")
    )
    local, manifest = Registry(registry).fetch("production")
    data = (local / "manifest.json").read_bytes()
    files = tmp_path / "files"
    save_pyfunc(tmp_path / "mlflow-model", local, manifest, data, files)
    requirements = (tmp_path / "mlflow-model" / "requirements.txt").read_text()
    assert f"onnxruntime=={onnxruntime.__version__}" in requirements
    assert not any(r.startswith("onnxruntime") for r in pinned_requirements("x86"))
    model = mlflow.pyfunc.load_model(str(tmp_path / "mlflow-model"))
    frame = model.predict(pd.DataFrame({"text": TEXTS}), params={"probabilities": True})
    expected = distilq.load(registry).predict_proba(TEXTS)
    got = np.stack([frame["prob_NEGATIVE"].to_numpy(), frame["prob_POSITIVE"].to_numpy()], 1)
    assert np.array_equal(got, expected)
