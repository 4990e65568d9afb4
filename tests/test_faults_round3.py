"""Bad inputs and faults, third round (the issue's cases, by number): each test fails on the
code before the fix it covers."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from distilq.config.quantize import QuantizeConfig
from distilq.config.score import ScoreConfig
from distilq.errors import InputError
from distilq.registry.registry import Registry
from distilq.storage.parquet import discover_inputs
from distilq.storage.store import sha256_file
from tests.conftest import (
    BUCKET,
    all_at_once,
    make_checkpoint,
    make_texts,
    run,
    stage_tiny_version,
    tiny_config,
    wait_until,
    write_parquet,
)

ROOT = Path(__file__).resolve().parents[1]


def test_3_files_named_like_distilqs_own_are_not_data_in_a_glob(tmp_path):
    """Scoring `old_out/*.parquet` must not take the old output's `_audit.parquet` (or any
    `_` or `.` file, as pyarrow and Spark skip them) for a shard."""
    old = tmp_path / "old_out"
    write_parquet(old / "part.parquet", make_texts(5))
    write_parquet(old / "_audit.parquet", make_texts(3))
    write_parquet(old / ".part.parquet.tmp.parquet", make_texts(3))
    write_parquet(old / "sub" / "_hidden" / "x.parquet", make_texts(3))
    found, _ = discover_inputs([str(old / "*.parquet")])
    assert [relative for _, relative, _ in found] == ["part.parquet"]
    found, _ = discover_inputs([str(old / "**" / "*.parquet")])
    assert [relative for _, relative, _ in found] == ["part.parquet"]
    with pytest.raises(InputError, match=r"matches no data file.*_audit\.parquet"):
        discover_inputs([str(old / "_*.parquet")])


def test_11_workers_with_a_dask_address_are_refused_not_ignored(tmp_path):
    common = {"inputs": ["x.parquet"], "output": str(tmp_path / "out"), "runner": "dask"}
    with pytest.raises(ValueError, match=r"--workers .* --dask-address"):
        ScoreConfig(**common, dask_address="tcp://127.0.0.1:8786", workers=4)
    # The cluster distilq starts itself is sized by --workers, as before.
    assert ScoreConfig(**common, workers=2, threads=2).threads_per_worker == 1


@pytest.mark.parametrize("deployment", ["weekly", "rescore", "regate"])
def test_14_the_deployments_follow_distilq_registry(deployment, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILQ_REGISTRY", str(tmp_path / "team-registry"))
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    [found] = [d for d in spec["deployments"] if d["name"] == deployment]
    config = dict(found["parameters"]["config"])
    made = ScoreConfig(**config) if "inputs" in config else QuantizeConfig(**config)
    assert made.registry == str(tmp_path / "team-registry")
    monkeypatch.delenv("DISTILQ_REGISTRY")
    again = ScoreConfig(**config) if "inputs" in config else QuantizeConfig(**config)
    assert again.registry == "./registry"


def test_10_damaged_audit_and_attestation_records_are_named_and_skipped(
    promoted_registry, tmp_path
):
    registry = tmp_path / "reg"
    shutil.copytree(promoted_registry, registry)
    version = Registry(registry).resolve("production")
    where = registry / "versions" / version
    gate_key = Registry(registry).manifest(version).platform.key
    (where / "audits").mkdir(exist_ok=True)
    (where / "audits" / "run-cut.json").write_text('{"run_id": "run-cut", "rows": 3')
    (where / "audits" / "run-shape.json").write_text('{"run_id": 7}')
    (where / "attestations" / "x86_64-other-0000.json").write_text("[1, 2]")
    for args in (["models", "show"], ["models", "audits"], ["models", "show", "--json"]):
        done = run(*args, "--registry", str(registry))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        for name in ("audits/run-cut.json", "audits/run-shape.json"):
            assert f"versions/{version}/{name}: damaged, skipped" in done.stderr
    shown = run("models", "show", "--registry", str(registry))
    assert "attestations/x86_64-other-0000.json: damaged, skipped" in shown.stderr
    assert f"`{gate_key}`" in shown.stdout  # the readable attestation is still shown
    # A damaged attestation of this platform counts as none: the self-check runs again.
    (where / "attestations" / f"{gate_key}.json").write_text("{")
    assert Registry(registry).attestation(version, gate_key) is None


def test_12_an_fp32_reference_that_will_not_load_leaves_the_run_scored_and_unaudited(
    tiny_validation, tmp_path
):
    """An architecture the installed transformers lacks: the audit was not required, so the
    rows are scored and the audit says why it is missing. (This held already on the main
    the issue was read on: `checkpoint.load_model` turns transformers' ValueError into an
    InputError, which the audit takes as an unavailable reference. Kept as a guard.)"""
    import json

    from distilq.pipelines.quantize import quantize_and_promote
    from distilq.pipelines.score import score_dataset

    source = make_checkpoint(tmp_path / "ckpt")
    registry = tmp_path / "reg"
    assert quantize_and_promote(tiny_config(source, tiny_validation, registry)).promoted
    config_file = source / "config.json"  # not a weight file: its sha256 is not the gate's
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "model_type": "nobert"})
    )
    data = write_parquet(tmp_path / "in" / "part.parquet", make_texts(300, seed=4))
    summary = score_dataset(
        ScoreConfig(
            inputs=[data], output=str(tmp_path / "out"), registry=str(registry), audit_rate=0.5
        )  # fmt: skip
    )
    assert summary.failed == {} and summary.rows_scored == 300
    assert summary.audit.rows == 0 and "nobert" in summary.audit.reason


def test_2_flipped_rows_with_timestamp_decimal_or_binary_ids_are_recorded(
    sensitive_checkpoint, tiny_validation, tmp_path
):
    import datetime
    import decimal
    import json

    import pyarrow.parquet as pq

    from distilq.pipelines.quantize import quantize_and_promote
    from distilq.pipelines.score import score_dataset

    registry = tmp_path / "reg"  # per-channel INT8 of the sensitive model: many flips
    assert quantize_and_promote(tiny_config(sensitive_checkpoint, tiny_validation, registry))
    texts = make_texts(120, seed=9)
    start = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
    ids = {
        "at": [start + datetime.timedelta(minutes=i) for i in range(120)],
        "amount": [decimal.Decimal(f"{i}.50") for i in range(120)],
        "raw": [bytes([i, 255]) for i in range(120)],
    }
    data = write_parquet(tmp_path / "in" / "part.parquet", texts, **ids)
    out = tmp_path / "out"
    summary = score_dataset(
        ScoreConfig(
            inputs=[data],
            output=str(out),
            registry=str(registry),
            audit_rate=1.0,
            id_columns=["at", "amount", "raw"],
        )  # fmt: skip
    )
    assert summary.failed == {} and summary.rows_scored == 120
    flipped = json.loads((out / "_manifest.json").read_text())["summary"]["audit"]["flipped"]
    assert flipped, "the sensitive model's INT8 flips some rows"
    first = flipped[0]
    row = next(i for i in range(120) if ids["amount"][i] == decimal.Decimal(first["amount"]))
    assert first["at"] == ids["at"][row].isoformat() and first["raw"] == ids["raw"][row].hex()
    audited = pq.read_table(out / "_audit.parquet")  # the audit's rows keep their types
    assert str(audited.schema.field("at").type).startswith("timestamp")


def test_1_a_shard_whose_audit_rows_were_not_written_is_not_recorded(promoted_registry, tmp_path):
    """The audit file's write fails for one shard: the next shard's save must not record it
    (its audited rows would be counted but missing, and a resume would not redo it)."""
    import json

    import distilq
    from distilq.config.score import ScoreOptions
    from distilq.score.audit import AUDIT_FILE
    from distilq.score.inputs import plan_shards
    from distilq.score.output import MANIFEST, ManifestNotSaved, prepare_output
    from distilq.score.scoring import score_shard

    classifier = distilq.load(promoted_registry)
    a = write_parquet(tmp_path / "a.parquet", make_texts(10, 4))
    b = write_parquet(tmp_path / "b.parquet", make_texts(10, 5))
    options, out = ScoreOptions(), tmp_path / "out"
    plan = plan_shards([a, b], options)
    manifest, todo = prepare_output(str(out), plan, classifier.version, options.model_dump(), False)
    stats = [score_shard(classifier, shard, str(out), options) for shard in todo]
    for shard, s in zip(todo, stats, strict=True):  # each shard audited one row
        s.audit_rows = [{"shard": shard.output, "text_key": shard.output, "fp32_label": "x"}]
    (out / AUDIT_FILE).mkdir()  # its atomic rename now fails: an OSError, as a full disk
    with pytest.raises(ManifestNotSaved, match=AUDIT_FILE):
        manifest.record_shard(todo[0], stats[0])
    (out / AUDIT_FILE).rmdir()
    manifest.record_shard(todo[1], stats[1])
    saved = json.loads((out / MANIFEST).read_text())
    assert list(saved["shards"]) == [todo[1].output]  # a.parquet is redone by a resume
    rows = pq.read_table(out / AUDIT_FILE).to_pylist()
    assert [r["shard"] for r in rows] == [todo[1].output]
    _, again = prepare_output(str(out), plan, classifier.version, options.model_dump(), False)
    assert [s.output for s in again] == [todo[0].output]


@pytest.mark.slow
def test_5_workers_fetching_into_one_cache_at_once_never_read_a_half_written_file(
    s3, tiny_checkpoint, tiny_validation, tmp_path
):
    """Workers of one run share the object-store cache: each must see a file whole or not
    at all, for the version's files and for the FP32 source the audit downloads."""
    from distilq.quantize.checkpoint import resolve_checkpoint

    staging = tmp_path / "staging"
    staging.mkdir()
    manifest = stage_tiny_version(staging, tiny_checkpoint, tiny_validation)
    registry = Registry(f"s3://{BUCKET}/cache-race")
    registry.publish(staging, manifest)
    source = f"s3://{BUCKET}/cache-race-source"
    s3.put(str(tiny_checkpoint), f"{BUCKET}/cache-race-source", recursive=True)
    weights = sha256_file(tiny_checkpoint / "model.safetensors")
    for round_ in range(4):
        cache = tmp_path / f"cache-{round_}"
        fetch = functools.partial(Registry(registry.uri).fetch, manifest.version, cache_dir=cache)
        errors = all_at_once(6, lambda i, fetch=fetch: fetch())
        assert not errors, errors[0]
        found = functools.partial(resolve_checkpoint, source, None, cache)
        errors = all_at_once(6, lambda i, found=found: found().weight_sha256)
        assert not errors, errors[0]
        assert found().weight_sha256["model.safetensors"] == weights


def test_9_regate_draws_scored_data_with_null_and_empty_texts(
    tiny_checkpoint, tiny_validation, tmp_path
):
    """Scored data holds rows scoring left unscored (null, empty, blank): the draw skips and
    counts them, and a regate on every scored input gates each on its own."""
    from distilq.gate.data import load_validation
    from distilq.pipelines.quantize import quantize_and_promote

    texts = make_texts(120, seed=3)
    first = texts[:60] + [None, "", "   "]
    write_parquet(tmp_path / "scored-a" / "part-0.parquet", first)
    write_parquet(tmp_path / "scored-b" / "part-0.parquet", texts[60:] + [None])
    drawn = load_validation(str(tmp_path / "scored-a"), check_accuracy=False, rows=50)
    assert drawn.drawn.rows_read == 63 and drawn.drawn.rows_without_text == 3
    assert len(drawn.texts) == 50 and all(t and t.strip() for t in drawn.texts)

    inputs = [str(tmp_path / "scored-a"), str(tmp_path / "scored-b")]
    config = QuantizeConfig(
        source=str(tiny_checkpoint),
        validation=inputs,
        registry=str(tmp_path / "reg"),
        recipe="dynamic-int8-token",
        min_agreement=0.0,
        no_accuracy_check=True,
    )
    manifest = quantize_and_promote(config).manifest
    sets = {s.name: s for s in manifest.validation.sets}
    assert sets.keys() == set(inputs)
    assert sets[inputs[0]].drawn.rows_without_text == 3
    assert sets[inputs[1]].drawn.rows_without_text == 1
    report = (tmp_path / "reg" / "versions" / manifest.version / "report.md").read_text()
    assert "(3 of them without text)" in report


# -- the MLflow mirror (cases 6, 7, 8, 13), against a real `mlflow server` -----------------


def _versions(registry_dir: Path, staged: tuple[Path, object], count: int) -> list[str]:
    """`count` versions of the same staged files in a new registry, promoted in turn."""
    staging, manifest = staged
    registry = Registry(registry_dir)
    names = []
    for i in range(count):
        version = f"2026010{i}T000000000Z-{registry_dir.name[:8]}"
        made = manifest.model_copy(update={"version": version, "created_at": f"2026-01-0{i + 1}"})
        names.append(registry.publish(staging, made))
        registry.promote(names[-1], "test")
    return names


@pytest.fixture(scope="module")
def staged_version(tmp_path_factory, tiny_checkpoint, tiny_validation):
    staging = tmp_path_factory.mktemp("mirror-staging")
    return staging, stage_tiny_version(staging, tiny_checkpoint, tiny_validation)


def _copies(client, model: str) -> dict[str, list[str]]:
    """MLflow's versions of `model`, by the distilq version each mirrors."""
    found: dict[str, list[str]] = {}
    for mv in client.search_model_versions(f"name = '{model}'"):
        found.setdefault(mv.tags["distilq_version"], []).append(mv.version)
    return found


def _mlflow_production(client, model: str) -> str:
    return client.get_model_version_by_alias(model, "production").tags["distilq_version"]


@pytest.mark.slow
def test_6_two_syncs_at_once_register_each_version_once(mlflow_server, staged_version, tmp_path):
    from mlflow import MlflowClient

    from distilq.integrations.mlflow.mirror import MlflowMirror

    versions = _versions(tmp_path / "reg-twice", staged_version, 2)
    model = "round3-twice"
    errors = all_at_once(
        3, lambda i: MlflowMirror(mlflow_server.uri, model).sync(Registry(tmp_path / "reg-twice"))
    )
    assert not errors, errors[0]
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    assert {v: len(n) for v, n in _copies(client, model).items()} == {v: 1 for v in versions}
    assert _mlflow_production(client, model) == versions[-1]


@pytest.mark.slow
def test_6_a_rollback_during_a_long_sync_is_not_undone(mlflow_server, staged_version, tmp_path):
    """Sync A reads production (v4), registers v2..v4 for a while; meanwhile production is
    rolled back to v1 and followed. A must leave MLflow's alias at v1, not set v4 it read."""
    from mlflow import MlflowClient

    from distilq.integrations.mlflow.mirror import MlflowMirror

    model = "round3-rollback"
    registry = Registry(tmp_path / "reg-rollback")
    v1 = _versions(tmp_path / "reg-rollback", staged_version, 1)[0]
    MlflowMirror(mlflow_server.uri, model).sync(registry)
    staging, manifest = staged_version
    later = []
    for i in (2, 3, 4):
        made = manifest.model_copy(
            update={"version": f"2026020{i}T000000000Z-later", "created_at": f"2026-02-0{i}"}
        )
        later.append(registry.publish(staging, made))
    registry.promote(later[-1], "test")
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    syncing = threading.Thread(target=MlflowMirror(mlflow_server.uri, model).sync, args=(registry,))
    syncing.start()
    wait_until(lambda: later[0] in _copies(client, model), 60, "the long sync's first upload")
    registry.rollback("incident")
    assert registry.alias() == v1
    MlflowMirror(mlflow_server.uri, model).sync(registry, versions=[])  # what rollback runs
    syncing.join()
    assert _mlflow_production(client, model) == v1 == registry.alias()


@pytest.mark.slow
def test_6_a_copy_with_another_manifest_is_not_trusted(mlflow_server, staged_version, tmp_path):
    from mlflow import MlflowClient

    from distilq.integrations.mlflow.mirror import MlflowMirror

    model = "round3-forged"
    registry = Registry(tmp_path / "reg-forged")
    (version,) = _versions(tmp_path / "reg-forged", staged_version, 1)
    MlflowMirror(mlflow_server.uri, model).sync(registry)
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    (number,) = _copies(client, model)[version]
    client.set_model_version_tag(model, number, "manifest_sha256", "0" * 64)  # not this one's
    result = MlflowMirror(mlflow_server.uri, model).sync(registry)
    assert list(result.registered) == [version]  # a faithful copy, registered anew
    assert result.production != number
    mv = client.get_model_version_by_alias(model, "production")
    assert mv.tags["manifest_sha256"] == registry.sealed(version)[1]


@pytest.mark.slow
def test_7_old_and_damaged_versions_are_skipped_and_production_still_followed(
    mlflow_server, staged_version, tmp_path
):
    from mlflow import MlflowClient

    reg = tmp_path / "reg-damaged"
    unsealed, changed, good = _versions(reg, staged_version, 3)
    (reg / "versions" / unsealed / "manifest.sha256").unlink()  # published before sealing
    manifest = reg / "versions" / changed / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"created_at"', '"created_at" ', 1))
    model = "round3-damaged"
    done = run(
        "models", "sync-mlflow", "--registry", str(reg), "--mlflow-tracking-uri",
        mlflow_server.uri, "--mlflow-model", model,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"skipped {unsealed} (published before manifests were sealed" in done.stdout
    assert f"skipped {changed} (" in done.stdout and "manifest" in done.stdout
    assert f"registered {good} as {model} version 1" in done.stdout
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)
    assert _mlflow_production(client, model) == good
    assert set(_copies(client, model)) == {good}


@pytest.mark.slow
def test_13_a_mirrored_registry_is_followed_without_the_flags(
    mlflow_server, staged_version, tiny_checkpoint, tiny_validation, tmp_path
):
    """Mirrored once with the flags (a password in the URI), then a rollback, a gated
    promotion and `models show` without them: MLflow follows, or the line says it is behind."""
    from mlflow import MlflowClient

    from distilq.pipelines.quantize import quantize_and_promote

    reg = tmp_path / "reg-followed"
    first, second = _versions(reg, staged_version, 2)
    model = "round3-followed"
    secret_uri = mlflow_server.uri.replace("http://", "http://alice:s3cret@")
    done = run(
        "models", "sync-mlflow", "--registry", str(reg), "--mlflow-tracking-uri", secret_uri,
        "--mlflow-model", model,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = json.loads((reg / "mirror.json").read_text())
    assert recorded == {"tracking_uri": mlflow_server.uri, "model": model}  # no secrets kept
    client = MlflowClient(mlflow_server.uri, mlflow_server.uri)

    rolled = run("models", "rollback", "--registry", str(reg))
    assert rolled.returncode == 0, rolled.stderr[-2000:]
    assert f"{model}@production: version 2 -> 1" in rolled.stdout
    assert _mlflow_production(client, model) == first == Registry(reg).alias()
    shown = run("models", "show", "--registry", str(reg))
    assert f"MLflow: {model}@production (MLflow version 1) is {first}, as distilq's" in shown.stdout

    client.set_registered_model_alias(model, "production", "2")  # someone moved MLflow's
    shown = run("models", "show", "--registry", str(reg))
    assert f"MLflow mirror behind: {model}@production (MLflow version 2) is {second}" in (
        shown.stdout
    )

    # A gated promotion without the flags registers its version and moves the alias.
    result = quantize_and_promote(tiny_config(tiny_checkpoint, tiny_validation, reg, batch_size=4))
    assert result.promoted and f"{model}@production: version 2 -> 3" in result.mirror
    assert _mlflow_production(client, model) == result.version


class _Proxy(http.server.BaseHTTPRequestHandler):
    """What sits in front of many MLflow servers (an ingress, an auth proxy) answering for
    it: `status` to every API request (0: never answers), 200 on /health."""

    status = 401

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        if self.path.startswith("/health"):
            self._answer(200, b"OK")
        elif self.status == 0:
            time.sleep(30)  # longer than the client's timeout
        else:
            self._answer(self.status, b"<html>refused by the proxy</html>")

    do_POST = do_PATCH = do_DELETE = do_GET

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "exit_code", "words", "transient"),
    [
        (401, 2, "refused mirroring to round3-http (HTTP 401", False),
        (403, 2, "refused mirroring to round3-http (HTTP 403", False),
        (503, 1, "could not serve mirroring to round3-http", True),
        (0, 1, "timeout", True),
    ],
)
def test_8_mlflow_refusals_and_outages_are_told_apart(
    status, exit_code, words, transient, promoted_registry, monkeypatch, tmp_path
):
    from distilq.errors import worth_retrying
    from distilq.integrations.mlflow.mirror import MlflowMirror, resolve_ref

    handler = type("Proxy", (_Proxy,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        registry = Registry(promoted_registry)
        with pytest.raises(Exception) as synced:
            MlflowMirror(uri, "round3-http").sync(registry)
        assert worth_retrying(synced.value) is transient
        assert words in str(synced.value) and "has no" not in str(synced.value)
        with pytest.raises(Exception) as resolved:
            resolve_ref(uri, "mlflow:round3-http@production", registry)
        assert worth_retrying(resolved.value) is transient
        assert "has no" not in str(resolved.value)
        done = run(
            "models", "sync-mlflow", "--registry", str(promoted_registry),
            "--mlflow-tracking-uri", uri, "--mlflow-model", "round3-http",
        )  # fmt: skip
        assert done.returncode == exit_code, done.stderr[-2000:]
        assert words in done.stderr and "Traceback" not in done.stderr
    finally:
        server.shutdown()


# -- case 4: two runs at once on one object-store output ---------------------------------


@pytest.mark.slow
def test_4_a_second_run_on_an_s3_output_is_stopped_before_it_touches_anything(
    s3, promoted_registry, tmp_path
):
    """On main, a second run's --overwrite removed the first run's files and rewrote
    _audit.parquet before its conditional manifest write could notice the first run."""
    import json as json_

    from distilq.pipelines.score import score_dataset
    from distilq.score.output import LOCK, output_lock

    data = tmp_path / "data"
    for i in range(2):
        write_parquet(data / f"part-{i}.parquet", make_texts(40, seed=80 + i))
    output = f"s3://{BUCKET}/two-runs"

    def config(**fields) -> ScoreConfig:
        return ScoreConfig(
            inputs=[str(data)], output=output, registry=str(promoted_registry),
            audit_rate=0.5, **fields,
        )  # fmt: skip

    first = score_dataset(config())
    assert first.rows_written == 80 and not s3.exists(f"{BUCKET}/two-runs/{LOCK}")
    before = {k: s3.cat_file(k) for k in s3.find(f"{BUCKET}/two-runs")}
    with output_lock(output):  # a run writing there now (it holds the lease)
        lease = json_.loads(s3.cat_file(f"{BUCKET}/two-runs/{LOCK}"))
        with pytest.raises(InputError, match="being written by another distilq run"):
            score_dataset(config(overwrite=True, batch_size=8))
    assert {k: s3.cat_file(k) for k in s3.find(f"{BUCKET}/two-runs")} == before  # untouched
    assert not s3.exists(f"{BUCKET}/two-runs/{LOCK}")  # released by its holder

    # A run killed while holding the lease: the next one takes it over once it is stale.
    s3.pipe_file(f"{BUCKET}/two-runs/{LOCK}", json_.dumps({**lease, "renewed_at": 0}).encode())
    again = score_dataset(config(overwrite=True, batch_size=8))
    assert again.rows_written == 80 and again.files_scored == 2
    assert not s3.exists(f"{BUCKET}/two-runs/{LOCK}")
    # A live lease of another run: refused however old the output is.
    s3.pipe_file(
        f"{BUCKET}/two-runs/{LOCK}", json_.dumps({**lease, "renewed_at": time.time()}).encode()
    )
    with pytest.raises(InputError, match="being written by another distilq run"):
        score_dataset(config())


def test_4_object_stores_without_conditional_writes_are_refused_for_writing(
    promoted_registry, tmp_path
):
    """gs://, az:// and the like (here memory://, the same branch): a plain overwrite and a
    lock that always succeeds would lose a concurrent run's updates unseen."""
    from distilq.pipelines.score import score_dataset
    from distilq.storage.store import Store

    data = write_parquet(tmp_path / "data" / "part.parquet", make_texts(10))
    with pytest.raises(InputError, match=r"is on memory://, where distilq has no lock"):
        score_dataset(
            ScoreConfig(inputs=[data], output="memory://out", registry=str(promoted_registry))
        )
    with pytest.raises(InputError, match=r"memory://reg .*no conditional write"):
        Registry("memory://reg").check_writable()
    with pytest.raises(InputError, match=r"--registry memory://reg is on memory://"):
        score_dataset(
            ScoreConfig(inputs=[data], output=str(tmp_path / "o"), registry="memory://reg")
        )
    with pytest.raises(InputError, match="no conditional write"):
        Store("memory://cas").write_if_unchanged("pointer.json", b"1", None)
