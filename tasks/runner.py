"""The Prefect runner of `distilq.pipelines`: each step a task, shards over a task runner."""

from __future__ import annotations

import base64
import contextlib
import functools
import inspect
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.states import Crashed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from distilq.config.score import ScoreConfig
from distilq.errors import DistilqError, worth_retrying
from distilq.manifest import AuditFigures, ScoreSummary, VersionManifest
from distilq.pipelines.runner import Outcome, Runner
from distilq.report import render as report
from distilq.runtime import configure_logging
from distilq.score.output import OutputManifest

PROMOTED_EVENT = "distilq.model.promoted"
AUDIT_FAILED_EVENT = "distilq.audit.failed"
AUDIT_FAILED_TAG = "audit-failed"
STARTED_DIR = "DISTILQ_STARTED_DIR"  # where shard tasks say they started
RETRY_DELAYS = [2, 10, 30]


def _retry_unreachable(task, task_run, state) -> bool:
    """Retry only what may pass on a second try (`distilq.errors.worth_retrying`)."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001  judged, not handled
        return worth_retrying(e)
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
        started = os.environ.get(STARTED_DIR)
        if started:  # see `map_shards`; a worker on another machine has no such directory
            with contextlib.suppress(OSError):
                (Path(started) / str(TaskRunContext.get().task_run.id)).touch()
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
    """Runs pipeline steps as Prefect tasks of the current flow run, and shows what the run
    did where a Prefect user looks: artifacts that lead with the outcome, a progress bar,
    and tags on the flow run (promoted, rejected, reused, resumed, the recipe)."""

    def __init__(self, shard_runner: TaskRunner | None = None):
        super().__init__()
        self.shard_runner = shard_runner
        self._progress: dict[str, Any] = {}  # artifact ids by key
        log_to_run()

    def step(self, fn: Callable, *args: Any, retries: int = 0):
        return as_task(fn, retries)(*args)

    def map_shards(self, fn, shards: Sequence, args: tuple, on_done) -> None:
        """Shards over the task runner. A worker process that dies (killed, out of memory)
        breaks a process pool: the shard it was scoring fails, and the shards the pool had
        not started yet run on a fresh pool. Which ones started, each task says by a file
        it touches first (pool workers share this machine's disk)."""
        shard_task = as_task(fn)
        names = list(inspect.signature(fn).parameters)
        runner = self.shard_runner or ThreadPoolTaskRunner(max_workers=1)
        pending = list(shards)
        with tempfile.TemporaryDirectory(prefix="distilq-started-") as started:
            os.environ[STARTED_DIR] = started  # read by the tasks, in workers too
            try:
                while pending:
                    round_args = (shard_task, names, pending, args, Path(started), on_done)
                    not_started = self._run_round(runner, *round_args)
                    if len(not_started) == len(pending):  # nothing ran: a new pool won't help
                        for shard in not_started:
                            on_done(shard, WorkerDied("not attempted: the worker pool broke"))
                        return
                    if not_started:
                        logging.getLogger("distilq").warning(
                            "a worker process died: %d shard(s) not started yet run on a fresh "
                            "pool",
                            len(not_started),
                        )
                    pending, runner = not_started, runner.duplicate()
            finally:
                del os.environ[STARTED_DIR]

    @staticmethod
    def _run_round(runner, shard_task, names, shards, args, started: Path, on_done) -> list:
        """Every shard on `runner`; return those it never started because its pool broke."""
        not_started = []
        with runner:
            futures = {
                runner.submit(
                    shard_task.with_options(task_run_name=f"score {shard.output}"),
                    dict(zip(names, (shard, *args), strict=True)),
                ): shard
                for shard in shards
            }
            for future in as_completed(list(futures)):
                shard = futures[future]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    if not (started / str(future.task_run_id)).exists():
                        not_started.append(shard)
                        continue
                    result = WorkerDied(
                        "its worker process died while scoring it (killed, or out of memory); "
                        "the other files went on, and a re-run scores this one"
                    )
                    _mark_crashed(future.task_run_id, str(result))
                except Exception as e:  # noqa: BLE001  one bad file must not stop the others
                    result = e
                on_done(shard, result)
        return not_started

    def decided(self, manifest: VersionManifest, outcome: Outcome) -> None:
        """The report, outcome first, and the metrics table as artifacts; outcome tags."""
        add_tags(outcome.tags)
        said = f"{outcome.headline}. Gate: {'; '.join(outcome.reasons)}"
        reused = "reused" in outcome.tags  # nothing was measured: no report, no metrics
        if reused:
            reasons = "\n".join(f"- {reason}" for reason in outcome.reasons)
            where = f"`versions/{manifest.version}/report.md` in the registry"
            body = f"Gate:\n\n{reasons}\n\nNothing was quantized: the version's report is {where}."
        else:
            # The UI cannot reach the registry's report.png: the chart goes in the artifact.
            chart = None
            if outcome.chart_png:
                encoded = base64.b64encode(outcome.chart_png).decode("ascii")
                chart = f"data:image/png;base64,{encoded}"
            body = report.render_report(manifest, chart)
        mirror = f"{outcome.mirror}.\n\n" if outcome.mirror else ""
        markdown = f"**{outcome.headline}.**\n\n{mirror}{body}"
        create_markdown_artifact(key="quantize-report", markdown=markdown, description=said)
        if reused:
            return
        rows = report.metrics_table(manifest)
        create_table_artifact(
            key="quantize-metrics",
            table=[dict(zip(["metric", *rows[0][1:]], r, strict=True)) for r in rows[1:]],
            description=f"FP32 vs INT8 for {manifest.version}",
        )

    def promoted(self, version: str, registry: str, entry: dict) -> None:
        emit_promoted(version, registry, entry)

    def progress(self, key: str, done: int, total: int, note: str) -> None:
        """A progress artifact per `key`, made at the first call and moved at each next."""
        percent = 100.0 * done / total if total else 100.0
        if key not in self._progress:
            self._progress[key] = create_progress_artifact(percent, key=key, description=note)
        else:
            update_progress_artifact(self._progress[key], percent, description=note)

    def scored(self, summary: ScoreSummary, manifest: OutputManifest) -> None:
        """The summary in words and as a table, and a table per output file; `resumed` if
        shards were already done."""
        if summary.files_skipped:
            add_tags(["resumed"])
        rows = [["what", "figure"], *map(list, report.score_summary_table(summary))]
        failed = [f"- `{uri}`: {why}" for uri, why in summary.failed.items()]
        markdown = "\n".join(
            [report.markdown_table(rows), *(["", "**Failed:**", "", *failed] if failed else [])]
        )
        create_markdown_artifact(
            key="score-summary",
            markdown=markdown,
            description=report.score_summary_line(summary),
        )
        create_table_artifact(
            key="score-files",
            table=report.score_files_table(manifest.record),
            description=f"{summary.files} file(s) in {summary.output}",
        )

    def run_id(self) -> str:
        """The flow run's id after the time it started: one audit record per flow run."""
        from prefect.runtime import flow_run

        started = super().run_id()
        return f"{started.split('-')[0]}-{flow_run.id}" if flow_run.id else started

    def run_name(self) -> str | None:
        from prefect.runtime import flow_run

        return flow_run.name

    def audit_failed(self, summary: ScoreSummary, config) -> None:
        """Tag the flow run `audit-failed` and emit `distilq.audit.failed`, for automations."""
        add_tags([AUDIT_FAILED_TAG])
        emit_audit_failed(summary, config)


class WorkerDied(DistilqError):
    """A shard's worker process died under it (or the pool broke before it started)."""


def _mark_crashed(task_run_id, message: str) -> None:
    """A task run whose process died stays Running in the API: say it crashed."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception as e:  # noqa: BLE001  the UI's record only: the run goes on
        logging.getLogger("distilq").warning(
            "could not mark task run %s crashed: %s", task_run_id, e
        )


def add_tags(tags: list[str]) -> None:
    """Add `tags` to the current flow run (they filter the runs list in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id).tags
        client.update_flow_run(flow_run.id, tags=sorted(set(current) | set(tags)))


def emit_promoted(version: str, registry: str, entry: dict) -> None:
    """Tell Prefect that `production` moved, so deployment triggers can re-score datasets."""
    emit_event(
        event=PROMOTED_EVENT,
        resource={"prefect.resource.id": f"distilq.model.{version}", "registry": registry},
        payload={"version": version, "registry": registry, "previous": entry["from"]},
    )


def emit_audit_failed(summary: ScoreSummary, config) -> None:
    """Tell Prefect that a scoring run's FP32 audit failed: the version, the output, the
    figures, and the inputs (an automation may re-gate on them)."""
    audit = summary.audit
    emit_event(
        event=AUDIT_FAILED_EVENT,
        resource={
            "prefect.resource.id": f"distilq.model.{summary.model_version}",
            "registry": config.registry,
        },
        payload={
            "version": summary.model_version,
            "registry": config.registry,
            "output": summary.output,
            "inputs": config.inputs,
            "text_column": config.text_column,
            **audit.model_dump(include=set(AuditFigures.model_fields)),
        },
    )
