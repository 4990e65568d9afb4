"""Every quantization recipe, in one registry: the config, the CLI's help, the quantizer and
the run key all read it. No torch here, so the CLI can list recipes without loading it.

A new recipe is one `Recipe(...)` line in `RECIPES` (plus, if it needs a new kind of layer,
its kernel in `distilq.quantize.int8`).
"""

from __future__ import annotations

from dataclasses import dataclass

from distilq.errors import InputError


@dataclass(frozen=True)
class Recipe:
    """How a model is made INT8."""

    name: str
    summary: str  # one line for --help
    per_channel: bool  # Linear weights: one scale per output row, else one per tensor
    int8_embeddings: bool  # word/position embeddings as int8 with per-row scales
    # Keep the most sensitive Linear layers FP32 until the gate's target is met (autoquant).
    fallback: bool = False
    # Linear inputs: "per-tensor" (torch.ao's dynamic Linear: one 7-bit scale per batch) or
    # "per-token" (one 8-bit scale per row: a row's output never depends on its batch).
    activations: str = "per-tensor"
    engine: str = "x86"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "auto",
            "dynamic-int8-token on CPUs with VNNI, else dynamic-int8-pc; then keep the most "
            "sensitive Linear layers FP32 until the tuning part's agreement would certify the "
            "gate, plus margin",
            per_channel=True,
            int8_embeddings=True,
            fallback=True,
        ),
        Recipe(
            "dynamic-int8-token",
            "Linear weights INT8 per channel, activations INT8 per token (a row's answer "
            "never depends on its batch), word/position embeddings INT8 per row",
            per_channel=True,
            int8_embeddings=True,
            activations="per-token",
        ),
        Recipe(
            "dynamic-int8-pc",
            "Linear weights INT8 per channel, word/position embeddings INT8 per row",
            per_channel=True,
            int8_embeddings=True,
        ),
        # The seed's method, kept for comparison: exactly torch.ao quantize_dynamic's defaults.
        Recipe(
            "dynamic-int8",
            "the seed's torch.ao quantize_dynamic: per-tensor weights, FP32 embeddings",
            per_channel=False,
            int8_embeddings=False,
        ),
    )
}
DEFAULT_RECIPE = "auto"


# With these, torch's integer GEMM (per-token recipe) runs VNNI/AMX kernels; without them it
# falls back to a slow reference loop (pytorch#136942), and fbgemm's kernels are the fast ones.
INTEGER_GEMM_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


def fallback_base(cpu_features: list[str]) -> tuple[Recipe, str]:
    """The recipe a fallback recipe (`auto`) starts from on a CPU with `cpu_features`: the
    one that is both faithful and fast there; and why."""
    fast = [f for f in INTEGER_GEMM_FEATURES if f in cpu_features]
    if fast:
        base = RECIPES["dynamic-int8-token"]
        why = (
            f"this CPU has {', '.join(fast)}: torch's integer GEMM is fast here, and per-token "
            "activations agree best with FP32"
        )
    else:
        base = RECIPES["dynamic-int8-pc"]
        why = (
            "this CPU has no VNNI: torch's integer GEMM would run a slow reference loop "
            "(pytorch#136942), so fbgemm's per-tensor kernels are the fast path"
        )
    return base, why


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`."""
    try:
        return RECIPES[name]
    except KeyError:
        raise InputError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def recipes_help() -> str:
    """The recipes, one a line, for --help."""
    import textwrap

    width = max(map(len, RECIPES))
    indent = " " * (width + 4)
    return "\n".join(
        textwrap.fill(f"  {r.name:<{width}}  {r.summary}", 88, subsequent_indent=indent)
        for r in RECIPES.values()
    )
