"""The registry: immutable versions, atomic and ordered alias moves, history, hash checks."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil

import fsspec
import pytest

import distilq
from distilq.errors import InputError, IntegrityError
from distilq.gate.decide import decide_manifest
from distilq.registry.registry import Registry
from tests.conftest import make_texts, stage_tiny_version


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_checkpoint, tiny_validation):
    """One real staged version (approved) and its manifest."""
    staging = tmp_path_factory.mktemp("staged")
    return staging, stage_tiny_version(staging, tiny_checkpoint, tiny_validation)


def _variant(staged, version: str, created_at: str, approved: bool = True):
    """The staged version under another name and time (same files); rejected by the gate
    if not `approved` (its metrics say so, and the decision follows from them)."""
    staging, manifest = staged
    manifest = manifest.model_copy(deep=True, update={"version": version, "created_at": created_at})
    if not approved:
        manifest.decision.thresholds = manifest.decision.thresholds.model_copy(
            update={"min_agreement": 0.5}
        )
        manifest.metrics.agreement = 0.0
        for part in manifest.metrics.sets:
            part.agreement, part.flips = 0.0, part.n_examples
    manifest.decision = decide_manifest(manifest)
    assert manifest.decision.approved is approved
    return staging, manifest


def test_publish_then_load_production(staged, tmp_path):
    registry = Registry(tmp_path / "reg")
    staging, manifest = staged
    version = registry.publish(staging, manifest)
    assert registry.versions() == [version]
    assert registry.promote(version, "gate passed")["to"] == version
    classifier = distilq.load(tmp_path / "reg")
    assert classifier.version == version
    results = classifier.predict(make_texts(3, seed=1))
    assert [set(r) for r in results] == [{"label", "score", "probabilities", "error"}] * 3
    for r in results:
        assert r["label"] in ("NEGATIVE", "POSITIVE") and r["error"] is None
        assert r["score"] == max(r["probabilities"].values())
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
    with pytest.raises(TypeError, match="sequence of texts"):
        classifier.predict("one text")


def test_versions_are_immutable(staged, tmp_path):
    registry = Registry(tmp_path / "reg")
    registry.publish(*staged)
    with pytest.raises(InputError, match="exists and is immutable"):
        registry.publish(*staged)


def test_a_version_without_its_manifest_does_not_exist(staged, tmp_path):
    registry = Registry(tmp_path / "reg")
    staging, manifest = staged
    # A publish killed before its last write: every file but the manifest.
    shutil.copytree(staging, tmp_path / "reg" / "versions" / manifest.version)
    assert registry.versions() == []
    with pytest.raises(InputError, match="no version or alias"):
        registry.resolve(manifest.version)


def test_tampered_file_is_refused_before_loading(staged, tmp_path):
    registry = Registry(tmp_path / "reg")
    version = registry.publish(*staged)
    registry.promote(version, "gate passed")
    weights = tmp_path / "reg" / "versions" / version / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors: sha256 .* refusing to load"):
        distilq.load(tmp_path / "reg")


def test_rejected_versions_need_force_and_it_is_recorded(staged, tmp_path):
    registry = Registry(tmp_path / "reg")
    version = registry.publish(
        *_variant(staged, "20260101T000000Z-rejected", "2026-01-01T00:00:00", False)
    )
    with pytest.raises(InputError, match="rejected by the gate .* use --force"):
        registry.promote(version, "manual")
    assert registry.alias() is None
    entry = registry.promote(version, "manual", force=True)
    assert "forced over a rejected gate" in entry["reason"]
    assert registry.history()[-1]["reason"] == entry["reason"]


def test_promote_and_rollback_walk_the_history(staged, tmp_path):
    registry = Registry(tmp_path / "reg")
    a = registry.publish(*_variant(staged, "20260101T000000Z-aaaaaaaa", "2026-01-01T00:00:00"))
    b = registry.publish(*_variant(staged, "20260102T000000Z-bbbbbbbb", "2026-01-02T00:00:00"))
    c = registry.publish(*_variant(staged, "20260103T000000Z-cccccccc", "2026-01-03T00:00:00"))
    for v in (a, b, c):
        registry.promote(v, "gate passed", command="test")
    assert registry.rollback(command="test")["to"] == b
    assert registry.rollback(command="test")["to"] == a
    assert registry.alias() == a
    with pytest.raises(InputError, match="no earlier production version"):
        registry.rollback()
    history = registry.history()
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("promote", None, a),
        ("promote", a, b),
        ("promote", b, c),
        ("rollback", c, b),
        ("rollback", b, a),
    ]
    assert all(h["command"] == "test" and h["at"] for h in history)


def test_automatic_promotion_never_moves_back_to_an_older_version(staged, tmp_path):
    registry = Registry(tmp_path / "reg")
    old = registry.publish(*_variant(staged, "20260101T000000Z-aaaaaaaa", "2026-01-01T00:00:00"))
    new = registry.publish(*_variant(staged, "20260102T000000Z-bbbbbbbb", "2026-01-02T00:00:00"))
    registry.promote(new, "gate passed", newer_only=True)
    assert registry.promote(old, "gate passed", newer_only=True) is None
    assert registry.alias() == new


def _publish_and_promote(root: str, staging: str, manifest: dict, barrier) -> None:
    registry = Registry(root)
    registry.publish(staging, manifest)
    barrier.wait()  # every process moves the alias at the same moment
    registry.promote(manifest.version, "gate passed", command="race", newer_only=True)


def test_concurrent_publishes_leave_production_on_the_newest(staged, tmp_path):
    n = 6
    variants = [
        _variant(staged, f"2026010{i}T000000Z-{i:08d}", f"2026-01-0{i}T00:00:00")
        for i in range(1, n + 1)
    ]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    procs = [
        ctx.Process(target=_publish_and_promote, args=(str(tmp_path / "reg"), str(s), m, barrier))
        for s, m in reversed(variants)  # the oldest starts last
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    registry = Registry(tmp_path / "reg")
    assert registry.alias() == variants[-1][1].version
    assert len(registry.versions()) == n
    moves = registry.history()
    assert moves and all(h["to"] > (h["from"] or "") for h in moves)  # only ever forward
    json.loads((tmp_path / "reg" / "aliases" / "production.json").read_text())


def test_object_store_registry_downloads_and_verifies(staged, tmp_path):
    staging, manifest = staged
    local = Registry(tmp_path / "made-here")  # memory:// has no conditional writes: read-only
    version = local.publish(staging, manifest)
    local.promote(version, "gate passed", command="test")
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "made-here"), "/reg-test", recursive=True)
    classifier = distilq.load("memory://reg-test", cache_dir=tmp_path / "cache")
    assert classifier.version == version
    assert (tmp_path / "cache" / version / "model" / "model.safetensors").is_file()
    fs.pipe_file(f"/reg-test/versions/{version}/model/config.json", b"{}")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(IntegrityError, match="config.json: sha256"):
        distilq.load("memory://reg-test", cache_dir=tmp_path / "cache")


def test_manifest_has_the_contracted_fields(staged):
    m = staged[1].dump()  # as written to manifest.json
    assert m["schema_version"] == 2
    for key in (
        "version",
        "source",
        "recipe",
        "metrics",
        "decision",
        "files",
        "created_at",
        "software",
    ):
        assert key in m
    assert set(m["source"]) >= {"id", "revision", "sha256"}
    assert set(m["recipe"]) >= {"name", "fp32_layers", "batching"}
    assert set(m["metrics"]) >= {
        "agreement",
        "accuracy_fp32",
        "accuracy_int8",
        "n_examples",
        "size_bytes_fp32",
        "size_bytes_int8",
        "flips",
        "flipped",
    }
    assert set(m["decision"]) == {"approved", "reasons", "thresholds"}
    assert set(m["software"]) == {"torch", "transformers", "distilq"}
    assert set(m["platform"]) >= {"key", "cpu", "features", "torch_cpu_capability", "torch"}
    assert m["platform"]["key"].startswith(m["platform"]["architecture"])
    assert set(m["metrics"]) >= {"confidence", "agreement_lower_bound"}
    model_files = [f for f in m["files"] if f.startswith("model/")]
    weights = [f for f in model_files if f.endswith((".safetensors", ".pt"))]
    assert weights == ["model/model.safetensors"]
    assert "report.md" in m["files"] and "selfcheck.parquet" in m["files"]
    staging = staged[0]
    assert (
        m["files"]["report.md"] == hashlib.sha256((staging / "report.md").read_bytes()).hexdigest()
    )
    # Sizes are bytes on disk of the weights shipped, never a sum of parameters().
    assert (
        m["metrics"]["size_bytes_int8"] == (staging / "model" / "model.safetensors").stat().st_size
    )
