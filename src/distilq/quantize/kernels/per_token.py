"""The per-token layer kind: INT8 Linear layers whose rows never depend on their batch,
with the two things such a model needs to keep that promise whole: attention over each
text alone, and its FP32 layers summed exactly (`exact_linear`)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from distilq.quantize.kernels.base import LayerKind, linear_tensors
from distilq.quantize.kernels.exact_linear import ExactLinear, keep_exact
from distilq.quantize.kernels.token_linear import Int8TokenLinear

# Files with per-token Linear layers: a reader of /1 alone would run them per tensor.
FORMAT_PER_TOKEN = "distilq-int8/2"

ROWWISE_ATTENTION = "distilq_rowwise"


def _rowwise_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Self-attention of each sequence over its own tokens only, in tensors shaped as if it
    were alone: padding and neighbours change no bit of a text's result (batched attention
    sums padded rows in other orders; per-token INT8 would round those last bits apart)."""
    batch, heads, length, dim = query.shape
    scaling = scaling or dim**-0.5
    if attention_mask is None:  # no padding
        keys = torch.ones(batch, length, dtype=torch.bool)
    else:  # [batch, 1, query, key]: True, or 0.0 when additive, where a key may be seen
        keys = attention_mask[:, 0, 0, :]
        keys = keys if keys.dtype == torch.bool else keys == 0
    out = query.new_zeros(batch, length, heads, dim)
    counts = keys.sum(dim=1, keepdim=True)
    if not bool((keys == (torch.arange(length) < counts)).all()):
        raise ValueError("per-token attention needs right padding (the tokenizer's default)")
    first = 0
    for n, texts in itertools.groupby(counts.squeeze(1).tolist()):
        # Neighbours of one length n (length-sorted batches have many) in one call: each
        # computed as if alone, through views with the strides a text alone has, set by the
        # projections' (token, head, dim) layout, not by the padded length.
        last = first + len(list(texts))
        q, k, v = (t[first:last, :, :n] for t in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        out[first:last, :n] = attended.transpose(1, 2)
        first = last
    return out, None


def use_rowwise_attention(model: nn.Module) -> None:
    """Run `model`'s attention for each sequence over its own tokens (`_rowwise_attention`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ROWWISE_ATTENTION, _rowwise_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROWWISE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROWWISE_ATTENTION)


def batch_independent(model: nn.Module) -> bool:
    """Whether every row of `model` gets the same answer in any batch: all its Linear layers
    per-token INT8 or exact FP32, its attention row-wise."""
    linear = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8TokenLinear))]
    rowwise = model.config._attn_implementation == ROWWISE_ATTENTION
    return rowwise and all(isinstance(m, (Int8TokenLinear, ExactLinear)) for m in linear)


class TokenLinearKind(LayerKind):
    module = Int8TokenLinear
    format = FORMAT_PER_TOKEN

    def quantize(self, float_module: nn.Module, per_channel: bool) -> nn.Module:
        return Int8TokenLinear.from_float(float_module)  # weights always per channel

    def tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return linear_tensors(module.weight_int8, module.weight_scale, module.bias)

    def entry(self, module: nn.Module) -> dict:
        return {"per_channel": True, "activations": "per-token"}

    def load(self, tensors: dict[str, torch.Tensor], entry: dict) -> nn.Module:
        return Int8TokenLinear(tensors["weight_int8"], tensors["weight_scale"], tensors.get("bias"))

    def prepare(self, model: nn.Module) -> None:
        use_rowwise_attention(model)
        keep_exact(model)
