"""The MLflow mirror: distilq versions as MLflow model versions, `production` as an alias.

distilq's registry stays the source of truth; MLflow gets a faithful copy that the rest of
a team's stack can use (its UI, `models:/NAME@production`, `mlflow models serve`, Spark
UDFs). Each distilq version becomes, once:

- an MLflow run (named as the Prefect run that made it) with the gate's params, metrics
  and `report.md`, `report.png`, `manifest.json` as artifacts;
- the run's output, an MLflow logged model named by the version: a `pyfunc` model
  (`distilq.integrations.mlflow.pyfunc`) holding the version's files and sealed manifest, with
  pinned requirements;
- a version of the registered model, tagged `distilq_version`, `approved`, `recipe`,
  `platform_key` (and where it came from: `registry`, `manifest_sha256`).

`sync` is the one way in: it registers what MLflow lacks, oldest first, then points MLflow's
`production` at the version distilq's `production` holds. It is idempotent (a version is
found by its `distilq_version` tag and never registered twice) and never deletes anything
in MLflow. Callers run it after distilq's registry moved; when it fails, distilq has
moved anyway and the mirror is behind until the next `sync` (`distilq models sync-mlflow`).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from distilq.config.shared import MLFLOW_MISSING, MLFLOW_PREFIX
from distilq.errors import DistilqError, InputError, IntegrityError
from distilq.gate.decide import decide_manifest
from distilq.integrations.mlflow.logged import description, run_metrics, run_params, save_pyfunc
from distilq.manifest import VersionManifest
from distilq.registry.layout import MANIFEST, PRODUCTION, sealed_manifest
from distilq.registry.registry import Registry
from distilq.report import charts

TAG_VERSION = "distilq_version"
REF = re.compile(r"mlflow:(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+)|/(?P<number>\d+))")
# What a mirrored model pins: distilq and what decides its numbers (dynamic INT8 differs
# between torch builds). Each at the version installed where the model was logged.
KIND = "custom_model_development"  # the experiment kind of MLflow's model-training UI
VERSION_DIR = "version"  # the version's files inside the MLflow model's artifacts
# An unreachable server must not hold a promotion for minutes: MLflow's client retries
# failed requests 7 times with backoff by default. A user's own setting wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
log = logging.getLogger("distilq")


def require_mlflow():
    """The `mlflow` module, or InputError saying which extra installs it."""
    try:
        import mlflow
    except ImportError:
        raise InputError(MLFLOW_MISSING) from None
    return mlflow


@dataclass
class SyncResult:
    """What one `sync` did in MLflow."""

    model: str
    registered: dict[str, str] = field(default_factory=dict)  # distilq version -> MLflow's
    alias_moved: tuple[str | None, str] | None = None  # MLflow versions: from, to
    production: str | None = None  # the MLflow version `production` points at after

    def line(self) -> str:
        """What it did, in one line."""
        done = [f"registered {v} as {self.model} version {n}" for v, n in self.registered.items()]
        if self.alias_moved:
            before, after = self.alias_moved
            done.append(f"{self.model}@{PRODUCTION}: version {before or 'none'} -> {after}")
        if not done:
            where = f"{self.model}@{PRODUCTION} is version {self.production}"
            done.append(f"up to date ({where})" if self.production else "up to date")
        return "MLflow: " + "; ".join(done)


@dataclass
class Mirrored:
    """A distilq version as MLflow holds it."""

    name: str
    number: str  # MLflow's version number
    version: str  # distilq's
    registry: str  # the distilq registry it was mirrored from
    manifest_sha256: str


class MlflowMirror:
    """The registered model `model` on the MLflow tracking server at `tracking_uri`."""

    def __init__(self, tracking_uri: str, model: str):
        require_mlflow()
        from mlflow import MlflowClient

        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.tracking_uri, self.model = tracking_uri, model
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- reading --------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Fail in seconds, saying so, when an HTTP tracking server does not answer at all
        (any answer will do: a server behind a proxy may not serve /health)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        import httpx

        try:
            httpx.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=5)
        except httpx.TransportError as e:
            raise DistilqError(f"MLflow at {self.tracking_uri} does not answer: {e}") from e

    def mirrored(self) -> dict[str, Mirrored]:
        """The model's versions that mirror a distilq version, by distilq version (the
        oldest MLflow version when one was registered twice)."""
        found: dict[str, Mirrored] = {}
        for mv in sorted(self._model_versions(), key=lambda mv: int(mv.version)):
            version = mv.tags.get(TAG_VERSION)
            if version and version not in found:
                found[version] = _mirrored(mv)
        return found

    def _model_versions(self) -> list:
        versions, token = [], None
        while True:
            page = self.client.search_model_versions(
                f"name = '{self.model}'", max_results=1000, page_token=token
            )
            versions += list(page)
            token = page.token
            if not token:
                return versions

    def resolve(self, alias: str | None = None, number: str | None = None) -> Mirrored:
        """The distilq version behind the model's `alias` or version `number`."""
        from mlflow.exceptions import MlflowException

        self.check_reachable()
        what = f"{self.model}@{alias}" if alias else f"{self.model}/{number}"
        try:
            if alias:
                mv = self.client.get_model_version_by_alias(self.model, alias)
            else:
                mv = self.client.get_model_version(self.model, number)
        except MlflowException as e:
            raise InputError(f"MLflow at {self.tracking_uri} has no {what}: {e.message}") from None
        if TAG_VERSION not in mv.tags:
            raise InputError(
                f"{MLFLOW_PREFIX}{what}: MLflow version {mv.version} was not mirrored by "
                f"distilq (no {TAG_VERSION} tag)"
            )
        return _mirrored(mv)

    # -- writing --------------------------------------------------------------------------

    def sync(
        self, registry: Registry, versions: list[str] | None = None, run_name: str | None = None
    ) -> SyncResult:
        """Register in MLflow the distilq versions it lacks (`versions`, default all of the
        registry's, oldest first; production's is always among them), then point MLflow's
        `production` at the MLflow version of distilq's production. Nothing is deleted."""
        self.check_reachable()
        production = registry.alias(PRODUCTION)
        wanted = list(registry.versions() if versions is None else versions)
        if production and production not in wanted:
            wanted.insert(0, production)
        result = SyncResult(self.model)
        have = self.mirrored()
        for version in wanted:
            if version not in have:
                have[version] = self.publish(registry, version, run_name or f"mirror {version}")
                result.registered[version] = have[version].number
        if production is not None:
            result.alias_moved = self._point_production(have[production].number)
            result.production = have[production].number
        return result

    def publish(self, registry: Registry, version: str, run_name: str) -> Mirrored:
        """Log `version` as a run with its pyfunc model and register it."""
        data, seal = registry.sealed(version)
        manifest = sealed_manifest(data, seal, registry.store.uri_of("versions", version), version)
        if seal is None:
            raise DistilqError(
                f"version {version} was published before manifests were sealed: MLflow's copy "
                "could not be checked on load, so it is not mirrored"
            )
        experiment = self._experiment()
        tags = {
            TAG_VERSION: version,
            "registry": _where(registry),
            # what MLflow's UI shows as the run's description, creator and source
            "mlflow.note.content": description(manifest),
            "mlflow.user": getpass.getuser(),
            "mlflow.source.name": "distilq",
            "mlflow.source.type": "JOB",
        }
        run = self.client.create_run(experiment, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        try:
            with tempfile.TemporaryDirectory(prefix="distilq-mlflow-") as scratch:
                model_id = self._log_run(
                    experiment, run_id, registry, manifest, data, Path(scratch)
                )
            mv = self._register(run_id, model_id, manifest, seal, registry)
        except BaseException:
            self._end(run_id, "FAILED")
            raise
        self._end(run_id, "FINISHED")
        return _mirrored(mv)

    def _end(self, run_id: str, status: str) -> None:
        # MLflow prints the run's address on stdout, which `--json` keeps for its JSON.
        with contextlib.redirect_stdout(sys.stderr):
            self.client.set_terminated(run_id, status)

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"distilq-{self.model}"
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        # A new experiment opens in the UI's model-training view, not the GenAI one.
        return self.client.create_experiment(name, tags={"mlflow.experimentKind": KIND})

    def _log_run(
        self,
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
        model = self.client.create_logged_model(
            experiment,
            name=manifest.version,
            source_run_id=run_id,
            tags={TAG_VERSION: manifest.version},
            params={p.key: p.value for p in params},
            model_type="distilq-int8",
        )
        metrics = [
            Metric(k, v, 0, 0, model_id=model.model_id) for k, v in run_metrics(manifest).items()
        ]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        (scratch / MANIFEST).write_bytes(data)
        for rel in ("report.md", charts.CHART):
            if rel in manifest.files:
                self.client.log_artifact(run_id, str(local / rel))
        self.client.log_artifact(run_id, str(scratch / MANIFEST))
        self.client.log_model_artifacts(model.model_id, str(model_dir))
        self.client.finalize_logged_model(model.model_id, "READY")
        # The run's output: how MLflow's UI links the run and its model.
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        return model.model_id

    def _register(
        self, run_id: str, model_id: str, manifest: VersionManifest, seal: str, registry: Registry
    ):
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.model, description=f"INT8 versions mirrored from distilq {_where(registry)}"
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
            "registry": _where(registry),
            "manifest_sha256": seal,
        }
        return self.client.create_model_version(
            self.model,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags=tags,
            description=description(manifest),
            model_id=model_id,
        )

    def _point_production(self, number: str) -> tuple[str | None, str] | None:
        """MLflow's `production` at `number`; (from, to) when it moved."""
        from mlflow.exceptions import MlflowException

        try:
            current = self.client.get_model_version_by_alias(self.model, PRODUCTION).version
        except MlflowException:
            current = None
        if current == number:
            return None
        self.client.set_registered_model_alias(self.model, PRODUCTION, number)
        return current, number


def _where(registry: Registry) -> str:
    """The registry's URI, a local one as an absolute path (read on other machines)."""
    local = registry.store.local_path()
    return str(local.resolve()) if local is not None else registry.uri


def _mirrored(mv) -> Mirrored:
    return Mirrored(
        name=mv.name,
        number=mv.version,
        version=mv.tags[TAG_VERSION],
        registry=mv.tags.get("registry", ""),
        manifest_sha256=mv.tags.get("manifest_sha256", ""),
    )


def follow(
    registry: Registry,
    tracking_uri: str,
    model: str,
    versions: list[str] | None = None,
    run_name: str | None = None,
) -> tuple[str, bool]:
    """`sync` after distilq's registry moved, never failing: its line and False, or
    "MLflow mirror behind: <why>" (logged as a warning) and True when MLflow could not
    follow."""
    try:
        line = MlflowMirror(tracking_uri, model).sync(registry, versions, run_name).line()
    except Exception as e:  # noqa: BLE001  distilq moved; `sync-mlflow` catches up later
        line = f"MLflow mirror behind: {e}; run `distilq models sync-mlflow` once it is back"
        log.warning(line)
        return line, True
    log.info(line)
    return line, False


def resolve_ref(tracking_uri: str, ref: str, registry: Registry) -> str:
    """The distilq version `mlflow:NAME@ALIAS` or `mlflow:NAME/VERSION` names, checked to be
    in `registry` with the very manifest MLflow mirrored."""
    match = REF.fullmatch(ref)
    if not match:
        raise InputError(
            f"--model {ref!r}: an MLflow model is mlflow:NAME@ALIAS or mlflow:NAME/VERSION"
        )
    found = MlflowMirror(tracking_uri, match["name"]).resolve(match["alias"], match["number"])
    where = f"{ref} (MLflow version {found.number})"
    try:
        _, seal = registry.sealed(found.version)
    except InputError:
        raise InputError(
            f"{where} is distilq version {found.version} of registry {found.registry}, which "
            f"is not in --registry {registry.uri}"
        ) from None
    if seal != found.manifest_sha256:
        raise IntegrityError(
            f"{where}: the manifest sha256 MLflow recorded is not the one of {found.version} "
            f"in {registry.uri}; refusing to score with it"
        )
    log.info("%s is distilq version %s", where, found.version)
    return found.version
