"""The Prefect runner of `distilq.pipelines`: each step a task, shards over a task runner."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from distilq import report
from distilq.config import ScoreConfig
from distilq.errors import SourceUnavailable
from distilq.manifest import ScoreSummary, VersionManifest
from distilq.pipelines import Runner
from distilq.runtime import configure_logging

PROMOTED_EVENT = "distilq.model.promoted"
RETRY_DELAYS = [2, 10, 30]


def _retry_unreachable(task, task_run, state) -> bool:
    """Retry only what may pass on a second try: an unreachable source or store."""
    try:
        state.result()
    except (SourceUnavailable, OSError):
        return True
    except Exception:
        return False
    return False


def log_to_run() -> None:
    """Send distilq's log lines to the Prefect run's logs, as PREFECT_LOGGING_EXTRA_LOGGERS
    does when the CLI set it; a flow run (or a worker's task) owns its process's logging."""
    configure_logging()
    logger = logging.getLogger("distilq")
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)


@functools.cache
def as_task(fn: Callable, retries: int = 0):
    """`fn` as a Prefect task named after it. Models and tensors flow between steps in
    memory: no input hashing, no caching."""

    @functools.wraps(fn)
    def step(*args, **kwargs):
        log_to_run()  # in worker processes too
        return fn(*args, **kwargs)

    return task(
        step,
        name=fn.__name__,
        retries=retries,
        retry_delay_seconds=RETRY_DELAYS[:retries] or 0,
        retry_condition_fn=_retry_unreachable if retries else None,
        cache_policy=NO_CACHE,
    )


def task_runner_for(config: ScoreConfig) -> TaskRunner:
    """The Prefect task runner for `config.runner`."""
    if config.runner == "process":
        return ProcessPoolTaskRunner(max_workers=config.workers)
    if config.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": config.workers,
                "threads_per_worker": 1,
                "processes": True,
            },
        )
    return ThreadPoolTaskRunner(max_workers=1)


class PrefectRunner(Runner):
    """Runs pipeline steps as Prefect tasks of the current flow run."""

    def __init__(self, shard_runner: TaskRunner | None = None):
        self.shard_runner = shard_runner
        log_to_run()

    def step(self, fn: Callable, *args: Any, retries: int = 0):
        return as_task(fn, retries)(*args)

    def map_shards(self, fn, shards: Sequence, args: tuple, on_done) -> None:
        shard_task = as_task(fn)
        names = list(inspect.signature(fn).parameters)
        with self.shard_runner or ThreadPoolTaskRunner(max_workers=1) as runner:
            futures = {
                runner.submit(shard_task, dict(zip(names, (shard, *args), strict=True))): shard
                for shard in shards
            }
            for future in as_completed(list(futures)):
                try:
                    result = future.result()
                except Exception as e:  # noqa: BLE001  one bad file must not stop the others
                    result = e
                on_done(futures[future], result)

    def staged(self, manifest: VersionManifest) -> None:
        """The report and the metrics table, as Prefect artifacts."""
        create_markdown_artifact(
            key="quantize-report",
            markdown=report.render_report(manifest),
            description=f"distilq candidate {manifest.version}",
        )
        rows = report.metrics_table(manifest)
        create_table_artifact(
            key="quantize-metrics",
            table=[dict(zip(["metric", *rows[0][1:]], r, strict=True)) for r in rows[1:]],
            description=f"FP32 vs INT8 for {manifest.version}",
        )

    def promoted(self, version: str, registry: str, entry: dict) -> None:
        emit_promoted(version, registry, entry)

    def scored(self, summary: ScoreSummary, config: ScoreConfig) -> None:
        create_table_artifact(
            key="score-summary",
            table=[{"metric": k, "value": str(v)} for k, v in summary.model_dump().items()],
            description=f"scoring {', '.join(config.inputs)} with {summary.model_version}",
        )


def emit_promoted(version: str, registry: str, entry: dict) -> None:
    """Tell Prefect that `production` moved, so deployment triggers can re-score datasets."""
    emit_event(
        event=PROMOTED_EVENT,
        resource={"prefect.resource.id": f"distilq.model.{version}", "registry": registry},
        payload={"version": version, "registry": registry, "previous": entry["from"]},
    )
