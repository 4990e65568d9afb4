"""The registry, scoring inputs and outputs on S3: a real S3-compatible server (moto's server
mode) on loopback, reached through the usual AWS environment variables."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distilq
from distilq.config.quantize import QuantizeConfig
from distilq.config.score import ScoreConfig
from distilq.errors import InputError, IntegrityError
from distilq.manifest import OutputRecord
from distilq.registry.registry import Registry
from distilq.score.output import OutputManifest
from distilq.storage.store import Store, WriteConflict, sha256_file
from tests.conftest import (
    BUCKET,
    all_at_once,
    make_texts,
    stage_tiny_version,
)

pytestmark = pytest.mark.slow


def keys(fs, prefix: str) -> list[str]:
    return sorted(p.removeprefix(f"{BUCKET}/") for p in fs.find(f"{BUCKET}/{prefix}"))


@pytest.mark.usefixtures("prefect_harness")
def test_quantize_score_and_load_on_s3(s3, tiny_checkpoint, tiny_validation, tmp_path):
    from flows.quantize_and_promote import quantize_and_promote
    from flows.score_parquet import score_parquet

    registry_uri = f"s3://{BUCKET}/registry"
    s3.put(str(tiny_checkpoint), f"{BUCKET}/checkpoints/tiny", recursive=True)
    result = quantize_and_promote(
        QuantizeConfig(
            source=f"s3://{BUCKET}/checkpoints/tiny",
            validation=str(tiny_validation),
            registry=registry_uri,
            recipe="dynamic-int8-token",
            min_agreement=0.9,
            max_accuracy_drop=1.0,
        )
    )
    assert result.promoted
    version = result.version
    source = result.manifest.source
    assert source.id == f"s3://{BUCKET}/checkpoints/tiny"
    weights = tiny_checkpoint / "model.safetensors"  # identified by its bytes, wherever it is
    assert source.sha256 == {"model.safetensors": sha256_file(weights)}
    registry = Registry(registry_uri)
    assert registry.alias() == version and registry.versions() == [version]
    assert f"registry/versions/{version}/manifest.json" in keys(s3, "registry")
    assert [e["to"] for e in registry.history()] == [version]

    # Loading `production` from S3 checks every file against the manifest's sha256.
    classifier = distilq.load(registry_uri, cache_dir=tmp_path / "cache")
    assert classifier.version == version
    assert [p["label"] for p in classifier.predict(["good fun", "awful dull"])]

    local = tmp_path / "data"
    local.mkdir()
    for i in range(2):
        table = pa.table({"id": list(range(50)), "text": make_texts(50, seed=60 + i)})
        pq.write_table(table, local / f"part-{i}.parquet")
        s3.put_file(str(local / f"part-{i}.parquet"), f"{BUCKET}/data/part-{i}.parquet")

    def score(inputs: str, output: str) -> dict:
        config = ScoreConfig(inputs=[inputs], output=output, registry=registry_uri, audit_rate=0.2)
        return score_parquet(config).model_dump()

    summary = score(f"s3://{BUCKET}/data/", f"s3://{BUCKET}/scored")
    assert summary["files"] == 2 and summary["rows_written"] == 100 and not summary["failed"]
    assert keys(s3, "scored") == [
        "scored/_audit.parquet",
        "scored/_manifest.json",
        "scored/part-0.parquet",
        "scored/part-1.parquet",
    ]
    # Audited against the version's source on S3, hashes checked; recorded in the registry.
    assert summary["audit"]["rows"] > 5 and source.id in summary["audit"]["reference"]
    (audited,) = registry.audits(version)
    assert audited.run_rows == summary["audit"]["rows"]
    manifest = json.loads(s3.cat_file(f"{BUCKET}/scored/_manifest.json"))
    assert manifest["model_version"] == version
    for entry in manifest["shards"].values():  # inputs are recognised by their ETag
        assert entry["identity"]["version"] == s3.info(entry["input"])["ETag"]

    # Same files as scoring local copies into a local directory.
    score(str(local), str(tmp_path / "scored"))
    for name in ("part-0.parquet", "part-1.parquet"):
        assert s3.cat_file(f"{BUCKET}/scored/{name}") == (tmp_path / "scored" / name).read_bytes()

    # A re-run resumes: nothing left to do, nothing rewritten.
    before = {k: s3.info(f"{BUCKET}/{k}")["ETag"] for k in keys(s3, "scored") if "part" in k}
    assert score(f"s3://{BUCKET}/data/", f"s3://{BUCKET}/scored")["rows_written"] == 100
    assert before == {k: s3.info(f"{BUCKET}/{k}")["ETag"] for k in before}

    # A weight file changed on the store is refused at load, however it got there.
    stored = next(k for k in keys(s3, f"registry/versions/{version}") if k.endswith(".safetensors"))
    s3.pipe_file(f"{BUCKET}/{stored}", b"not the weights")
    with pytest.raises(IntegrityError, match="sha256"):
        distilq.load(registry_uri, cache_dir=tmp_path / "fresh-cache")


def test_conditional_writes_refuse_a_stale_writer(s3):
    store = Store(f"s3://{BUCKET}/cas")
    _, token = store.read_for_update("pointer.json")
    assert token is None
    first = store.write_if_unchanged("pointer.json", b"1", token)
    with pytest.raises(WriteConflict):  # it exists now: a create is refused
        store.write_if_unchanged("pointer.json", b"2", None)
    store.write_if_unchanged("pointer.json", b"3", first)
    with pytest.raises(WriteConflict):  # `first` is stale
        store.write_if_unchanged("pointer.json", b"4", first)
    assert s3.cat_file(f"{BUCKET}/cas/pointer.json") == b"3"


def test_racing_promotions_on_s3_keep_a_consistent_alias_and_history(
    s3, tiny_checkpoint, tiny_validation, tmp_path
):
    registry = Registry(f"s3://{BUCKET}/race")
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = stage_tiny_version(staging, tiny_checkpoint, tiny_validation)
    versions = []
    for i in range(6):  # the same files as six versions, each created after the last
        manifest = staged.model_copy(
            update={"version": f"2026010{i}T000000000Z-race", "created_at": f"2026-01-0{i + 1}"}
        )
        versions.append(registry.publish(staging, manifest))

    newest_first = versions[::-1]
    errors = all_at_once(
        len(versions),
        lambda i: Registry(registry.uri).promote(newest_first[i], "race", newer_only=True),
    )
    assert not errors
    assert registry.alias() == versions[-1]  # automatic promotion never moves backwards
    history = registry.history()
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    assert history[0]["from"] is None and history[-1]["to"] == versions[-1]
    for before, after in zip(history, history[1:], strict=False):
        assert after["from"] == before["to"]  # no move was lost or based on a stale read


def test_a_second_writer_of_an_s3_output_is_stopped(s3):
    output = f"s3://{BUCKET}/shared-output"
    first, second = OutputManifest(output), OutputManifest(output)
    first.load()
    first.record = OutputRecord(model_version="a", settings={})
    first.save()
    second.load()
    second.record.model_version = "b"
    second.save()
    with pytest.raises(InputError, match="another run changed _manifest.json"):
        first.save()
    assert json.loads(s3.cat_file(f"{BUCKET}/shared-output/_manifest.json"))["model_version"] == "b"
