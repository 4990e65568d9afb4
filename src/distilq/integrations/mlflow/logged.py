"""What a distilq version becomes in MLflow: its run's params and metrics, its registered
version's description, and the `pyfunc` model holding its files with pinned requirements."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shutil
import warnings
from pathlib import Path

from distilq.gate.decide import decide_manifest
from distilq.manifest import VersionManifest
from distilq.registry.layout import MANIFEST, MANIFEST_SHA256, model_files

PINNED = ["distilq", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas"]
PINNED_ONNX = ["onnxruntime", "onnx"]  # what loads a version of the onnxruntime engine


def description(manifest: VersionManifest) -> str:
    """The verdict first (MLflow's lists show a description's first words only)."""
    decision = decide_manifest(manifest)
    verdict = "APPROVED" if decision.approved else "REJECTED"
    reasons = "\n".join(f"- {r}" for r in decision.reasons)
    return (
        f"{verdict} by distilq's gate: version `{manifest.version}` ({manifest.recipe.name})"
        f"\n\n{reasons}\n\nThe full report is the run's `report.md`, its chart `report.png`."
    )


def run_params(manifest: VersionManifest) -> dict[str, object]:
    """What made the version: source, recipe, thresholds, validation sets."""
    thresholds = manifest.decision.thresholds
    sets = manifest.validation.sets
    params: dict[str, object] = {
        "source": manifest.source.id,
        "source_kind": manifest.source.kind,
        "revision": manifest.source.revision,
        "recipe": manifest.recipe.name,
        "engine": manifest.recipe.engine,
        "fp32_layers": ", ".join(manifest.recipe.fp32_layers) or "none",
        "batch_size": manifest.recipe.batching.batch_size,
        "max_length": manifest.recipe.batching.max_length,
        "min_agreement": thresholds.min_agreement,
        "max_accuracy_drop": thresholds.max_accuracy_drop,
        "confidence": thresholds.confidence,
        "check_accuracy": thresholds.check_accuracy,
        "validation": ", ".join(s.name for s in sets) or manifest.validation.name,
    }
    for key, s in zip(set_keys([s.name for s in sets]), sets, strict=True):
        params[f"validation.{key}"] = s.name
        params[f"validation.{key}.examples"] = s.n_examples
    return params


def run_metrics(manifest: VersionManifest) -> dict[str, float]:
    """What the gate measured: agreement and its lower bound (overall, the weakest set's,
    and per set), accuracy, bytes on disk, rows/s. Missing figures are left out."""
    m = manifest.metrics
    figures = {
        "agreement": m.agreement,
        "agreement_lower_bound": m.agreement_lower_bound,
        "flips": m.flips,
        "accuracy_fp32": m.accuracy_fp32,
        "accuracy_int8": m.accuracy_int8,
        "accuracy_drop": m.accuracy_drop,
        "size_bytes_fp32": m.size_bytes_fp32,
        "size_bytes_int8": m.size_bytes_int8,
        "rows_per_second_fp32": m.rows_per_second_fp32,
        "rows_per_second_int8": m.rows_per_second_int8,
    }
    for key, s in zip(set_keys([s.name for s in m.sets]), m.sets, strict=True):
        for name in ("agreement", "agreement_lower_bound", "accuracy_fp32", "accuracy_int8"):
            figures[f"{name}/{key}"] = getattr(s, name)
    return {k: float(v) for k, v in figures.items() if v is not None}


def set_keys(names: list[str]) -> list[str]:
    """Validation sets' names as MLflow takes them in keys: the last part of a path (a
    key may not look like a path), other characters than MLflow allows as `_`, and a
    number after a name that repeats."""
    keys: list[str] = []
    for name in names:
        key = re.sub(r"[^\w\-. :]", "_", name.rstrip("/").rsplit("/", 1)[-1]) or "set"
        keys.append(key if key not in keys else f"{key}-{len(keys) + 1}")
    return keys


def save_pyfunc(
    path: Path, local: Path, manifest: VersionManifest, data: bytes, files: Path
) -> None:
    """Write the version as an MLflow pyfunc model at `path`: the files a load checks
    (copied from `local`, already checked) and the manifest as published (`data`) with its
    seal, under `files`, the model's artifact."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from distilq.integrations.mlflow.pyfunc import CODE, VERSION_ARTIFACT

    seal = hashlib.sha256(data).hexdigest()
    for rel in sorted(model_files(manifest)):
        (files / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local / rel, files / rel)
    (files / MANIFEST).write_bytes(data)
    (files / MANIFEST_SHA256).write_text(seal + "\n")
    labels = [ColSpec("string", "label"), ColSpec("float", "score")]
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema([*labels, ColSpec("string", "model_version"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("probabilities", "boolean", False)]),
    )
    with warnings.catch_warnings():
        # MLflow asks for an input example: checking one would load the model (and run its
        # self-check) only to log it. The signature says what the model takes.
        warnings.filterwarnings("ignore", ".*input example", UserWarning)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(CODE),
            artifacts={VERSION_ARTIFACT: str(files)},
            model_config={
                "version": manifest.version,
                "manifest_sha256": seal,
                "text_column": "text",
            },
            signature=signature,
            pip_requirements=pinned_requirements(manifest.recipe.engine),
        )


def pinned_requirements(engine: str) -> list[str]:
    """`name==version` of what a mirrored model of `engine` needs, as installed here (a
    local version label such as torch's `+cpu` dropped: pip resolves it from the index it
    is given)."""
    names = PINNED + (PINNED_ONNX if engine == "onnxruntime" else [])
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]
