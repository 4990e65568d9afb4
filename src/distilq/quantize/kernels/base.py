"""What every INT8 layer kind shares: the `LayerKind` interface, quiet model loading, torch's
quantized engine, and symmetric per-row int8."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Files of layers every reader of distilq's INT8 files runs as written.
FORMAT = "distilq-int8/1"


class LayerKind:
    """One kind of INT8 layer: how it is made from a float module (`quantize`), written to
    and read from the INT8 file (`tensors`, `entry`, `load`), and what a model holding it
    needs (`prepare`). Its module's `forward` runs it.

    A new kind is one subclass in a module of its own, registered in `kernels/__init__.py`.
    """

    module: type[nn.Module]  # the INT8 module this kind makes
    format: str = FORMAT  # the file format a file holding this kind must declare

    def quantize(self, float_module: nn.Module, per_channel: bool) -> nn.Module:
        """The INT8 module for `float_module` (`per_channel`: one weight scale per row)."""
        raise NotImplementedError

    def tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's tensors on disk, by name under the module's own."""
        raise NotImplementedError

    def entry(self, module: nn.Module) -> dict:
        """The module's record in the file's layout (read back by `load`)."""
        return {}

    def load(self, tensors: dict[str, torch.Tensor], entry: dict) -> nn.Module:
        """The module rebuilt from what `tensors` and `entry` wrote."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Set up a model that holds (or, after quantizing, will run) layers of this kind."""


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Within: transformers' per-load progress bar is off (restored after: nothing
    process-wide). No warning is hidden: the per-tensor kinds' deprecation (torch's
    quantized tensors) shows where they run."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Pack weights for engine `name`; torch's process-wide engine is restored after (the
    packed weights keep their engine's kernels)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: the values and the scales."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def linear_tensors(weight_int8, weight_scale, bias) -> dict[str, torch.Tensor]:
    """A quantized Linear's tensors on disk (every Linear kind writes these three)."""
    tensors = {"weight_int8": weight_int8, "weight_scale": weight_scale}
    if bias is not None:
        tensors["bias"] = bias
    return tensors
