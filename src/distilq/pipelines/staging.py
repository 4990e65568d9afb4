"""Stage a quantized candidate as a registry version: model files, report and manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from distilq.config.shared import BatchingPolicy, GateThresholds
from distilq.gate.attest import write_selfcheck
from distilq.gate.data import SPLIT_RULE, ValidationSet
from distilq.hardware import platform_record
from distilq.inference import Predictions
from distilq.manifest import (
    Decision,
    DrawnRecord,
    SetRecord,
    SourceRecord,
    SplitRecord,
    ValidationRecord,
    VersionManifest,
    VersionMetrics,
)
from distilq.metrics import Metrics
from distilq.quantize.checkpoint import Checkpoint, copy_checkpoint
from distilq.recipes import AUTO
from distilq.report import charts
from distilq.report.render import render_report
from distilq.storage.store import sha256_file

if TYPE_CHECKING:
    from distilq.quantize.autoquant import Candidate  # imports torch

STAGING_PREFIX = "distilq-stage-"


@dataclass
class Gated:
    """A candidate with what the gate measured on the confirmation part: both models'
    predictions there, the metrics and the decision."""

    candidate: Candidate
    confirmation: ValidationSet
    fp32: Predictions
    int8: Predictions
    metrics: Metrics
    decision: Decision


def staging_dir() -> Path:
    """A new temporary directory to stage a version in, named after this process so that a
    later run can tell it was left by a run that died (`remove_stale_staging`)."""
    remove_stale_staging()
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))


def keep_report(staging: Path, manifest: VersionManifest) -> Path:
    """A dry run's report, copied out of its staging directory (which is removed) to the
    temporary directory, where the user reads it."""
    target = Path(tempfile.gettempdir()) / f"distilq-dry-run-{manifest.version}.md"
    chart = None
    if (staging / charts.CHART).exists():
        chart = target.with_suffix(".png")
        shutil.copyfile(staging / charts.CHART, chart)
    target.write_text(render_report(manifest, chart and chart.name))
    return target


def remove_stale_staging() -> None:
    """Remove staging directories whose process is gone (a run killed before publishing)."""
    for path in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        pid = path.name.removeprefix(STAGING_PREFIX).split("-")[0]
        if not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_key(
    checkpoint: Checkpoint,
    recipe: str,
    validation: ValidationSet,
    thresholds: GateThresholds,
    pass_probability: float,
    policy: BatchingPolicy,
    keep_reference: bool = False,
) -> str:
    """Identity of a quantize-and-promote run's inputs (`recipe`: its name, as configured):
    the same key means the same result (a version that keeps its FP32 reference is another
    result; without one, keys are as before references existed)."""
    inputs = {
        "source": checkpoint.source,
        "revision": checkpoint.revision,
        "recipe": recipe,
        "validation": validation.sha256,
        "thresholds": thresholds.model_dump(),
        "pass_probability": pass_probability if recipe == AUTO else None,
        "batching": policy.model_dump(),
        "split": SPLIT_RULE,
    }
    if keep_reference:
        inputs["keep_reference"] = True
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of what produced the artifact."""
    import torch
    import transformers

    from distilq import __version__

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "distilq": __version__,
    }


def validation_record(validation: ValidationSet, confirmation: ValidationSet) -> ValidationRecord:
    """The validation sets, their sizes and the split, as the manifest records them."""
    return ValidationRecord(
        name=validation.name,
        sha256=validation.sha256,
        labels=validation.labels is not None,
        sets=[
            SetRecord(
                name=p.name,
                n_examples=p.stop - p.start,
                n_confirmation=c.stop - c.start,
                sha256=p.sha256,
                drawn=None if p.drawn is None else DrawnRecord(**dataclasses.asdict(p.drawn)),
            )
            for p, c in zip(validation.slices(), confirmation.slices(), strict=True)
        ],
        split=SplitRecord(
            rule=SPLIT_RULE,
            tuning=len(validation.texts) - len(confirmation.texts) - confirmation.copies,
            confirmation=len(confirmation.texts),
            confirmation_copies=confirmation.copies,
        ),
    )


def stage_version(
    staging: str | Path,
    gated: Gated,
    tokenizer,
    checkpoint: Checkpoint,
    validation: ValidationSet,
    policy: BatchingPolicy,
    key: str,
    keep_reference: bool = False,
) -> VersionManifest:
    """Write `model/`, the self-check data and `report.md` under `staging` and return the
    manifest describing them.

    `gated` holds the candidate and what the gate measured on `gated.confirmation`, the part
    of `validation` (see `split`) that `auto`'s choices never saw; both models' predictions
    there are kept for self-checks on other platforms (`distilq.gate.attest`). With
    `keep_reference`, the FP32 checkpoint goes in `reference/` for scoring audits."""
    staging = Path(staging)
    model_dir, candidate = staging / "model", gated.candidate
    weights = _write_model(model_dir, candidate, tokenizer)
    if keep_reference:
        from distilq.registry.layout import REFERENCE_PREFIX

        copy_checkpoint(checkpoint.path, staging / REFERENCE_PREFIX)
    write_selfcheck(staging, gated.confirmation, gated.fp32.labels, gated.int8.probs)
    now = datetime.now(UTC)
    manifest = VersionManifest(
        # Sortable by creation to the millisecond, then by content.
        version=f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{sha256_file(weights)[:8]}",
        created_at=now.isoformat(timespec="microseconds"),
        run_key=key,
        source=SourceRecord(
            id=checkpoint.source,
            kind=checkpoint.kind,
            revision=checkpoint.revision,
            sha256=checkpoint.weight_sha256,
        ),
        recipe=candidate.recipe_record(policy),
        validation=validation_record(validation, gated.confirmation),
        metrics=VersionMetrics(
            **gated.metrics.model_dump(),
            size_bytes_fp32=checkpoint.weight_bytes,
            size_bytes_int8=weights.stat().st_size,  # the INT8 weights or graph we ship
        ),
        decision=gated.decision,
        software=software_versions(),
        # Where the gate measured: INT8 predictions differ between CPUs.
        platform=platform_record(candidate.recipe.engine),
    )
    _write_report(staging, manifest)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest.files = {str(p.relative_to(staging)): sha256_file(p) for p in files}
    return manifest


def _write_model(model_dir: Path, candidate, tokenizer) -> Path:
    """The INT8 model's config, tokenizer and weights; returns the weights' path."""
    from distilq.quantize.int8 import save_int8  # torch: only once there is a model to save

    candidate.model.config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return save_int8(candidate.model, candidate.recipe, model_dir)


def _write_report(staging: Path, manifest: VersionManifest) -> None:
    """`report.md`, with its chart when matplotlib is installed."""
    chart = None
    if charts.available():
        charts.write_chart(manifest, staging / charts.CHART)
        chart = charts.CHART
    (staging / "report.md").write_text(render_report(manifest, chart))
