"""Every quantization recipe, in one registry: the config, the CLI's help, the quantizer and
the run key all read it. No torch here, so the CLI can list recipes without loading it.

A new recipe is one `Recipe(...)` line in `RECIPES` (plus, if it needs a new kind of layer,
its kernel in `distilq.quantization`).
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
    engine: str = "x86"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "auto",
            "dynamic-int8-pc, then keep the most sensitive Linear layers FP32 until the "
            "tuning part's agreement would certify the gate, plus margin",
            per_channel=True,
            int8_embeddings=True,
            fallback=True,
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
