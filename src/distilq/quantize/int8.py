"""The quantization seam: `quantize(model, recipe) -> model` and the INT8 file on disk.

The backend (torch's dynamic quantized Linear kernels today) stays behind this module, so it
can move to torchao or another runtime without touching callers. On disk the INT8 model is
a safetensors file of plain int8 tensors and their scales, rebuilt at load: nothing is
ever unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distilq.errors import InputError, IntegrityError
from distilq.quantize.recipes import Recipe, get_recipe

WEIGHTS_FILE = "model.safetensors"
FORMAT = "distilq-int8/1"
# Files with per-token Linear layers: a reader of /1 alone would run them per tensor.
FORMAT_PER_TOKEN = "distilq-int8/2"

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Within: hide torch's deprecation noise about torch.ao and quantized tensors, and
    transformers' per-load progress bar. Both are restored after: nothing process-wide."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
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


with quiet_torch():
    from torch.ao.nn.quantized import dynamic as nnqd


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: the values and the scales."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Embedding(nn.Module):
    """An embedding table kept as int8 with one scale per row; rows are expanded on lookup."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        return cls(*_int8_rows(embedding.weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * self.weight_scale[ids].unsqueeze(-1)


def token_linear(
    rows: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias
) -> torch.Tensor:
    """rows [n, in] float -> [n, out]: each row quantized to INT8 with its own scale, an
    integer GEMM (s8 x s8 -> s32, exact), then scaled back by the row's and each output
    channel's scale."""
    # Two reads, no temporary: faster here than abs().amax() or vector_norm(ord=inf).
    peak = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())
    scale = peak.clamp_(min=1e-12).div_(127)
    q = rows.div(scale).round_().to(torch.int8)  # |rows / scale| <= 127 by construction
    # float() then in-place scaling: faster than a type-promoting int32 x float32 mul.
    out = torch._int_mm(q, weight_t).float().mul_(weight_scale).mul_(scale)
    return out if bias is None else out.add_(bias)


class TokenKernels:
    """The kernel of every Int8TokenLinear (`token_linear`), eager or compiled.

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
        self.compiled = None  # the compiled kernel, once it passed its check
        self._wanted = os.environ.get("DISTILQ_COMPILE") == "1"
        self._tried = False
        self._lock = threading.Lock()

    def kernel(self):
        """The kernel to run now (compiled first, once, if DISTILQ_COMPILE=1 asks for it)."""
        if self._wanted and not self._tried:
            self.compile()
        return self.linear

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
            linear = torch.compile(token_linear, dynamic=True, fullgraph=True)
            same = _same_bits(linear)
        except Exception as e:  # no C++ compiler, or an inductor limit: eager is correct too
            log.warning("per-token INT8 kernel stays eager: torch.compile failed (%s)", e)
            return
        if not same:
            log.warning("per-token INT8 kernel stays eager: the compiled one rounds differently")
            return
        self.linear = self.compiled = linear
        log.info("per-token INT8 kernel compiled in %.1f s", time.perf_counter() - start)


def _same_bits(linear) -> bool:
    """The compiled kernel gives eager's bits on 1 and n rows, odd widths and outlier features
    (this also compiles it, for any row count, before a thread uses it)."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n, width in ((1, 67), (37, 200)):
            rows = torch.randn(n, width, generator=gen) * torch.rand(n, 1, generator=gen) * 50
            rows[:, 3] *= 40
            weight_t = torch.randint(-127, 128, (width, 96), dtype=torch.int8, generator=gen)
            weight_scale, bias = torch.rand(96, generator=gen) / 50, torch.randn(96, generator=gen)
            args = (rows, weight_t, weight_scale, bias)
            if not torch.equal(linear(*args), token_linear(*args)):
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

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8TokenLinear:
        return cls(*_int8_rows(linear.weight), linear.bias)

    @property
    def weight_int8(self) -> torch.Tensor:
        """The weights as [out, in] int8, the layout on disk."""
        return self.weight_t.t()

    # Rows per kernel call: its temporaries (int8 rows, int32 product, float output) stay
    # under glibc's 32 MiB mmap threshold, so long inputs reuse heap memory instead of
    # page-faulting fresh mappings in every layer (a quarter of eager time on 512-token
    # reviews here). Rows are independent: the result is the same to the bit.
    CHUNK_ROWS = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        kernel, args = TOKEN_KERNELS.kernel(), (self.weight_t, self.weight_scale, self.bias)
        if len(rows) <= self.CHUNK_ROWS:
            out = kernel(rows, *args)
        else:
            out = rows.new_empty(len(rows), self.out_features)
            chunks = zip(rows.split(self.CHUNK_ROWS), out.split(self.CHUNK_ROWS), strict=True)
            for part, into in chunks:
                into.copy_(kernel(part, *args))
        return out.reshape(*x.shape[:-1], self.out_features)


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


def linear_names(model: nn.Module) -> list[str]:
    """Names of the float `nn.Linear` modules, in model order."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _embedding_names(model: nn.Module) -> list[str]:
    emb = model.get_input_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    # Word and position tables; token-type tables are tiny and left as they are.
    return [n for n in names if model.get_submodule(n) is emb or "position" in n]


def quantize(
    model: nn.Module,
    recipe: str | Recipe,
    keep_fp32: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> nn.Module:
    """Return an INT8 copy of `model` made by `recipe`; `model` is left untouched.

    `keep_fp32` names Linear layers that stay FP32. `only` (sensitivity analysis) quantizes
    just those Linear layers and no embeddings.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    names = linear_names(model)
    keep = set(keep_fp32)
    unknown = keep.difference(names)
    if unknown:
        raise InputError(f"not Linear layers of this model: {', '.join(sorted(unknown))}")
    targets = [n for n in names if n not in keep] if only is None else list(only)
    out = copy.deepcopy(model).eval()
    with quantized_engine(recipe.engine):
        for name in targets:
            linear = out.get_submodule(name)
            if recipe.activations == "per-token":
                _set_module(out, name, Int8TokenLinear.from_float(linear))
                continue
            with quiet_torch():
                qweight = _quantize_weight(linear.weight, recipe.per_channel)
            _set_module(out, name, _int8_linear(qweight, linear.bias))
    if recipe.int8_embeddings and only is None:
        for name in _embedding_names(out):
            _set_module(out, name, Int8Embedding.from_float(out.get_submodule(name)))
    if recipe.activations == "per-token":
        use_rowwise_attention(out)
    return out


def save_int8(model: nn.Module, recipe: Recipe, directory: str | Path) -> Path:
    """Write the INT8 model's weights as safetensors (int8 tensors + scales); return the path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    linear: dict[str, dict] = {}
    embeddings: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nnqd.Linear):
            qweight, bias = module._weight_bias()
            per_channel = qweight.qscheme() == torch.per_channel_affine
            tensors[f"{name}.weight_int8"] = qweight.int_repr()
            tensors[f"{name}.weight_scale"] = (
                qweight.q_per_channel_scales() if per_channel else torch.tensor([qweight.q_scale()])
            ).float()
            if bias is not None:
                tensors[f"{name}.bias"] = bias
            linear[name] = {"per_channel": per_channel}
        elif isinstance(module, Int8TokenLinear):
            tensors[f"{name}.weight_int8"] = module.weight_int8
            tensors[f"{name}.weight_scale"] = module.weight_scale
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias
            linear[name] = {"per_channel": True, "activations": "per-token"}
        elif isinstance(module, Int8Embedding):
            embeddings.append(name)
    quantized = tuple(f"{n}." for n in linear)
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.startswith(quantized):
            tensors[key] = value
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    # One metadata key: safetensors writes several in hash-map order, so bytes would differ.
    per_token = any(v.get("activations") == "per-token" for v in linear.values())
    layout = {
        "format": FORMAT_PER_TOKEN if per_token else FORMAT,
        "engine": recipe.engine,
        "linear": linear,
        "int8_embeddings": embeddings,
    }
    metadata = {"distilq": json.dumps(layout, sort_keys=True)}
    path = Path(directory) / WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read_int8_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The layout metadata and the tensors of a `save_int8` file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads((f.metadata() or {}).get("distilq", "{}"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:
        raise IntegrityError(f"{path}: unreadable INT8 weights: {e}") from e
    if layout.get("format") not in (FORMAT, FORMAT_PER_TOKEN):
        raise IntegrityError(f"{path}: not a distilq INT8 file (format {layout.get('format')!r})")
    return layout, tensors


def load_int8(directory: str | Path) -> nn.Module:
    """Rebuild an INT8 model saved by `save_int8` (config.json beside the weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    layout, tensors = _read_int8_file(path)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    with quiet_torch():
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    for name in layout["int8_embeddings"]:
        weight, scale = tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"]
        _set_module(model, name, Int8Embedding(weight, scale))
    linear = layout["linear"]
    int8_parts = {
        name: (
            tensors.pop(f"{name}.weight_int8"),
            tensors.pop(f"{name}.weight_scale"),
            tensors.pop(f"{name}.bias", None),
        )
        for name in linear
    }
    # Float state first: torch's quantized Linear cannot take part in load_state_dict.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    replaced = {f"{n}.{p}" for n in linear for p in ("weight", "bias")}
    missing = [k for k in missing if k not in replaced]
    if missing or unexpected:
        raise IntegrityError(
            f"{path}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    with quantized_engine(layout["engine"]):
        for name, (int8, scale, bias) in int8_parts.items():
            if linear[name].get("activations") == "per-token":
                module = Int8TokenLinear(int8, scale, bias)
            else:
                module = _int8_linear(_qweight(int8, scale, linear[name]), bias)
            _set_module(model, name, module)
    if layout["format"] == FORMAT_PER_TOKEN:
        use_rowwise_attention(model)
    return model.eval()


def _qweight(int8: torch.Tensor, scale: torch.Tensor, scheme: dict) -> torch.Tensor:
    """A quantized weight tensor from its int8 values and scales (zero points are 0)."""
    with quiet_torch():
        if scheme["per_channel"]:
            zero = torch.zeros(scale.shape, dtype=torch.long)
            return torch._make_per_channel_quantized_tensor(int8, scale.double(), zero, 0)
        return torch._make_per_tensor_quantized_tensor(int8, scale.item(), 0)
