"""Bad inputs and faults: nothing a user gave is lost, nothing in the registry is forged.

Each test fails on the code before the fix it covers (the hardening issue's cases 1-14).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import distilq
from distilq.config.score import ScoreConfig, ScoreOptions
from distilq.errors import GateRejected, InputError, IntegrityError
from distilq.inference import NO_TOKENS
from distilq.pipelines.staging import STAGING_PREFIX, remove_stale_staging
from distilq.registry.layout import MANIFEST_SHA256
from distilq.registry.registry import Registry
from distilq.score.inputs import plan_shards
from distilq.score.output import MANIFEST, prepare_output
from distilq.score.scoring import options_for, score_shard
from tests.conftest import (
    DISTILQ,
    cli_env,
    make_texts,
    quantize,
    run,
    tiny_config,
    write_parquet,
)


@pytest.fixture
def registry(promoted_registry) -> Path:
    return promoted_registry


def _fresh_registry(tmp_path, staged_from: Path) -> tuple[Path, str]:
    """A copy of `staged_from` to damage."""
    shutil.copytree(staged_from, tmp_path / "reg")
    return tmp_path / "reg", Registry(tmp_path / "reg").alias()


# -- 1, 11: where scores are written -----------------------------------------------------


@pytest.mark.slow
def test_output_equal_to_input_is_refused_and_nothing_is_touched(registry, tmp_path):
    data = tmp_path / "d"
    write_parquet(data / "good.parquet", make_texts(5))
    (data / "notes.txt").write_text("mine")
    args = ["score", "--input", str(data), "--output", str(data), "--registry", str(registry)]
    done = run(*args, "--overwrite")
    assert done.returncode == 2, done.stderr
    assert "overlaps the input directory" in done.stderr
    assert "temporary Prefect API" not in done.stderr  # refused before any flow run
    assert sorted(p.name for p in data.iterdir()) == ["good.parquet", "notes.txt"]


def test_outputs_overlapping_the_inputs_are_refused(tmp_path):
    data = tmp_path / "data"
    write_parquet(data / "a" / "x.parquet", make_texts(3))
    (tmp_path / "link").symlink_to(data)
    options = ScoreOptions()
    overlapping = {
        "inside an input directory": ([str(data)], data / "scored"),
        "around an input directory": ([str(data / "a")], data),
        "the input directory through a link": ([str(data)], tmp_path / "link"),
        "around an input file": ([str(data / "a" / "x.parquet")], data),
        "around a ** glob's root": ([str(data / "**" / "*.parquet")], tmp_path),
    }
    for case, (inputs, output) in overlapping.items():
        with pytest.raises(InputError, match="distilq never writes where it reads"):
            plan_shards(inputs, options, str(output))
            pytest.fail(case)
    assert not (data / "scored").exists()
    plan_shards([str(data)], options, str(tmp_path / "scored"))  # beside the inputs is fine
    plan_shards([str(data / "*" / "*.parquet")], options, str(tmp_path / "elsewhere"))


def test_outputs_that_cannot_be_directories_are_refused(tmp_path):
    src = write_parquet(tmp_path / "in.parquet", make_texts(3))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is an existing file, not a directory"):
        plan_shards([src], ScoreOptions(), str(tmp_path / "file"))
    with pytest.raises(InputError, match=r"cannot be created: .*file is a file"):
        plan_shards([src], ScoreOptions(), str(tmp_path / "file" / "out"))


def test_overwrite_removes_only_what_distilq_wrote(registry, tmp_path):
    classifier = distilq.load(registry)
    src = write_parquet(tmp_path / "in" / "a.parquet", make_texts(10))
    out = tmp_path / "out"
    options = ScoreOptions()
    plan = plan_shards([src], options, str(out))
    manifest, todo = prepare_output(str(out), plan, classifier.version, options.model_dump(), False)
    manifest.record_shard(todo[0], score_shard(classifier, todo[0], str(out), options))
    for name in ("notes.txt", "draft.tmp", ".b.parquet.x1.tmp", ".mine.tmp"):
        (out / name).write_text("the user's")
    (out / "sub").mkdir()
    dump = options.model_dump()
    for overwrite in (False, True):
        with pytest.raises(
            InputError, match=r"did not write there \(\.mine\.tmp, draft\.tmp, notes\.txt, \.\.\.\)"
        ):
            prepare_output(str(out), plan, "another-version", dump, overwrite)
    assert (out / "a.parquet").is_file() and (out / "notes.txt").read_text() == "the user's"
    for name in ("notes.txt", "draft.tmp", ".mine.tmp", "sub"):
        shutil.rmtree(out / name) if name == "sub" else (out / name).unlink()
    manifest, todo = prepare_output(str(out), plan, "another-version", dump, True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]  # its shard and a temporary
    assert [s.output for s in todo] == ["a.parquet"]


def test_a_damaged_output_manifest_is_refused(tmp_path):
    src = write_parquet(tmp_path / "in" / "a.parquet", make_texts(3))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MANIFEST).write_text('{"model_version": ')
    plan = plan_shards([src], ScoreOptions(), str(tmp_path / "out"))
    with pytest.raises(InputError, match="is not a distilq output manifest"):
        prepare_output(str(tmp_path / "out"), plan, "v", {}, True)
    assert (tmp_path / "out" / MANIFEST).read_text() == '{"model_version": '


# -- 2, 3: texts and lengths ----------------------------------------------------------------


def test_texts_without_tokens_get_no_label(registry, tmp_path):
    classifier = distilq.load(registry)
    texts = ["a good movie", "\x00", "\u200b\u200b", "🎬", "\x00 good film"]
    src = write_parquet(tmp_path / "in.parquet", texts)
    out = tmp_path / "out"
    options = ScoreOptions()
    plan = plan_shards([src], options, str(out))
    manifest, todo = prepare_output(str(out), plan, classifier.version, options.model_dump(), False)
    manifest.record_shard(todo[0], score_shard(classifier, todo[0], str(out), options))
    rows = pq.read_table(out / "in.parquet").to_pylist()
    assert [r["error"] for r in rows] == [None, NO_TOKENS, NO_TOKENS, NO_TOKENS, None]
    assert [r["label"] is None for r in rows] == [False, True, True, True, False]
    assert manifest.record.shards["in.parquet"].rows_error == 3
    alone = classifier.predict(["\x00", "a good movie"])  # the library says the same
    assert alone[0] == {"label": None, "score": None, "probabilities": None, "error": NO_TOKENS}
    assert alone[1]["label"] == rows[0]["label"] and alone[1]["error"] is None


def test_max_length_beyond_the_model_is_refused(registry):
    reg = Registry(registry)
    version = reg.alias()
    config = ScoreConfig(inputs=["x"], output="y", registry=str(registry), max_length=4096)
    with pytest.raises(InputError, match="--max-length 4096 exceeds the 64 token positions"):
        options_for(config, reg, version)
    assert (
        options_for(config.model_copy(update={"max_length": None}), reg, version).max_length == 64
    )


# -- 4, 5: re-runs finish what the first run left, and exit as it did ----------------------


@pytest.mark.usefixtures("prefect_harness")
def test_reruns_promote_what_was_left_and_stay_rejected(
    tiny_checkpoint, sensitive_checkpoint, tiny_validation, tmp_path
):
    from flows.quantize_and_promote import quantize_and_promote

    config = tiny_config(tiny_checkpoint, tiny_validation, tmp_path / "reg", min_agreement=0.9)
    first = quantize_and_promote(config)
    shutil.rmtree(tmp_path / "reg" / "aliases")  # as if killed between publish and promote
    again = quantize_and_promote(config)
    assert again.reused and again.promoted and again.version == first.version
    assert Registry(tmp_path / "reg").alias() == first.version

    rejected = tiny_config(
        sensitive_checkpoint, tiny_validation, tmp_path / "reg", min_agreement=0.95
    )
    states = [quantize_and_promote(rejected, return_state=True) for _ in range(2)]
    assert [s.is_failed() for s in states] == [True, True]
    messages = []
    for state in states:
        with pytest.raises(GateRejected) as e:
            state.result()
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "gate rejected" in messages[0]
    assert Registry(tmp_path / "reg").alias() == first.version


# -- 6: a manifest edited after publishing ----------------------------------------------------


def test_an_edited_manifest_is_refused(registry, tmp_path):
    reg_dir, version = _fresh_registry(tmp_path, registry)
    path = reg_dir / "versions" / version / "manifest.json"
    manifest = json.loads(path.read_text())
    # Inflated: a lower bound never reaches 1 (the agreement itself may already be 1).
    manifest["metrics"]["agreement_lower_bound"] = 1.0
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(IntegrityError, match="was changed after it was published"):
        Registry(reg_dir).manifest(version)
    with pytest.raises(IntegrityError, match="was changed after it was published"):
        distilq.load(reg_dir)
    assert Registry(reg_dir).find_run(manifest["run_key"]) is None  # skipped, not reused
    listed = run("models", "list", "--registry", str(reg_dir))
    assert listed.returncode == 0 and "DAMAGED" in listed.stdout
    assert json.loads(run("models", "list", "--json", "--registry", str(reg_dir)).stdout)[0][
        "error"
    ].endswith(f"refusing to trust version {version}")


def test_promote_derives_the_decision_from_the_metrics(registry, tmp_path):
    reg_dir, version = _fresh_registry(tmp_path, registry)
    base = reg_dir / "versions" / version
    manifest = json.loads((base / "manifest.json").read_text())
    # A version published before manifests were sealed, rejected by its metrics, but whose
    # stored decision was edited to "approved".
    manifest["decision"]["thresholds"]["min_agreement"] = 1.0
    del manifest["decision"]["thresholds"]["confidence"]  # gated before bounds,
    del manifest["schema_version"]  # by a distilq that wrote schema 1
    manifest["metrics"]["sets"][0]["agreement"] = manifest["metrics"]["agreement"] = 0.9
    manifest["decision"]["approved"] = True
    (base / "manifest.json").write_text(json.dumps(manifest))
    (base / MANIFEST_SHA256).unlink()
    shutil.rmtree(reg_dir / "aliases")
    done = run("models", "promote", version, "--registry", str(reg_dir))
    assert done.returncode == 2 and "rejected by the gate (agreement 0.9000 < 1.0000" in done.stderr
    assert Registry(reg_dir).alias() is None
    assert run("models", "promote", version, "--force", "--registry", str(reg_dir)).returncode == 0
    assert "forced over a rejected gate" in Registry(reg_dir).history()[-1]["reason"]


# -- 7, 8, 9: the alias, its history, and registries that are not there ---------------------


@pytest.mark.parametrize("garbage", ["not json{", "{}", '{"version": 3}', "[]"])
def test_a_damaged_alias_is_reported_and_promote_repairs_it(registry, tmp_path, garbage):
    reg_dir, version = _fresh_registry(tmp_path, registry)
    pointer = reg_dir / "aliases" / "production.json"
    pointer.write_text(garbage)
    with pytest.raises(IntegrityError, match=r"production.json is damaged .* models promote"):
        distilq.load(reg_dir)
    for command in (["show"], ["list"]):
        done = run("models", *command, "--registry", str(reg_dir))
        assert "production.json is damaged" in done.stderr and "Traceback" not in done.stderr
    done = run("models", "promote", version, "--registry", str(reg_dir))
    assert done.returncode == 0, done.stderr
    assert f"production: None -> {version}" in done.stdout
    assert distilq.load(reg_dir).version == version
    assert Registry(reg_dir).history()[-1]["seq"] == 2  # numbered after the first move


def test_rollback_repairs_a_damaged_alias_from_the_history(staged_pair, tmp_path):
    reg_dir, (first, second) = staged_pair
    (reg_dir / "aliases" / "production.json").write_text("")
    done = run("models", "rollback", "--registry", str(reg_dir))
    assert done.returncode == 0, done.stderr
    assert Registry(reg_dir).alias() == first


def test_a_torn_history_line_loses_no_later_entry(staged_pair, caplog):
    reg_dir, (first, second) = staged_pair
    history = reg_dir / "aliases" / "history.jsonl"
    lines = history.read_text().splitlines()
    history.write_text(lines[0] + "\n" + lines[1][:40])  # a crash cut the last append
    registry = Registry(reg_dir)
    with caplog.at_level(logging.WARNING, logger="distilq"):
        assert [h["to"] for h in registry.history()] == [first]
    assert "history.jsonl line 2 is damaged" in caplog.text
    registry.promote(first, "again", command="test")  # production is second: a real move
    registry.promote(second, "and back", command="test")
    assert [h["to"] for h in registry.history()] == [first, first, second]
    assert history.read_text().splitlines()[1] == lines[1][:40]  # kept for a person to read
    assert registry.rollback(command="test")["to"] == first


def test_commands_on_a_registry_that_is_not_there_create_nothing(tmp_path):
    missing = tmp_path / "nope"
    for args in (["rollback"], ["list"], ["show"], ["promote", "v1"]):
        done = run("models", *args, "--registry", str(missing))
        assert done.returncode == 2 and f"registry {missing} does not exist" in done.stderr
    assert not missing.exists()


# -- 10: processes a killed run leaves -------------------------------------------------------


@pytest.mark.slow
def test_a_killed_run_leaves_no_prefect_server(tmp_path, tiny_checkpoint, tiny_validation):
    env = cli_env()
    args = quantize(tiny_checkpoint, tiny_validation, tmp_path / "reg")
    cli = subprocess.Popen(
        [DISTILQ, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        server = _wait_for_child(cli.pid, "prefect.server.api.server:create_app", timeout=120)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(server):
        time.sleep(0.2)
    assert not _running(server), "the ephemeral Prefect server outlived its killed run"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_child(pid: int, marker: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(pid):
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    return child
        time.sleep(0.1)
    raise AssertionError(f"no child process running {marker} within {timeout} s")


def test_staging_left_by_dead_runs_is_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{STAGING_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-def"
    dry_run = tmp_path / "distilq-dry-run-ghi"
    for path in (stale, live, dry_run):
        path.mkdir()
    remove_stale_staging()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, dry_run.name])


# -- 11, 12: what the command line prints ------------------------------------------------------


@pytest.mark.slow
def test_a_failed_run_ends_with_one_clear_line(tmp_path, sensitive_checkpoint, tiny_validation):
    args = quantize(
        sensitive_checkpoint, tiny_validation, tmp_path / "reg", "--recipe", "dynamic-int8-token"
    )
    args += ["--min-agreement", "0.95"]
    done = run(*args)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("distilq: gate rejected")
    verbose = run(*args, "--verbose")
    assert verbose.returncode == 3 and "Traceback" in verbose.stderr


def test_models_list_aligns_its_columns(staged_pair):
    reg_dir, (first, second) = staged_pair
    lines = run("models", "list", "--registry", str(reg_dir)).stdout.splitlines()
    assert lines[1].startswith(f"* {second}  approved") and lines[2].startswith(f"  {first}  ")
    header, *rows = [[m.span() for m in re.finditer(r"\S+", line[2:])] for line in lines]
    assert [lines[0][2:][a:b] for a, b in header] == [
        *["version", "gate", "recipe", "agreement", "MiB", "source"]
    ]
    for row in rows:
        assert [start for start, _ in row[:3]] == [start for start, _ in header[:3]]
        assert [end for _, end in row[3:5]] == [end for _, end in header[3:5]]  # numbers
        assert row[5][0] == header[5][0]


def test_a_closed_pipe_ends_quietly(staged_pair):
    reg_dir, _ = staged_pair
    env = cli_env()
    proc = subprocess.Popen(
        [DISTILQ, "models", "show", "--registry", str(reg_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # the reader is gone before the first line: `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0 and err == ""
