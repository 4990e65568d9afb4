"""The report's Recipe section: how the INT8 model was made, and how `auto` chose."""

from __future__ import annotations

from distilq.manifest import FallbackRecord, OnnxRecord, RecipeRecord
from distilq.report.charts import SENSITIVE_LAYERS_SHOWN
from distilq.report.tables import MIB, markdown_table, pct

ACTIVATIONS = {
    "per-tensor": "7-bit dynamic activations, one scale per batch",
    "per-token": "8-bit dynamic activations, one scale per token",
}
ONNX_PER_TENSOR = "8-bit dynamic activations, one scale per batch"  # ONNX Runtime's uint8


BATCH_INDEPENDENT = {
    True: "yes (a row's answer is the same in any batch, bit for bit)",
    False: "no (a row's last bits depend on the rows batched with it)",
}


def _activations(r: RecipeRecord) -> str:
    if r.engine == "onnxruntime" and r.activations == "per-tensor":
        return ONNX_PER_TENSOR
    return ACTIVATIONS[r.activations]


def recipe_section(r: RecipeRecord) -> list[str]:
    b = r.batching
    start = []
    if r.auto is not None and r.auto.base:
        start = ["", f"`{r.name}` started from `{r.auto.base}`: {r.auto.base_reason}."]
    return [
        "## Recipe",
        "",
        f"`{r.name}`: engine `{r.engine}`, Linear weights "
        f"{'per-channel' if r.per_channel else 'per-tensor'}, {_activations(r)}, "
        f"embeddings {'INT8 per-row' if r.int8_embeddings else 'FP32'}. Batching: "
        f"{b.batch_size} rows, {'sorted by token length' if b.sort_by_length else 'in input order'}"
        f", max {b.max_length} tokens.",
        *start,
        "",
        f"FP32 layers: {', '.join(f'`{x}`' for x in r.fp32_layers) or 'none'}.",
        "",
        f"batch-independent: {BATCH_INDEPENDENT[r.rows_independent]}",
        *_onnx_lines(r.onnx),
    ]


def _onnx_lines(o: OnnxRecord | None) -> list[str]:
    if o is None:
        return []
    products = "uint8 x int8" if o.signed_weights else "uint8 x uint8"
    disabled = ", ".join(o.disabled_optimizers) or "none"
    return [
        "",
        f"ONNX Runtime {o.onnxruntime}, opset {o.opset}, {o.execution_provider}, "
        f"{o.optimization_level} (disabled: {disabled}); {products} integer products; "
        f"exported by the {o.exporter}; graph sha256 `{o.graph_sha256[:16]}`.",
    ]


def fallback_section(auto: FallbackRecord | None, kept: list[str]) -> list[str]:
    """How a fallback recipe chose its FP32 layers (`kept`): attempts and sensitivities."""
    if auto is None:
        return []
    return [*_attempts_section(auto, kept), *_sensitivity_section(auto, kept)]


def _attempts_section(auto: FallbackRecord, kept: list[str]) -> list[str]:
    reached = "reached" if auto.reached_target else "NOT reached"
    if auto.pass_probability is None:  # a version made by the margin rule
        if not auto.sensitivity:
            return []
        attempts = [["FP32 layers", "agreement", "rows/s"]] + [
            [str(len(a.fp32_layers)), pct(a.agreement), f"{a.rows_per_second:.1f}"]
            for a in auto.attempts
        ]
        return [
            "",
            f"### auto: attempts (target agreement {auto.target_agreement:.4f}, {reached})",
            "",
            "Each attempt keeps the most sensitive layers FP32, more each time, until the "
            "agreement on the tuning part reaches the target.",
            "",
            markdown_table(attempts),
        ]
    base = auto.base or "dynamic-int8-pc"  # None: made before auto recorded its base
    chosen = next(
        (
            i
            for i, a in enumerate(auto.attempts)
            if a.fp32_layers == kept and (a.recipe or base) == base
        ),
        None,
    )
    header = ["recipe", "FP32 layers", "tuning flips", "agreement", "P(pass)", "size", "rows/s"]
    attempts = [[*header, "kept"]] + [
        [
            a.recipe or base,
            str(len(a.fp32_layers)),
            str(a.tuning_flips),
            pct(a.agreement),
            f"{a.predicted_pass_probability:.3f}",
            f"{a.size_bytes / MIB:.2f} MiB",
            f"{a.rows_per_second:.1f}",
            "**yes**" if i == chosen else "",
        ]
        for i, a in enumerate(auto.attempts)
    ]
    return [
        "",
        f"### auto: attempts (pass probability {auto.pass_probability:.2f}, {reached})",
        "",
        "Measured on the tuning part. P(pass) is each attempt's predicted probability of "
        "passing the gate on the confirmation part, from its tuning flips; `auto` keeps the "
        "cheapest attempt (fewest FP32 layers, then fewest bytes) whose P(pass) reaches the "
        "target. Each step tries adding each of the most sensitive layers not yet kept, and "
        "goes on from the likeliest. Where `auto` measured more than one recipe, it went on "
        "from the fastest predicted to pass (else the likeliest).",
        "",
        markdown_table(attempts),
    ]


def _sensitivity_section(auto: FallbackRecord, kept: list[str]) -> list[str]:
    if not auto.sensitivity:
        return []
    shown = auto.sensitivity[:SENSITIVE_LAYERS_SHOWN]
    sensitivity = [["layer", "kept FP32", "flips alone", "mean abs prob change"]] + [
        [
            f"`{s.layer}`",
            "**yes**" if s.layer in kept else "",
            str(s.flips),
            f"{s.mean_abs_prob_change:.5f}",
        ]
        for s in shown
    ]
    return [
        "",
        f"### auto: layer sensitivity ({len(shown)} of {len(auto.sensitivity)} layers, most "
        "sensitive first)",
        "",
        markdown_table(sensitivity),
    ]
