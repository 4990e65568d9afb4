"""Linear layers on torch.ao's dynamic quantized kernels (fbgemm): INT8 weights, per channel
or per tensor; activations quantized with one scale per batch.

They need torch's quantized tensors, which torch deprecates (its warning is left to show).
The recipes that made them are retired (`recipes.TORCH_AO_RETIRED`): this kind now reads the
versions made with them, and builds them only for the benches and the reader's tests."""

from __future__ import annotations

import torch
from torch import nn

from distilq.quantize.kernels.base import LayerKind, linear_tensors, quiet_torch

with quiet_torch():
    from torch.ao.nn.quantized import dynamic as nnqd


def _quantize_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    # Symmetric qint8 with torch's observer arithmetic, so `dynamic-int8` equals quantize_dynamic.
    w = w.detach().float()
    if per_channel:
        scale = (w.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        return torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
    scale = max(w.abs().max().item() / 127.5, torch.finfo(torch.float32).eps)
    return torch.quantize_per_tensor(w, scale, 0, torch.qint8)


def _int8_linear(qweight: torch.Tensor, bias: torch.Tensor | None) -> nnqd.Linear:
    # torch quantizes activations to 7 bits here: on CPUs without VNNI the 8-bit range
    # saturates the int16 pair sums of the u8 x s8 kernel (measured: errors up to 8.0).
    out_features, in_features = qweight.shape
    with quiet_torch():
        module = nnqd.Linear(in_features, out_features, dtype=torch.qint8)
        module.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    return module


def _qweight(int8: torch.Tensor, scale: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A quantized weight tensor from its int8 values and scales (zero points are 0)."""
    with quiet_torch():
        if per_channel:
            zero = torch.zeros(scale.shape, dtype=torch.long)
            return torch._make_per_channel_quantized_tensor(int8, scale.double(), zero, 0)
        return torch._make_per_tensor_quantized_tensor(int8, scale.item(), 0)


def _per_channel(qweight: torch.Tensor) -> bool:
    return qweight.qscheme() == torch.per_channel_affine


class TensorLinearKind(LayerKind):
    """Packed for the quantized engine in use (callers choose it: `quantized_engine`)."""

    module = nnqd.Linear

    def quantize(self, float_module: nn.Module, per_channel: bool) -> nn.Module:
        with quiet_torch():
            qweight = _quantize_weight(float_module.weight, per_channel)
        return _int8_linear(qweight, float_module.bias)

    def tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        qweight, bias = module._weight_bias()
        if _per_channel(qweight):
            scale = qweight.q_per_channel_scales()
        else:
            scale = torch.tensor([qweight.q_scale()])
        return linear_tensors(qweight.int_repr(), scale.float(), bias)

    def entry(self, module: nn.Module) -> dict:
        return {"per_channel": _per_channel(module._weight_bias()[0])}

    def load(self, tensors: dict[str, torch.Tensor], entry: dict) -> nn.Module:
        qweight = _qweight(tensors["weight_int8"], tensors["weight_scale"], entry["per_channel"])
        return _int8_linear(qweight, tensors.get("bias"))
