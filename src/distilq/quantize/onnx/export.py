"""A float sequence classifier as an ONNX graph: exported by torch's dynamo exporter,
normalised so every Linear is `MatMul(x, <layer>.weight_t)` (its bias a separate `Add`),
then fused where the answer stays the same: attention as one MultiHeadAttention per layer
(`attention.py`), and ONNX Runtime's transformer optimizer's GELU and LayerNorm fusions.

Why the dynamo exporter (`torch.onnx.export(..., dynamo=True)`): it is the one torch
maintains (the TorchScript exporter is deprecated since torch 2.9) and it needs no stack of
its own (optimum-onnx pins its own transformers). Its attention is not a pattern ONNX
Runtime's optimizer recognises, hence `attention.py`. Weight initializers are renamed after
the torch modules they came from, found by their values, so no step depends on the
exporter's names.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import warnings
from collections.abc import Iterator

import numpy as np

from distilq.quantize.onnx.attention import fuse_attention
from distilq.quantize.onnx.graph import TABLE_SUFFIX, WEIGHT_SUFFIX
from distilq.quantize.onnx.session import run_graph

log = logging.getLogger("distilq")

OPSET = 18
# The optimizer's fusions are kept only if the graph's logits move by no more than this.
FUSION_TOLERANCE = 1e-4


def graph_inputs(model) -> list[str]:
    """The tokenizer outputs the graph takes: token types only where the model has them."""
    import inspect

    names = ["input_ids", "attention_mask"]
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    if takes_types and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


def export_float(model):
    """`model` (a transformers sequence classifier) as a normalised, fused ONNX graph
    (an `onnx.ModelProto`) with dynamic batch and token axes, and logits out."""
    import onnx
    import torch

    names = graph_inputs(model)
    example = {n: torch.ones(2, 8, dtype=torch.long) for n in names}
    if "token_type_ids" in example:
        example["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            model.eval(),
            (),
            kwargs=example,
            dynamic_shapes={n: {0: batch, 1: tokens} for n in names},
            input_names=names,
            output_names=["logits"],
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
        )
    with tempfile.TemporaryDirectory(prefix="distilq-export-") as tmp:
        program.save(f"{tmp}/float.onnx", external_data=False)  # weights in the proto
        graph = onnx.load(f"{tmp}/float.onnx")
    _name_weights(graph, model)
    return _fused(graph, model, _probe(names, model.config.vocab_size))


def _probe(names: list[str], vocab: int) -> dict[str, np.ndarray]:
    """Inputs the fusions are checked on: two texts of 12 tokens, the second padded after 5
    (masked positions are where a fused attention could differ)."""
    ids = (np.arange(24).reshape(2, 12) * 7919 + 11) % vocab
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    probe = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        probe["token_type_ids"] = np.zeros_like(ids)
    return probe


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Within: the exporter's notes that are no news to a user (torchvision absent; inputs
    sharing one dynamic axis) are hidden. Deprecations still show."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*will not be used, since it shares.*")
            yield
    finally:
        registration.setLevel(level)


def _digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()


def _name_weights(graph, model) -> None:
    """Rename the initializers of Linear weights (`<layer>.weight_t`, stored [in, out]) and
    embedding tables (`<table>.weight`) after their torch modules, found by their values,
    and turn each Gemm into MatMul + Add, so a Linear is found by its name alone."""
    from onnx import helper, numpy_helper
    from torch import nn

    by_value: dict[str, tuple[str, bool]] = {}  # digest -> (new name, transpose it)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach().numpy()
            by_value[_digest(w.T)] = (name + WEIGHT_SUFFIX, False)
            by_value[_digest(w)] = (name + WEIGHT_SUFFIX, True)  # a Gemm's transB operand
        elif isinstance(module, nn.Embedding):
            by_value[_digest(module.weight.detach().numpy())] = (name + TABLE_SUFFIX, False)
    renamed = {}
    for init in graph.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.ndim != 2 or values.dtype != np.float32 or _digest(values) not in by_value:
            continue
        target, transpose = by_value[_digest(values)]
        renamed[init.name] = target
        values = np.ascontiguousarray(values.T if transpose else values)
        init.CopyFrom(numpy_helper.from_array(values, target))
    for node in list(graph.graph.node):
        node.input[:] = [renamed.get(i, i) for i in node.input]
        if node.op_type == "Gemm" and node.input[1].endswith(WEIGHT_SUFFIX):
            at, inputs, out = list(graph.graph.node).index(node), list(node.input), node.output[0]
            replaced = [helper.make_node("MatMul", inputs[:2], [out], name=node.name)]
            if len(inputs) > 2:  # the bias
                replaced[0].output[0] = out + "_mm"
                replaced.append(helper.make_node("Add", [out + "_mm", inputs[2]], [out]))
            graph.graph.node.remove(node)
            for i, new in enumerate(replaced):
                graph.graph.node.insert(at + i, new)
    weights = [n for n in renamed.values() if n.endswith(WEIGHT_SUFFIX)]
    used = [n.input[1] for n in graph.graph.node if n.op_type == "MatMul"]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if sorted(set(weights)) != sorted(n + WEIGHT_SUFFIX for n in linears) or not set(
        weights
    ).issubset(used):
        raise RuntimeError(
            f"ONNX export: {len(set(weights))} of the model's {len(linears)} Linear weights "
            "found as MatMul operands"
        )


def _fused(graph, model, probe: dict):
    """The graph with attention as MultiHeadAttention (`attention.py`) and ONNX Runtime's
    transformer fusions, if its logits stay within FUSION_TOLERANCE of the unfused graph's
    on `probe`; else the graph as it was."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    config = model.config
    candidate = onnx.ModelProto()
    candidate.CopyFrom(graph)
    fuse_attention(candidate, model)
    options = FusionOptions("bert")
    # EmbedLayerNormalization would take the word table as a float input: int8 tables
    # (`rewrite.int8_tables`) need its Gather.
    options.enable_embed_layer_norm = False
    # SkipLayerNormalization is slower than what it fuses (`session.DISABLED_OPTIMIZERS`).
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    heads = getattr(config, "n_heads", None) or config.num_attention_heads
    hidden = getattr(config, "dim", None) or config.hidden_size
    with tempfile.TemporaryDirectory(prefix="distilq-fuse-") as tmp:
        # A path, not the proto: given a proto, the optimizer moves its constants out of
        # reach of ONNX Runtime's shape inference.
        onnx.save(candidate, f"{tmp}/float.onnx")
        fused = optimize_model(
            f"{tmp}/float.onnx", model_type="bert", num_heads=heads, hidden_size=hidden,
            optimization_options=options,
        ).model  # fmt: skip
    moved = float(np.abs(run_graph(graph, probe) - run_graph(fused, probe)).max())
    if moved > FUSION_TOLERANCE:
        log.warning("the graph's fusions moved the logits by %.1e: kept unfused", moved)
        return graph
    return fused
