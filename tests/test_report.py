"""What a person reads: the report's tables and its chart."""

from __future__ import annotations

import struct
from pathlib import Path

from distilq.manifest import Attempt, FallbackRecord, LayerSensitivity
from distilq.registry.registry import Registry
from distilq.report import charts
from distilq.report.render import render_report

WRITTEN = Path(__file__).parent / "data" / "written-by-0964a64" / "registry"


def _manifest():
    registry = Registry(WRITTEN)
    return registry.manifest(registry.versions()[-1])


def _with_auto(manifest, layers: int = 20, kept: int = 3, old_rule: bool = False):
    """The manifest as if a fallback recipe had measured `layers` layers and kept the
    `kept` most sensitive ones FP32 (to see how the report shows that); `old_rule`: as a
    version made by the margin rule recorded it."""
    names = [f"distilbert.transformer.layer.{i}.ffn.lin2" for i in range(layers)]
    rule = (
        {"target_agreement": 0.995}
        if old_rule
        else {"rule": "pass-probability: ...", "pass_probability": 0.9}
    )
    auto = FallbackRecord(
        **rule,
        reached_target=True,
        sensitivity=[
            LayerSensitivity(layer=n, flips=layers - i, mean_abs_prob_change=0.01 / (i + 1))
            for i, n in enumerate(names)
        ],  # fmt: skip
        attempts=[
            Attempt(
                fp32_layers=names[:k],
                agreement=0.99 + k / 1000,
                rows_per_second=100.0,
                **(
                    {}
                    if old_rule
                    else {
                        "tuning_flips": kept - k,
                        "predicted_pass_probability": 0.6 + 0.1 * k,
                        "size_bytes": (22 + k) * 2**20,
                    }
                ),
            )
            for k in range(kept + 1)
        ],  # fmt: skip
    )
    recipe = manifest.recipe.model_copy(update={"auto": auto, "fp32_layers": names[:kept]})
    return manifest.model_copy(update={"recipe": recipe})


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_tables_put_labels_first_say_what_is_cut_and_mark_kept_layers():
    manifest = _with_auto(_manifest())
    text = render_report(manifest, None)
    flips = text[text.index("## Flipped examples") :].splitlines()
    assert flips[2] == "| # | true | FP32 | INT8 | text |"
    assert flips[3] == "|---:|---|---|---|---|"
    assert "### auto: layer sensitivity (15 of 20 layers, most sensitive first)" in text
    kept = [line for line in text.splitlines() if line.startswith("| `") and "| **yes** |" in line]
    assert len(kept) == 3 and "layer.0.ffn.lin2" in kept[0]
    assert "### auto: attempts (pass probability 0.90, reached)" in text
    header = "| recipe | FP32 layers | tuning flips | agreement | P(pass) | size | rows/s | kept |"
    assert f"{header}\n|---|---:|---:|---:|---:|---:|---:|---|" in text
    # Attempts made before they named their recipe are the base's (here: recorded as None).
    assert "| dynamic-int8-pc | 3 | 0 | 99.30% | 0.900 | 25.00 MiB | 100.0 | **yes** |" in text
    assert "| dynamic-int8-pc | 0 | 3 | 99.00% | 0.600 | 22.00 MiB | 100.0 |  |" in text
    assert charts.MISSING in text


def test_a_version_made_by_the_margin_rule_still_reports_it():
    text = render_report(_with_auto(_manifest(), old_rule=True), None)
    assert "### auto: attempts (target agreement 0.9950, reached)" in text
    assert "| FP32 layers | agreement | rows/s |\n|---:|---:|---:|" in text


def test_chart_is_a_png_with_a_sensitivity_panel_when_a_fallback_chose_layers(tmp_path):
    plain, fallback = tmp_path / "plain.png", tmp_path / "fallback.png"
    charts.write_chart(_manifest(), plain)
    charts.write_chart(_with_auto(_manifest()), fallback)
    (w1, h1), (w2, h2) = _png_size(plain), _png_size(fallback)
    assert w1 == w2 and h2 > 1.9 * h1  # a second panel below the first
    text = render_report(_manifest(), "report.png")
    assert "![agreement with FP32 and layer sensitivity](report.png)" in text
