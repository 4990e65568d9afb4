"""Linear layers with per-channel INT8 weights and per-token INT8 activations, on torch's
integer GEMM (or exact float32 GEMMs where it is slow), and the choice of that kernel."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
from torch import nn

from distilq.quantize.kernels.base import int8_rows

log = logging.getLogger(__name__)


def _row_scales(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's INT8 values (as floats, |q| <= 127 by construction) and its scale."""
    # Two reads, no temporary: faster here than abs().amax() or vector_norm(ord=inf).
    peak = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())
    scale = peak.clamp_(min=1e-12).div_(127)
    return rows.div(scale).round_(), scale


def token_linear(
    rows: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias
) -> torch.Tensor:
    """rows [n, in] float -> [n, out]: each row quantized to INT8 with its own scale, an
    integer GEMM (s8 x s8 -> s32, exact), then scaled back by the row's and each output
    channel's scale. `weight_t`: [in, out] int8."""
    q, scale = _row_scales(rows)
    # float() then in-place scaling: faster than a type-promoting int32 x float32 mul.
    out = torch._int_mm(q.to(torch.int8), weight_t).float().mul_(weight_scale).mul_(scale)
    return out if bias is None else out.add_(bias)


# A float32 GEMM of int8 values is exact while every partial sum stays within 2**24:
# 1024 products of at most 128 * 128 do, in any order of summation.
EXACT_FLOAT_DEPTH = 1024


def token_linear_float(
    rows: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias
) -> torch.Tensor:
    """`token_linear`'s very bits, by float32 GEMMs: for CPUs without VNNI or AMX, where
    torch's integer GEMM runs a slow reference loop (pytorch#136942). `weight_t`: [in, out]
    float32 holding the int8 values. Each slice of at most EXACT_FLOAT_DEPTH inputs gives
    exact integers; slices are summed in int32, as the integer GEMM sums."""
    q, scale = _row_scales(rows)
    out = exact_float_product(q, weight_t).mul_(weight_scale).mul_(scale)
    return out if bias is None else out.add_(bias)


def exact_float_product(q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """q [n, in] @ weight_t [in, out], both float32 holding int8 values: the integer
    product, exact, as torch._int_mm(...).float() gives it (one GEMM when `in` fits a
    slice; else slices summed in int32)."""
    depth = q.shape[1]
    if depth <= EXACT_FLOAT_DEPTH:
        return q @ weight_t  # exact integers below 2**24: what int32 -> float32 gives too
    total = None
    for start in range(0, depth, EXACT_FLOAT_DEPTH):
        stop = start + EXACT_FLOAT_DEPTH
        part = (q[:, start:stop] @ weight_t[start:stop]).to(torch.int32)
        total = part if total is None else total.add_(part)
    return total.float()


class TokenKernels:
    """The kernel of every Int8TokenLinear, eager or compiled: `token_linear` on CPUs whose
    integer GEMM is fast (VNNI, AMX), else `token_linear_float`, if it gives the same bits
    here (checked once; the integer kernel stays if not). `float_weights` tells the layers
    which weights to pass.

    Eager unless DISTILQ_COMPILE=1: then, at the first per-token layer a process runs,
    torch.compile fuses the kernel's quantize and dequantize passes into vectorised loops.
    That is worth it for long jobs only: in-process it ran 0-21% faster here (bench_int8),
    and compiling costs about 5 s with inductor's on-disk cache warm, 18 s the first time
    on a machine. The compiled kernel must give the very bits eager gives, checked on the
    spot, so that a row's answer never depends on which one ran; if it does not, or there
    is no C++ compiler, eager stays, with a warning.
    """

    def __init__(self) -> None:
        self.linear = token_linear  # the kernel in use
        self.float_weights = False  # whether it takes float32 weights (token_linear_float)
        self.compiled = None  # the compiled kernel, once it passed its check
        self._wanted = os.environ.get("DISTILQ_COMPILE") == "1"
        self._chosen = self._tried = False
        self._lock = threading.Lock()

    def kernel(self):
        """The kernel to run now (chosen for this CPU at the first call; then compiled,
        once, if DISTILQ_COMPILE=1 asks for it)."""
        if not self._chosen:
            self.choose()
        if self._wanted and not self._tried:
            self.compile()
        return self.linear

    def choose(self, cpu_features: list[str] | None = None) -> None:
        """The eager kernel for a CPU with `cpu_features` (default: this one's)."""
        from distilq.hardware import cpu_features as read_features
        from distilq.recipes import INTEGER_GEMM_FEATURES

        with self._lock:
            features = read_features() if cpu_features is None else cpu_features
            slow = not any(f in features for f in INTEGER_GEMM_FEATURES)
            exact = slow and _same_bits(token_linear_float, float_weights=True)
            if slow and not exact:
                log.warning(
                    "per-token INT8 stays on torch's integer GEMM: float32 GEMM is not exact here"
                )
            self.linear = token_linear_float if exact else token_linear
            self.float_weights = exact
            self._chosen = True
        if exact:
            log.info("per-token INT8 runs float32 GEMMs, exact: this CPU has no VNNI or AMX")

    def compile(self) -> bool:
        """Switch to the compiled kernel (tried once); whether it is in use."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self._switch()
        return self.compiled is not None

    def _switch(self) -> None:
        log.info("compiling the per-token INT8 kernel (once per process)")
        start = time.perf_counter()
        try:
            linear = torch.compile(self.linear, dynamic=True, fullgraph=True)
            same = _same_bits(linear, self.float_weights)
        except Exception as e:  # no C++ compiler, or an inductor limit: eager is correct too
            log.warning("per-token INT8 kernel stays eager: torch.compile failed (%s)", e)
            return
        if not same:
            log.warning("per-token INT8 kernel stays eager: the compiled one rounds differently")
            return
        self.linear = self.compiled = linear
        log.info("per-token INT8 kernel compiled in %.1f s", time.perf_counter() - start)


def _same_bits(linear, float_weights: bool = False) -> bool:
    """`linear` gives the integer kernel's bits on 1 and n rows, odd widths, widths past one
    float slice and outlier features (this also compiles a compiled kernel, for any row
    count, before a thread uses it). `float_weights`: it takes float32 weights."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n, width in ((1, 67), (37, 200), (5, 2 * EXACT_FLOAT_DEPTH + 9)):
            rows = torch.randn(n, width, generator=gen) * torch.rand(n, 1, generator=gen) * 50
            rows[:, 3] *= 40
            weight_t = torch.randint(-127, 128, (width, 96), dtype=torch.int8, generator=gen)
            weight_t[:, 0] = 127  # the largest products, all of one sign
            rows[0, :] = rows[0, :].abs()
            weight_scale, bias = torch.rand(96, generator=gen) / 50, torch.randn(96, generator=gen)
            weight = weight_t.float() if float_weights else weight_t
            if not torch.equal(
                linear(rows, weight, weight_scale, bias),
                token_linear(rows, weight_t, weight_scale, bias),
            ):
                return False
    return True


TOKEN_KERNELS = TokenKernels()


class Int8TokenLinear(nn.Module):
    """A Linear with per-channel INT8 weights and per-token INT8 activations.

    Each row of the input (a token) is quantized with its own scale, so a row's output
    never depends on the other rows of the batch: one text, one answer, whatever the batch
    or its padding. The product is torch's integer GEMM (s8 x s8 -> s32, exact), then
    scaled back to float by the row's and the output channel's scales (`token_linear`).
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias):
        super().__init__()
        # [in, out], contiguous: the layout torch._int_mm reads fastest.
        self.register_buffer("weight_t", weight_int8.t().contiguous())
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self._weight_float: torch.Tensor | None = None  # see _float_weight

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8TokenLinear:
        return cls(*int8_rows(linear.weight), linear.bias)

    @property
    def weight_int8(self) -> torch.Tensor:
        """The weights as [out, in] int8, the layout on disk."""
        return self.weight_t.t()

    # Rows per kernel call: its temporaries (int8 rows, int32 product, float output) stay
    # under glibc's 32 MiB mmap threshold, so long inputs reuse heap memory instead of
    # page-faulting fresh mappings in every layer (a quarter of eager time on 512-token
    # reviews here). Rows are independent: the result is the same to the bit.
    CHUNK_ROWS = 2048

    def _float_weight(self) -> torch.Tensor:
        """The int8 weights as float32, made once (for `token_linear_float`; not saved)."""
        if self._weight_float is None:
            self._weight_float = self.weight_t.float()
        return self._weight_float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        kernel = TOKEN_KERNELS.kernel()
        weight = self._float_weight() if TOKEN_KERNELS.float_weights else self.weight_t
        args = (weight, self.weight_scale, self.bias)
        if len(rows) <= self.CHUNK_ROWS:
            out = kernel(rows, *args)
        else:
            out = rows.new_empty(len(rows), self.out_features)
            chunks = zip(rows.split(self.CHUNK_ROWS), out.split(self.CHUNK_ROWS), strict=True)
            for part, into in chunks:
                into.copy_(kernel(part, *args))
        return out.reshape(*x.shape[:-1], self.out_features)
