"""deployments/prefect.yaml on a real `prefect server start` with a process work pool and a
`prefect worker start` process, all on loopback: deploy as the README says, quantize, let the
promotion event trigger a re-score, then check the registry and the scored files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilq.registry.registry import Registry
from tests.conftest import (
    ROOT,
    VENV_BIN,
    make_checkpoint,
    make_texts,
    running,
    stage_tiny_version,
    wait_until,
)

pytestmark = pytest.mark.slow

PREFECT = str(VENV_BIN / "prefect")


def prefect_cli(args: list[str], env: dict, cwd: Path = ROOT) -> str:
    """Run the `prefect` CLI; fail with its output if it fails."""
    done = subprocess.run(
        [PREFECT, *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def api(env: dict):
    """Point this process's Prefect client at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]})


def call(fn):
    """Run `fn(client)` with an async Prefect client and return its result."""
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


def score_runs() -> list:
    """Flow runs of the score_parquet deployment (not the score_shards subflows)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read(client):
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["score_parquet"]))
        )
        return [r for r in runs if r.deployment_id is not None]

    return call(read)


def wait_for_rescore(version: str, count: int = 1, timeout: float = 300) -> None:
    """Wait until `count` re-scores with `version` (one per promotion of it) completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in score_runs() if r.parameters["config"]["model"] == version]
        for run in runs:
            assert not run.state.is_final() or run.state.is_completed(), run.state
        if sum(r.state.is_completed() for r in runs) >= count:
            return
        time.sleep(2)
    raise AssertionError(f"no {count} completed re-score(s) of {version} after {timeout:.0f} s")


def run_logs(flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read(client):
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        return "\n".join(log.message for log in logs)

    return call(read)


def run(deployment: str, parameters: dict | None = None):
    """Run a deployment and wait for the flow run to end."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters=parameters, timeout=600, poll_interval=1)


def check_scored(directory: Path, version: str, dataset: dict[str, list]) -> dict[str, pa.Table]:
    """Every input file scored by `version`, rows in order."""
    tables = {p.name: pq.read_table(p) for p in sorted(directory.glob("[!_]*.parquet"))}
    assert sorted(tables) == sorted(dataset)
    for name, table in tables.items():
        assert table.column("id").to_pylist() == dataset[name]
        assert set(table.column("model_version").to_pylist()) == {version}
        assert table.column("label").null_count == 0
    return tables


def test_deploy_quantize_trigger_rescore_on_a_server_and_worker(
    prefect_server, tmp_path, tiny_validation
):
    env = prefect_server
    work = tmp_path / "work"  # the worker's DISTILQ_WORKDIR: relative paths resolve here
    (work / "data" / "to-score").mkdir(parents=True)
    dataset = {}
    for i in range(2):
        ids = list(range(i * 100, i * 100 + 60))
        table = pa.table({"id": ids, "text": make_texts(60, seed=40 + i)})
        pq.write_table(table, work / "data" / "to-score" / f"part-{i}.parquet")
        dataset[f"part-{i}.parquet"] = ids
    checkpoint = make_checkpoint(tmp_path / "checkpoint", seed=0)

    prefect_cli(["work-pool", "create", "distilq", "--type", "process"], env)
    prefect_cli(
        ["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env
    )
    quantize = {
        "config": {
            "source": str(checkpoint),
            "validation": str(tiny_validation),
            "recipe": "dynamic-int8-token",
            "min_agreement": 0.9,
            "max_accuracy_drop": 1.0,
            "registry": "./registry",
        }
    }
    # Poll for runs every second (default 10 s): the test waits for six of them.
    worker_env = {**env, "DISTILQ_WORKDIR": str(work), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    worker_cmd = [PREFECT, "worker", "start", "--pool", "distilq", "--limit", "2"]
    with running(worker_cmd, tmp_path / "worker.log", worker_env, cwd=tmp_path) as worker, api(env):
        weekly = call(lambda c: c.read_deployment_by_name("quantize_and_promote/weekly"))
        assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"]
        automations = call(lambda c: c.read_automations())
        expected = [{"distilq.audit.failed"}, {"distilq.model.promoted"}]
        assert sorted([a.trigger.expect for a in automations], key=sorted) == expected

        # A new checkpoint: quantized, validated, promoted; the event re-scores the dataset.
        first = run("quantize_and_promote/weekly", quantize)
        assert first.state.is_completed(), (first.state, (tmp_path / "worker.log").read_text())
        registry = Registry(work / "registry")
        v1 = registry.alias()
        assert registry.versions() == [v1]
        wait_for_rescore(v1)
        check_scored(work / "scored" / v1, v1, dataset)

        # Same revision, recipe and validation set: no work, and the run says so.
        again = run("quantize_and_promote/weekly", quantize)
        assert again.state.is_completed()
        assert registry.versions() == [v1]
        said = f"unchanged inputs: {v1} already holds this result"  # logs ship in batches
        wait_until(lambda: said in run_logs(again.id), 60, "the log line saying so")

        # The upstream checkpoint moves: a new version, promoted, re-scored into its own dir.
        make_checkpoint(checkpoint, seed=5)
        moved = run("quantize_and_promote/weekly", quantize)
        assert moved.state.is_completed()
        v2 = registry.alias()
        assert registry.versions() == [v1, v2]
        wait_for_rescore(v2)
        by_trigger = check_scored(work / "scored" / v2, v2, dataset)

        # The rescore deployment run by hand, with its default parameters (production).
        direct = run("score_parquet/rescore")
        assert direct.state.is_completed()
        assert check_scored(work / "scored" / "production", v2, dataset) == by_trigger

        # A promotion by hand announces itself too, and re-scores (here: resumes, as
        # scored/<v1> is complete).
        promote = [str(VENV_BIN / "distilq"), "models", "promote", v1, "--registry", "registry"]
        done = subprocess.run(
            promote, env={**os.environ, **env}, cwd=work, capture_output=True, text=True
        )
        assert done.returncode == 0 and "sent distilq.model.promoted" in done.stderr, done.stderr
        wait_for_rescore(v1, count=2)
        check_scored(work / "scored" / v1, v1, dataset)
        assert len(score_runs()) == 4  # one per promotion, and the one by hand

        # A failed audit, as distilq announces it, starts the regate deployment on the data
        # whose audit failed (the run itself needs the hub's checkpoint: not run here).
        emit = (
            "import sys; from distilq.config.score import ScoreConfig; "
            "from distilq.manifest import read_output_manifest; "
            "from tasks.runner import emit_audit_failed; import json; "
            "m = read_output_manifest(json.load(open(sys.argv[1])), sys.argv[1]); "
            "emit_audit_failed(m.summary, ScoreConfig(inputs=['./data/to-score', 'more/*.pq'], "
            "output=m.summary.output, registry='./registry'))"
        )
        manifest = work / "scored" / v1 / "_manifest.json"
        done = subprocess.run(
            [str(VENV_BIN / "python"), "-c", emit, str(manifest)],
            env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        regate = call(lambda c: c.read_deployment_by_name("quantize_and_promote/regate"))

        def regate_runs() -> list:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

            ids = DeploymentFilter(id=DeploymentFilterId(any_=[regate.id]))
            return call(lambda c: c.read_flow_runs(deployment_filter=ids))

        wait_until(lambda: bool(regate_runs()), 120, "the regate run")
        config = regate_runs()[0].parameters["config"]
        assert config["validation"] == ["./data/to-score", "more/*.pq"]  # every scored input
        assert config["registry"] == "./registry"
        assert config["text_column"] == "text" and config["no_accuracy_check"] is True
        assert worker.poll() is None


def test_serve_runs_the_same_deployments_without_a_work_pool(
    prefect_server, tmp_path, tiny_checkpoint, tiny_validation
):
    env = prefect_server
    work = tmp_path / "work"
    (work / "data" / "to-score").mkdir(parents=True)
    ids = list(range(40))
    pq.write_table(
        pa.table({"id": ids, "text": make_texts(40, seed=9)}),
        work / "data" / "to-score" / "part-0.parquet",
    )
    (tmp_path / "staging").mkdir()
    registry = Registry(work / "registry")
    staged = stage_tiny_version(tmp_path / "staging", tiny_checkpoint, tiny_validation)
    version = registry.publish(tmp_path / "staging", staged)
    registry.promote(version, "test")

    serve_cmd = [str(VENV_BIN / "python"), str(ROOT / "deployments" / "serve.py")]
    serve_env = {**env, "DISTILQ_WORKDIR": str(work), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with api(env):  # start from no deployments (an earlier test deployed the same names)
        for deployment in call(lambda c: c.read_deployments()):
            call(lambda c, d=deployment: c.delete_deployment(d.id))
    with running(serve_cmd, tmp_path / "serve.log", serve_env, cwd=tmp_path) as served, api(env):

        def served_deployments() -> bool:
            deployments = call(lambda c: c.read_deployments())
            return sum(d.work_pool_name is None for d in deployments) == 3

        wait_until(served_deployments, 120, "serve.py", served, tmp_path / "serve.log")
        weekly = call(lambda c: c.read_deployment_by_name("quantize_and_promote/weekly"))
        assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"]
        scored = run("score_parquet/rescore")
        assert scored.state.is_completed(), (scored.state, (tmp_path / "serve.log").read_text())
        check_scored(work / "scored" / "production", version, {"part-0.parquet": ids})
