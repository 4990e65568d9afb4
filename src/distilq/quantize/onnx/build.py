"""`quantize` for the onnxruntime engine: the float export (once per model), an INT8
rewrite of the layers asked for, and the `OnnxModel` that runs it."""

from __future__ import annotations

import weakref

from distilq.quantize.onnx import rewrite
from distilq.quantize.onnx.export import OPSET, export_float
from distilq.quantize.onnx.session import (
    DISABLED_OPTIMIZERS,
    OPTIMIZATION_LEVEL,
    PROVIDER,
    OnnxModel,
    describe,
    require_onnxruntime,
)

# A model's float graph: `auto` quantizes one model dozens of times (each sensitivity probe,
# each attempt) and the export takes seconds.
_float_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def float_graph(model):
    """A fresh copy of `model`'s float graph (exported on first use)."""
    import onnx

    if model not in _float_graphs:
        _float_graphs[model] = export_float(model).SerializeToString()
    return onnx.load_from_string(_float_graphs[model])


def quantize_onnx(model, recipe, layers: list[str], tables: list[str]) -> OnnxModel:
    """`model` on ONNX Runtime with the Linear `layers` INT8 by `recipe` and the embedding
    `tables` int8 per row; every other layer runs in float32."""
    require_onnxruntime(f"recipe {recipe.name}")
    import onnx.helper

    graph = float_graph(model)
    make = rewrite.per_token if recipe.activations == "per-token" else rewrite.per_channel
    graph = make(graph, set(layers), recipe.signed_weights)
    if tables:
        graph = rewrite.int8_tables(graph, tables)
    onnx.helper.set_model_props(graph, describe(recipe.activations))
    quantized = OnnxModel(graph.SerializeToString(), model.config, recipe.activations)
    quantized.session()  # opened now: a first call's timing is the model's, not the start's
    return quantized


def onnx_record(model: OnnxModel, recipe) -> dict:
    """What the manifest records of an ONNX Runtime version (`manifest.OnnxRecord`)."""
    import onnxruntime
    import torch

    return {
        "onnxruntime": onnxruntime.__version__,
        "opset": OPSET,
        "graph_sha256": model.sha256,
        "exporter": f"torch.onnx dynamo exporter (torch {torch.__version__})",
        "execution_provider": PROVIDER,
        "optimization_level": OPTIMIZATION_LEVEL,
        "disabled_optimizers": list(DISABLED_OPTIMIZERS),
        "signed_weights": recipe.signed_weights,
    }
