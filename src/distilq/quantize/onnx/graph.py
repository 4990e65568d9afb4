"""What every step on an exported graph shares: the names distilq gives what it finds in it
(`export._name_weights`), and dropping what no longer reaches the logits."""

WEIGHT_SUFFIX = ".weight_t"  # a Linear's weight, transposed to [in, out] as MatMul takes it
TABLE_SUFFIX = ".weight"  # an embedding table, [rows, dim]


def drop_dead(graph) -> None:
    """Remove (in place) the nodes none of whose outputs reach the graph's outputs, then
    the initializers no node reads."""
    g = graph.graph
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(kept))
    used = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)


def use_microsoft_domain(graph) -> None:
    """Declare ONNX Runtime's contrib operators' domain, which the fused nodes are in."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
