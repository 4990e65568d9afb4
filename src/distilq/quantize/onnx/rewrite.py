"""INT8 rewrites of a normalised float graph (`export.export_float`), by torch layer name.

- `per_token`: each Linear's weights INT8 per output channel, its input quantized per row
  (one scale per token, symmetric), multiplied by `MatMulIntegerToFloat` and scaled back
  per row. Layers that read the same input (query, key, value) share one quantization.
- `per_channel`: ONNX Runtime's own dynamic quantization (one uint8 scale per batch for
  the activations), per-channel weights, as Optimum's `ORTQuantizer` makes it.
- `int8_tables`: embedding tables int8 with one scale per row, gathered then scaled.

`signed_weights` picks the integer product MLAS runs: uint8 x int8 (VPDPBUSD) is exact only
with VNNI; without it MLAS's u8s8 kernel sums pairs in int16 (VPMADDUBSW) and can saturate,
so weights are stored uint8 (offset 128) and MLAS runs its exact u8u8 kernel instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from distilq.quantize.onnx.graph import (
    TABLE_SUFFIX,
    WEIGHT_SUFFIX,
    drop_dead,
    use_microsoft_domain,
)

ZERO_POINT = 128  # activations: symmetric int8 stored as uint8 + 128


def _graph_tools():
    from onnx import TensorProto, helper, numpy_helper

    return TensorProto, helper, numpy_helper


def _int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of `w` [in, out] (one scale per output channel)."""
    scale = np.maximum(np.abs(w).max(axis=0) / 127, 1e-12).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127), scale


def _stored(q: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 values as MLAS will multiply them, with their zero point."""
    if signed:
        return q.astype(np.int8), np.array(0, np.int8)
    return (q + ZERO_POINT).astype(np.uint8), np.array(ZERO_POINT, np.uint8)


def _matmuls(graph, layers: set[str]) -> list:
    wanted = {name + WEIGHT_SUFFIX for name in layers}
    return [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in wanted]


def per_token(graph, layers: set[str], signed_weights: bool):
    """`graph` with the Linear `layers` INT8, activations per token (changed in place)."""
    TensorProto, helper, numpy_helper = _graph_tools()
    g = graph.graph
    weights = {i.name: i for i in g.initializer}

    def const(name: str, value) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    const("pt.127", np.float32(127))
    const("pt.tiny", np.float32(1e-30))
    const("pt.one", np.float32(1))
    const("pt.zp", np.uint8(ZERO_POINT))
    const("pt.last", np.array([-1], np.int64))
    by_input: dict[str, list] = {}
    for node in _matmuls(graph, layers):
        by_input.setdefault(node.input[0], []).append(node)
    for x, nodes in by_input.items():
        p = nodes[0].input[1][: -len(WEIGHT_SUFFIX)] + ".pt."
        width = weights[nodes[0].input[1]].dims[0]
        const(p + "rows", np.array([-1, width], np.int64))
        row = [  # x -> [rows, in]; its per-row scale s; q = round(x / s) + 128 as uint8
            helper.make_node("Reshape", [x, p + "rows"], [p + "x"]),
            # max(x) and -min(x): two reads of x, where Abs would write a copy first
            helper.make_node("ReduceMax", [p + "x", "pt.last"], [p + "hi"], keepdims=0),
            helper.make_node("ReduceMin", [p + "x", "pt.last"], [p + "lo"], keepdims=0),
            helper.make_node("Neg", [p + "lo"], [p + "-lo"]),
            helper.make_node("Max", [p + "hi", p + "-lo", "pt.tiny"], [p + "max1"]),
            helper.make_node("Div", [p + "max1", "pt.127"], [p + "s"]),
            helper.make_node("Shape", [p + "s"], [p + "n"]),
            helper.make_node("Expand", ["pt.zp", p + "n"], [p + "zps"]),
            helper.make_node("QuantizeLinear", [p + "x", p + "s", p + "zps"], [p + "q"], axis=0),
            helper.make_node("Unsqueeze", [p + "s", "pt.last"], [p + "s1"]),
            helper.make_node("Shape", [x], [p + "lead"], end=-1),
        ]
        products = _row_products(nodes, p, weights, const, signed_weights)
        at = min(list(g.node).index(n) for n in nodes)
        for node in nodes:
            g.node.remove(node)
        for i, node in enumerate(row + products):
            g.node.insert(at + i, node)
    use_microsoft_domain(graph)
    drop_dead(graph)
    return graph


def _row_products(nodes, p: str, weights: dict, const, signed_weights: bool) -> list:
    """Each Linear of `nodes` (which share the input quantized as `p`q, scaled `p`s1) as an
    integer product of INT8 columns, the row's scale after, reshaped to the output's."""
    _, helper, numpy_helper = _graph_tools()
    products = []
    for node in nodes:
        name = node.input[1][: -len(WEIGHT_SUFFIX)]
        q, scale = _int8_columns(numpy_helper.to_array(weights[node.input[1]]))
        values, zero = _stored(q, signed_weights)
        w, wz = const(name + ".weight_int8", values), const(name + ".weight_zero", zero)
        ws = const(name + ".weight_scale", scale)
        out = const(name + ".out", np.array([values.shape[1]], np.int64))
        y = node.output[0]
        products += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [p + "q", w, "pt.one", ws, "pt.zp", wz],
                [y + ".int"],
                domain="com.microsoft",
            ),
            helper.make_node("Mul", [y + ".int", p + "s1"], [y + ".rows"]),
            helper.make_node("Concat", [p + "lead", out], [y + ".shape"], axis=0),
            helper.make_node("Reshape", [y + ".rows", y + ".shape"], [y]),
        ]
    return products


def per_channel(graph, layers: set[str], signed_weights: bool):
    """`graph` with the Linear `layers` quantized by ONNX Runtime's `quantize_dynamic`
    (per-channel weights, activations one uint8 scale per call)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n.name for n in _matmuls(graph, layers)]
    if not nodes:
        return graph
    with tempfile.TemporaryDirectory(prefix="distilq-ort-") as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(
            graph,
            out,
            per_channel=True,
            weight_type=QuantType.QInt8 if signed_weights else QuantType.QUInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load(out)


def int8_tables(graph, tables: list[str]):
    """`graph` with the embedding `tables` int8 per row: a Gather of the int8 rows and of
    their scales, multiplied back (changed in place)."""
    TensorProto, helper, numpy_helper = _graph_tools()
    g = graph.graph
    found = {i.name: i for i in g.initializer}
    for table in (t + TABLE_SUFFIX for t in tables):
        if table not in found:
            continue  # not gathered by the graph (e.g. positions sliced): left float
        w = numpy_helper.to_array(found[table])
        scale = np.maximum(np.abs(w).max(axis=1) / 127, 1e-12).astype(np.float32)
        q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        g.initializer.append(numpy_helper.from_array(q, table + "_int8"))
        g.initializer.append(numpy_helper.from_array(scale[:, None], table + "_scale"))
        for node in [n for n in g.node if n.op_type == "Gather" and n.input[0] == table]:
            at = list(g.node).index(node)
            ids, out = node.input[1], node.output[0]
            g.node.remove(node)
            for i, new in enumerate(
                [
                    helper.make_node("Gather", [table + "_int8", ids], [out + ".q"], axis=0),
                    helper.make_node("Gather", [table + "_scale", ids], [out + ".s"], axis=0),
                    helper.make_node("Cast", [out + ".q"], [out + ".f"], to=TensorProto.FLOAT),
                    helper.make_node("Mul", [out + ".f", out + ".s"], [out]),
                ]
            ):
                g.node.insert(at + i, new)
    drop_dead(graph)
    return graph
