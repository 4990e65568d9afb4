"""The quantization seam: `quantize(model, recipe) -> model` and the INT8 file on disk.

Two engines stay behind this module: torch's quantized kernels (the layer kinds in
`kernels/`) and ONNX Runtime (`quantize.onnx`), so callers never ask which runs. On disk a
torch INT8 model is a safetensors file of plain int8 tensors and their scales, rebuilt at
load (nothing is ever unpickled); an ONNX Runtime one is its graph, `model.onnx`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from distilq.errors import InputError, IntegrityError
from distilq.quantize.kernels import (
    EMBEDDING,
    FORMAT,
    FORMATS,
    LINEAR_KINDS,
    kind_of,
    linear_kind,
)
from distilq.quantize.kernels.base import quantized_engine, quiet_torch
from distilq.quantize.kernels.exact_linear import ExactLinear
from distilq.quantize.kernels.per_token import batch_independent
from distilq.quantize.onnx.session import GRAPH_FILE, OnnxModel
from distilq.recipes import ONNXRUNTIME, Recipe, get_recipe

WEIGHTS_FILE = "model.safetensors"


def linear_names(model: nn.Module) -> list[str]:
    """Names of the float Linear modules (`nn.Linear`, or `ExactLinear` in a per-token
    model), in model order."""
    return [name for name, m in model.named_modules() if type(m) in (nn.Linear, ExactLinear)]


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

    `keep_fp32` names Linear layers that keep their FP32 weights (in a per-token model they
    run summed exactly, `kernels.exact_linear`). `only` (sensitivity analysis) quantizes
    just those Linear layers, no embeddings, and leaves the model's FP32 rest as it is.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    names = linear_names(model)
    keep = set(keep_fp32)
    unknown = keep.difference(names)
    if unknown:
        raise InputError(f"not Linear layers of this model: {', '.join(sorted(unknown))}")
    targets = [n for n in names if n not in keep] if only is None else list(only)
    if recipe.engine == ONNXRUNTIME:
        from distilq.quantize.onnx.build import quantize_onnx

        tables = _embedding_names(model) if recipe.int8_embeddings and only is None else []
        return quantize_onnx(model, recipe, targets, tables)
    kind = LINEAR_KINDS[recipe.activations]
    out = copy.deepcopy(model).eval()
    with quantized_engine(recipe.engine):
        for name in targets:
            _set_module(out, name, kind.quantize(out.get_submodule(name), recipe.per_channel))
    if only is None:
        if recipe.int8_embeddings:
            for name in _embedding_names(out):
                _set_module(out, name, EMBEDDING.quantize(out.get_submodule(name), True))
        kind.prepare(out)
    # else: a sensitivity probe, measured and never shipped: its FP32 rest runs as it is.
    return out


def rows_independent(model: nn.Module | OnnxModel) -> bool:
    """Whether every row of the INT8 `model` gets the same answer in any batch."""
    if isinstance(model, OnnxModel):
        return model.batch_independent
    return batch_independent(model)


def save_int8(model: nn.Module | OnnxModel, recipe: Recipe, directory: str | Path) -> Path:
    """Write the INT8 model's weights as safetensors (int8 tensors + scales), or its ONNX
    graph; return the path."""
    from safetensors.torch import save_file

    if isinstance(model, OnnxModel):
        path = Path(directory) / GRAPH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.graph)
        return path

    tensors: dict[str, torch.Tensor] = {}
    linear: dict[str, dict] = {}
    embeddings: list[str] = []
    formats = {FORMAT}
    for name, module in model.named_modules():
        kind = kind_of(module)
        if kind is None:
            continue
        tensors.update({f"{name}.{k}": v for k, v in kind.tensors(module).items()})
        formats.add(kind.format)
        if kind is EMBEDDING:
            embeddings.append(name)
        else:
            linear[name] = kind.entry(module)
    quantized = tuple(f"{n}." for n in (*linear, *embeddings))
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.startswith(quantized):
            tensors[key] = value
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    # One metadata key: safetensors writes several in hash-map order, so bytes would differ.
    layout = {
        "format": max(formats, key=FORMATS.index),  # the newest any of its layers needs
        "engine": recipe.engine,
        "linear": linear,
        "int8_embeddings": embeddings,
    }
    metadata = {"distilq": json.dumps(layout, sort_keys=True)}
    path = Path(directory) / WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def int8_bytes(model: nn.Module | OnnxModel, recipe: Recipe) -> int:
    """Bytes on disk of the weights file `save_int8` writes for `model`."""
    import tempfile

    if isinstance(model, OnnxModel):
        return len(model.graph)

    with tempfile.TemporaryDirectory(prefix="distilq-size-") as tmp:
        return save_int8(model, recipe, tmp).stat().st_size


def _read_int8_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The layout metadata and the tensors of a `save_int8` file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads((f.metadata() or {}).get("distilq", "{}"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:
        raise IntegrityError(f"{path}: unreadable INT8 weights: {e}") from e
    if layout.get("format") not in FORMATS:
        raise IntegrityError(f"{path}: not a distilq INT8 file (format {layout.get('format')!r})")
    return layout, tensors


def load_int8(directory: str | Path) -> nn.Module | OnnxModel:
    """Rebuild an INT8 model saved by `save_int8` (config.json beside the weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    directory = Path(directory)
    if (directory / GRAPH_FILE).is_file():
        from distilq.quantize.onnx.session import load_graph

        return load_graph(directory / GRAPH_FILE, AutoConfig.from_pretrained(directory))
    path = directory / WEIGHTS_FILE
    layout, tensors = _read_int8_file(path)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    with quiet_torch():
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    layers = {name: (EMBEDDING, {}) for name in layout["int8_embeddings"]}
    layers.update({name: (linear_kind(e), e) for name, e in layout["linear"].items()})
    parts = {name: _pop_under(tensors, name) for name in layers}
    # Float state first: torch's quantized Linear cannot take part in load_state_dict.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    replaced = tuple(f"{name}." for name in layers)
    missing = [k for k in missing if not k.startswith(replaced)]
    if missing or unexpected:
        raise IntegrityError(
            f"{path}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    with quantized_engine(layout["engine"]):
        for name, (kind, entry) in layers.items():
            _set_module(model, name, kind.load(parts[name], entry))
    for kind in dict.fromkeys(kind for kind, _ in layers.values()):
        kind.prepare(model)
    return model.eval()


def _pop_under(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors under module `name`, by their own names, taken out of `tensors`."""
    prefix = f"{name}."
    return {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
