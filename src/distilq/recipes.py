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

# Linear inputs: "per-tensor" (one scale per batch: ONNX Runtime's dynamic quantization, or
# torch.ao's retired 7-bit one) or "per-token" (one 8-bit scale per row: a row's output
# never depends on its batch).
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
    # Why no new version is made by it any more (versions made by it still load and score).
    retired: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("activations", Activations), ("engine", Engine)):
            if getattr(self, name) not in get_args(allowed):
                raise InputError(
                    f"recipe {self.name!r}: {name} {getattr(self, name)!r} is not one of "
                    f"{', '.join(get_args(allowed))}"
                )


# The per-tensor torch recipes ran on torch's quantized tensors (fbgemm), which torch 2.13
# deprecates with no successor for them; ONNX Runtime now runs INT8 on CPUs without VNNI.
TORCH_AO_RETIRED = (
    "it ran on torch's quantized tensors, which torch deprecates; versions made by it still "
    "load and score (with torch's deprecation warning) while torch ships them. For a new "
    "version use auto, or ort-int8-pc for the same per-batch activations on ONNX Runtime"
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
            "retired (versions made by it load and score): torch.ao per-tensor activations, "
            "Linear weights INT8 per channel, word/position embeddings INT8 per row",
            per_channel=True,
            int8_embeddings=True,
            retired=TORCH_AO_RETIRED,
        ),
        Recipe(
            "dynamic-int8",
            "retired (versions made by it load and score): the seed's torch.ao "
            "quantize_dynamic, per-tensor weights, FP32 embeddings",
            per_channel=False,
            int8_embeddings=False,
            retired=TORCH_AO_RETIRED,
        ),
    )
}
AUTO = "auto"
AUTO_SUMMARY = (
    "the fastest on this CPU, measured on the tuning part, of the recipes with fast integer "
    "products here (dynamic-int8-token with VNNI or AMX; ort-int8-token where ONNX Runtime "
    "is installed) predicted to pass; then keep the most sensitive Linear layers FP32 until "
    "the tuning part predicts the gate will pass with probability --pass-probability"
)
RECIPE_NAMES = (AUTO, *RECIPES)  # what a config may name (a retired one is refused, with why)
CURRENT_NAMES = tuple(n for n in RECIPE_NAMES if n == AUTO or not RECIPES[n].retired)
DEFAULT_RECIPE = AUTO

# With these, torch's integer GEMM (per-token recipe) runs VNNI/AMX kernels; without them it
# falls back to a slow reference loop (pytorch#136942), so the per-token layers run exact
# float32 GEMMs instead (no faster than FP32). MLAS (ONNX Runtime) multiplies uint8 x int8
# exactly only with them, too.
INTEGER_GEMM_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
AUTO_TORCH = "dynamic-int8-token"  # `auto`'s torch recipe, on every CPU
AUTO_ONNX = "ort-int8-token"  # ...and its ONNX Runtime one, where installed
ENGINES = ("torch", ONNXRUNTIME)  # what may run a model, when installed
# What the onnxruntime engine needs (the `onnxruntime` extra); onnxscript: torch's exporter.
ONNX_MODULES = ("onnxruntime", "onnx", "onnxscript")
ONNX_MISSING = "runs on ONNX Runtime, which is not installed: pip install 'distilq[onnxruntime]'"


def installed_engines() -> tuple[str, ...]:
    """The engines installed here (`auto` measures only those)."""
    import importlib.util

    onnx = all(importlib.util.find_spec(m) is not None for m in ONNX_MODULES)
    return ENGINES if onnx else ENGINES[:1]


def recipe_problem(name: str) -> str | None:
    """Why no new version can be made by recipe `name` here (retired, or its engine is not
    installed), with what to do instead; None when it can."""
    recipe = RECIPES.get(name)
    if recipe is None:
        return None
    if recipe.retired:
        return _retired(recipe)
    if recipe.engine == ONNXRUNTIME and ONNXRUNTIME not in installed_engines():
        return f"recipe {name} {ONNX_MISSING}"
    return None


def _retired(recipe: Recipe) -> str:
    return f"recipe {recipe.name} is retired: {recipe.retired}"


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
    that CPU (`for_cpu`); a retired one is refused. `auto` is a search, under the name
    `auto`: it starts from the recipe that is both faithful and fast on that CPU (`base`,
    with the reason) and measures the others that are (`alternatives`)."""
    if name != AUTO:
        recipe = get_recipe(name)
        if recipe.retired:
            raise InputError(_retired(recipe))
        return for_cpu(recipe, cpu_features)
    fast = [f for f in INTEGER_GEMM_FEATURES if f in cpu_features]
    onnx = (for_cpu(RECIPES[AUTO_ONNX], cpu_features),) if ONNXRUNTIME in engines else ()
    if fast:
        why = (
            f"this CPU has {', '.join(fast)}: torch's integer GEMM is fast here, and per-token "
            "activations agree best with FP32"
        )
        return replace(_as_auto(RECIPES[AUTO_TORCH], why), alternatives=onnx)
    if onnx:
        why = (
            "this CPU has no VNNI: torch's integer GEMM is a slow reference loop here "
            "(pytorch#136942), so INT8 runs on ONNX Runtime, whose MLAS multiplies uint8 x "
            "uint8 exactly on AVX2 (its uint8 x int8 kernel saturates there)"
        )
        return _as_auto(onnx[0], why)
    why = (
        "this CPU has no VNNI and ONNX Runtime is not installed: per-token INT8 runs exact "
        "float32 GEMMs here, about as fast as FP32 in a quarter of its bytes; pip install "
        "'distilq[onnxruntime]' for integer kernels on this CPU"
    )
    return _as_auto(RECIPES[AUTO_TORCH], why)


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
            f"unknown recipe {name!r}; choose one of {', '.join(CURRENT_NAMES)}"
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
