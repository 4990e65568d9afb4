"""Attention as one `MultiHeadAttention` node (ONNX Runtime's contrib op) per layer.

The dynamo exporter writes scaled dot-product attention as two dozen nodes (reshapes,
transposes, the mask's arithmetic) that ONNX Runtime's optimizer does not recognise: they
took about 20% of a full-size INT8 forward. The layer's projections are found by their
torch names (`graph.WEIGHT_SUFFIX`), so no pattern of the exporter's is matched: the
fused op reads the query, key and value after their biases, and feeds the output
projection; what it replaces is then unused and dropped.
"""

from __future__ import annotations

from distilq.quantize.onnx.graph import WEIGHT_SUFFIX, drop_dead, use_microsoft_domain

MASK = "attention_mask.int32"  # MultiHeadAttention takes its key padding mask as int32


def attention_layers(model) -> list[tuple[str, str, str, str]]:
    """(query, key, value, output) Linear names of each attention layer: DistilBERT's
    q_lin/k_lin/v_lin/out_lin, BERT's and RoBERTa's self.query/key/value + output.dense."""
    layers = []
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("q_lin", "k_lin", "v_lin", "out_lin")):
            layers.append(tuple(f"{name}.{a}" for a in ("q_lin", "k_lin", "v_lin", "out_lin")))
        elif all(hasattr(module, a) for a in ("query", "key", "value")) and name.endswith(".self"):
            parent = name[: -len(".self")]
            layers.append(
                (f"{name}.query", f"{name}.key", f"{name}.value", f"{parent}.output.dense")
            )
    return layers


def fuse_attention(graph, model) -> int:
    """Replace each attention layer of `graph` (changed in place) by MultiHeadAttention;
    returns how many were fused (0: the graph is left as it was)."""
    from onnx import TensorProto, helper

    g = graph.graph
    by_weight = {n.input[1]: n for n in g.node if n.op_type == "MatMul"}
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    heads = getattr(model.config, "n_heads", None) or model.config.num_attention_heads
    fused = []
    for q, k, v, out in attention_layers(model):
        projected = []
        for name in (q, k, v):
            matmul = by_weight.get(name + WEIGHT_SUFFIX)
            adds = consumers.get(matmul.output[0], []) if matmul else []
            if len(adds) != 1 or adds[0].op_type != "Add":
                return 0  # not the shape this fusion knows: leave the graph unfused
            projected.append(adds[0].output[0])
        output = by_weight.get(out + WEIGHT_SUFFIX)
        if output is None:
            return 0
        fused.append((projected, output, out))
    if not fused:
        return 0
    g.node.insert(0, helper.make_node("Cast", ["attention_mask"], [MASK], to=TensorProto.INT32))
    for (query, key, value), output, name in fused:
        context = f"{name}.context"
        attention = helper.make_node(
            "MultiHeadAttention", [query, key, value, "", MASK], [context],
            domain="com.microsoft", num_heads=heads, name=f"{name}.attention",
        )  # fmt: skip
        g.node.insert(list(g.node).index(output), attention)
        output.input[0] = context
    drop_dead(graph)
    use_microsoft_domain(graph)
    return len(fused)
