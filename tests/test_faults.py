"""Bad inputs and faults, second round: nothing lost, nothing escapes the registry.

Each test fails on the code before the fix it covers (the faults issue's items 1-9); the
disk-full and read-only cases run the real CLI in a mount namespace of their own (a small
tmpfs, a read-only bind mount), and are skipped where the machine allows neither.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import distilq
from distilq.cli.flags import config_from
from distilq.cli.main import build_parser
from distilq.config.quantize import QuantizeConfig
from distilq.config.score import ScoreConfig, ScoreOptions
from distilq.errors import (
    InputError,
    IntegrityError,
    SourceUnavailable,
    worth_retrying,
)
from distilq.inference import CHARS_PER_TOKEN_BOUND, cut_text
from distilq.pipelines.quantize import quantize_and_promote
from distilq.registry.registry import Registry
from distilq.score.inputs import plan_shards
from distilq.score.output import output_lock
from tests.conftest import (
    DISTILQ,
    cli_env,
    make_texts,
    quantize,
    run,
    stage_tiny_version,
    tiny_config,
    write_parquet,
)


@pytest.fixture
def registry(promoted_registry, tmp_path) -> Path:
    """A copy of the promoted tiny registry, to damage."""
    shutil.copytree(promoted_registry, tmp_path / "reg")
    return tmp_path / "reg"


def in_mount_namespace(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`script` (sh) in a mount namespace of its own: its mounts vanish with it."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a namespace here: {probe.stderr.decode()[:200]}")
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


def logged(command: str, name: str, where: Path) -> str:
    """A script line that runs `command`, keeping its stderr and exit code in `where`."""
    return f"{command} 2> {where}/{name}.err; echo $? > {where}/{name}.rc\n"


def outcome(name: str, where: Path) -> tuple[int, str]:
    """The exit code and stderr `logged` kept."""
    return int((where / f"{name}.rc").read_text()), (where / f"{name}.err").read_text()


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# -- 1: a reference never leaves the registry -------------------------------------------------


@pytest.mark.parametrize("ref", ["../../outside/ver", "/abs/ver", "a/b", "..", "v..1", ""])
def test_a_reference_that_is_a_path_is_refused_everywhere(registry, ref):
    reg = Registry(registry)
    for call in (reg.resolve, reg.manifest, lambda r: reg.promote(r, "x"), reg.fetch):
        with pytest.raises(InputError, match="never a path"):
            call(ref)
    with pytest.raises(InputError, match="never a path"):
        distilq.load(registry, ref)


@pytest.mark.slow
def test_the_cli_refuses_a_version_outside_the_registry(registry):
    production = Registry(registry).alias()
    outside = registry.parent / "outside" / "ver"
    shutil.copytree(registry / "versions" / production, outside)
    ref = "../../outside/ver"
    for args in (
        ["models", "promote", ref, "--force"],
        ["models", "show", ref],
        ["models", "attest", ref],
        ["score", "--input", str(outside), "--output", str(registry.parent / "o"), "--model", ref],
    ):
        done = run(*args, "--registry", str(registry))
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "never a path" in last_line(done.stderr) and "Traceback" not in done.stderr
    assert Registry(registry).alias() == production
    assert not (registry.parent / "o").exists()


def test_aliases_and_history_pointing_outside_are_damaged(registry, caplog):
    production = Registry(registry).alias()
    pointer = registry / "aliases" / "production.json"
    pointer.write_text(json.dumps({"alias": "production", "version": "../../outside/ver"}))
    with pytest.raises(IntegrityError, match="production.json is damaged"):
        distilq.load(registry)
    history = registry / "aliases" / "history.jsonl"
    escape = {"action": "promote", "from": production, "to": "../../outside/ver", "seq": 99}
    history.write_text(history.read_text() + json.dumps(escape) + "\n")
    reg = Registry(registry)
    with caplog.at_level(logging.WARNING, logger="distilq"):
        assert [h["to"] for h in reg.history()] == [production]
    assert "history.jsonl line 2 is damaged" in caplog.text
    assert reg.promote(production, "repair", command="test")["to"] == production
    assert distilq.load(registry).version == production


# -- 2: hive partitions -------------------------------------------------------------------------


def test_a_partition_that_is_also_a_column_is_refused(tmp_path):
    data = tmp_path / "data"
    write_parquet(data / "year=2024" / "part.parquet", ["good film"], year=[2023])
    with pytest.raises(InputError, match=r"'year' is both a column .* \(year=2024\)") as e:
        plan_shards([str(data)], ScoreOptions())
    assert "year=2024/part.parquet" in str(e.value)
    assert len(plan_shards([str(data)], ScoreOptions(id_columns=["id"])).shards) == 1


def test_a_column_has_one_type_across_the_output(tmp_path):
    data = tmp_path / "data"
    write_parquet(data / "a.parquet", ["good film"], year=[2023])
    write_parquet(data / "year=2024" / "b.parquet", ["bad film"])
    with pytest.raises(InputError, match=r"'year' is int64 in .*a.parquet but string in .*b"):
        plan_shards([str(data)], ScoreOptions())
    # kept only what the user asked for: no clash, nothing lost
    assert len(plan_shards([str(data)], ScoreOptions(id_columns=["id"])).shards) == 2


def test_a_partition_given_twice_with_two_values_is_refused(tmp_path):
    data = tmp_path / "data"
    write_parquet(data / "day=1" / "day=2" / "part.parquet", ["good film"])
    with pytest.raises(InputError, match="'day' is given twice in its path, as '1' and '2'"):
        plan_shards([str(data)], ScoreOptions())


# -- 3: a registry that cannot be written, and what is retried ------------------------------


@pytest.mark.slow
def test_a_read_only_registry_is_refused_before_any_work(
    promoted_registry, tmp_path, tiny_checkpoint, tiny_validation
):
    registry = tmp_path / "ro-reg"
    shutil.copytree(promoted_registry, registry)
    version = Registry(registry).alias()
    args = " ".join(quantize(tiny_checkpoint, tiny_validation, registry))
    promote = f"{DISTILQ} models promote {version} --force --registry {registry}"
    script = (
        f"mount --bind {registry} {registry} && mount -o remount,bind,ro {registry} || exit 99\n"
        + logged(f"{DISTILQ} {args}", "q", tmp_path)
        + logged(promote, "p", tmp_path)
    )
    done = in_mount_namespace(script)
    assert done.returncode == 0, done.stderr
    for name in ("q", "p"):
        code, stderr = outcome(name, tmp_path)
        assert code == 2, stderr[-2000:]
        assert "Traceback" not in stderr and "Read-only file system" in last_line(stderr)
        assert last_line(stderr).startswith(f"distilq: error: registry {registry} cannot be")
    q_err = outcome("q", tmp_path)[1]
    assert "resolve_source" not in q_err and "Retrying" not in q_err  # refused before any work


def test_only_what_a_retry_can_mend_is_retried():
    def caused(error, cause):
        error.__cause__ = cause
        return error

    class Response:
        def __init__(self, status_code):
            self.status_code = status_code

    def http_error(status):
        e = Exception(f"HTTP {status}")
        e.response = Response(status)
        return e

    assert worth_retrying(ConnectionResetError())
    assert worth_retrying(TimeoutError())
    assert worth_retrying(SourceUnavailable("hub down"))
    assert worth_retrying(http_error(503)) and worth_retrying(http_error(429))
    assert not worth_retrying(http_error(404))
    assert not worth_retrying(PermissionError(13, "Permission denied"))
    assert not worth_retrying(OSError(30, "Read-only file system"))
    assert not worth_retrying(OSError(28, "No space left on device"))
    assert not worth_retrying(FileNotFoundError(2, "No such file"))
    assert not worth_retrying(InputError("bad flag"))
    # a refusal wrapped as "unavailable" is still a refusal
    assert not worth_retrying(caused(SourceUnavailable("cannot download"), PermissionError(13, "")))
    assert not worth_retrying(ValueError("a bug is not retried"))
    # A host the resolver says does not exist (offline, or a typo), wrapped as the hub
    # client wraps it, is not retried; a temporary resolver failure is.
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert not worth_retrying(caused(SourceUnavailable("cannot reach the hub"), unknown))
    again = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert worth_retrying(caused(SourceUnavailable("cannot reach the hub"), again))


# -- 4: a dangling production alias ------------------------------------------------------------


def test_a_deleted_production_version_never_blocks_a_gated_promotion(
    registry, tmp_path, tiny_checkpoint, tiny_validation, caplog
):
    old = Registry(registry).alias()
    shutil.rmtree(registry / "versions" / old)
    with pytest.raises(IntegrityError, match=f"points at version '{old}', which is not in"):
        distilq.load(registry)
    listed = run("models", "list", "--registry", str(registry))
    assert listed.returncode == 0 and "production.json points at version" in listed.stderr
    # same inputs as the deleted version, but a new threshold: a new version, promoted
    config = tiny_config(tiny_checkpoint, tiny_validation, registry, max_accuracy_drop=0.9)
    with caplog.at_level(logging.WARNING, logger="distilq"):
        result = quantize_and_promote(config)
    assert result.promoted and Registry(registry).alias() == result.version
    assert f"points at version '{old}'" in caplog.text
    assert Registry(registry).history()[-1]["to"] == result.version


def test_rollback_to_a_deleted_version_is_refused_by_name(staged_pair):
    reg_dir, (first, second) = staged_pair
    registry = Registry(reg_dir)
    shutil.rmtree(reg_dir / "versions" / first)
    with pytest.raises(InputError, match=f"{first}, is no longer in the registry"):
        registry.rollback(command="test")
    assert registry.alias() == second


# -- 5: a full disk while the output manifest is saved --------------------------------------------


@pytest.mark.slow
def test_a_full_disk_ends_with_one_line_and_the_rerun_counts_each_row_once(registry, tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        write_parquet(data / f"f{i}.parquet", make_texts(40, seed=i))
    clean = run("score", "--input", str(data), "--output", str(tmp_path / "clean"),
                "--registry", str(registry))  # fmt: skip
    assert clean.returncode == 0, clean.stderr[-2000:]
    mnt, out = tmp_path / "mnt", tmp_path / "mnt" / "out"
    mnt.mkdir()
    score = f"{DISTILQ} score --input {data} --output {out} --registry {registry}"
    # 16 pages of 4 KiB, 13 of them taken: room for the manifest and a shard or two (every
    # file here is under a page), not for the whole run.
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {mnt} || exit 99\n"
        f"head -c {13 * 4096} /dev/zero > {mnt}/filler\n"
        + logged(score, "1", tmp_path)
        + f"rm {mnt}/filler\n"
        + logged(f"{score} --json > {tmp_path}/2.json", "2", tmp_path)
        + f"cp -a {out} {tmp_path}/after\n"
    )
    done = in_mount_namespace(script)
    assert done.returncode == 0, done.stderr
    code, first = outcome("1", tmp_path)
    assert code == 1, first[-3000:]
    assert "Traceback" not in first
    assert last_line(first).startswith(f"distilq: could not save {out}/_manifest.json (No space")
    assert "f2.parquet" in first  # the files after the failed save were still tried
    code, second = outcome("2", tmp_path)
    assert code == 0, second[-3000:]
    summary = json.loads((tmp_path / "2.json").read_text())
    assert summary["rows_written"] == 120 and summary["files"] == 3 and not summary["failed"]
    after = tmp_path / "after"
    assert sorted(p.name for p in after.iterdir()) == [
        "_manifest.json",
        *(f"f{i}.parquet" for i in range(3)),
    ]
    for i in range(3):
        name = f"f{i}.parquet"
        assert (after / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


# -- 6: flag errors in one line ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--threads", "0"], "--threads must be at least 1 (got 0)"),
        (["--runner", "process", "--workers", "-1"], "--workers must be at least 1 (got -1)"),
        (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
        (["--shard-rows", "0"], "--shard-rows must be at least 1 (got 0)"),
        (["--window-batches", "0"], "--window-batches must be at least 1 (got 0)"),
    ],
)
def test_a_bad_score_flag_is_said_in_one_line(flags, said):
    args = build_parser().parse_args(["score", "--input", "x", "--output", "y", *flags])
    with pytest.raises(InputError) as e:
        config_from(ScoreConfig, args)
    assert str(e.value) == said


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--min-agreement", "1.5"], "--min-agreement must be at most 1 (got 1.5)"),
        (["--confidence", "1"], "--confidence must be less than 1 (got 1)"),
        (["--min-agreement", "1"], "--min-agreement 1 cannot be certified"),
    ],
)
def test_a_bad_quantize_flag_is_said_in_one_line(flags, said):
    with pytest.raises(InputError) as e:
        config_from(QuantizeConfig, build_parser().parse_args(["quantize", *flags]))
    assert str(e.value).startswith(said) and "pydantic" not in str(e.value)


def test_the_cli_prints_the_flag_error_alone():
    done = run("score", "--input", "x", "--output", "y", "--batch-size", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "distilq: error: --batch-size must be at least 1 (got 0)"


# -- 7: what a kill leaves behind ----------------------------------------------------------------

KILL_DURING_PUBLISH = """
import os, signal, sys
from pathlib import Path
from distilq.manifest import VersionManifest
from distilq.registry.registry import Registry
from distilq.storage.store import Store
from distilq.gate.attest import gate_attestation

staging, registry, when = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
manifest = VersionManifest.model_validate_json((staging / "manifest.json").read_text())
real_put, real_write = Store.put_file, Store.write_atomic

def put_file(self, source, rel):
    real_put(self, source, rel)
    if when == "copy":  # a kill once the first file is in
        os.kill(os.getpid(), signal.SIGKILL)

def write_atomic(self, rel, data):
    if when == "copy" and "/model/" in rel:  # a kill with a temporary file half-written
        tmp = Path(self.path(rel)).parent / ".config.json.x1y2.tmp"
        tmp.write_bytes(data[:10])
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(self, rel, data)
    if when == "sealed" and rel.endswith("/manifest.json"):  # killed just after publishing
        os.kill(os.getpid(), signal.SIGKILL)

Store.put_file, Store.write_atomic = put_file, write_atomic
Registry(registry).publish(staging, manifest, gate_attestation(manifest))
"""


@pytest.fixture
def staged(tmp_path, tiny_checkpoint, tiny_validation) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir()
    manifest = stage_tiny_version(staging, tiny_checkpoint, tiny_validation)
    (staging / "manifest.json").write_text(manifest.model_dump_json())
    return staging


def _publish_and_kill(staging: Path, registry: Path, when: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", KILL_DURING_PUBLISH, str(staging), str(registry), when],
        capture_output=True,
        text=True,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return json.loads((staging / "manifest.json").read_text())["version"]


def test_a_version_killed_mid_publish_is_removed_by_the_next_publish(
    staged, tmp_path, tiny_checkpoint, tiny_validation
):
    registry = tmp_path / "reg"
    version = _publish_and_kill(staged, registry, "copy")
    partial = registry / "versions" / version
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    reg = Registry(registry)
    assert reg.versions() == []
    assert reg.remove_partial_versions() == [version]
    assert not partial.exists()
    # the next publish finishes the job: one whole version, no debris
    again = tmp_path / "again"
    again.mkdir()
    manifest = stage_tiny_version(again, tiny_checkpoint, tiny_validation, max_accuracy_drop=0.9)
    assert reg.publish(again, manifest) == manifest.version
    leftovers = [p for p in (registry / "versions").rglob(".*") if p.name != ".lock"]
    assert reg.versions() == [manifest.version] and leftovers == []


def test_a_partial_version_being_written_is_left_alone(tmp_path):
    registry = Registry(tmp_path / "reg")
    (tmp_path / "reg" / "versions" / "v-busy" / "model").mkdir(parents=True)
    with registry.store.lock("versions/v-busy/"):  # a live publisher holds it
        assert registry.remove_partial_versions() == []
    assert (tmp_path / "reg" / "versions" / "v-busy").is_dir()
    assert registry.remove_partial_versions() == ["v-busy"]


def test_the_gates_attestation_is_part_of_publishing(staged, tmp_path):
    registry = tmp_path / "reg"
    version = _publish_and_kill(staged, registry, "sealed")
    reg = Registry(registry)
    assert reg.versions() == [version]
    platform = reg.manifest(version).platform.key
    record = reg.attestation(version, platform)
    assert record is not None and record["max_abs_prob_diff"] == 0.0


# -- 8: a dead worker fails only what it was scoring ---------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_fails_its_file_and_the_pool_goes_on(registry, tmp_path):
    data = tmp_path / "data"
    for i in range(6):
        write_parquet(data / f"part{i}.parquet", make_texts(2500, seed=i))
    out = tmp_path / "out"
    env = cli_env()
    cmd = [DISTILQ, "score", "--input", str(data), "--output", str(out),
           "--registry", str(registry), "--runner", "process", "--workers", "2", "--threads",
           "2", "--json"]  # fmt: skip
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    workers = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (workers and list(out.glob(".part*.tmp"))):
        time.sleep(0.05)  # until a worker is writing a shard
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert workers, "no pool worker started"
    workers[0].send_signal(signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=600)
    stderr = log.read_text()
    summary = json.loads(stdout)
    assert proc.returncode == 1, stderr[-3000:]
    assert 1 <= len(summary["failed"]) <= 2  # the files the pool's two workers held
    for why in summary["failed"].values():
        assert "worker process died while scoring it" in why
    scored = sorted(p.name for p in out.glob("part*.parquet"))
    assert len(scored) + len(summary["failed"]) == 6  # every other file was scored
    assert "not started yet run on a fresh pool" in stderr
    # the workers' logs and task runs go to this run's API, not to a second server of
    # Prefect's own (its process pool forwards them from a thread)
    assert "Starting temporary server" not in stderr
    resumed = run(*cmd[1:-1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("part*.parquet")) == [
        f"part{i}.parquet" for i in range(6)
    ]


# -- 9: costs paid before a refusal ----------------------------------------------------------


@pytest.mark.slow
def test_a_locked_output_is_refused_before_the_model_loads(registry, tmp_path):
    data = tmp_path / "data"
    write_parquet(data / "a.parquet", make_texts(10))
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(str(out)):
        done = run("score", "--input", str(data), "--output", str(out), "--registry", str(registry))
    assert done.returncode == 2
    assert "being written by another distilq run" in last_line(done.stderr)
    assert "attested" not in done.stderr  # printed once the model is loaded


def test_a_text_longer_than_the_models_positions_is_truncated_to_them(registry):
    classifier = distilq.load(registry)  # the tiny model has 64 positions, the policy 512
    (result,) = classifier.predict([" ".join(make_texts(100, seed=3))])
    assert result["error"] is None and result["label"] in ("NEGATIVE", "POSITIVE")


def test_a_huge_text_costs_what_its_head_costs(registry):
    classifier = distilq.load(registry)
    limit = classifier.batching.max_length * CHARS_PER_TOKEN_BOUND
    words = " ".join(make_texts(400_000, seed=5))
    huge = words * (20_000_000 // len(words) + 1)
    head, cut = cut_text(huge, classifier.batching.max_length)
    assert cut and len(head) <= limit and huge.startswith(head) and huge[len(head)].isspace()
    # what the model sees is the same: the tokens past the cut are truncated away anyway
    tok = classifier.tokenizer
    ids = tok(huge[: 4 * limit], truncation=True, max_length=classifier.batching.max_length)
    assert (
        ids["input_ids"]
        == tok(head, truncation=True, max_length=len(ids["input_ids"]))["input_ids"]
    )
    (result,) = classifier.predict([huge])
    assert result == classifier.predict([head])[0]
