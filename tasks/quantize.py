"""Tasks of the quantize-and-promote flow; every one is a call into `distilq`."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from distilq import artifact, attest, autoquant, checkpoint, gate, report, validation
from distilq.config import QuantizeConfig
from distilq.errors import SourceUnavailable
from distilq.registry import Registry

PROMOTED_EVENT = "distilq.model.promoted"


def _retry_unreachable(task, task_run, state) -> bool:
    """Retry only what may pass on a second try: an unreachable source or store."""
    try:
        state.result()
    except (SourceUnavailable, OSError):
        return True
    except Exception:
        return False
    return False


# Models and tensors flow between these tasks in memory: no input hashing, no caching.
@task(
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=_retry_unreachable,
    cache_policy=NO_CACHE,
)
def resolve_checkpoint(config: QuantizeConfig) -> checkpoint.Checkpoint:
    """Download (hub, URI) or locate (directory) the checkpoint and record its revision."""
    found = checkpoint.resolve_checkpoint(config.source, config.revision)
    get_run_logger().info("checkpoint %s at %s (%s)", found.source, found.revision, found.path)
    return found


@task(cache_policy=NO_CACHE)
def load_fp32(found: checkpoint.Checkpoint):
    """The FP32 model and its tokenizer, refused early if unsafe or not a classifier."""
    return checkpoint.load_checkpoint(found.path)


@task(cache_policy=NO_CACHE)
def load_validation(
    config: QuantizeConfig, found: checkpoint.Checkpoint
) -> validation.ValidationSet:
    """The validation sets the gate measures agreement on, labels mapped to the model's ids."""
    label2id = checkpoint.read_label2id(found.path)
    sets = [
        validation.load_validation(spec, config.text_column, config.label_column, label2id)
        for spec in config.validation
    ]
    logger = get_run_logger()
    for data in sets:
        labelled = "with labels" if data.labels is not None else "without labels"
        logger.info("validation %s: %d examples %s", data.name, len(data.texts), labelled)
    return validation.combine(sets)


@task(cache_policy=NO_CACHE)
def split_validation(data: validation.ValidationSet, config: QuantizeConfig):
    """Tuning and confirmation parts; refused here if a confirmation part is too small to
    certify the gate even with no flip."""
    tuning, confirmation = validation.split(data)
    gate.check_certifiable(
        {p.name: p.stop - p.start for p in confirmation.slices()}, config.thresholds
    )
    get_run_logger().info(
        "split %s: %d examples to tune on, %d to confirm on",
        validation.SPLIT_RULE,
        len(tuning.texts),
        len(confirmation.texts),
    )
    return tuning, confirmation


@task(
    retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unreachable, cache_policy=NO_CACHE
)
def find_existing(config: QuantizeConfig, key: str) -> dict | None:
    """A version already made from these very inputs, if any."""
    return Registry(config.registry).find_run(key)


@task(cache_policy=NO_CACHE)
def predict_fp32(model, tokenizer, data: validation.ValidationSet, config: QuantizeConfig):
    """FP32 reference predictions, batched by the policy INT8 will use."""
    return validation.predict(model, tokenizer, data.texts, config.batching, progress="FP32")


@task(cache_policy=NO_CACHE)
def quantize(model, tokenizer, tuning, fp32, confirmation, config: QuantizeConfig):
    """Quantize by the recipe (auto: with FP32 fallback on the most sensitive layers, chosen
    on the tuning part only)."""
    target = autoquant.target_agreement(confirmation, config.thresholds, config.margin)
    candidate = autoquant.quantize_for_gate(
        model, tokenizer, config.recipe, tuning, fp32, config.batching, target
    )
    layers = ", ".join(candidate.fp32_layers) or "none"
    get_run_logger().info("recipe %s: FP32 layers: %s", config.recipe, layers)
    return candidate


@task(cache_policy=NO_CACHE)
def measure(model, tokenizer, fp32, candidate, confirmation, config: QuantizeConfig):
    """FP32-vs-INT8 metrics on the confirmation part, and both models' warm speed; and the
    INT8 predictions they came from."""
    int8 = validation.predict(
        candidate.model, tokenizer, confirmation.texts, config.batching, progress="confirm INT8"
    )
    speed = validation.measure_speed(
        model, candidate.model, tokenizer, confirmation.texts, config.batching
    )
    metrics = validation.compare(
        fp32, int8, confirmation, model.config.id2label, speed, config.confidence
    )
    get_run_logger().info(
        "agreement %.4f (lower bound %.4f), %d flips; rows/s FP32 %.1f, INT8 %.1f (%s)",
        metrics.agreement,
        metrics.agreement_lower_bound,
        metrics.flips,
        speed.rows_per_second_fp32,
        speed.rows_per_second_int8,
        speed.cpu,
    )
    return metrics, int8


@task(cache_policy=NO_CACHE)
def decide(metrics: validation.Metrics, config: QuantizeConfig) -> gate.Decision:
    """The gate's decision, with its reasons."""
    decision = gate.decide(metrics, config.thresholds)
    get_run_logger().info(
        "gate %s: %s", "passed" if decision.approved else "FAILED", "; ".join(decision.reasons)
    )
    return decision


@task(cache_policy=NO_CACHE)
def stage(
    candidate, tokenizer, found, data, confirmation, fp32, int8, metrics, decision, config, key
):
    """Write the version's files to a staging directory; return it and the manifest."""
    staging = artifact.staging_dir(config.dry_run)
    manifest = artifact.stage_version(
        staging,
        candidate,
        tokenizer,
        found,
        data,
        confirmation,
        fp32,
        int8,
        metrics,
        decision,
        config.batching,
        key,
    )
    return staging, manifest


@task(
    retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unreachable, cache_policy=NO_CACHE
)
def publish(staging: Path, manifest: dict, config: QuantizeConfig) -> str:
    """Publish the staged version (immutable; manifest written last)."""
    registry = Registry(config.registry)
    version = registry.publish(staging, manifest)
    attest.record_gate(registry, manifest)
    get_run_logger().info("published %s to %s", version, config.registry)
    return version


@task(cache_policy=NO_CACHE)
def promote(version: str, config: QuantizeConfig) -> dict | None:
    """Move `production` to the approved version (never back to an older one)."""
    entry = Registry(config.registry).promote(version, "gate passed", newer_only=True)
    logger = get_run_logger()
    if entry is None:
        logger.warning("production not moved: it already holds %s or a newer version", version)
    else:
        logger.info("production: %s -> %s", entry["from"], entry["to"])
        emit_promoted(version, config.registry, entry)
    return entry


def emit_promoted(version: str, registry: str, entry: dict) -> None:
    """Tell Prefect that `production` moved, so deployment triggers can re-score datasets."""
    emit_event(
        event=PROMOTED_EVENT,
        resource={"prefect.resource.id": f"distilq.model.{version}", "registry": registry},
        payload={"version": version, "registry": registry, "previous": entry["from"]},
    )


@task(cache_policy=NO_CACHE)
def publish_artifacts(manifest: dict) -> None:
    """The report and the metrics table, as Prefect artifacts."""
    create_markdown_artifact(
        key="quantize-report",
        markdown=report.render_report(manifest),
        description=f"distilq candidate {manifest['version']}",
    )
    rows = report.metrics_table(manifest)
    create_table_artifact(
        key="quantize-metrics",
        table=[dict(zip(["metric", *rows[0][1:]], r, strict=True)) for r in rows[1:]],
        description=f"FP32 vs INT8 for {manifest['version']}",
    )
