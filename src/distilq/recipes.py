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
# What runs the model: torch's quantized engine its weights are packed for, or ONNX Runtime.
Engine = Literal["x86", "fbgemm", "onednn", "onnxruntime"]
ONNXRUNTIME: Engine = "onnxruntime"


@dataclass(frozen=True)
class Recipe:
    """How a model is made INT8."""

    name: str
    summary: str  # one line for --help
    per_channel: bool  # Linear weights: one scale per output row, else one per tensor
    int8_embeddings: bool  # word/position embeddings as int8 with per-row scales
    activations: Activations = "per-tensor"
    engine: Engine = "x86"
    # ONNX Runtime only: int8 weights (uint8 x int8 products) or uint8 ones (uint8 x uint8),
    # as `resolve_recipe` picks for the CPU (`quantize.onnx.rewrite` says why).
    signed_weights: bool = True
    # Set by `resolve_recipe` for `auto` only: keep the most sensitive Linear layers FP32
    # until the gate's target is met; `base` is the recipe it starts from, and why.
    fallback: bool = False
    base: str | None = None
    base_reason: str | None = None
    # `auto` only: the other recipes it measures against `base` (the fastest of those
    # predicted to pass is kept).
    alternatives: tuple[Recipe, ...] = ()

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
            "ort-int8-token",
            "ONNX Runtime: Linear weights INT8 per channel, activations INT8 per token (a "
            "row's answer never depends on its batch), word embeddings INT8 per row",
            per_channel=True,
            int8_embeddings=True,
            activations="per-token",
            engine=ONNXRUNTIME,
        ),
        Recipe(
            "ort-int8-pc",
            "ONNX Runtime's own dynamic INT8 (as Optimum makes it): Linear weights per "
            "channel, activations one scale per batch; word embeddings INT8 per row",
            per_channel=True,
            int8_embeddings=True,
            engine=ONNXRUNTIME,
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
AUTO = "auto"
AUTO_SUMMARY = (
    "the fastest on this CPU, measured on the tuning part, of ort-int8-token and the torch "
    "preset (dynamic-int8-token with VNNI, else dynamic-int8-pc) predicted to pass; then "
    "keep the most sensitive Linear layers FP32 until the tuning part predicts the gate "
    "will pass with probability --pass-probability"
)
RECIPE_NAMES = (AUTO, *RECIPES)  # what a config may name
DEFAULT_RECIPE = AUTO

# With these, torch's integer GEMM (per-token recipe) runs VNNI/AMX kernels; without them it
# falls back to a slow reference loop (pytorch#136942), so the per-token layers run exact
# float32 GEMMs instead (no faster than FP32), and fbgemm's kernels are the fast ones. MLAS
# (ONNX Runtime) multiplies uint8 x int8 exactly only with them, too.
INTEGER_GEMM_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
# `auto`'s torch recipe per instruction set, as Optimum names a preset per ISA; with ONNX
# Runtime installed it is measured against ort-int8-token.
AUTO_PRESETS = {"vnni": "dynamic-int8-token", "avx2": "dynamic-int8-pc"}
AUTO_ONNX = "ort-int8-token"
ENGINES = ("torch", ONNXRUNTIME)  # what may run a model, when installed
# What the onnxruntime engine needs (the `onnxruntime` extra); onnxscript: torch's exporter.
ONNX_MODULES = ("onnxruntime", "onnx", "onnxscript")
ONNX_MISSING = "runs on ONNX Runtime, which is not installed: pip install 'distilq[onnxruntime]'"


def installed_engines() -> tuple[str, ...]:
    """The engines installed here (`auto` measures only those)."""
    import importlib.util

    onnx = all(importlib.util.find_spec(m) is not None for m in ONNX_MODULES)
    return ENGINES if onnx else ENGINES[:1]


def check_engine(name: str) -> None:
    """Refuse at once, with the install line, a fixed recipe whose engine is missing (a
    ValueError: the config's validators raise these)."""
    if name in RECIPES and RECIPES[name].engine == ONNXRUNTIME:
        if ONNXRUNTIME not in installed_engines():
            raise ValueError(f"recipe {name} {ONNX_MISSING}")


def for_cpu(recipe: Recipe, cpu_features: list[str] | tuple[str, ...]) -> Recipe:
    """`recipe` as it runs on a CPU with `cpu_features`: ONNX Runtime's weights signed
    only where MLAS's uint8 x int8 product is exact (VNNI)."""
    if recipe.engine != ONNXRUNTIME:
        return recipe
    return replace(recipe, signed_weights=any(f in cpu_features for f in INTEGER_GEMM_FEATURES))


def resolve_recipe(
    name: str, cpu_features: list[str] | tuple[str, ...], engines: tuple[str, ...] = ENGINES
) -> Recipe:
    """The recipe `name` quantizes by on a CPU with `cpu_features` when `engines` are
    installed (a pure function: the caller reads the CPU). A fixed recipe is itself, for
    that CPU (`for_cpu`); `auto` is a search, under the name `auto`: it starts from the
    torch preset that is both faithful and fast on that CPU (`base`, with the reason) and
    measures it against ort-int8-token where ONNX Runtime is installed."""
    if name != AUTO:
        return for_cpu(get_recipe(name), cpu_features)
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
    others = (for_cpu(RECIPES[AUTO_ONNX], cpu_features),) if ONNXRUNTIME in engines else ()
    return replace(_as_auto(base, why), alternatives=others)


def _as_auto(recipe: Recipe, why: str) -> Recipe:
    """`recipe` as the start of `auto`'s search: named `auto`, searching, its base and why."""
    return replace(
        recipe, name=AUTO, summary=AUTO_SUMMARY, fallback=True, base=recipe.name, base_reason=why
    )


def auto_choices(auto: Recipe) -> list[Recipe]:
    """What `auto` measures first: its torch preset, then each alternative under the name
    `auto` with its own base and reason."""
    choices = [replace(auto, alternatives=())]
    for other in auto.alternatives:
        products = "uint8 x int8 (VNNI)" if other.signed_weights else "uint8 x uint8"
        why = (
            f"ONNX Runtime's MLAS runs exact {products} integer products on this CPU, and "
            "per-token activations agree best with FP32"
        )
        choices.append(_as_auto(other, why))
    return choices


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
