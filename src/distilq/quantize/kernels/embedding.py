"""Word and position embeddings as int8 with one scale per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distilq.quantize.kernels.base import LayerKind, int8_rows


class Int8Embedding(nn.Module):
    """An embedding table kept as int8 with one scale per row; rows are expanded on lookup."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        return cls(*int8_rows(embedding.weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * self.weight_scale[ids].unsqueeze(-1)


class EmbeddingKind(LayerKind):
    module = Int8Embedding

    def quantize(self, float_module: nn.Module, per_channel: bool) -> nn.Module:
        return Int8Embedding.from_float(float_module)  # always one scale per row

    def tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight_int8": module.weight_int8, "weight_scale": module.weight_scale}

    def load(self, tensors: dict[str, torch.Tensor], entry: dict) -> nn.Module:
        return Int8Embedding(tensors["weight_int8"], tensors["weight_scale"])
