"""The MLflow mirror, against a real `mlflow server` on loopback (SQLite backend store,
artifacts on local disk, served through the server): what a gated promotion, a rejection,
a rollback and an unreachable server leave in MLflow, and what MLflow gives back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distilq.config.quantize import QuantizeConfig
from distilq.config.score import ScoreConfig
from distilq.config.shared import MLFLOW_MISSING
from distilq.registry.registry import Registry
from tests.conftest import (
    make_texts,
    quantize,
    run,
    tiny_config,
    write_parquet,
)

NAME = "sst2-int8"


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


@pytest.fixture(scope="module")
def client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


@pytest.fixture(scope="module")
def mirrored(server, tmp_path_factory, tiny_checkpoint, sensitive_checkpoint, tiny_validation):
    """A registry whose first version was gated, promoted and mirrored by `distilq quantize`
    with the MLflow flags, and whose second was rejected (mirrored by the library run)."""
    from distilq.errors import GateRejected
    from distilq.pipelines.quantize import quantize_and_promote

    root = tmp_path_factory.mktemp("mirrored")
    registry = root / "reg"
    gate = ["--recipe", "dynamic-int8-token", "--min-agreement", "0", "--max-accuracy-drop", "1"]
    mlflow_flags = ["--mlflow-tracking-uri", server.uri, "--mlflow-model", NAME]
    done = run(*quantize(tiny_checkpoint, tiny_validation, registry, *gate, *mlflow_flags))
    assert done.returncode == 0, done.stderr
    rejected = tiny_config(
        sensitive_checkpoint, tiny_validation, registry, min_agreement=0.95,
        mlflow_tracking_uri=server.uri, mlflow_model=NAME,
    )  # fmt: skip
    with pytest.raises(GateRejected) as e:
        quantize_and_promote(rejected)
    versions = Registry(registry).versions()
    assert versions[1] == e.value.manifest.version
    return registry, versions, done.stdout


@pytest.mark.slow
def test_gated_promotion_registers_a_tagged_version_and_moves_production(mirrored, server, client):
    import mlflow

    registry_dir, (approved, rejected), stdout = mirrored
    registry = Registry(registry_dir)
    assert f"MLflow: registered {approved} as {NAME} version 1; {NAME}@production" in stdout
    by_tag = {
        mv.tags["distilq_version"]: mv for mv in client.search_model_versions(f"name='{NAME}'")
    }
    assert set(by_tag) == {approved, rejected}
    manifest = registry.manifest(approved)
    _, seal = registry.sealed(approved)
    assert by_tag[approved].tags == {
        "distilq_version": approved,
        "approved": "true",
        "recipe": manifest.recipe.name,
        "platform_key": manifest.platform.key,
        "registry": str(registry_dir),
        "manifest_sha256": seal,
    }
    assert by_tag[rejected].tags["approved"] == "false"
    # production: the approved one only (the rejected one is registered without it)
    assert client.get_model_version_by_alias(NAME, "production").version == "1"
    assert by_tag[rejected].aliases == []

    # The run: named as the Prefect run, the gate's params and metrics, the report.
    mlflow_run = client.get_run(by_tag[approved].run_id)
    assert mlflow_run.info.run_name == f"quantize {manifest.source.id} {manifest.recipe.name}"
    assert mlflow_run.info.status == "FINISHED"
    params, metrics = mlflow_run.data.params, mlflow_run.data.metrics
    assert params["source"] == manifest.source.id and params["revision"] == manifest.source.revision
    assert float(params["min_agreement"]) == manifest.decision.thresholds.min_agreement
    assert params["validation.val.tsv"] == manifest.validation.sets[0].name
    m = manifest.metrics
    assert metrics["agreement"] == pytest.approx(m.agreement)
    assert metrics["agreement_lower_bound/val.tsv"] == pytest.approx(
        m.sets[0].agreement_lower_bound
    )
    assert metrics["accuracy_int8"] == pytest.approx(m.accuracy_int8)
    assert metrics["size_bytes_int8"] == m.size_bytes_int8 > 0
    assert metrics["rows_per_second_int8"] == pytest.approx(m.rows_per_second_int8)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"report.md", "report.png", "manifest.json"} <= artifacts
    # The model: an MLflow logged model of that run, the gate's metrics linked to it.
    source = client.get_model_version(NAME, "1").source  # models:/<logged model id>
    model = client.get_logged_model(source.removeprefix("models:/"))
    assert model.source_run_id == mlflow_run.info.run_id and model.status == "READY"
    assert model.name == approved and model.params == params
    assert {m.key for m in model.metrics} == set(metrics)
    location = model.artifact_location
    files = Path(mlflow.artifacts.download_artifacts(location, tracking_uri=server.uri))
    pins = (files / "requirements.txt").read_text().split()
    assert {p.split("==")[0] for p in pins} >= {"distilq", "torch", "transformers", "mlflow"}
    assert all("==" in p for p in pins)


@pytest.mark.slow
def test_pyfunc_scores_as_distilq_score_and_a_tampered_copy_is_refused(
    mirrored, server, monkeypatch, tmp_path
):
    import mlflow
    import pandas as pd

    registry_dir, (approved, rejected), _ = mirrored
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    texts = [*make_texts(300, seed=3), "", None]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    predicted = model.predict(pd.DataFrame({"text": texts}), params={"probabilities": True})

    data = write_parquet(tmp_path / "in" / "part.parquet", texts)
    done = run(
        "score", "--input", data, "--output", str(tmp_path / "out"), "--registry",
        str(registry_dir), "--model", f"mlflow:{NAME}@production", "--mlflow-tracking-uri",
        server.uri, "--probabilities", "--audit-rate", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scored = pq.read_table(tmp_path / "out" / "part.parquet").to_pandas()

    def values(column) -> list:
        return [None if pd.isna(v) else v for v in column]

    assert values(predicted["label"]) == values(scored["label"])
    assert values(predicted["error"]) == values(scored["error"])[:300] + [
        "text is empty",
        "text is null",
    ]
    valid = scored["error"].isna()
    assert valid.sum() == 300
    for column in ("score", "prob_NEGATIVE", "prob_POSITIVE"):
        # the same batches; a process's thread count may move the last bits only
        assert np.allclose(predicted[column][valid], scored[column][valid], rtol=0, atol=1e-6)
    assert set(predicted["model_version"]) == {approved}
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["model_version"] == approved

    # On another platform (torch's kernels without vector code) the load self-checks first.
    load = (
        f"import mlflow; model = mlflow.pyfunc.load_model('models:/{NAME}@production'); "
        "print(model.unwrap_python_model().classifier.attestation)"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    other = subprocess.run(
        [sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300
    )
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.splitlines()[-1].startswith("self-check passed on platform x86_64-default-")

    # The rejected version's weights changed in MLflow's artifact store: refused on load.
    by_number = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert by_number.tags["distilq_version"] == rejected
    model_id = by_number.source.removeprefix("models:/")
    weights = next(server.artifacts.glob(f"**/{model_id}/**/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(Exception, match=r"model\.safetensors: sha256 .* refusing to load it"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/2")


@pytest.mark.slow
def test_rollback_follows_and_an_unreachable_mlflow_holds_nothing_back(
    mirrored, server, client, tiny_checkpoint, tiny_validation, tmp_path
):
    from distilq.pipelines.quantize import quantize_and_promote

    registry_dir, (approved, _), _ = mirrored
    registry = Registry(registry_dir)
    flags = ["--registry", str(registry_dir), "--mlflow-tracking-uri", server.uri]
    flags += ["--mlflow-model", NAME]

    def production() -> str:
        return client.get_model_version_by_alias(NAME, "production").tags["distilq_version"]

    mirror = {"mlflow_tracking_uri": server.uri, "mlflow_model": NAME}
    newer = quantize_and_promote(
        tiny_config(tiny_checkpoint, tiny_validation, registry_dir, batch_size=16, **mirror)
    )
    assert newer.promoted and newer.mirror.endswith("production: version 1 -> 3")
    assert production() == newer.version
    done = run("models", "rollback", *flags)
    assert done.returncode == 0, done.stderr
    assert registry.alias() == approved == production()

    server.stop()
    try:
        # A gated promotion and a manual one, MLflow down: distilq's registry moves.
        newest = quantize_and_promote(
            tiny_config(tiny_checkpoint, tiny_validation, registry_dir, batch_size=8, **mirror)
        )
        assert newest.promoted and registry.alias() == newest.version
        assert newest.mirror.startswith(f"MLflow mirror behind: MLflow at {server.uri}")
        done = run("models", "promote", newer.version, *flags)
        assert done.returncode == 0, done.stderr
        assert "MLflow mirror behind" in done.stdout and registry.alias() == newer.version
        failed = run("models", "sync-mlflow", *flags)
        assert failed.returncode == 1 and "does not answer" in failed.stderr
    finally:
        server.start()

    synced = run("models", "sync-mlflow", "--json", *flags)
    assert synced.returncode == 0, synced.stderr
    assert json.loads(synced.stdout) == {
        "model": NAME,
        "registered": {newest.version: "4"},
        "alias_moved": ["1", "3"],
        "production": "3",
        "skipped": {},
    }
    assert production() == newer.version == registry.alias()
    again = run("models", "sync-mlflow", "--json", *flags)
    assert (
        json.loads(again.stdout)["registered"] == {}
        and json.loads(again.stdout)["alias_moved"] is None
    )
    numbers = sorted(int(mv.version) for mv in client.search_model_versions(f"name='{NAME}'"))
    assert numbers == [1, 2, 3, 4]  # nothing registered twice, nothing deleted


def test_without_mlflow_the_flags_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    monkeypatch.delenv("DISTILQ_MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match=r"pip install 'distilq\[mlflow\]'"):
        QuantizeConfig(mlflow_tracking_uri="http://127.0.0.1:1", mlflow_model=NAME)
    with pytest.raises(ValueError, match=r"pip install 'distilq\[mlflow\]'"):
        ScoreConfig(
            inputs=["x"], output="y", model=f"mlflow:{NAME}@production",
            mlflow_tracking_uri="http://127.0.0.1:1",
        )  # fmt: skip
    with pytest.raises(ValueError, match="go together"):
        QuantizeConfig(mlflow_model=NAME, mlflow_tracking_uri=None)
    assert "distilq[mlflow]" in MLFLOW_MISSING
    from distilq.errors import InputError
    from distilq.integrations.mlflow.mirror import require_mlflow

    with pytest.raises(InputError, match=r"distilq\[mlflow\]"):
        require_mlflow()


def test_validation_sets_become_keys_mlflow_takes():
    from distilq.integrations.mlflow.logged import set_keys

    names = ["/data/a/val.tsv", "s3://bucket/b/val.tsv", "builtin:sst2-gate", "glue:sst2@dev"]
    assert set_keys(names) == ["val.tsv", "val.tsv-2", "builtin:sst2-gate", "glue:sst2_dev"]
