"""One distilq version logged and registered in MLflow: a run (named as the Prefect run that
made it) with the gate's params, metrics and `report.md`, `report.png`, `manifest.json`; its
output, a `pyfunc` logged model holding the version's files and sealed manifest; and a
version of the registered model tagged with what it mirrors."""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
import tempfile
from pathlib import Path

from distilq.gate.decide import decide_manifest
from distilq.integrations.mlflow.logged import description, run_metrics, run_params, save_pyfunc
from distilq.manifest import VersionManifest
from distilq.registry.layout import MANIFEST
from distilq.registry.registry import Registry
from distilq.report import charts

TAG_VERSION = "distilq_version"
KIND = "custom_model_development"  # the experiment kind of MLflow's model-training UI
VERSION_DIR = "version"  # the version's files inside the MLflow model's artifacts


def upload(
    client,
    model: str,
    registry: Registry,
    manifest: VersionManifest,
    sealed: tuple[bytes, str],
    run_name: str,
):
    """Log `manifest`'s version as a run with its pyfunc model and register it as a version
    of `model`; MLflow's model version. `sealed`: the manifest as published, and its seal."""
    data, seal = sealed
    experiment = _experiment(client, model)
    tags = {
        TAG_VERSION: manifest.version,
        "registry": where(registry),
        # what MLflow's UI shows as the run's description, creator and source
        "mlflow.note.content": description(manifest),
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": "distilq",
        "mlflow.source.type": "JOB",
    }
    run_id = client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="distilq-mlflow-") as scratch:
            model_id = _log_run(client, experiment, run_id, registry, manifest, data, Path(scratch))
        mv = _register(client, model, run_id, model_id, manifest, seal, registry)
    except BaseException:
        _end(client, run_id, "FAILED")
        raise
    _end(client, run_id, "FINISHED")
    return mv


def where(registry: Registry) -> str:
    """The registry's URI, a local one as an absolute path (read on other machines)."""
    local = registry.store.local_path()
    return str(local.resolve()) if local is not None else registry.uri


def _end(client, run_id: str, status: str) -> None:
    # MLflow prints the run's address on stdout, which `--json` keeps for its JSON.
    with contextlib.redirect_stdout(sys.stderr):
        client.set_terminated(run_id, status)


def _experiment(client, model: str) -> str:
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"distilq-{model}"
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:  # a new experiment opens in the UI's model-training view, not the GenAI one
        return client.create_experiment(name, tags={"mlflow.experimentKind": KIND})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # made by a sync at once


def _log_run(
    client,
    experiment: str,
    run_id: str,
    registry: Registry,
    manifest: VersionManifest,
    data: bytes,
    scratch: Path,
) -> str:
    """The run's params, metrics and artifacts, and its model (an MLflow logged model, the
    metrics linked to it); the model's id. `data`: the manifest as published."""
    from mlflow.entities import LoggedModelOutput, Metric, Param

    local, _ = registry.fetch(manifest.version, cache_dir=scratch / "cache")
    model_dir = scratch / "model"
    save_pyfunc(model_dir, local, manifest, data, scratch / VERSION_DIR)
    params = [Param(k, str(v)[:6000]) for k, v in run_params(manifest).items()]
    logged = client.create_logged_model(
        experiment,
        name=manifest.version,
        source_run_id=run_id,
        tags={TAG_VERSION: manifest.version},
        params={p.key: p.value for p in params},
        model_type="distilq-int8",
    )
    metrics = [
        Metric(k, v, 0, 0, model_id=logged.model_id) for k, v in run_metrics(manifest).items()
    ]
    client.log_batch(run_id, metrics=metrics, params=params)
    (scratch / MANIFEST).write_bytes(data)
    for rel in ("report.md", charts.CHART):
        if rel in manifest.files:
            client.log_artifact(run_id, str(local / rel))
    client.log_artifact(run_id, str(scratch / MANIFEST))
    client.log_model_artifacts(logged.model_id, str(model_dir))
    client.finalize_logged_model(logged.model_id, "READY")
    # The run's output: how MLflow's UI links the run and its model.
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def _register(
    client,
    model: str,
    run_id: str,
    model_id: str,
    manifest: VersionManifest,
    seal: str,
    registry: Registry,
):
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            model, description=f"INT8 versions mirrored from distilq {where(registry)}"
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    decision = decide_manifest(manifest)
    tags = {
        TAG_VERSION: manifest.version,
        "approved": str(decision.approved).lower(),
        "recipe": manifest.recipe.name,
        "platform_key": manifest.platform.key if manifest.platform else "unrecorded",
        "registry": where(registry),
        "manifest_sha256": seal,
    }
    return client.create_model_version(
        model,
        source=f"models:/{model_id}",
        run_id=run_id,
        tags=tags,
        description=description(manifest),
        model_id=model_id,
    )
