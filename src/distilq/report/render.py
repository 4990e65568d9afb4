"""A report a person can read: Markdown tables built from a version's manifest."""

from __future__ import annotations

from distilq.manifest import (
    AuditRecord,
    OutputRecord,
    ScoreSummary,
    VersionManifest,
    VersionMetrics,
)
from distilq.report.audit import audit_line, bounds, texts_counted, verdict_word
from distilq.report.charts import CHART, MISSING
from distilq.report.recipe import fallback_section, recipe_section
from distilq.report.tables import MIB, markdown_table, pct


def _escape(text: str, limit: int = 120) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _interval(interval: list[float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:+.4f}..{interval[1]:+.4f}"


def _split(manifest: VersionManifest) -> str:
    split = manifest.validation.split
    if split is None:
        return f"{manifest.metrics.n_examples} examples"
    return f"{split.tuning} examples to tune on, {split.confirmation} to confirm on: {split.rule}"


def _drawn_lines(manifest: VersionManifest) -> list[str]:
    """Which sets were drawn from a larger source, and how."""
    lines = []
    for s in manifest.validation.sets:
        if s.drawn is not None:
            files = f" in {len(s.drawn.files):,} Parquet file(s)" if s.drawn.files else ""
            skipped = s.drawn.rows_without_text
            skipped = f" ({skipped:,} of them without text)" if skipped else ""
            lines.append(
                f"`{s.name}`: {s.n_examples:,} rows drawn from {s.drawn.rows_read:,}{files}"
                f"{skipped}: {s.drawn.rule}."
            )
    return ["", *lines] if lines else []


def metrics_table(manifest: VersionManifest) -> list[list[str]]:
    """Rows (header first) comparing FP32 and INT8: the table shown in reports and artifacts."""
    m = manifest.metrics
    fp32_bytes, int8_bytes = m.size_bytes_fp32, m.size_bytes_int8
    return [
        ["", "FP32", "INT8", "INT8 / FP32"],
        ["accuracy", pct(m.accuracy_fp32), pct(m.accuracy_int8), ""],
        [
            "weights on disk",
            f"{fp32_bytes / MIB:.2f} MiB",
            f"{int8_bytes / MIB:.2f} MiB",
            f"{int8_bytes / fp32_bytes:.1%}",
        ],
        [
            "rows/s",
            f"{m.rows_per_second_fp32:.1f}",
            f"{m.rows_per_second_int8:.1f}",
            f"{m.rows_per_second_int8 / m.rows_per_second_fp32:.2f}x",
        ],
        [
            "ms per batch",
            f"{m.latency_ms_per_batch_fp32:.1f}",
            f"{m.latency_ms_per_batch_int8:.1f}",
            "",
        ],
    ]


def speed_note(metrics: VersionMetrics) -> str:
    """Where the rows/s figures came from: the CPU, the threads, and how they were taken."""
    speed = metrics.speed
    if speed is None:
        return "rows/s: one cold pass over the validation set each, noisy."
    return (
        f"rows/s: warm, best of {speed.passes} interleaved passes over {speed.rows} "
        f"validation rows, on {speed.cpu}. INT8 speed depends on the CPU: with VNNI or AMX "
        "its integer kernels outrun FP32; on AVX2 alone they barely do."
    )


def _sets_section(metrics: VersionMetrics) -> list[str]:
    """Per validation set: examples, measured agreement, what it certifies, accuracies."""
    sets, confidence = metrics.sets, metrics.confidence
    if len(sets) < 2 and confidence is None:
        return []
    bound = f"lower bound ({confidence:.0%})" if confidence else "lower bound"
    header = ["validation set", "examples", "agreement", bound, "flips", "acc. FP32", "INT8"]
    rows = [[*header, "acc. drop"]]
    rows += [
        [
            f"`{s.name}`",
            str(s.n_examples),
            pct(s.agreement),
            pct(s.agreement_lower_bound),
            str(s.flips),
            pct(s.accuracy_fp32),
            pct(s.accuracy_int8),
            _interval(s.accuracy_drop_interval),
        ]
        for s in sets
    ]
    intro = "The gate checks each validation set on its own"
    if confidence:
        intro += (
            ", on its confirmation part: the lower bound is what the agreement certifies for "
            "texts like these, with the stated confidence"
        )
    return [intro + ":", "", markdown_table(rows), ""]


FLIPS_SHOWN = 25


def _flips_section(m: VersionMetrics) -> list[str]:
    """The examples whose label INT8 changed: labels first, texts shortened (the manifest
    holds them whole)."""
    if not m.flipped:
        return []
    shown = m.flipped[:FLIPS_SHOWN]
    rows = [["#", "true", "FP32", "INT8", "text"]] + [
        [
            str(f.index),
            f.label or "",
            f"{f.fp32_label} {f.fp32_score:.3f}",
            f"{f.int8_label} {f.int8_score:.3f}",
            _escape(f.text, 60),
        ]
        for f in shown
    ]
    return ["", f"## Flipped examples ({len(shown)} of {m.flips})", "", markdown_table(rows)]


def _provenance(manifest: VersionManifest) -> str:
    sw, where = manifest.software, manifest.platform
    line = f"torch {sw['torch']}, transformers {sw['transformers']}, distilq {sw['distilq']}."
    if where is not None:
        line += (
            f" Gated on platform `{where.key}`: {where.cpu} ({', '.join(where.features)}; "
            f"torch kernels {where.torch_cpu_capability})."
        )
    return line


def render_report(manifest: VersionManifest, chart: str | None = "") -> str:
    """The Markdown report of one candidate version. `chart`: where the report's image is
    (a path relative to the report, or a data URI), None if there is none; by default the
    version's own `report.png` when it has one."""
    m, d = manifest.metrics, manifest.decision
    if chart == "":
        chart = CHART if CHART in manifest.files else None
    picture = f"![agreement with FP32 and layer sensitivity]({chart})" if chart else MISSING
    out = [
        f"# distilq INT8 candidate {manifest.version}",
        "",
        f"**Gate: {'APPROVED' if d.approved else 'REJECTED'}**",
        "",
        *[f"- {reason}" for reason in d.reasons],
        "",
        f"Source `{manifest.source.id}` at `{manifest.source.revision}`; "
        f"validation `{manifest.validation.name}` ({_split(manifest)}).",
        *_drawn_lines(manifest),
        "",
        "## FP32 vs INT8",
        "",
        markdown_table(metrics_table(manifest)),
        "",
        *_sets_section(m),
        f"Agreement {pct(m.agreement)} ({m.flips} flips); probability of the FP32 label "
        f"changed by {m.mean_abs_prob_change:.4f} on average, {m.max_abs_prob_change:.4f} "
        "at most. Sizes are bytes on disk of the weight files.",
        "",
        speed_note(m),
        "",
        picture,
        "",
        *recipe_section(manifest.recipe),
        *fallback_section(manifest.recipe.auto, manifest.recipe.fp32_layers),
        *_flips_section(m),
        "",
        _provenance(manifest),
        "",
    ]
    return "\n".join(out)


# -- scoring ---------------------------------------------------------------------------------


def labels_text(labels: dict[str, int]) -> str:
    """`NEGATIVE 226, POSITIVE 274`."""
    return ", ".join(f"{label} {n:,}" for label, n in sorted(labels.items())) or "none"


def score_summary_line(summary: ScoreSummary) -> str:
    """What a scoring run did, then what its output holds, in one line a person reads."""
    s = summary
    line = f"scored {s.rows_scored:,} rows in {s.files_scored} file(s) in {s.seconds:.1f} s"
    if s.rows_scored and s.seconds:
        line += f" ({s.rows_scored / s.seconds:,.1f} rows/s)"
    if s.files_skipped:
        line += f", skipped {s.files_skipped} file(s) already done ({s.rows_skipped:,} rows)"
    if s.failed:
        line += f", {len(s.failed)} file(s) FAILED"
    mean = "n/a" if s.mean_score is None else f"{s.mean_score:.4f}"
    return (
        f"{line}. Output {s.output} holds {s.rows_written:,} rows from {s.files} file(s) "
        f"scored by {s.model_version}: {labels_text(s.labels)}; mean score {mean}; "
        f"{s.rows_error:,} row(s) with errors, {s.rows_truncated:,} truncated. "
        f"{audit_line(s.audit, s.rows_written)}."
    )


def score_summary_table(summary: ScoreSummary) -> list[tuple[str, str]]:
    """(what, figure) rows: what this run did, then the output's totals, a row per label."""
    s = summary
    rate = f"{s.rows_scored / s.seconds:,.1f}" if s.rows_scored and s.seconds else "n/a"
    mean = "n/a" if s.mean_score is None else f"{s.mean_score:.4f}"
    return [
        ("files scored by this run", f"{s.files_scored:,}"),
        ("rows scored by this run", f"{s.rows_scored:,}"),
        ("files skipped, already done", f"{s.files_skipped:,}"),
        ("rows skipped, already done", f"{s.rows_skipped:,}"),
        ("files failed", f"{len(s.failed):,}"),
        ("seconds", f"{s.seconds:.1f}"),
        ("rows/s", rate),
        ("rows in the output", f"{s.rows_written:,}"),
        *((f"label {label}", f"{n:,}") for label, n in sorted(s.labels.items())),
        ("mean score", mean),
        ("rows with errors", f"{s.rows_error:,}"),
        ("rows truncated", f"{s.rows_truncated:,}"),
        *_audit_rows(s.audit),
    ]


def _audit_rows(audit: AuditRecord | None) -> list[tuple[str, str]]:
    if audit is None or not audit.rows:
        return [("audit", audit.reason if audit else "none (scored before audits)")]
    rows = [
        ("texts audited in FP32", texts_counted(audit)),
        ("seconds of the audit (FP32 loaded and run)", f"{audit.seconds:.1f}"),
        ("audited texts that agree", f"{audit.agreeing:,} ({audit.agreement:.2%})"),
        ("agreement bounds", bounds(audit)),
        ("audit", f"{verdict_word(audit)} (bar {audit.threshold:.2%})"),
    ]
    if audit.verdict is not None:
        rows.append(
            ("alarm", f"{'yes' if audit.alarm else 'no'} (--audit-fail-on {audit.fail_on})")
        )
    return rows


def score_files_table(record: OutputRecord) -> list[dict]:
    """One row per output file: rows, errors, truncated, seconds, labels."""
    return [
        {
            "file": name,
            "rows": shard.rows_written,
            "errors": shard.rows_error,
            "truncated": shard.rows_truncated,
            "seconds": round(shard.seconds, 2),
            "labels": labels_text(shard.labels),
            "input": shard.input,
        }
        for name, shard in sorted(record.shards.items())
    ]
