"""Every quantization recipe, in one registry: the config, the CLI's help, the quantizer and
the run key all read it. No torch here, so the CLI can list recipes without loading it.

A new recipe is one `Recipe(...)` line in `RECIPES` (plus, if it needs a new kind of layer,
its `LayerKind` in `distilq.quantize.kernels`). `auto` is not a recipe but a search: on a
given CPU, `resolve_recipe` names the recipe it starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from distilq.errors import InputError

# Linear inputs: "per-tensor" (torch.ao's dynamic Linear: one 7-bit scale per batch) or
# "per-token" (one 8-bit scale per row: a row's output never depends on its batch).
Activations = Literal["per-tensor", "per-token"]
Engine = Literal["x86", "fbgemm", "onednn"]  # torch's quantized engine weights are packed for


@dataclass(frozen=True)
class Recipe:
    """How a model is made INT8."""

    name: str
    summary: str  # one line for --help
    per_channel: bool  # Linear weights: one scale per output row, else one per tensor
    int8_embeddings: bool  # word/position embeddings as int8 with per-row scales
    activations: Activations = "per-tensor"
    engine: Engine = "x86"
    # Set by `resolve_recipe` for `auto` only: keep the most sensitive Linear layers FP32
    # until the gate's target is met; `base` is the recipe it starts from, and why.
    fallback: bool = False
    base: str | None = None
    base_reason: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("activations", Activations), ("engine", Engine)):
            if getattr(self, name) not in get_args(allowed):
                raise InputError(
                    f"recipe {self.name!r}: {name} {getattr(self, name)!r} is not one of "
                    f"{', '.join(get_args(allowed))}"
                )


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
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
AUTO = "auto"
AUTO_SUMMARY = (
    "dynamic-int8-token on CPUs with VNNI, else dynamic-int8-pc; then keep the most "
    "sensitive Linear layers FP32 until the tuning part predicts the gate will pass with "
    "probability --pass-probability"
)
RECIPE_NAMES = (AUTO, *RECIPES)  # what a config may name
DEFAULT_RECIPE = AUTO

# With these, torch's integer GEMM (per-token recipe) runs VNNI/AMX kernels; without them it
# falls back to a slow reference loop (pytorch#136942), so the per-token layers run exact
# float32 GEMMs instead (no faster than FP32), and fbgemm's kernels are the fast ones.
INTEGER_GEMM_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
# `auto`'s starting recipe per instruction set, as Optimum names a preset per ISA.
AUTO_PRESETS = {"vnni": "dynamic-int8-token", "avx2": "dynamic-int8-pc"}


def resolve_recipe(name: str, cpu_features: list[str] | tuple[str, ...]) -> Recipe:
    """The recipe `name` quantizes by on a CPU with `cpu_features` (a pure function: the
    caller reads the CPU). A fixed recipe is itself; `auto` is the preset that is both
    faithful and fast on that CPU, under the name `auto`, with the search switched on and
    the base and the reason recorded."""
    if name != AUTO:
        return get_recipe(name)
    fast = [f for f in INTEGER_GEMM_FEATURES if f in cpu_features]
    if fast:
        base = RECIPES[AUTO_PRESETS["vnni"]]
        why = (
            f"this CPU has {', '.join(fast)}: torch's integer GEMM is fast here, and per-token "
            "activations agree best with FP32"
        )
    else:
        base = RECIPES[AUTO_PRESETS["avx2"]]
        why = (
            "this CPU has no VNNI: per-token INT8 runs exact float32 GEMMs here, no faster than "
            "FP32 (torch's integer GEMM is a slow reference loop, pytorch#136942), so "
            "fbgemm's per-tensor kernels are the fast path"
        )
    return replace(
        base, name=AUTO, summary=AUTO_SUMMARY, fallback=True, base=base.name, base_reason=why
    )


def get_recipe(name: str) -> Recipe:
    """The fixed recipe called `name` (`auto` depends on the CPU: see `resolve_recipe`)."""
    if name == AUTO:
        raise InputError("auto is a search, not a fixed recipe: use resolve_recipe(name, cpu)")
    try:
        return RECIPES[name]
    except KeyError:
        raise InputError(
            f"unknown recipe {name!r}; choose one of {', '.join(RECIPE_NAMES)}"
        ) from None


def recipes_help() -> str:
    """The recipes, one a line, for --help."""
    import textwrap

    summaries = {AUTO: AUTO_SUMMARY, **{r.name: r.summary for r in RECIPES.values()}}
    width = max(map(len, summaries))
    indent = " " * (width + 4)
    return "\n".join(
        textwrap.fill(f"  {name:<{width}}  {summary}", 88, subsequent_indent=indent)
        for name, summary in summaries.items()
    )
