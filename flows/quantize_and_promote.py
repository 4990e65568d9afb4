"""Flow: checkpoint -> INT8 -> agreement gate -> registry, promoted only if the gate passed."""

from __future__ import annotations

import shutil

from prefect import flow, get_run_logger
from pydantic import BaseModel

from distilq import gate
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
    tuning, confirmation = t.split_validation(data, config)
    key = run_key(found, config.recipe, data, config.thresholds, config.margin, config.batching)
    existing = t.find_existing(config, key)
    if existing is not None:
        get_run_logger().info(
            "unchanged inputs: %s already holds this result, nothing to do", existing["version"]
        )
        # Exit as the first run did, and finish what it left: a run killed after publishing
        # an approved version had not promoted it yet.
        decision = gate.decide_manifest(existing)
        _raise_if_rejected(existing, decision, config)
        entry = None if config.dry_run else t.promote(existing["version"], config)
        location = _location(config, existing)
        return _result(existing, config, location, decision, True, entry is not None)

    model, tokenizer = t.load_fp32(found)
    fp32_tuning = t.predict_fp32(model, tokenizer, tuning, config)
    fp32_confirmation = t.predict_fp32(model, tokenizer, confirmation, config)
    candidate = t.quantize(model, tokenizer, tuning, fp32_tuning, confirmation, config)
    metrics, int8 = t.measure(model, tokenizer, fp32_confirmation, candidate, confirmation, config)
    decision = t.decide(metrics, config)
    staging, manifest = t.stage(
        candidate,
        tokenizer,
        found,
        data,
        confirmation,
        fp32_confirmation,
        int8,
        metrics,
        decision,
        config,
        key,
    )
    t.publish_artifacts(manifest)
    if config.dry_run:
        return _result(manifest, config, str(staging), decision, False, False)

    try:
        t.publish(staging, manifest, config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # published, or failed for good
    _raise_if_rejected(manifest, decision, config)
    entry = t.promote(manifest["version"], config)
    return _result(
        manifest, config, _location(config, manifest), decision, False, entry is not None
    )


def _raise_if_rejected(manifest: dict, decision: gate.Decision, config: QuantizeConfig) -> None:
    """A published candidate the gate rejected fails the run (CLI exit 3)."""
    if config.dry_run or decision.approved:
        return
    raise GateRejected(
        f"gate rejected {manifest['version']}: {'; '.join(decision.reasons)}. It is kept in "
        f"{config.registry} with its report; production is unchanged.",
        manifest,
    )


def _location(config: QuantizeConfig, manifest: dict) -> str:
    return f"{config.registry.rstrip('/')}/versions/{manifest['version']}"


def _result(
    manifest: dict,
    config: QuantizeConfig,
    location: str,
    decision: gate.Decision,
    reused: bool,
    promoted: bool,
) -> QuantizeResult:
    return QuantizeResult(
        version=manifest["version"],
        approved=decision.approved,
        promoted=promoted,
        reused=reused,
        dry_run=config.dry_run,
        registry=config.registry,
        location=location,
        manifest=manifest,
    )
