"""The MLflow mirror: distilq versions as MLflow model versions, `production` as an alias.

distilq's registry stays the source of truth; MLflow gets a faithful copy that the rest of
a team's stack can use (its UI, `models:/NAME@production`, `mlflow models serve`, Spark
UDFs). Each distilq version becomes, once, an MLflow run with its pyfunc model and a
version of the registered model (upload.py says what each holds).

`sync` is the one way in: it registers what MLflow lacks, oldest first, then points MLflow's
`production` at the version distilq's `production` holds *when the alias is set* (read
again after setting it, so a rollback during a long upload is not undone). A version in
MLflow counts as a copy only with the very manifest (its `manifest_sha256`); two syncs at
once that register the same version keep the older registration and delete their own
duplicate, the one thing `sync` ever deletes. A version that cannot be mirrored (published
before manifests were sealed, or whose manifest changed) is skipped with a line naming
it. The registry records where it is mirrored (`Registry.mirror_target`), so promotions and
rollbacks follow without the flags. When a sync fails, distilq has moved anyway and the
mirror is behind until the next one (`distilq models sync-mlflow`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field

from distilq.config.shared import MLFLOW_MISSING, MLFLOW_PREFIX
from distilq.errors import DistilqError, InputError, IntegrityError, SourceUnavailable
from distilq.integrations.mlflow.upload import TAG_VERSION, upload
from distilq.registry.layout import PRODUCTION, sealed_manifest
from distilq.registry.registry import Registry

REF = re.compile(r"mlflow:(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+)|/(?P<number>\d+))")
# An unreachable server must not hold a promotion for minutes: MLflow's client retries
# failed requests 7 times with backoff by default. A user's own setting wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# Times `sync` reads distilq's production again after pointing MLflow's alias at it: only a
# registry whose production moves on every read needs more than two.
ALIAS_ROUNDS = 5
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
    skipped: dict[str, str] = field(default_factory=dict)  # distilq version -> why

    def line(self) -> str:
        """What it did, in one line."""
        done = [f"registered {v} as {self.model} version {n}" for v, n in self.registered.items()]
        done += [f"skipped {v} ({why})" for v, why in self.skipped.items()]
        if self.alias_moved:
            before, after = self.alias_moved
            done.append(f"{self.model}@{PRODUCTION}: version {before or 'none'} -> {after}")
        if not self.registered and not self.alias_moved:
            where = f"{self.model}@{PRODUCTION} is version {self.production}"
            done.insert(0, f"up to date ({where})" if self.production else "up to date")
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
        (any answer will do: a server behind a proxy may not serve /health); transient."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        import httpx

        try:
            httpx.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=5)
        except httpx.TransportError as e:
            raise SourceUnavailable(f"MLflow at {self.tracking_uri} does not answer: {e}") from e

    def mirrored(self) -> dict[tuple[str, str], Mirrored]:
        """The model's versions that mirror a distilq version, by (distilq version, manifest
        sha256): the oldest MLflow version of each, when one was registered twice."""
        found: dict[tuple[str, str], Mirrored] = {}
        for mv in sorted(self._model_versions(), key=lambda mv: int(mv.version)):
            if TAG_VERSION in mv.tags:
                copy = _mirrored(mv)
                found.setdefault((copy.version, copy.manifest_sha256), copy)
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
            if _not_found(e):
                raise InputError(f"MLflow at {self.tracking_uri} has no {what}: {e.message}") from e
            raise mlflow_error(self.tracking_uri, e, f"reading {what}") from e
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
        `production` at the MLflow version of distilq's production; record in the registry
        that it is mirrored here."""
        self.check_reachable()
        result = SyncResult(self.model)
        with _translated(self.tracking_uri, f"mirroring to {self.model}"):
            have = self.mirrored()
            production = registry.alias(PRODUCTION)
            wanted = list(registry.versions() if versions is None else versions)
            if production and production not in wanted:
                wanted.insert(0, production)
            for version in wanted:
                self._copy(registry, version, have, result, run_name)
            self._follow_production(registry, have, result, run_name)
        registry.record_mirror(self.tracking_uri, self.model)
        return result

    def _copy(
        self, registry: Registry, version: str, have: dict, result: SyncResult, run_name
    ) -> Mirrored | None:
        """MLflow's copy of `version` (registered now if it has none); None, the reason in
        `result.skipped`, when the version cannot be mirrored faithfully."""
        data, seal = registry.sealed(version)
        try:
            manifest = sealed_manifest(
                data, seal, registry.store.uri_of("versions", version), version
            )
            if seal is None:
                raise IntegrityError(
                    "published before manifests were sealed: a copy could not be checked on load"
                )
        except IntegrityError as e:
            if version not in result.skipped:
                log.warning("MLflow mirror: skipped %s: %s", version, e)
            result.skipped[version] = str(e)
            return None
        key = (version, seal)
        if key not in have:
            mv = upload(
                self.client,
                self.model,
                registry,
                manifest,
                (data, seal),
                run_name or f"mirror {version}",
            )
            have[key] = self._first_copy(_mirrored(mv))
            if have[key].number == mv.version:
                result.registered[version] = mv.version
        return have[key]

    def _first_copy(self, ours: Mirrored) -> Mirrored:
        """The copy every sync agrees on when two registered one version at once: the older
        registration; ours is deleted when it is the later one."""
        first = self.mirrored()[(ours.version, ours.manifest_sha256)]
        if first.number != ours.number:
            log.info(
                "MLflow: %s was registered meanwhile as %s version %s; deleting our duplicate "
                "version %s",
                ours.version, self.model, first.number, ours.number,
            )  # fmt: skip
            self.client.delete_model_version(self.model, ours.number)
        return first

    def _follow_production(
        self, registry: Registry, have: dict, result: SyncResult, run_name
    ) -> None:
        """Point MLflow's production at distilq's production as it is when the alias is set:
        read again after setting it, until it held still."""
        for _ in range(ALIAS_ROUNDS):
            production = registry.alias(PRODUCTION)
            if production is None:
                return
            copy = self._copy(registry, production, have, result, run_name)
            if copy is None:
                raise DistilqError(
                    f"production {production} cannot be mirrored ({result.skipped[production]}); "
                    f"{self.model}@{PRODUCTION} is left where it was"
                )
            moved = self._point_production(copy.number)
            if moved:
                first = result.alias_moved[0] if result.alias_moved else moved[0]
                result.alias_moved = (first, moved[1]) if first != moved[1] else None
            result.production = copy.number
            if registry.alias(PRODUCTION) == production:
                return
        raise DistilqError(
            f"distilq's production kept moving while MLflow followed it ({ALIAS_ROUNDS} times); "
            "run `distilq models sync-mlflow` again"
        )

    def _point_production(self, number: str) -> tuple[str | None, str] | None:
        """MLflow's `production` at `number`; (from, to) when it moved."""
        from mlflow.exceptions import MlflowException

        try:
            current = self.client.get_model_version_by_alias(self.model, PRODUCTION).version
        except MlflowException as e:
            if not _not_found(e):
                raise
            current = None
        if current == number:
            return None
        self.client.set_registered_model_alias(self.model, PRODUCTION, number)
        return current, number


def _mirrored(mv) -> Mirrored:
    return Mirrored(
        name=mv.name,
        number=mv.version,
        version=mv.tags[TAG_VERSION],
        registry=mv.tags.get("registry", ""),
        manifest_sha256=mv.tags.get("manifest_sha256", ""),
    )


def _not_found(error) -> bool:
    """Whether MLflow said "no such model, version or alias" (a missing alias is a 400
    INVALID_PARAMETER_VALUE; a missing model or version a 404)."""
    return error.get_http_status_code() in (400, 404)


@contextlib.contextmanager
def _translated(tracking_uri: str, what: str):
    """MLflow's errors as distilq's (see `mlflow_error`)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise mlflow_error(tracking_uri, e, what) from e


def mlflow_error(tracking_uri: str, error, what: str) -> DistilqError:
    """An MLflow error as a user should read it: HTTP 401 or 403 is a refusal (the
    credentials or their permissions), a 5xx, 408, 429 or a timeout is transient (a retry
    may pass: SourceUnavailable), anything else says what MLflow said."""
    status = error.get_http_status_code()
    said = f"{error.error_code}: {error.message}"
    if status in (401, 403):
        return InputError(
            f"MLflow at {tracking_uri} refused {what} (HTTP {status}, {said}); check the "
            "credentials distilq sends (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
            "or MLFLOW_TRACKING_TOKEN) and their permissions on the model"
        )
    if status >= 500 or status in (408, 429):
        return SourceUnavailable(
            f"MLflow at {tracking_uri} could not serve {what} ({said}); transient: worth a retry"
        )
    return DistilqError(f"MLflow at {tracking_uri}: {what}: {said}")


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
        line = f"MLflow mirror behind: {e}; run `distilq models sync-mlflow` once that is fixed"
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


def alias_line(registry: Registry, tracking_uri: str, model: str) -> str:
    """Whether MLflow's `production` is distilq's, in one line; never fails."""
    production = registry.alias(PRODUCTION)
    try:
        found = MlflowMirror(tracking_uri, model).resolve(PRODUCTION)
        agrees = production is not None and found.version == production
        if agrees:
            _, seal = registry.sealed(production)
            agrees = seal == found.manifest_sha256
    except Exception as e:  # noqa: BLE001  a report line, whatever went wrong
        return f"MLflow mirror ({model} at {tracking_uri}) could not be checked: {e}"
    where = f"{model}@{PRODUCTION} (MLflow version {found.number}) is {found.version}"
    if agrees:
        return f"MLflow: {where}, as distilq's production."
    return (
        f"MLflow mirror behind: {where}, distilq's production is {production or 'unset'}; "
        "run `distilq models sync-mlflow`"
    )
