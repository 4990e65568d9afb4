"""The report's chart: agreement (and `auto`'s predicted pass probability, tuning flips and
size per attempt) against FP32 layers kept, and per-layer sensitivity.

Drawn with matplotlib, an optional extra (`pip install 'distilq[charts]'`): without it a
report is written without its chart, and says how to get one.
"""

from __future__ import annotations

from pathlib import Path

from distilq.manifest import VersionManifest

CHART = "report.png"
MISSING = "No chart with this report: charts need matplotlib (`pip install 'distilq[charts]'`)."
SENSITIVE_LAYERS_SHOWN = 15  # in the chart and in the report's table alike


def available() -> bool:
    """Whether charts can be drawn here."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_chart(manifest: VersionManifest, path: Path) -> None:
    """Agreement with FP32 (each attempt of a fallback recipe, and the gate's confirmation
    measure with its lower bound) against the FP32 layers kept, above the most sensitive
    layers with those kept FP32 marked. Needs matplotlib (see `available`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    auto = manifest.recipe.auto
    sensitivity = auto.sensitivity[:SENSITIVE_LAYERS_SHOWN] if auto else []
    panels = 2 if sensitivity else 1
    # Panels stacked: reports and Prefect's artifact pages are narrow.
    fig, axes = plt.subplots(panels, 1, figsize=(7.5, 4.2 * panels), squeeze=False)
    _agreement(axes[0][0], manifest)
    if sensitivity:
        _sensitivity(axes[1][0], sensitivity, set(manifest.recipe.fp32_layers))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _agreement(ax, manifest: VersionManifest) -> None:
    m, recipe = manifest.metrics, manifest.recipe
    thresholds = manifest.decision.thresholds
    attempts = recipe.auto.attempts if recipe.auto else []
    if attempts:
        ax.plot(
            [len(a.fp32_layers) for a in attempts],
            [100 * a.agreement for a in attempts],
            "o",
            color="tab:gray",
            label="attempts (tuning part)",
        )
    kept = len(recipe.fp32_layers)
    bound = m.agreement_lower_bound
    below = 100 * (m.agreement - bound) if bound is not None else 0
    ax.errorbar(
        [kept],
        [100 * m.agreement],
        yerr=[[below], [0]],
        fmt="s",
        color="tab:blue",
        capsize=6,
        label="gate: confirmation part, whisker to its lower bound"
        if bound is not None
        else "gate: confirmation part",
    )
    # Zoom on the measures; a threshold far below them is named, not drawn.
    shown = [100 * a.agreement for a in attempts] + [100 * m.agreement - below]
    low, high = min(shown), max(*shown, 100 * m.agreement)
    threshold = 100 * thresholds.min_agreement
    label = f"min agreement {thresholds.min_agreement:.2%}"
    if threshold >= low - 2 * max(high - low, 0.5):
        low = min(low, threshold)
        ax.axhline(threshold, color="tab:red", linestyle="--", label=label)
    else:
        ax.plot([], [], " ", label=f"{label} (below the plot)")
    pad = max(high - low, 0.2) * 0.15
    ax.set_ylim(low - pad, min(100.0, high) + pad)
    mib = m.size_bytes_int8 / 2**20
    ax.set_title(
        f"{recipe.name}: {kept} FP32 layer(s), {mib:.2f} MiB "
        f"({m.size_bytes_int8 / m.size_bytes_fp32:.0%} of FP32)"
    )
    ax.set_xlabel("Linear layers kept FP32")
    ax.set_ylabel("agreement with FP32 (%)")
    most = max([kept, *(len(a.fp32_layers) for a in attempts)])
    ax.set_xlim(-0.5, most + 0.5)
    ax.set_xticks(range(most + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if attempts and recipe.auto.pass_probability is not None:
        _pass_probability(ax, recipe.auto)


def _pass_probability(ax, auto) -> None:
    """Each attempt's predicted probability of passing the gate, on a second axis, with its
    tuning flips and size written beside it, and the target `auto` aimed at."""
    twin = ax.twinx()
    layers = [len(a.fp32_layers) for a in auto.attempts]
    chance = [a.predicted_pass_probability for a in auto.attempts]
    twin.plot(layers, chance, "^", color="tab:green", label="predicted P(pass), right axis")
    twin.axhline(auto.pass_probability, color="tab:green", alpha=0.5, linewidth=0.8)
    for a, x, y in zip(auto.attempts, layers, chance, strict=True):
        twin.annotate(
            f"{a.tuning_flips} flips\n{a.size_bytes / 2**20:.1f} MiB",
            (x, y),
            textcoords="offset points",
            xytext=(6, -18),
            fontsize=7,
            color="tab:green",
        )
    twin.set_ylim(0, 1.05)
    twin.set_ylabel(f"predicted P(pass); target {auto.pass_probability:.2f}")
    twin.legend(fontsize=8, loc="upper left")


def _sensitivity(ax, sensitivity, kept: set[str]) -> None:
    layers = [s.layer for s in sensitivity][::-1]  # most sensitive on top
    values = [s.mean_abs_prob_change for s in sensitivity][::-1]
    colors = ["tab:orange" if layer in kept else "tab:blue" for layer in layers]
    ax.barh(range(len(layers)), values, color=colors)
    ax.set_yticks(range(len(layers)), [layer.removeprefix("distilbert.") for layer in layers])
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("mean abs change of P(FP32 label), that layer alone INT8")
    ax.set_title("Layer sensitivity (orange: kept FP32)")
    ax.grid(axis="x", alpha=0.3)
