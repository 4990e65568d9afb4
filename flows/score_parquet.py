"""Flow: score Parquet datasets with a registry model, in parallel, resumably."""

from __future__ import annotations

import sys
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel
from tqdm.auto import tqdm

from distilq import scoring
from distilq.config import ScoreConfig
from distilq.errors import DistilqError
from tasks import score as t


class ScoringFailed(DistilqError):
    """Some input files could not be scored; the others were."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class ScoreResult(BaseModel):
    """Totals of a scoring run (over the whole output, resumed shards included)."""

    summary: dict


def task_runner(config: ScoreConfig):
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


@flow(name="score_shards")
def score_shards(
    config: ScoreConfig, shards: list[scoring.Shard], version: str, options: scoring.ScoreOptions
) -> None:
    """Map shards over the task runner; record each in the output manifest as it completes."""
    manifest = scoring.OutputManifest(config.output)
    manifest.load()
    bar = tqdm(total=sum(s.rows for s in shards), unit="rows", file=sys.stderr, desc="scoring")
    futures = {t.score_shard.submit(s, config, version, options): s for s in shards}
    for future in as_completed(list(futures)):
        shard = futures[future]
        try:
            scoring.record_shard(manifest, shard, future.result())
        except Exception as e:  # one bad file must not stop the others
            get_run_logger().error("%s failed: %s", shard.name, e)
            scoring.record_failure(manifest, shard.name, str(e))
        bar.update(shard.rows)
    bar.close()


@flow(name="score_parquet")
def score_parquet(config: ScoreConfig) -> ScoreResult:
    """Score Parquet files with the registry's model into `config.output`; files already
    scored by the same model from the same inputs are skipped. Fails, listing them, if any
    input file could not be scored."""
    start = time.perf_counter()
    version, options = t.resolve_model(config)
    found = t.plan(config, options)
    with scoring.output_lock(config.output):
        todo = t.prepare(config, found, version, options)
        manifest = scoring.OutputManifest(config.output)
        manifest.load()
        for uri, error in found.unreadable.items():
            scoring.record_failure(manifest, uri, error)
        if todo:
            score_shards.with_options(task_runner=task_runner(config))(
                config, todo, version, options
            )
        manifest.load()
        summary = scoring.finalize(manifest, time.perf_counter() - start)
    create_table_artifact(
        key="score-summary",
        table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
        description=f"scoring {', '.join(config.inputs)} with {version}",
    )
    if summary["failed"]:
        raise ScoringFailed(
            f"{len(summary['failed'])} input file(s) failed: "
            + "; ".join(f"{uri}: {why}" for uri, why in summary["failed"].items()),
            summary,
        )
    return ScoreResult(summary=summary)
