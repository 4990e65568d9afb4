"""Shared fixtures: tiny random DistilBERT checkpoints built in the test session itself."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

WORDS = (
    "good bad great awful movie film plot actor acting story boring fun funny sad dull "
    "brilliant terrible love hate best worst wonderful poor slow fast long short music "
    "scene ending script cast director hero villain charming mess moving flat fresh stale "
    "smart silly bright dark warm cold rich thin deep shallow the a an and but is was it "
    "this that not very too so of to in"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "distilbert-sst2-minilm"
SENSITIVE_LAYER = "distilbert.transformer.layer.1.ffn.lin2"
DISTILQ = str(Path(sys.executable).parent / "distilq")


# MLflow sends usage reports by default; tests send nothing off this machine.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

# The Prefect home of the session's `distilq` processes: its database is made by the first
# one (a fresh database costs a run about 7 s of migrations here). A test that needs an
# empty home passes its own.
SESSION_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="distilq-tests-prefect-"))


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(SESSION_PREFECT_HOME, ignore_errors=True)


def cli_env(prefect_home: Path | None = None) -> dict[str, str]:
    """This environment without the test session's Prefect settings, so a `distilq` process
    starts its own temporary API, under `prefect_home` (default: the session's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(prefect_home or SESSION_PREFECT_HOME)
    return env


def run(
    *args: str, prefect_home: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`distilq ARGS` as a user runs it, on its own temporary Prefect API."""
    env = cli_env(prefect_home)
    return subprocess.run(
        [DISTILQ, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def quantize(source: Path, validation: Path, registry: Path, *extra: str) -> list[str]:
    """Arguments of a `distilq quantize` run."""
    return [
        "quantize",
        "--source",
        str(source),
        "--validation",
        str(validation),
        "--registry",
        str(registry),
        *extra,
    ]


def write_parquet(path, texts, row_group_size=None, **extra) -> str:
    """A Parquet file of `id` and `text` columns (and `extra` ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(texts))), "text": texts, **extra})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Short random sentences over the tiny vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def make_checkpoint(
    path: Path,
    seed: int = 0,
    sensitive: bool = False,
    labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE"),
    dim: int = 32,
) -> Path:
    """Save a tiny random DistilBERT sequence classifier with a WordPiece tokenizer, its
    classes named `labels`.

    `sensitive=True` plants an outlier in one Linear layer (SENSITIVE_LAYER): a huge weight
    on an input that is always ~0, so FP32 is unaffected but per-channel INT8 rounds the
    rest of each row to zero. `dim` (hidden size; the FFN is twice as wide) at 384, the
    shared model's, takes torch's float GEMM onto the paths whose sums depend on the rows.
    """
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizer,
    )

    path.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores `vocab_file` here (every word became [UNK]): pass the vocabulary.
    tokenizer = DistilBertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)})
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        dim=dim,
        n_layers=2,
        n_heads=2,
        hidden_dim=2 * dim,
        max_position_embeddings=64,
        initializer_range=0.2 * (32 / dim) ** 0.5,  # the same spread of activations at any width
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = DistilBertForSequenceClassification(config).eval()
    with torch.no_grad():
        if sensitive:
            lin1 = model.distilbert.transformer.layer[1].ffn.lin1
            lin2 = model.get_submodule(SENSITIVE_LAYER)
            lin1.weight[0].zero_()
            lin1.bias[0] = -20.0  # GELU(-20) == 0: input 0 of lin2 is always zero
            lin2.weight.mul_(6)
            lin2.weight[:, 0] = 400.0
        # A random encoder barely separates inputs: widen the head and centre it on the
        # median logit gap, so predictions split about evenly and have spread.
        model.classifier.weight.mul_(20)
        enc = tokenizer(make_texts(300, seed=123), padding=True, return_tensors="pt")
        logits = model(**enc).logits
        last = len(labels) - 1  # centre the last class on the first
        gap = (logits[:, last] - logits[:, 0]).median()
        model.classifier.bias[last] -= gap
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tsv(path: Path, texts: list[str], labels: list[int] | None = None) -> Path:
    """A GLUE-style TSV: header, tab-separated, no quoting."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["text", "label"] if labels is not None else ["text"])
        for i, text in enumerate(texts):
            writer.writerow([text, labels[i]] if labels is not None else [text])
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def sensitive_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sensitive") / "ckpt", seed=1, sensitive=True)


@pytest.fixture(scope="session")
def wide_sensitive_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wide-sensitive") / "ckpt"
    return make_checkpoint(path, seed=1, sensitive=True, dim=384)


@pytest.fixture(scope="session")
def tiny_validation(tmp_path_factory) -> Path:
    texts = make_texts(200, seed=7)
    labels = [int(("good" in t) or ("great" in t)) for t in texts]
    return write_tsv(tmp_path_factory.mktemp("val") / "val.tsv", texts, labels)


def tiny_config(checkpoint: Path, validation: Path, registry: Path, **fields):
    """A QuantizeConfig for the tiny checkpoint: per-token INT8, a gate it passes."""
    from distilq.config.quantize import QuantizeConfig

    defaults = {"recipe": "dynamic-int8-token", "min_agreement": 0.0, "max_accuracy_drop": 1.0}
    return QuantizeConfig(
        source=str(checkpoint),
        validation=[str(validation)],
        registry=str(registry),
        **{**defaults, **fields},
    )


def stage_tiny_version(staging: Path, checkpoint: Path, validation: Path, **fields):
    """A version made by the library pipeline (no Prefect) in a scratch registry, its files
    copied to `staging` to publish elsewhere; returns its manifest."""
    import shutil
    import tempfile

    from distilq.errors import GateRejected
    from distilq.pipelines.quantize import quantize_and_promote

    with tempfile.TemporaryDirectory() as scratch:
        config = tiny_config(checkpoint, validation, Path(scratch) / "reg", **fields)
        try:
            manifest = quantize_and_promote(config).manifest
        except GateRejected as e:
            manifest = e.manifest
        version_dir = Path(scratch) / "reg" / "versions" / manifest.version
        for rel in manifest.files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(version_dir / rel, staging / rel)
    return manifest


@pytest.fixture(scope="session")
def promoted_registry(tmp_path_factory, tiny_checkpoint, tiny_validation) -> Path:
    """A registry with one approved tiny version in production. Shared: copy it to change it."""
    from distilq.pipelines.quantize import quantize_and_promote

    root = tmp_path_factory.mktemp("promoted")
    assert quantize_and_promote(
        tiny_config(tiny_checkpoint, tiny_validation, root / "reg")
    ).promoted
    return root / "reg"


@pytest.fixture
def staged_pair(tmp_path, tiny_checkpoint, tiny_validation) -> tuple[Path, list[str]]:
    """A registry with two versions promoted in turn (the history has two entries)."""
    from distilq.registry.registry import Registry

    registry = Registry(tmp_path / "pair")
    versions = []
    for i in range(2):
        staging = tmp_path / f"stage{i}"
        staging.mkdir()
        manifest = stage_tiny_version(staging, tiny_checkpoint, tiny_validation)
        versions.append(registry.publish(staging, manifest))
        registry.promote(versions[-1], "setup", command="test")
    return tmp_path / "pair", versions


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port with its own SQLite database, shared by the
    session's server tests; its client env."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    log = home / "server.log"
    cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running(cmd, log, env) as server:
        wait_until(http_ok(f"{env['PREFECT_API_URL']}/health"), 180, "prefect server", server, log)
        yield env


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API on SQLite for the whole session (flow tests only)."""
    from distilq.runtime import set_prefect_defaults

    set_prefect_defaults()  # as the CLI does, before prefect is imported
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def as_shown(state) -> tuple:
    """A finished flow run as the Prefect server shows it: the run, and its artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = state.state_details.flow_run_id
    only_this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        artifacts = client.read_artifacts(artifact_filter=only_this_run)
    return run, {a.key: a for a in artifacts}


# -- real server processes: start on a free loopback port, wait until ready, stop ---------

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv's bin: prefect, dask, moto_server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: `url` answers 2xx."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= response.status < 300
        except OSError:
            return False

    return check


def wait_until(ready: Callable[[], bool], timeout: float, what: str, proc=None, log=None) -> None:
    """Poll `ready` until it is true; fail with the process's log if it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = Path(log).read_text()[-3000:] if log else ""
    state = "exited" if proc is not None and proc.poll() is not None else "not ready"
    raise AssertionError(f"{what} {state} after {timeout:.0f} s. Log tail:\n{tail}")


@contextlib.contextmanager
def running(
    cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group, output to `log`; stop the whole group on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    proc.wait()


def all_at_once(calls: int, fn) -> list[BaseException]:
    """Run `fn(i)` in `calls` threads started together; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(calls)

    def one(i: int) -> None:
        start.wait()
        try:
            fn(i)
        except Exception as e:  # noqa: BLE001  (returned to the test)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


BUCKET = "distilq-test"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """`moto_server` on a free loopback port, a bucket, and the AWS env pointing at it."""
    import s3fs

    from distilq.storage.store import url_to_fs

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    cmd = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with running(cmd, log) as server, pytest.MonkeyPatch.context() as mp:
        wait_until(http_ok(f"{env['AWS_ENDPOINT_URL']}/moto-api/"), 60, "moto", server, log)
        for name, value in env.items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs, _ = url_to_fs(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()


class MlflowServer:
    """`mlflow server` on a free loopback port; stopped and started again on the same
    database and artifact store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.artifacts),
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(http_ok(f"{self.uri}/health"), 180, "mlflow server", self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` for the session; tests use model names of their own."""
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.stop()
