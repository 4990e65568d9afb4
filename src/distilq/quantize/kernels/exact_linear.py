"""FP32 layers of a per-token model, summed exactly: a row's result never depends on its batch.

torch's float32 GEMM (MKL) sums each output in an order set by how many rows the call has
and how many threads run it (measured here: 1 to 15 rows, or 57 to 129 rows at depth 1536,
sum differently from 4,096), so a layer kept FP32 gave a text's last bits by its batch, and
the next per-token layer rounded them into answers 1e-3 apart. `ExactLinear` keeps the FP32
weights and runs them as integers: each row and each weight channel scaled to 24 bits
(float32's precision) and cut into three int8 digits; the digit products of each place are
one integer GEMM (exact int32, in any order: `TOKEN_KERNELS` picks the integer or the
exact-float one for the CPU), and the places are combined in float32, the same operations
for every row whatever its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from distilq.quantize.kernels.token_linear import TOKEN_KERNELS, exact_float_product

# Rows and weight channels are scaled to integers of at most TOP * 2**16 (< 2**23): three
# int8 digits in base 256, the most significant within [-127, 127].
TOP = 127
BASE = 256
DIGITS = 3


def _digits(rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each row of `rows` [n, k] as three digit tensors (float32 holding int8, most
    significant first) and its scale: row ~= scale * (d0 * 2**16 + d1 * 2**8 + d2)."""
    peak = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
    scale = peak / (TOP * BASE**2)
    # Integers below 2**23, exact in float32, as are the digit steps below.
    value = rows.div(scale).round_()
    digits = []
    for _ in range(DIGITS - 1):
        low = torch.remainder(value + BASE // 2, BASE).sub_(BASE // 2)  # in [-128, 127]
        digits.append(low)
        value = value.sub_(low).div_(BASE)
    digits.append(value)  # within [-127, 127]
    return digits[::-1], scale


def weight_operands(weight: torch.Tensor, as_float: bool):
    """The right-hand sides of `exact_linear` for `weight` [out, in]: for place p = 0, 1, 2
    the digits w_p, ..., w_0 stacked along the input ([(p + 1) * in, out], int8, or float32
    holding int8 when `as_float`), and the per-channel scales [out]."""
    digits, scale = _digits(weight.detach().float())
    dtype = torch.float32 if as_float else torch.int8
    stacked = [torch.cat(digits[p::-1], dim=1).t().contiguous().to(dtype) for p in range(DIGITS)]
    # The places sum in units of 2**16 (the last one's): the scales carry that factor.
    return stacked, scale.squeeze(1) * BASE**2


def exact_linear(rows: torch.Tensor, operands, weight_scale: torch.Tensor, bias) -> torch.Tensor:
    """rows [n, in] float -> [n, out] float32: the FP32 layer at 24 bits, summed in integers.
    `operands`, `weight_scale`: from `weight_operands` (float ones when
    `TOKEN_KERNELS.float_weights`). Place p sums the digit products d_i w_j with i + j = p,
    in one GEMM of (d_0 .. d_p) by (w_p .. w_0); the places past 2 are below 2**-23 of the
    largest product, where float32 rounds, and are left out."""
    digits, scale = _digits(rows)
    if TOKEN_KERNELS.float_weights:
        product = exact_float_product
    else:
        digits = [d.to(torch.int8) for d in digits]
        product = torch._int_mm
    out = None
    for p, operand in enumerate(operands):
        # Exact int32 (at most 3 * 3072 * 2**14 < 2**31); one float32 rounding per place.
        place = product(digits[0] if p == 0 else torch.cat(digits[: p + 1], dim=1), operand)
        out = place.float() if out is None else out.mul_(BASE).add_(place)
    out.mul_(weight_scale).mul_(scale)
    return out if bias is None else out.add_(bias)


class ExactLinear(nn.Linear):
    """An FP32 Linear of a per-token model (same weights, same file), run by `exact_linear`."""

    CHUNK_ROWS = 2048  # as Int8TokenLinear's: temporaries stay under glibc's mmap threshold

    @classmethod
    def from_float(cls, linear: nn.Linear) -> ExactLinear:
        exact = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta")
        exact.weight, exact.bias = linear.weight, linear.bias
        exact._made = None
        return exact

    def _operands(self):
        """`weight_operands` for the kernel in use (made once, not saved)."""
        as_float = TOKEN_KERNELS.float_weights
        if self._made is None or self._made[0] != as_float:
            self._made = (as_float, *weight_operands(self.weight, as_float))
        return self._made[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        TOKEN_KERNELS.kernel()  # chooses the kernel for this CPU, once
        operands, scale = self._operands()
        bias = None if self.bias is None else self.bias.detach()
        rows = x.reshape(-1, self.in_features)
        out = torch.cat(
            [exact_linear(part, operands, scale, bias) for part in rows.split(self.CHUNK_ROWS)]
        )
        return out.reshape(*x.shape[:-1], self.out_features)


def keep_exact(model: nn.Module) -> None:
    """Run every FP32 Linear layer of `model` as an `ExactLinear` (weights shared)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, ExactLinear.from_float(module))
