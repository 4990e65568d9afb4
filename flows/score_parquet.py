"""Flow: score Parquet datasets with a registry model, in parallel, resumably."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from distilq.config.score import ScoreConfig
from distilq.manifest import ScoreSummary
from distilq.pipelines import score as pipeline
from tasks.runner import PrefectRunner, task_runner_for


def run_name() -> str:
    """`score <inputs> -> <output>`: what ran, in the runs list."""
    config = ScoreConfig.model_validate(flow_run.parameters["config"])
    return f"score {', '.join(config.inputs)} -> {config.output}"


# persist_result=False: nothing reads a stored copy of the run's result.
@flow(name="score_parquet", flow_run_name=run_name, persist_result=False)
def score_parquet(config: ScoreConfig) -> ScoreSummary:
    """Score Parquet files with the registry's model into `config.output`; files already
    scored by the same model from the same inputs are skipped; a sample of the rows is
    audited against FP32. Fails, listing them, if any input file could not be scored, and
    (tagged `audit-failed`, the files kept) if the audit's lower bound is below its bar."""
    return pipeline.score_dataset(config, PrefectRunner(task_runner_for(config)))
