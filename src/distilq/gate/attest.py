"""Attestation: the gate's promise re-checked on every platform a version runs on.

INT8 predictions differ between CPUs (AVX2 and AVX-512 VNNI kernels round differently), so
a version certified on one platform is not yet certified on another. Each version carries
its confirmation texts with the FP32 labels and the INT8 probabilities measured at the gate
(`selfcheck.parquet`, hash-checked like every file). Before a process scores with a version
on a platform with no attestation, it runs those texts here and applies the same gate;
a pass is written to `versions/<v>/attestations/<platform key>.json` and is not repeated.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distilq.errors import Unattested
from distilq.gate.compare import set_metrics
from distilq.gate.decide import certified_agreement, decide_sets
from distilq.hardware import platform_record
from distilq.manifest import VersionManifest
from distilq.metrics import SetMetrics

SELFCHECK = "selfcheck.parquet"
log = logging.getLogger("distilq")


def write_selfcheck(directory: str | Path, confirmation, fp32_labels, int8_probs) -> Path:
    """What a self-check needs, next to the model: set, text, FP32 label, INT8 probabilities."""
    names = [p.name for p in confirmation.slices() for _ in range(p.start, p.stop)]
    table = pa.table(
        {
            "set": names,
            "text": confirmation.texts,
            "fp32_label": pa.array(np.asarray(fp32_labels), pa.int16()),
            "int8_probs": pa.array(list(np.asarray(int8_probs, dtype=np.float32))),
        }
    )
    path = Path(directory) / SELFCHECK
    pq.write_table(table, path, compression="zstd")
    return path


def _set_figures(sets: list[SetMetrics]) -> list[dict]:
    return [m.model_dump(include={"name", "n_examples", "agreement", "flips"}) for m in sets]


def gate_attestation(manifest: VersionManifest) -> dict[str, dict]:
    """The attestation of a version's own platform (the gate's figures), by platform key:
    written by `Registry.publish` with the version, before its manifest."""
    m = manifest.metrics
    record = {
        "version": manifest.version,
        "platform": manifest.platform.model_dump(),
        "agreement": min(s.agreement for s in m.sets),
        "agreement_lower_bound": m.agreement_lower_bound,
        "sets": _set_figures(m.sets),
        "approved": manifest.decision.approved,
        "reasons": manifest.decision.reasons,
        "max_abs_prob_diff": 0.0,  # the very outputs the gate measured
    }
    return {manifest.platform.key: record}


def self_check(classifier, directory: str | Path) -> dict:
    """Run the version's confirmation texts on this platform and apply its gate; return the
    attestation record (`approved` says whether it passed)."""
    table = pq.read_table(Path(directory) / SELFCHECK)
    sets, texts = table["set"].to_pylist(), table["text"].to_pylist()
    fp32 = np.asarray(table["fp32_label"])
    stored = np.stack(table["int8_probs"].to_numpy(zero_copy_only=False))
    probs = classifier.predict_proba(texts)  # the version's own batching policy
    labels = probs.argmax(axis=1)
    manifest = classifier.manifest
    thresholds = manifest.decision.thresholds
    figures = []
    for name in dict.fromkeys(sets):
        rows = [i for i, s in enumerate(sets) if s == name]
        figures.append(set_metrics(name, fp32[rows], labels[rows], None, thresholds.confidence))
    decision = decide_sets(figures, thresholds)
    weakest = min(figures, key=lambda m: certified_agreement(m, thresholds))
    return {
        "version": manifest.version,
        "platform": platform_record(manifest.platform.quantized_engine),
        "agreement": weakest.agreement,
        "agreement_lower_bound": weakest.agreement_lower_bound,
        "sets": _set_figures(figures),
        "approved": decision.approved,
        "reasons": decision.reasons,
        # Whether this platform reproduces the gate's INT8 outputs exactly, or only agrees.
        "max_abs_prob_diff": float(np.nanmax(np.abs(probs - stored))),
    }


def ensure_attested(registry, classifier, directory: str | Path, allow: bool = False) -> str:
    """Make sure `classifier`'s version is attested on this platform: by the gate itself, by
    an earlier self-check recorded in `registry`, or by one run now (recorded there; with no
    registry, not recorded). Returns how (a line for logs). A failed self-check raises
    Unattested, or with `allow` only warns."""
    manifest = classifier.manifest
    version = manifest.version
    if manifest.platform is None:
        log.warning(
            "version %s was published before platforms were recorded: it cannot be "
            "self-checked here; quantize again to get a version that can",
            version,
        )
        return "not attestable (published before platforms were recorded)"
    here = platform_record(manifest.platform.quantized_engine)
    if here["key"] == manifest.platform.key:
        return f"attested by the gate on platform {here['key']}"
    if registry is not None and registry.attestation(version, here["key"]) is not None:
        return f"attested earlier on platform {here['key']}"
    if not (Path(directory) / SELFCHECK).is_file():
        log.warning("version %s has no %s: it cannot be self-checked here", version, SELFCHECK)
        return "not attestable (no self-check data)"
    log.info(
        "version %s was gated on platform %s, this is %s: running its self-check",
        version,
        manifest.platform.key,
        here["key"],
    )
    record = self_check(classifier, directory)
    if record["approved"]:
        if registry is not None:
            registry.write_attestation(version, here["key"], record)
        return f"self-check passed on platform {here['key']}: {'; '.join(record['reasons'])}"
    message = (
        f"version {version} fails its self-check on this platform ({here['key']}: "
        f"{here['cpu']}): {'; '.join(record['reasons'])}"
    )
    if allow:
        log.warning("%s; scoring anyway (--allow-unattested)", message)
        return "unattested (allowed)"
    raise Unattested(message + ". Use another machine, or --allow-unattested to score anyway")
