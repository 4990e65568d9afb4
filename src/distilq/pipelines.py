"""The two user paths, each one plain function that owns the order of its steps, its
clean-up and its bookkeeping:

    quantize_and_promote(config) -> QuantizeResult
    score_dataset(config) -> ScoreSummary

Every step is a plain function of this module or the library, called through a `Runner`.
`Runner()` calls them here, one after another, and maps shards in this process; the Prefect
flows pass a runner that makes each step a task (retries, run logs) and maps shards over a
Prefect task runner (tasks/runner.py). Nothing else sequences these steps.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from distilq import artifact, attest, charts, checkpoint, gate, report, validation
from distilq.config import QuantizeConfig, ScoreConfig
from distilq.errors import DistilqError, GateRejected, PromotionFailed, ScoringFailed
from distilq.inputs import Plan, Shard, plan_shards
from distilq.manifest import Decision, ScoreSummary, VersionManifest
from distilq.output import (
    ManifestNotSaved,
    OutputManifest,
    output_lock,
    pending_shards,
    prepare_output,
    refuse_if_locked,
)
from distilq.recipes import get_recipe
from distilq.registry import Registry
from distilq.scoring import ScoreOptions, ShardStats, options_for, score_shard

log = logging.getLogger("distilq")
T = TypeVar("T")
PROGRESS_SECONDS = 15  # how often a shard logs its progress


class Runner:
    """How a pipeline runs its steps. This one: plain calls in this process.

    Subclasses (the Prefect runner) may run steps as tasks, retrying those given `retries`
    when they fail on something worth a second try (an unreachable source or store)."""

    def step(self, fn: Callable[..., T], *args: Any, retries: int = 0) -> T:
        """Run one step."""
        return fn(*args)

    def map_shards(
        self,
        fn: Callable[..., ShardStats],
        shards: Sequence[Shard],
        args: tuple,
        on_done: Callable[[Shard, ShardStats | BaseException], None],
    ) -> None:
        """Run `fn(shard, *args)` for every shard; pass each result (or its exception) to
        `on_done` as it completes. One failed shard must not stop the others."""
        for shard in shards:
            try:
                result: ShardStats | BaseException = fn(shard, *args)
            except Exception as e:  # noqa: BLE001  recorded by on_done
                result = e
            on_done(shard, result)

    def decided(self, manifest: VersionManifest, outcome: Outcome) -> None:
        """A quantize run knows its outcome (published, promoted, rejected or reused)."""

    def promoted(self, version: str, registry: str, entry: dict) -> None:
        """`production` moved to `version`."""

    def progress(self, key: str, done: int, total: int, note: str) -> None:
        """How far a long part of the run (`key`: scoring, auto's search) went."""

    def scored(self, summary: ScoreSummary, manifest: OutputManifest) -> None:
        """A scoring run is done (some files may have failed)."""


class Outcome(BaseModel):
    """How a quantize run ended, said first wherever the run is shown."""

    tags: list[str]  # promoted | approved | rejected | reused | dry-run, and the recipe
    headline: str  # one sentence: the decision, and what happened to production
    reasons: list[str]  # the gate's, one per threshold
    chart_png: bytes | None = Field(None, repr=False)  # the report's chart, when one was drawn


# -- quantize_and_promote --------------------------------------------------------------------


class QuantizeResult(BaseModel):
    """What a quantize-and-promote run did."""

    version: str
    approved: bool
    promoted: bool
    reused: bool
    dry_run: bool
    registry: str
    location: str | None  # the version's directory in the registry; None for a dry run
    report: str  # report.md: in the registry, or a dry run's copy in the temp directory
    manifest: VersionManifest


def quantize_and_promote(config: QuantizeConfig, run: Runner | None = None) -> QuantizeResult:
    """Quantize a checkpoint to INT8, validate it against FP32, publish it, and promote it
    to `production` only if the gate approved it. A rejected candidate is published with
    its report and raises GateRejected; a dry run publishes nothing."""
    run = run or Runner()
    if not config.dry_run:
        run.step(check_registry, config)
    found = run.step(resolve_source, config, retries=3)
    data = run.step(load_validation, config, found, retries=2)
    tuning, confirmation = run.step(split_validation, data, config)
    key = artifact.run_key(
        found, get_recipe(config.recipe), data, config.thresholds, config.margin, config.batching
    )
    existing = run.step(find_existing, config, key, retries=2)
    if existing is not None:
        return _finish_existing(existing, config, run)

    model, tokenizer = run.step(load_fp32, found)
    fp32_tuning = run.step(predict_fp32, model, tokenizer, tuning, config)
    progress = functools.partial(run.progress, "auto-progress")
    candidate = run.step(
        quantize, model, tokenizer, tuning, fp32_tuning, confirmation, config, progress
    )
    gated = run.step(confirm, model, tokenizer, candidate, confirmation, config)
    staging = artifact.staging_dir()
    try:
        manifest = run.step(stage, staging, gated, tokenizer, found, data, config, key)
        chart = staging / charts.CHART
        chart_png = chart.read_bytes() if chart.exists() else None
        if config.dry_run:
            kept = artifact.keep_report(staging, manifest)
            _decided(run, manifest, outcome(manifest, gated.decision, config, chart_png=chart_png))
            return _result(manifest, config, gated.decision, None, str(kept))
        run.step(publish, staging, manifest, config, retries=2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # published, reported, or failed for good
    _raise_if_rejected(manifest, gated.decision, config, run, chart_png=chart_png)
    return _promote(manifest, config, run, gated.decision, reused=False, chart_png=chart_png)


def _finish_existing(
    existing: VersionManifest, config: QuantizeConfig, run: Runner
) -> QuantizeResult:
    """Exit as the first run with these inputs did, and finish what it left: a run killed
    after publishing an approved version had not promoted it yet."""
    log.info("unchanged inputs: %s already holds this result, nothing to do", existing.version)
    decision = gate.decide_manifest(existing)
    _raise_if_rejected(existing, decision, config, run, reused=True)
    if config.dry_run:
        _decided(run, existing, outcome(existing, decision, config, reused=True))
        where = _location(config, existing)
        return _result(existing, config, decision, where, f"{where}/report.md", reused=True)
    return _promote(existing, config, run, decision, reused=True)


def _promote(
    manifest: VersionManifest,
    config: QuantizeConfig,
    run: Runner,
    decision: Decision,
    reused: bool,
    chart_png: bytes | None = None,
) -> QuantizeResult:
    try:
        entry = run.step(promote, manifest.version, config)
    except DistilqError as e:
        raise PromotionFailed(
            f"{manifest.version} is published in {config.registry} but was not promoted: {e}"
        ) from e
    if entry is not None:
        run.promoted(manifest.version, config.registry, entry)
        production = manifest.version
    else:
        production = Registry(config.registry).alias()
    said = outcome(manifest, decision, config, reused, entry, production, chart_png)
    _decided(run, manifest, said)
    where = _location(config, manifest)
    return _result(
        manifest, config, decision, where, f"{where}/report.md", reused, entry is not None
    )


def _raise_if_rejected(
    manifest: VersionManifest,
    decision: Decision,
    config: QuantizeConfig,
    run: Runner,
    reused: bool = False,
    chart_png: bytes | None = None,
):
    """A published candidate the gate rejected fails the run (CLI exit 3)."""
    if config.dry_run or decision.approved:
        return
    _decided(run, manifest, outcome(manifest, decision, config, reused, chart_png=chart_png))
    raise GateRejected(
        f"gate rejected {manifest.version}: {'; '.join(decision.reasons)}. It is kept in "
        f"{config.registry} with its report; production is unchanged.",
        manifest,
    )


def _decided(run: Runner, manifest: VersionManifest, said: Outcome) -> None:
    log.info("%s. Gate: %s", said.headline, "; ".join(said.reasons))  # in the run's logs too
    run.decided(manifest, said)


def outcome(
    manifest: VersionManifest,
    decision: Decision,
    config: QuantizeConfig,
    reused: bool = False,
    promotion: dict | None = None,
    production: str | None = None,
    chart_png: bytes | None = None,
) -> Outcome:
    """The run's outcome in one sentence, decision first, and its tags. `promotion`: the
    history entry if this run moved production; `production`: what it holds after."""
    verdict = "APPROVED" if decision.approved else "REJECTED"
    version = manifest.version
    unchanged = "; production unchanged"
    if config.dry_run:
        tags = ["dry-run"]
        said = f"Dry run, gate {verdict} {version}: nothing published{unchanged}"
    elif not decision.approved:
        tags = ["rejected"]
        said = f"{verdict} {version}: kept in the registry with its report{unchanged}"
    elif promotion is not None:
        tags = ["promoted"]
        before = promotion["from"] or "no version before"
        said = f"{verdict} and promoted: production {version} (was {before})"
    elif production == version:
        tags, said = ["approved"], f"{verdict} {version}: already in production"
    else:
        tags = ["approved"]
        said = f"{verdict} {version}, not promoted: production holds the newer {production}"
    if reused:
        tags.insert(0, "reused")
        said = f"Unchanged inputs, {version} reused. {said}"
    tags.append(manifest.recipe.name)
    return Outcome(tags=tags, headline=said, reasons=decision.reasons, chart_png=chart_png)


def _location(config: QuantizeConfig, manifest: VersionManifest) -> str:
    return f"{config.registry.rstrip('/')}/versions/{manifest.version}"


def _result(
    manifest: VersionManifest,
    config: QuantizeConfig,
    decision: Decision,
    location: str | None,
    report: str,
    reused: bool = False,
    promoted: bool = False,
) -> QuantizeResult:
    return QuantizeResult(
        version=manifest.version,
        approved=decision.approved,
        promoted=promoted,
        reused=reused,
        dry_run=config.dry_run,
        registry=config.registry,
        location=location,
        report=report,
        manifest=manifest,
    )


# The steps of quantize_and_promote, in order.


def check_registry(config: QuantizeConfig) -> None:
    """Refuse a registry this run could not publish to, before any work."""
    Registry(config.registry).check_writable()


def resolve_source(config: QuantizeConfig) -> checkpoint.Checkpoint:
    """Download (hub, URI) or locate (directory) the checkpoint and record its revision."""
    found = checkpoint.resolve_checkpoint(config.source, config.revision)
    log.info("checkpoint %s at %s (%s)", found.source, found.revision, found.path)
    return found


def load_validation(config: QuantizeConfig, found: checkpoint.Checkpoint):
    """The validation sets the gate measures agreement on, labels mapped to the model's ids."""
    label2id = checkpoint.read_label2id(found.path)
    sets = [
        validation.load_validation(spec, config.text_column, config.label_column, label2id)
        for spec in config.validation
    ]
    for data in sets:
        labelled = "with labels" if data.labels is not None else "without labels"
        log.info("validation %s: %d examples %s", data.name, len(data.texts), labelled)
    return validation.combine(sets)


def split_validation(data: validation.ValidationSet, config: QuantizeConfig):
    """Tuning and confirmation parts; refused here if a confirmation part is too small to
    certify the gate even with no flip."""
    tuning, confirmation = validation.split(data)
    gate.check_certifiable(
        {p.name: p.stop - p.start for p in confirmation.slices()}, config.thresholds
    )
    log.info(
        "split %s: %d examples to tune on, %d to confirm on",
        validation.SPLIT_RULE,
        len(tuning.texts),
        len(confirmation.texts),
    )
    return tuning, confirmation


def find_existing(config: QuantizeConfig, key: str) -> VersionManifest | None:
    """A version already made from these very inputs, if any."""
    return Registry(config.registry).find_run(key)


def load_fp32(found: checkpoint.Checkpoint):
    """The FP32 model and its tokenizer, refused early if unsafe or not a classifier."""
    return checkpoint.load_checkpoint(found.path)


def predict_fp32(model, tokenizer, data: validation.ValidationSet, config: QuantizeConfig):
    """FP32 reference predictions, batched by the policy INT8 will use."""
    return validation.predict(model, tokenizer, data.texts, config.batching, progress="FP32")


def quantize(model, tokenizer, tuning, fp32, confirmation, config: QuantizeConfig, progress):
    """Quantize by the recipe (a fallback recipe keeps the most sensitive layers FP32,
    chosen on the tuning part only, and tells `progress` how its search goes)."""
    from distilq import autoquant  # torch: imported only by a run that quantizes

    target = autoquant.target_agreement(confirmation, config.thresholds, config.margin)
    candidate = autoquant.quantize_for_gate(
        model, tokenizer, config.recipe, tuning, fp32, config.batching, target, progress=progress
    )
    layers = ", ".join(candidate.fp32_layers) or "none"
    log.info("recipe %s: FP32 layers: %s", config.recipe, layers)
    return candidate


def confirm(model, tokenizer, candidate, confirmation, config: QuantizeConfig) -> artifact.Gated:
    """Both models on the confirmation part, which the recipe never saw: the metrics, both
    models' warm speed, and the gate's decision."""
    policy = config.batching
    fp32 = validation.predict(model, tokenizer, confirmation.texts, policy, progress="FP32")
    int8 = validation.predict(
        candidate.model, tokenizer, confirmation.texts, policy, progress="confirm INT8"
    )
    speed = validation.measure_speed(model, candidate.model, tokenizer, confirmation.texts, policy)
    metrics = validation.compare(
        fp32, int8, confirmation, model.config.id2label, speed, config.confidence
    )
    decision = gate.decide(metrics, config.thresholds)
    log.info(
        "agreement %.4f (lower bound %.4f), %d flips; rows/s FP32 %.1f, INT8 %.1f (%s)",
        metrics.agreement,
        metrics.agreement_lower_bound,
        metrics.flips,
        speed.rows_per_second_fp32,
        speed.rows_per_second_int8,
        speed.cpu,
    )
    verdict = "passed" if decision.approved else "FAILED"
    log.info("gate %s: %s", verdict, "; ".join(decision.reasons))
    return artifact.Gated(candidate, confirmation, fp32, int8, metrics, decision)


def stage(staging: Path, gated, tokenizer, found, data, config: QuantizeConfig, key: str):
    """Write the version's files to `staging`; return its manifest."""
    return artifact.stage_version(staging, gated, tokenizer, found, data, config.batching, key)


def publish(staging: Path, manifest: VersionManifest, config: QuantizeConfig) -> str:
    """Publish the staged version (immutable; manifest written last) with the gate's own
    attestation of its platform."""
    registry = Registry(config.registry)
    version = registry.publish(staging, manifest, attest.gate_attestation(manifest))
    log.info("published %s to %s", version, config.registry)
    return version


def promote(version: str, config: QuantizeConfig) -> dict | None:
    """Move `production` to the approved version (never back to an older one)."""
    entry = Registry(config.registry).promote(version, "gate passed", newer_only=True)
    if entry is None:
        log.warning("production not moved: it already holds %s or a newer version", version)
    else:
        log.info("production: %s -> %s", entry["from"], entry["to"])
    return entry


# -- score_dataset ---------------------------------------------------------------------------


def score_dataset(config: ScoreConfig, run: Runner | None = None) -> ScoreSummary:
    """Score Parquet files with the registry's model into `config.output`; shards already
    scored by the same model from the same inputs are skipped. Raises ScoringFailed, with
    the summary, if any input file could not be scored (the others are)."""
    run = run or Runner()
    start = time.perf_counter()
    version, options = run.step(resolve_model, config)
    plan = run.step(plan_inputs, config, options)
    with output_lock(config.output):
        manifest, todo = run.step(prepare, config, plan, version, options)
        for uri, error in plan.unreadable.items():
            manifest.record_failure(uri, error)
        total = sum(s.rows for s in todo)
        bar = tqdm(total=total, unit="rows", file=sys.stderr, desc="scoring")
        progress = functools.partial(run.progress, "score-progress")
        progress(0, total, f"0 of {total:,} rows to score in this run")

        def done(shard: Shard, result: ShardStats | BaseException) -> None:
            try:
                if isinstance(result, BaseException):
                    log.error("%s failed: %s", shard.name, result)
                    manifest.record_failure(shard.name, str(result))
                else:
                    manifest.record_shard(shard, result)
            except ManifestNotSaved as e:  # kept in memory: the next save may pass
                log.error("%s; going on with the other files", e)
            bar.update(shard.rows)
            progress(bar.n, total, f"{bar.n:,} of {total:,} rows to score in this run")

        run.map_shards(score_one_shard, todo, (config, version, options), done)
        bar.close()
        this_run = {s.output for s in todo}
        summary = manifest.finalize(time.perf_counter() - start, this_run)
    log.info(report.score_summary_line(summary))
    run.scored(summary, manifest)
    if summary.failed:
        raise ScoringFailed(
            f"{len(summary.failed)} input file(s) failed: "
            + "; ".join(f"{uri}: {why}" for uri, why in summary.failed.items()),
            summary,
        )
    return summary


def preflight(config: ScoreConfig) -> tuple[str, int]:
    """The checks of `score_dataset` that need no engine: unknown model, a --max-length the
    model cannot take, missing paths or columns, an output that overlaps the inputs, cannot
    be made or is held by another run. Returns the model version `config.model` names now
    and the number of shards left to score (0: the output is complete, no model is needed)."""
    version, options = resolve_model(config)
    plan = plan_inputs(config, options)
    refuse_if_locked(config.output)
    todo = pending_shards(config.output, plan, version, options.model_dump(), config.overwrite)
    return version, len(todo)


# The steps of score_dataset, in order.


def resolve_model(config: ScoreConfig) -> tuple[str, ScoreOptions]:
    """The version behind `config.model` and the options to score with (its batching
    policy); fails early if the model is unknown or cannot take `max_length`."""
    registry = Registry(config.registry)
    version = registry.resolve(config.model)
    options = options_for(config, registry, version)
    log.info("model %s (%s) from %s", version, config.model, config.registry)
    return version, options


def plan_inputs(config: ScoreConfig, options: ScoreOptions) -> Plan:
    """Shards to score, after every input's schema and the output's place were checked."""
    plan = plan_shards(config.inputs, options, config.output)
    rows = sum(s.rows for s in plan.shards)
    log.info(
        "%d shard(s), %d rows; %d unreadable file(s)", len(plan.shards), rows, len(plan.unreadable)
    )
    return plan


def prepare(
    config: ScoreConfig, plan: Plan, version: str, options: ScoreOptions
) -> tuple[OutputManifest, list[Shard]]:
    """Check the output against this run; save its manifest; return it and the shards to do."""
    manifest, todo = prepare_output(
        config.output, plan, version, options.model_dump(), config.overwrite
    )
    skipped = len(plan.shards) - len(todo)
    if skipped:
        log.info("resuming: %d shard(s) already done, %d to go", skipped, len(todo))
    return manifest, todo


def score_one_shard(
    shard: Shard, config: ScoreConfig, version: str, options: ScoreOptions
) -> ShardStats:
    """Score one shard on this worker (model loaded once per process); log progress."""
    from distilq.classifier import load_cached
    from distilq.runtime import configure_worker

    configure_worker(config.threads_per_worker)
    classifier = load_cached(config.registry, version, config.allow_unattested)
    done, start, last = 0, time.perf_counter(), time.perf_counter()

    def progress(rows: int) -> None:
        nonlocal done, last
        done += rows
        if time.perf_counter() - last >= PROGRESS_SECONDS:
            last = time.perf_counter()
            rate = done / (last - start)
            log.info("%s: %d/%d rows, %.1f rows/s", shard.output, done, shard.rows, rate)

    stats = score_shard(classifier, shard, config.output, options, progress)
    log.info("%s: %d rows in %.1f s", shard.output, stats.rows_written, stats.seconds)
    return stats
