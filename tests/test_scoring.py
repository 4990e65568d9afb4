"""Library-level Parquet scoring: outputs, bad input, sharding, resume rules, locking."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distilq
from distilq.config.score import ScoreConfig, ScoreOptions
from distilq.errors import InputError
from distilq.pipelines.score import score_dataset
from distilq.registry.registry import Registry
from distilq.score.audit import AUDIT_FILE
from distilq.score.inputs import plan_shards
from distilq.score.output import MANIFEST, OutputManifest, output_lock, prepare_output
from distilq.score.scoring import score_shard
from tests.conftest import make_texts, stage_tiny_version, write_parquet


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_checkpoint, tiny_validation):
    root = tmp_path_factory.mktemp("score-reg")
    staging = root / "staging"
    staging.mkdir()
    registry = Registry(root / "reg")
    version = registry.publish(
        staging, stage_tiny_version(staging, tiny_checkpoint, tiny_validation)
    )
    registry.promote(version, "test")
    loaded = distilq.load(root / "reg")
    loaded.registry_dir = str(root / "reg")  # for run_all
    return loaded


def run_all(classifier, inputs, out, options, overwrite=False):
    """The library pipeline `score_dataset` with these options; its plan and manifest."""
    config = ScoreConfig(
        inputs=[str(i) for i in inputs],
        output=str(out),
        registry=classifier.registry_dir,
        model=classifier.version,
        overwrite=overwrite,
        **options.model_dump(exclude_unset=True),
    )
    score_dataset(config)
    manifest = OutputManifest(str(out))
    manifest.load()
    return plan_shards(config.inputs, options), manifest


def test_scores_keep_rows_columns_and_order(classifier, tmp_path):
    texts = make_texts(150, seed=21)
    src = write_parquet(
        tmp_path / "in" / "reviews.parquet", texts, stars=[i % 5 for i in range(150)]
    )
    options = ScoreOptions(window_batches=2, probabilities=True)
    _, manifest = run_all(classifier, [src], tmp_path / "out", options)
    out = pq.read_table(tmp_path / "out" / "reviews.parquet")
    assert out.column_names == [
        "id",
        "stars",
        "label",
        "score",
        "prob_NEGATIVE",
        "prob_POSITIVE",
        "model_version",
        "error",
    ]
    assert out.column("id").to_pylist() == list(range(150))  # order kept across windows
    assert out.schema.field("score").type == pa.float32()
    probs = np.stack(
        [out.column("prob_NEGATIVE").to_numpy(), out.column("prob_POSITIVE").to_numpy()], 1
    )
    # Exactly what the classifier gives window by window (2 batches of 32 = 64 rows).
    expected = np.concatenate(
        [classifier.predict_proba(texts[w : w + 64]) for w in range(0, 150, 64)]
    )
    assert np.array_equal(probs, expected)
    assert out.column("label").to_pylist() == [classifier.id2label[i] for i in expected.argmax(1)]
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(out.column("score").to_numpy(), probs.max(1))
    assert set(out.column("model_version").to_pylist()) == {classifier.version}
    assert out.column("error").null_count == 150
    summary = manifest.record.summary
    assert summary.rows_read == summary.rows_written == 150 and summary.rows_error == 0
    assert sum(summary.labels.values()) == 150
    audited = [AUDIT_FILE] if summary.audit.rows else []
    listed = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert listed == [*audited, MANIFEST, "reviews.parquet"]


def test_bad_texts_are_kept_and_flagged(classifier, tmp_path):
    texts = ["a good movie", None, "", "   \t", "the worst plot " * 200, "ünïcödé 🎬 film"]
    src = write_parquet(tmp_path / "in.parquet", texts)
    options = ScoreOptions(max_length=64, id_columns=["id"], keep_text=True)
    _, manifest = run_all(classifier, [src], tmp_path / "out", options)
    out = pq.read_table(tmp_path / "out" / "in.parquet").to_pylist()
    assert [r["text"] for r in out] == texts and [r["id"] for r in out] == list(range(6))
    assert [r["error"] for r in out] == [
        None,
        "text is null",
        "text is empty",
        "text is only whitespace",
        None,
        None,
    ]
    assert [r["label"] is None for r in out] == [False, True, True, True, False, False]
    assert [r["score"] is None for r in out] == [False, True, True, True, False, False]
    stats = manifest.record.shards["in.parquet"]
    assert stats.rows_error == 3 and stats.rows_truncated == 1


def test_non_string_text_column_flags_every_row(classifier, tmp_path):
    src = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), src)
    run_all(classifier, [str(src)], tmp_path / "out", ScoreOptions())
    out = pq.read_table(tmp_path / "out" / "nums.parquet")
    assert out.column("error").to_pylist() == ["text is int, not a string"] * 3


def test_missing_columns_and_paths_fail_before_scoring(tmp_path):
    src = write_parquet(tmp_path / "a.parquet", ["x"])
    with pytest.raises(InputError, match="has no text column 'review'; columns: id, text"):
        plan_shards([src], ScoreOptions(text_column="review"))
    with pytest.raises(InputError, match="no id column\\(s\\) user"):
        plan_shards([src], ScoreOptions(id_columns=["user"]))
    with pytest.raises(InputError, match="does not exist"):
        plan_shards([str(tmp_path / "nope.parquet")], ScoreOptions())
    with pytest.raises(InputError, match="matches no file"):
        plan_shards([str(tmp_path / "*.csv")], ScoreOptions())
    write_parquet(tmp_path / "b.parquet", ["x"], label=["y"])
    with pytest.raises(InputError, match="column\\(s\\) label would be overwritten"):
        plan_shards([str(tmp_path / "b.parquet")], ScoreOptions())


def test_directories_globs_partitions_and_unreadable_files(classifier, tmp_path):
    root = tmp_path / "data"
    write_parquet(root / "day=mon" / "part-0.parquet", make_texts(5, 1))
    write_parquet(root / "day=tue" / "part-0.parquet", make_texts(7, 2))
    (root / "_SUCCESS").write_text("")
    (root / "day=tue" / "broken.parquet").write_bytes(b"PAR1 not really")
    plan = plan_shards([str(root)], ScoreOptions())
    assert [s.output for s in plan.shards] == ["day=mon__part-0.parquet", "day=tue__part-0.parquet"]
    assert list(plan.unreadable) == [str(root / "day=tue" / "broken.parquet")]
    assert "not a readable Parquet file" in next(iter(plan.unreadable.values()))
    globbed = plan_shards([str(root / "day=*" / "part-*.parquet")], ScoreOptions())
    assert [s.output for s in globbed.shards] == [s.output for s in plan.shards]
    run_all(classifier, [str(root / "day=*" / "part-*.parquet")], tmp_path / "out", ScoreOptions())
    out = pq.read_table(tmp_path / "out" / "day=tue__part-0.parquet")
    assert out.column("day").to_pylist() == ["tue"] * 7


def test_large_files_split_by_row_group(classifier, tmp_path):
    src = write_parquet(tmp_path / "big.parquet", make_texts(100, 3), row_group_size=20)
    options = ScoreOptions(shard_rows=45)
    plan, _ = run_all(classifier, [src], tmp_path / "out", options)
    assert [s.output for s in plan.shards] == [
        "big.rg00000-00001.parquet",
        "big.rg00002-00003.parquet",
        "big.rg00004-00004.parquet",
    ]
    ids = [
        i
        for s in plan.shards
        for i in pq.read_table(tmp_path / "out" / s.output).column("id").to_pylist()
    ]
    assert ids == list(range(100))


def test_resume_skips_done_shards_and_refuses_foreign_outputs(classifier, tmp_path):
    a = write_parquet(tmp_path / "a.parquet", make_texts(10, 4))
    b = write_parquet(tmp_path / "b.parquet", make_texts(10, 5))
    options = ScoreOptions()
    plan = plan_shards([a, b], options)
    manifest, todo = prepare_output(
        str(tmp_path / "out"), plan, classifier.version, options.model_dump(), False
    )
    manifest.record_shard(todo[0], score_shard(classifier, todo[0], str(tmp_path / "out"), options))
    (tmp_path / "out" / ".b.parquet.dead.tmp").write_bytes(b"half")  # a killed run's leftovers
    (tmp_path / "out" / "._manifest.json.x1y2.tmp").write_bytes(b"{")
    _, todo = prepare_output(
        str(tmp_path / "out"), plan, classifier.version, options.model_dump(), False
    )
    assert [s.output for s in todo] == ["b.parquet"]
    assert not (tmp_path / "out" / ".b.parquet.dead.tmp").exists()
    assert not (tmp_path / "out" / "._manifest.json.x1y2.tmp").exists()
    with pytest.raises(InputError, match="holds results of model version .* --overwrite"):
        prepare_output(str(tmp_path / "out"), plan, "another-version", options.model_dump(), False)
    other = plan_shards([b], options)
    with pytest.raises(InputError, match="a.parquet comes from another input"):
        prepare_output(
            str(tmp_path / "out"), other, classifier.version, options.model_dump(), False
        )
    changed = ScoreOptions(max_length=128).model_dump()
    with pytest.raises(InputError, match="other settings"):
        prepare_output(str(tmp_path / "out"), plan, classifier.version, changed, False)
    manifest, todo = prepare_output(str(tmp_path / "out"), other, "v2", options.model_dump(), True)
    assert [s.output for s in todo] == ["b.parquet"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [MANIFEST]  # old results gone
    json.dumps(manifest.record.model_dump())


def test_a_second_writer_is_refused(tmp_path):
    with output_lock(str(tmp_path / "out")):
        with pytest.raises(InputError, match="being written by another distilq run"):
            with output_lock(str(tmp_path / "out")):
                pass
    with output_lock(str(tmp_path / "out")):
        pass  # released


def test_a_failed_shard_stays_failed_when_a_sibling_succeeds(classifier, tmp_path):
    src = write_parquet(tmp_path / "big.parquet", make_texts(60, 3), row_group_size=20)
    options = ScoreOptions(shard_rows=20)
    plan = plan_shards([src], options)
    manifest, todo = prepare_output(
        str(tmp_path / "out"), plan, classifier.version, options.model_dump(), False
    )
    manifest.record_failure(todo[0].name, "disk on fire")
    manifest.record_shard(todo[1], score_shard(classifier, todo[1], str(tmp_path / "out"), options))
    assert manifest.record.failed == {f"{src} (row groups 0-0)": "disk on fire"}


def test_a_checked_run_plans_its_inputs_once(classifier, tmp_path, monkeypatch):
    """`distilq score` checks a run (preflight) before its flow starts; the run then takes
    that plan instead of reading every input's footer again."""
    from distilq.pipelines import score

    plans = []

    def counted(*args, **kwargs):  # the real planner, counted
        plans.append(args[0])
        return plan_shards(*args, **kwargs)

    monkeypatch.setattr(score, "plan_shards", counted)
    a = write_parquet(tmp_path / "a.parquet", make_texts(10, 4))
    config = ScoreConfig(inputs=[a], output=str(tmp_path / "out"), registry=classifier.registry_dir)
    assert score.preflight(config) == (classifier.version, 1)
    assert score_dataset(config).rows_scored == 10 and len(plans) == 1
    # The handoff is taken once: the next run of the same config plans anew (and resumes).
    assert score_dataset(config).rows_skipped == 10 and len(plans) == 2
