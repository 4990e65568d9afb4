"""The quantize path: `quantize_and_promote(config) -> QuantizeResult` and its steps, in order."""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

from pydantic import BaseModel

from distilq.config.quantize import QuantizeConfig
from distilq.errors import DistilqError, GateRejected, PromotionFailed
from distilq.gate import attest, compare, decide
from distilq.gate import data as validation
from distilq.hardware import cpu_features
from distilq.inference import predict
from distilq.manifest import Decision, VersionManifest
from distilq.pipelines.runner import Outcome, Runner
from distilq.pipelines.staging import Gated, keep_report, run_key, stage_version, staging_dir
from distilq.quantize import checkpoint
from distilq.recipes import installed_engines, resolve_recipe
from distilq.registry.registry import Registry
from distilq.report import charts

log = logging.getLogger("distilq")
MLFLOW_BEHIND_TAG = "mlflow-behind"  # the MLflow mirror could not follow this run


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
    mirror: str | None = None  # what the MLflow mirror did, or why it is behind


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
    key = run_key(
        found,
        config.recipe,
        data,
        config.thresholds,
        config.pass_probability,
        config.batching,
        config.keep_reference,
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
    staging = staging_dir()
    try:
        manifest = run.step(stage, staging, gated, tokenizer, found, data, config, key)
        chart = staging / charts.CHART
        chart_png = chart.read_bytes() if chart.exists() else None
        if config.dry_run:
            kept = keep_report(staging, manifest)
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
    decision = decide.decide_manifest(existing)
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
    _mirror(said, manifest, config, run)
    _decided(run, manifest, said)
    where = _location(config, manifest)
    result = _result(
        manifest, config, decision, where, f"{where}/report.md", reused, entry is not None
    )
    result.mirror = said.mirror
    return result


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
    said = outcome(manifest, decision, config, reused, chart_png=chart_png)
    _mirror(said, manifest, config, run)
    _decided(run, manifest, said)
    raise GateRejected(
        f"gate rejected {manifest.version}: {'; '.join(decision.reasons)}. It is kept in "
        f"{config.registry} with its report; production is unchanged.",
        manifest,
    )


def _mirror(said: Outcome, manifest: VersionManifest, config: QuantizeConfig, run: Runner):
    """Mirror the published version to MLflow, when asked to or when the registry is
    mirrored: `said` gets what that did, and the tag `mlflow-behind` when MLflow could not
    follow."""
    if mirror_target(config) is None:
        return
    name = run.run_name() or run_name(config)
    said.mirror, behind = run.step(mirror, manifest.version, config, name)
    if behind:
        said.tags.append(MLFLOW_BEHIND_TAG)


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


def run_name(config: QuantizeConfig) -> str:
    """`quantize <source>[@<revision>] <recipe>`: what ran (the flow run's name, and the
    MLflow run's)."""
    revision = f"@{config.revision}" if config.revision else ""
    return f"quantize {config.source}{revision} {config.recipe}"


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
    """The validation sets the gate measures agreement on (Parquet datasets drawn from),
    labels placed in the model's classes, or refused before any quantizing."""
    label2id = checkpoint.read_label2id(found.path)
    sets = [
        validation.load_validation(
            spec,
            config.text_column,
            config.label_column,
            label2id,
            config.label_map,
            check_accuracy=not config.no_accuracy_check,
            rows=config.validation_rows,
        )
        for spec in config.validation
    ]
    for data in sets:
        labelled = "with labels" if data.labels is not None else "without labels"
        if config.no_accuracy_check:
            labelled = "labels not read (--no-accuracy-check)"
        drawn = ""
        if data.drawn is not None:
            drawn = f", drawn from {data.drawn.rows_read:,} rows by a hash of the text"
            if data.drawn.rows_without_text:
                drawn += f" ({data.drawn.rows_without_text:,} rows without text skipped)"
        log.info("validation %s: %d examples %s%s", data.name, len(data.texts), labelled, drawn)
    return validation.combine(sets)


def split_validation(data: validation.ValidationSet, config: QuantizeConfig):
    """Tuning and confirmation parts; refused here if a confirmation part is too small to
    certify the gate even with no flip."""
    tuning, confirmation = validation.split(data)
    decide.check_certifiable(
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
    return predict(model, tokenizer, data.texts, config.batching, progress="FP32")


def quantize(model, tokenizer, tuning, fp32, confirmation, config: QuantizeConfig, progress):
    """Quantize by the recipe (a fallback recipe keeps the most sensitive layers FP32,
    chosen on the tuning part only, and tells `progress` how its search goes)."""
    from distilq.quantize import autoquant  # torch: imported only by a run that quantizes

    # This CPU decides auto's start, and what it measures against it.
    recipe = resolve_recipe(config.recipe, cpu_features(), installed_engines())
    if recipe.base:
        log.info("%s: starts from %s: %s", recipe.name, recipe.base, recipe.base_reason)
    target = autoquant.PassTarget.for_gate(confirmation, config.thresholds, config.pass_probability)
    candidate = autoquant.quantize_for_gate(
        model, tokenizer, recipe, tuning, fp32, config.batching, target, progress=progress
    )
    layers = ", ".join(candidate.fp32_layers) or "none"
    log.info("recipe %s: FP32 layers: %s", config.recipe, layers)
    return candidate


def confirm(model, tokenizer, candidate, confirmation, config: QuantizeConfig) -> Gated:
    """Both models on the confirmation part, which the recipe never saw: the metrics, both
    models' warm speed, and the gate's decision."""
    policy = config.batching
    fp32 = predict(model, tokenizer, confirmation.texts, policy, progress="FP32")
    int8 = predict(candidate.model, tokenizer, confirmation.texts, policy, progress="confirm INT8")
    speed = compare.measure_speed(model, candidate.model, tokenizer, confirmation.texts, policy)
    metrics = compare.compare(
        fp32, int8, confirmation, model.config.id2label, speed, config.confidence
    )
    decision = decide.decide(metrics, config.thresholds)
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
    return Gated(candidate, confirmation, fp32, int8, metrics, decision)


def stage(staging: Path, gated, tokenizer, found, data, config: QuantizeConfig, key: str):
    """Write the version's files to `staging`; return its manifest."""
    return stage_version(
        staging, gated, tokenizer, found, data, config.batching, key, config.keep_reference
    )


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


def mirror(version: str, config: QuantizeConfig, name: str) -> tuple[str, bool]:
    """Mirror `version` to MLflow as the run `name` and point MLflow's `production` where
    distilq's is; never fails the run: says "MLflow mirror behind: <why>" instead."""
    from distilq.integrations.mlflow.mirror import follow

    return follow(Registry(config.registry), *mirror_target(config), [version], name)


def mirror_target(config: QuantizeConfig) -> tuple[str, str] | None:
    """The MLflow mirror to follow: the one `config` names, else the registry's own."""
    return Registry(config.registry).mirror_target(config.mlflow_tracking_uri, config.mlflow_model)
