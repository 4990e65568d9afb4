"""The score path: `score_dataset(config) -> ScoreSummary`, its preflight and its steps."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time

from tqdm.auto import tqdm

from distilq.config.score import ScoreConfig, ScoreOptions
from distilq.config.shared import MLFLOW_PREFIX
from distilq.errors import AuditFailed, InputError, ScoringFailed
from distilq.manifest import AuditFigures, RunAudit, ScoreSummary
from distilq.pipelines.runner import Runner
from distilq.registry.layout import utc_now
from distilq.registry.registry import Registry
from distilq.report.render import score_summary_line
from distilq.score.audit import AuditPlan, plan_audit
from distilq.score.evidence import pool_texts
from distilq.score.inputs import Plan, Shard, plan_shards
from distilq.score.output import (
    ManifestNotSaved,
    OutputManifest,
    output_lock,
    pending_shards,
    prepare_output,
    refuse_if_locked,
)
from distilq.score.scoring import ShardStats, options_for, score_shard

log = logging.getLogger("distilq")
PROGRESS_SECONDS = 15  # how often a shard logs its progress


def score_dataset(config: ScoreConfig, run: Runner | None = None) -> ScoreSummary:
    """Score Parquet files with the registry's model into `config.output`; shards already
    scored by the same model from the same inputs are skipped. Raises ScoringFailed, with
    the summary, if any input file could not be scored (the others are)."""
    run = run or Runner()
    start = time.perf_counter()
    version, options = run.step(resolve_model, config, retries=2)  # MLflow, S3: transient
    plan = run.step(plan_inputs, config, options)
    audit = run.step(audit_plan, config, version, plan)
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

        run.map_shards(score_one_shard, todo, (config, version, options, audit), done)
        bar.close()
        this_run = {s.output for s in todo}
        summary = manifest.finalize(time.perf_counter() - start, this_run, audit)
    if summary.audit.rows:
        run.step(record_audit, config, summary, manifest, this_run, run.run_id(), retries=2)
    log.info(score_summary_line(summary))
    run.scored(summary, manifest)
    if summary.audit.alarm:
        run.audit_failed(summary, config)
    if summary.failed:
        raise ScoringFailed(
            f"{len(summary.failed)} input file(s) failed: "
            + "; ".join(f"{uri}: {why}" for uri, why in summary.failed.items()),
            summary,
        )
    if summary.audit.alarm:
        raise AuditFailed(audit_failed_message(summary), summary)
    return summary


def preflight(config: ScoreConfig) -> tuple[str, int]:
    """The checks of `score_dataset` that need no engine: unknown model, a --max-length the
    model cannot take, missing paths or columns, an output that overlaps the inputs, cannot
    be made or is held by another run. Returns the model version `config.model` names now
    and the number of shards left to score (0: the output is complete, no model is needed).

    Its plan is handed to the next `score_dataset` of the same config in this process, which
    then plans nothing again (planning reads every input's footer: on an object store, the
    slow part of a start)."""
    version, options = resolve_model(config)
    plan = plan_shards(config.inputs, options, config.output)
    refuse_if_locked(config.output)
    todo = pending_shards(
        config.output, plan, version, run_settings(config, options), config.overwrite
    )
    _PREFLIGHT_PLANS[_plan_key(config, options)] = plan
    return version, len(todo)


_PREFLIGHT_PLANS: dict[str, Plan] = {}  # by _plan_key; each taken once, by the run it checked


def run_settings(config: ScoreConfig, options: ScoreOptions) -> dict:
    """What an output records as `settings` and a resume must match: the scoring options and
    the audit's (a resume that sampled or judged otherwise would mix two audits)."""
    audit = config.model_dump(include=AUDIT_SETTINGS)
    return {**options.model_dump(), "audit": audit}


AUDIT_SETTINGS = {"audit_rate", "audit_max_rows", "min_audit_agreement", "audit_fail_on"}


def _plan_key(config: ScoreConfig, options: ScoreOptions) -> str:
    return json.dumps([config.model_dump(mode="json"), options.model_dump(mode="json")])


# The steps of score_dataset, in order.


def resolve_model(config: ScoreConfig) -> tuple[str, ScoreOptions]:
    """The version behind `config.model` and the options to score with (its batching
    policy); fails early if the model is unknown or cannot take `max_length`."""
    registry = Registry(config.registry)
    unguarded = registry.store.unguarded()
    if unguarded:  # a run records its attestations and audit there
        raise InputError(f"--registry {config.registry} {unguarded}")
    if config.model.startswith(MLFLOW_PREFIX):
        from distilq.integrations.mlflow.mirror import resolve_ref

        version = resolve_ref(config.mlflow_tracking_uri, config.model, registry)
    else:
        version = registry.resolve(config.model)
    options = options_for(config, registry, version)
    log.info("model %s (%s) from %s", version, config.model, config.registry)
    return version, options


def plan_inputs(config: ScoreConfig, options: ScoreOptions) -> Plan:
    """Shards to score, after every input's schema and the output's place were checked: the
    plan `preflight` made for this run, else a new one."""
    plan = _PREFLIGHT_PLANS.pop(_plan_key(config, options), None) or plan_shards(
        config.inputs, options, config.output
    )
    rows = sum(s.rows for s in plan.shards)
    log.info(
        "%d shard(s), %d rows; %d unreadable file(s)", len(plan.shards), rows, len(plan.unreadable)
    )
    return plan


def audit_plan(config: ScoreConfig, version: str, plan: Plan) -> AuditPlan:
    """How this run audits (over every shard of the inputs, so a resume samples as the
    first run did); says so when it cannot."""
    registry = Registry(config.registry)
    audit = plan_audit(config, registry, registry.manifest(version), plan.shards)
    if audit.active:
        log.info(
            "audit: rows sampled at %g against %s, bar %.2f%% at %.0f%%",
            audit.sampling_rate,
            audit.reference.describe(),
            100 * audit.threshold,
            100 * audit.confidence,
        )
    else:
        log.warning("not audited: %s", audit.reason)
    return audit


def prepare(
    config: ScoreConfig, plan: Plan, version: str, options: ScoreOptions
) -> tuple[OutputManifest, list[Shard]]:
    """Check the output against this run; save its manifest; return it and the shards to do."""
    manifest, todo = prepare_output(
        config.output, plan, version, run_settings(config, options), config.overwrite
    )
    skipped = len(plan.shards) - len(todo)
    if skipped:
        log.info("resuming: %d shard(s) already done, %d to go", skipped, len(todo))
    return manifest, todo


def score_one_shard(
    shard: Shard, config: ScoreConfig, version: str, options: ScoreOptions, audit: AuditPlan
) -> ShardStats:
    """Score one shard on this worker (models loaded once per process); log progress."""
    from distilq.runtime import configure_worker
    from distilq.score.classifier import load_cached

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

    stats = score_shard(classifier, shard, config.output, options, progress, audit)
    log.info("%s: %d rows in %.1f s", shard.output, stats.rows_written, stats.seconds)
    return stats


def record_audit(
    config: ScoreConfig, summary: ScoreSummary, manifest: OutputManifest, this_run: set, run_id
) -> RunAudit | None:
    """`versions/<v>/audits/<run-id>.json`: the output's audit as this run ended, and the
    rows this run audited itself (what `models show` pools). None, and nothing written,
    when this run audited no row (a re-run of a complete output)."""
    audit = summary.audit
    own = [s.audit for name, s in manifest.record.shards.items() if name in this_run and s.audit]
    if not sum(a.rows for a in own):
        return None
    record = RunAudit(
        run_id=run_id,
        created_at=utc_now(),
        model_version=summary.model_version,
        output=summary.output,
        **audit.model_dump(include=set(AuditFigures.model_fields)),
        run_rows=sum(a.rows for a in own),
        run_agreeing=sum(a.agreeing for a in own),
        texts=pool_texts([s.audit.texts for s in manifest.record.shards.values() if s.audit]),
    )  # fmt: skip
    Registry(config.registry).write_audit(record)
    return record


def audit_failed_message(summary: ScoreSummary) -> str:
    """One line with the numbers, and the rule that fired."""
    a = summary.audit
    said = (
        f"upper bound {a.agreement_upper_bound:.2%} at {a.confidence:.0%} is below the bar "
        f"{a.threshold:.2%}: evidence that it agrees with FP32 less often than promised"
        if a.verdict == "failed"
        else f"lower bound {a.agreement_lower_bound:.2%} at {a.confidence:.0%} does not certify "
        f"the bar {a.threshold:.2%} (--audit-fail-on {a.fail_on})"
    )
    return (
        f"audit FAILED for {summary.model_version} on {summary.output}: {a.agreeing:,} of "
        f"{a.rows:,} audited texts agree with FP32 ({a.agreement:.2%}); {said}. The scored "
        f"files are kept; flipped rows are in {summary.output}/_manifest.json, every audited "
        f"row in {summary.output}/{a.file}"
    )
