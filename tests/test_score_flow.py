"""score_parquet end to end: CLI, runners, resume after SIGKILL, failures."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilq.config.score import ScoreConfig
from distilq.errors import ScoringFailed
from flows.score_parquet import score_parquet
from tests.conftest import DISTILQ, VENV_BIN, as_shown, cli_env, free_port, make_texts, run, running

pytestmark = pytest.mark.slow


@pytest.fixture
def registry(promoted_registry) -> Path:
    return promoted_registry


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    for i in range(4):
        texts = make_texts(120, seed=100 + i)
        texts[3] = None
        pq.write_table(
            pa.table({"review_id": [f"{i}-{j}" for j in range(120)], "text": texts}),
            root / f"f{i}.parquet",
        )
    return root


def score_args(source: Path, output: Path, registry: Path) -> list[str]:
    """Arguments of a `distilq score` run."""
    return ["score", "--input", str(source), "--output", str(output), "--registry", str(registry)]


def outputs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.parquet"))}


@pytest.fixture(scope="module")
def dask_scheduler(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes (1 thread each) on loopback."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    dask = str(VENV_BIN / "dask")
    host, port = address.removeprefix("tcp://").split(":")
    loopback = ["--host", host, "--dashboard-address", f"{host}:0"]
    scheduler_cmd = [dask, "scheduler", "--port", port, *loopback]
    worker_cmd = [dask, "worker", address, "--nthreads", "1", *loopback]
    with (
        running(scheduler_cmd, logs / "scheduler.log"),
        running(worker_cmd, logs / "worker-1.log"),
        running(worker_cmd, logs / "worker-2.log"),
    ):
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address


@pytest.mark.usefixtures("prefect_harness")
def test_runners_agree_file_for_file(registry, dataset, dask_scheduler, tmp_path):
    results, audits = {}, {}
    runners = {
        "local": {"runner": "local"},
        "process": {"runner": "process", "workers": 2},
        "dask-local-cluster": {"runner": "dask", "workers": 2},
        # A running scheduler's workers are its own: --threads is each one's torch threads.
        "dask-scheduler": {"runner": "dask", "dask_address": dask_scheduler, "threads": 1},
    }
    for name, runner in runners.items():
        config = ScoreConfig(
            inputs=[str(dataset)],
            output=str(tmp_path / name),
            registry=str(registry),
            probabilities=True,
            audit_rate=0.1,
            **{"threads": 2, **runner},
        )
        summary = score_parquet(config).model_dump()
        assert (
            summary["files"] == 4 and summary["rows_written"] == 480 and summary["rows_error"] == 4
        )
        assert summary["audit"]["rows"] > 20
        results[name] = {k: v for k, v in outputs(tmp_path / name).items() if k[0] != "_"}
        audits[name] = pq.read_table(tmp_path / name / "_audit.parquet").to_pydict()
    assert len(results["local"]) == 4
    for name in runners:
        assert results[name] == results["local"], name  # the same scores
        # The same rows audited, with the same labels; FP32's floats may differ in the last
        # bits with the threads a worker has.
        for column in ("file", "index", "fp32_label", "int8_label", "int8_score"):
            assert audits[name][column] == audits["local"][column], (name, column)
        assert audits[name]["fp32_score"] == pytest.approx(audits["local"]["fp32_score"])


@pytest.mark.usefixtures("prefect_harness")
def test_corrupt_file_fails_alone(registry, dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in dataset.glob("*.parquet"):
        (data / p.name).write_bytes(p.read_bytes())
    (data / "zz-broken.parquet").write_bytes(b"PAR1" + b"\x00" * 100 + b"PAR1")
    config = ScoreConfig(inputs=[str(data)], output=str(tmp_path / "out"), registry=str(registry))
    with pytest.raises(
        ScoringFailed, match="1 input file\\(s\\) failed: .*zz-broken.parquet"
    ) as failed:
        score_parquet(config)
    assert failed.value.summary.files == 4
    assert sorted(outputs(tmp_path / "out")) == [
        "_audit.parquet",
        "f0.parquet",
        "f1.parquet",
        "f2.parquet",
        "f3.parquet",
    ]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert list(manifest["failed"]) == [str(data / "zz-broken.parquet")]


def test_cli_scores_then_resumes_byte_identical(registry, dataset, tmp_path):
    args = score_args(dataset, tmp_path / "out", registry)
    first = run(*args, "--json", "--id-column", "review_id")
    assert first.returncode == 0, first.stderr[-3000:]
    # distilq starts the temporary API early, beside the imports; Prefect starts no other.
    assert first.stderr.count("temporary Prefect API on") == 1
    assert "Starting temporary server" not in first.stderr
    summary = json.loads(first.stdout)
    assert summary["rows_written"] == 480
    # The summary says what the files hold.
    scored = pa.concat_tables(
        pq.read_table(p) for p in sorted((tmp_path / "out").glob("f*.parquet"))
    ).to_pydict()
    scores = [s for s in scored["score"] if s is not None]  # rows with an error have none
    assert summary["rows_error"] == 480 - len(scores) > 0
    labels = collections.Counter(label for label in scored["label"] if label is not None)
    assert summary["labels"] == dict(labels)
    assert summary["mean_score"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)
    before = outputs(tmp_path / "out")
    assert pq.read_table(tmp_path / "out" / "f0.parquet").column_names == [
        "review_id",
        "label",
        "score",
        "model_version",
        "error",
    ]
    again = run(*args, "--json", "--id-column", "review_id")
    assert again.returncode == 0 and outputs(tmp_path / "out") == before
    changed = run(*args, "--max-length", "32")
    assert changed.returncode == 2 and "other settings" in changed.stderr


def test_cli_bad_input_exits_2(registry, dataset, tmp_path):
    base = score_args(dataset, tmp_path / "out", registry)
    done = run(*base, "--text-column", "body")
    assert done.returncode == 2 and "no text column 'body'" in done.stderr
    assert "temporary Prefect API" not in done.stderr  # refused before any flow run
    done = run(*base, "--model", "19990101T000000000Z-deadbeef")
    assert done.returncode == 2 and "no version or alias" in done.stderr
    done = run(*base, "--workers", "2")
    assert done.returncode == 2 and "use --runner process or dask" in done.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_sigkill_half_way_then_resume_equals_an_uninterrupted_run(registry, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        pq.write_table(
            pa.table({"id": list(range(400)), "text": make_texts(400, seed=i)}),
            data / f"p{i}.parquet",
        )
    base = ["score", "--input", str(data), "--registry", str(registry)]
    clean_out = tmp_path / "clean"
    clean = run(*base, "--output", str(clean_out))
    assert clean.returncode == 0, clean.stderr[-3000:]

    env = cli_env()
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [DISTILQ, *base, "--output", str(out)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def mid_write() -> bool:
        """Shards finish one after another here: 3 to 5 done and the next one's hidden
        temporary file open, so at least 2 are left whenever the kill lands."""
        done, writing = list(out.glob("p*.parquet")), list(out.glob(".*.tmp"))
        return 3 <= len(done) <= 5 and bool(writing)

    deadline = time.monotonic() + 300
    while not mid_write():
        assert proc.poll() is None and time.monotonic() < deadline, "never caught mid-write"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = sorted(p.name for p in out.glob("p*.parquet"))
    assert 3 <= len(done_at_kill) <= 6  # killed mid-run, the last write cut off
    for p in out.glob("p*.parquet"):  # whatever is visible is complete
        assert pq.read_table(p).num_rows == 400

    resumed = run(*base, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The same scores, and the same rows audited: those of the shards done before the kill
    # pooled with those the resume scored.
    assert outputs(out) == outputs(tmp_path / "clean")
    assert pq.read_table(out / "_audit.parquet").num_rows > 10
    audits = [json.loads((d / "_manifest.json").read_text())["audit"] for d in (out, clean_out)]
    for audit in audits:
        audit.pop("seconds")  # the time it took
    assert audits[0] == audits[1]
    assert sorted(p.name for p in out.iterdir()) == ["_audit.parquet", "_manifest.json"] + [
        f"p{i}.parquet" for i in range(8)
    ]


@pytest.mark.usefixtures("prefect_harness")
def test_the_ui_shows_what_ran_progress_and_a_resume(registry, dataset, tmp_path):

    out = tmp_path / "out"
    config = ScoreConfig(inputs=[str(dataset)], output=str(out), registry=str(registry))
    state = score_parquet(config, return_state=True)
    summary = state.result()
    run, artifacts = as_shown(state)
    assert run.name == f"score {dataset} -> {out}" and run.tags == []
    assert artifacts["score-progress"].data == 100.0
    line = artifacts["score-summary"].description
    assert line.startswith("scored 480 rows in 4 file(s) in ")
    assert "skipped" not in line and f"mean score {summary.mean_score:.4f};" in line
    labels = [f"| label {k} | {v:,} |" for k, v in sorted(summary.labels.items())]
    assert all(row in artifacts["score-summary"].data for row in labels)
    files = json.loads(artifacts["score-files"].data)
    assert [f["file"] for f in files] == [f"f{i}.parquet" for i in range(4)]
    assert sum(f["rows"] for f in files) == 480

    (out / "f2.parquet").unlink()  # lost: the resume scores it again, and only it
    state = score_parquet(config, return_state=True)
    again = state.result()
    assert (again.files_scored, again.rows_scored) == (1, 120)
    assert (again.files_skipped, again.rows_skipped) == (3, 360)
    run, artifacts = as_shown(state)
    assert run.tags == ["resumed"]
    assert (
        artifacts["score-summary"].description.startswith("scored 120 rows in 1 file(s) in ")
        and "skipped 3 file(s) already done (360 rows)" in artifacts["score-summary"].description
    )
