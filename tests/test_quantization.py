"""The quantization seam: recipes, FP32 fallback, and the safetensors INT8 file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from distilq.errors import InputError, IntegrityError
from distilq.quantize.checkpoint import load_checkpoint
from distilq.quantize.int8 import WEIGHTS_FILE, linear_names, load_int8, quantize, save_int8
from distilq.quantize.kernels import EMBEDDING, LINEAR_KINDS, kind_of
from distilq.quantize.kernels.base import quantized_engine, quiet_torch
from distilq.quantize.kernels.embedding import Int8Embedding
from distilq.recipes import RECIPES
from tests.conftest import make_texts


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def _logits(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits


def _sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


def test_dynamic_int8_is_torch_quantize_dynamic(fp32):
    model, tokenizer = fp32
    with quiet_torch():
        from torch.ao.quantization import quantize_dynamic

        reference = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    ours = quantize(model, "dynamic-int8")
    for name in linear_names(model):
        a, b = reference.get_submodule(name).weight(), ours.get_submodule(name).weight()
        assert torch.equal(a.int_repr(), b.int_repr()), name
        assert a.q_scale() == b.q_scale(), name
    texts = make_texts(16, seed=3)
    assert torch.equal(_logits(reference, tokenizer, texts), _logits(ours, tokenizer, texts))


def test_per_channel_recipe_quantizes_linears_and_embeddings(fp32):
    model, tokenizer = fp32
    q = quantize(model, "dynamic-int8-pc")
    assert not linear_names(q)  # no float Linear left
    weight = q.get_submodule("distilbert.transformer.layer.0.ffn.lin1").weight()
    assert weight.qscheme() == torch.per_channel_affine
    assert isinstance(q.distilbert.embeddings.word_embeddings, Int8Embedding)
    assert isinstance(q.distilbert.embeddings.position_embeddings, Int8Embedding)
    texts = make_texts(32, seed=4)
    # Numeric threshold against the float reference (torchao tests use SQNR the same way).
    assert _sqnr_db(_logits(model, tokenizer, texts), _logits(q, tokenizer, texts)) > 20
    assert isinstance(model.distilbert.embeddings.word_embeddings, nn.Embedding)  # untouched


def test_int8_embedding_error_is_within_half_a_step(fp32):
    model, _ = fp32
    table = model.distilbert.embeddings.word_embeddings
    q = Int8Embedding.from_float(table)
    ids = torch.arange(table.num_embeddings)
    err = (q(ids) - table(ids)).abs()
    assert torch.all(err <= q.weight_scale[:, None] / 2 + 1e-7)


def test_keep_fp32_leaves_named_layers_float(fp32):
    model, _ = fp32
    keep = ["distilbert.transformer.layer.1.ffn.lin2", "classifier"]
    q = quantize(model, "dynamic-int8-pc", keep_fp32=keep)
    assert linear_names(q) == keep
    with pytest.raises(InputError, match="not Linear layers"):
        quantize(model, "dynamic-int8-pc", keep_fp32=["no.such.layer"])


def test_unknown_recipe_is_refused(fp32):
    with pytest.raises(InputError, match="unknown recipe 'int4'"):
        quantize(fp32[0], "int4")


TORCH_RECIPES = sorted(r for r in RECIPES if RECIPES[r].engine != "onnxruntime")  # see test_onnx


@pytest.mark.parametrize("recipe", TORCH_RECIPES)
def test_saved_int8_reloads_bit_exact_without_pickle(fp32, tmp_path, recipe):
    model, tokenizer = fp32
    q = quantize(model, recipe, keep_fp32=["classifier"])
    model.config.save_pretrained(tmp_path)
    path = save_int8(q, RECIPES[recipe], tmp_path)
    with safe_open(str(path), framework="pt") as f:  # plain tensors, readable by safetensors
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.int8 in dtypes
    loaded = load_int8(tmp_path)
    texts = make_texts(24, seed=5)
    assert torch.equal(_logits(q, tokenizer, texts), _logits(loaded, tokenizer, texts))
    assert linear_names(loaded) == ["classifier"]


def test_per_channel_file_is_much_smaller_than_fp32(fp32, tmp_path):
    model, _ = fp32
    model.save_pretrained(tmp_path / "fp32")
    fp32_bytes = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    sizes = {}
    for recipe in RECIPES:
        model.config.save_pretrained(tmp_path / recipe)
        sizes[recipe] = (
            save_int8(quantize(model, recipe), RECIPES[recipe], tmp_path / recipe).stat().st_size
        )
    # Embeddings dominate this tiny model: only the per-row INT8 tables shrink them.
    assert sizes["dynamic-int8-pc"] < 0.40 * fp32_bytes
    assert sizes["dynamic-int8-pc"] < sizes["dynamic-int8"] < fp32_bytes


@pytest.mark.parametrize("kind", [*LINEAR_KINDS, "embedding"])
def test_every_layer_kind_saves_and_loads_itself_to_the_bit(kind):
    """The seam a new layer kind plugs into: made from a float layer, written as tensors and
    a layout entry, read back, it runs exactly as before."""
    gen = torch.Generator().manual_seed(3)
    if kind == "embedding":
        layer, inputs = EMBEDDING, torch.randint(0, 50, (4, 7), generator=gen)
        float_module = torch.nn.Embedding(50, 16)
    else:
        layer, inputs = LINEAR_KINDS[kind], torch.randn(4, 7, 16, generator=gen)
        float_module = torch.nn.Linear(16, 8)
    with quantized_engine("x86"):
        module = layer.quantize(float_module, per_channel=True)
        tensors = {k: v.clone() for k, v in layer.tensors(module).items()}
        loaded = layer.load(tensors, json.loads(json.dumps(layer.entry(module))))
    assert kind_of(module) is kind_of(loaded) is layer
    assert all(t.dtype == torch.int8 for k, t in tensors.items() if k == "weight_int8")
    with torch.inference_mode():
        assert torch.equal(module(inputs), loaded(inputs))


def test_load_refuses_a_file_that_is_not_distilq_int8(fp32, tmp_path):
    model, _ = fp32
    model.save_pretrained(tmp_path)  # an FP32 safetensors file with no distilq metadata
    with pytest.raises(IntegrityError, match="not a distilq INT8 file"):
        load_int8(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match="unreadable INT8 weights"):
        load_int8(tmp_path)


def test_the_int8_file_is_byte_for_byte_reproducible(fp32, tmp_path):
    model, _ = fp32
    recipe = RECIPES["dynamic-int8-pc"]
    first = save_int8(quantize(model, recipe), recipe, tmp_path / "a").read_bytes()
    second = save_int8(quantize(model, recipe), recipe, tmp_path / "b").read_bytes()
    assert first == second  # so a version's hash names its content
