"""Flow: checkpoint -> INT8 -> agreement gate -> registry, promoted only if the gate passed."""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel

from distilq.artifact import run_key
from distilq.config import QuantizeConfig
from distilq.errors import GateRejected
from tasks import quantize as t


class QuantizeResult(BaseModel):
    """What a quantize-and-promote run did."""

    version: str
    approved: bool
    promoted: bool
    reused: bool
    dry_run: bool
    registry: str
    location: str  # the version's directory: in the registry, or the staging copy of a dry run
    manifest: dict


@flow(name="quantize_and_promote", log_prints=True)
def quantize_and_promote(config: QuantizeConfig | None = None) -> QuantizeResult:
    """Quantize a checkpoint to INT8, validate it against FP32, publish it, and promote it
    to `production` only if the gate approved it. A failed gate fails the run."""
    config = config or QuantizeConfig()
    found = t.resolve_checkpoint(config)
    data = t.load_validation(config, found)
    key = run_key(found, config.recipe, data, config.thresholds, config.margin, config.batching)
    existing = t.find_existing(config, key)
    if existing is not None:
        get_run_logger().info(
            "unchanged inputs: %s already holds this result, nothing to do", existing["version"]
        )
        return _result(existing, config, _location(config, existing), reused=True, promoted=False)

    model, tokenizer = t.load_fp32(found)
    fp32 = t.predict_fp32(model, tokenizer, data, config)
    candidate = t.quantize(model, tokenizer, data, fp32, config)
    metrics = t.measure(fp32, candidate, data, model.config.id2label)
    decision = t.decide(metrics, config)
    staging, manifest = t.stage(candidate, tokenizer, found, data, metrics, decision, config, key)
    t.publish_artifacts(manifest)
    if config.dry_run:
        return _result(manifest, config, str(staging), reused=False, promoted=False)

    version = t.publish(staging, manifest, config)
    if not decision.approved:
        raise GateRejected(
            f"gate rejected {version}: {'; '.join(decision.reasons)}. It is kept in "
            f"{config.registry} with its report; production is unchanged.",
            manifest,
        )
    entry = t.promote(version, config)
    return _result(
        manifest, config, _location(config, manifest), reused=False, promoted=entry is not None
    )


def _location(config: QuantizeConfig, manifest: dict) -> str:
    return f"{config.registry.rstrip('/')}/versions/{manifest['version']}"


def _result(
    manifest: dict, config: QuantizeConfig, location: str, reused: bool, promoted: bool
) -> QuantizeResult:
    return QuantizeResult(
        version=manifest["version"],
        approved=manifest["decision"]["approved"],
        promoted=promoted,
        reused=reused,
        dry_run=config.dry_run,
        registry=config.registry,
        location=location,
        manifest=manifest,
    )
