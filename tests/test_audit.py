"""The FP32 audit of scoring runs: which rows it samples, that it agrees with a plain FP32
run of them, what it records (output manifest, `_audit.parquet`, the version's live record)
and the alarm when INT8 disagrees (exit 3, the files kept, a Prefect event)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilq.config.score import ScoreConfig
from distilq.errors import InputError
from distilq.gate import stats
from distilq.manifest import AuditFigures, RunAudit, ShardAudit, ShardRecord
from distilq.pipelines.score import score_dataset
from distilq.registry.registry import Registry
from distilq.score.audit import AuditPlan, apportion, audit_key
from distilq.score.evidence import pooled, verdict
from tests.conftest import (
    DISTILQ,
    cli_env,
    make_checkpoint,
    make_texts,
    run,
    tiny_config,
    wait_until,
)

RATE = 0.3


def by_hand(text: str) -> float:
    """The documented sampling rule, computed here on its own."""
    digest = hashlib.sha256(b"distilq-audit:" + text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def test_the_sample_is_a_hash_of_the_text_at_the_rate():
    texts = make_texts(20_000, seed=3)
    assert [audit_key(t) for t in texts[:50]] == [by_hand(t) for t in texts[:50]]
    share = sum(audit_key(t) < 0.1 for t in set(texts)) / len(set(texts))
    assert share == pytest.approx(0.1, abs=0.01)
    assert apportion(10, [5, 5, 5]) == [4, 3, 3]
    assert apportion(100, [700, 200, 100, 0]) == [70, 20, 10, 0]
    assert sum(apportion(997, [13, 71, 5, 900])) == 997


def plan(threshold: float, reason: str | None = None) -> AuditPlan:
    return AuditPlan(0.01, 0.01, None, None, threshold, 0.95, None, reason, False, "r", "v")


def shard(rows: int, agreeing: int, reason: str | None = None) -> ShardRecord:
    fields = {"rows_read": rows, "rows_written": rows, "rows_error": 0, "rows_truncated": 0}
    return ShardRecord(
        input="x", identity={}, row_groups=None, seconds=0, labels={}, score_sum=0,
        audit=ShardAudit(rows=rows, agreeing=agreeing, reason=reason), **fields,
    )  # fmt: skip


def test_the_verdict_says_what_the_rows_are_evidence_of():
    # 298 agreeing rows cannot certify 0.99 at 95% (299 are needed): no verdict, never a fail.
    few = pooled([shard(298, 200)], plan(0.99))
    assert few.passed is None and few.verdict == "too few rows" and not few.alarm
    assert "too few rows to certify" in few.reason
    assert few.agreement_lower_bound == stats.agreement_lower_bound(200, 298, 0.95)
    # Counts whose answer is known, at bar 0.99 and 95%.
    certified = pooled([shard(1000, 1000)], plan(0.99))
    assert (certified.verdict, certified.passed, certified.alarm) == ("certified", True, False)
    consistent = pooled([shard(439, 436)], plan(0.99))  # 99.32%: bounds 98.24% to 99.81%
    assert consistent.agreement_lower_bound < 0.99 < consistent.agreement_upper_bound
    assert (consistent.verdict, consistent.passed, consistent.alarm) == ("consistent", None, False)
    assert "about 2,672 audited rows would decide at the measured 99.32%" in consistent.reason
    failed = pooled([shard(439, 409)], plan(0.99))  # 30 flips: the upper bound is 95.04%
    # The upper bound of agreement is the lower bound of the flip rate, mirrored.
    mirrored = 1 - stats.agreement_lower_bound(30, 439, 0.95)
    assert failed.agreement_upper_bound == pytest.approx(mirrored, abs=1e-12)
    assert (failed.verdict, failed.passed, failed.alarm) == ("failed", False, True)
    # The strict rule, asked for: anything not certified alarms (too few rows still does not).
    strict = {**plan(0.99).__dict__, "fail_on": "uncertified"}
    assert pooled([shard(439, 436)], AuditPlan(**strict)).alarm
    assert not pooled([shard(298, 200)], AuditPlan(**strict)).alarm
    # Two shards pool: 600 rows, 3 flips.
    both = pooled([shard(300, 299), shard(300, 298)], plan(0.98))
    assert (both.rows, both.agreeing, both.verdict) == (600, 597, "certified")
    assert both.agreement_lower_bound == stats.agreement_lower_bound(597, 600, 0.95)
    # A shard whose FP32 model could not be had is said, the others still count.
    part = pooled([shard(400, 400), shard(0, 0, "gone")], plan(0.99))
    assert part.passed is True and "1 shard(s) not audited: gone" in part.reason
    off = pooled([], plan(0.99, "--audit-rate 0"))
    assert off.passed is None and off.rows == 0 and off.reason == "not audited: --audit-rate 0"


def test_a_text_is_counted_once_in_an_output_whatever_its_copies():
    def keyed(texts: dict[str, bool], copies: int) -> ShardRecord:
        record = shard(len(texts), sum(texts.values()))
        record.audit.texts, record.audit.copies = texts, copies
        return record

    # One text in both shards (and twice more within the first): one row of evidence.
    audit = pooled([keyed({"a": True, "b": True}, 2), keyed({"a": True, "c": False}, 0)], plan(0.5))
    assert (audit.rows, audit.agreeing, audit.copies) == (3, 2, 3)
    # A text that flipped in any shard counts as flipped.
    audit = pooled([keyed({"a": True}, 0), keyed({"a": False}, 0)], plan(0.5))
    assert (audit.rows, audit.agreeing) == (1, 0)


def fp32_by_hand(checkpoint: Path, texts: list[str], max_length: int) -> list[tuple[str, float]]:
    """Label and score of each text by plain transformers FP32, one text at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            probs = model(**enc).logits.softmax(-1)[0]
            best = int(probs.argmax())
            out.append((model.config.id2label[best], float(probs[best])))
    return out


@pytest.fixture(scope="module")
def scored(promoted_registry, tmp_path_factory):
    """Two files (one with a null and an empty text) scored with a 30% audit, by the
    library pipeline alone."""
    root = tmp_path_factory.mktemp("audited")
    texts = {"a.parquet": make_texts(300, seed=11), "b.parquet": make_texts(200, seed=12)}
    texts["a.parquet"][5], texts["a.parquet"][6] = None, ""
    (root / "in").mkdir()
    for name, column in texts.items():
        table = pa.table({"id": [f"{name}-{i}" for i in range(len(column))], "text": column})
        pq.write_table(table, root / "in" / name)
    config = ScoreConfig(
        inputs=[str(root / "in")], output=str(root / "out"), registry=str(promoted_registry),
        audit_rate=RATE, min_audit_agreement=0.8,
    )  # fmt: skip
    return config, score_dataset(config), texts


def test_the_audit_is_a_plain_fp32_run_of_the_sampled_rows(scored, tiny_checkpoint):
    config, summary, texts = scored
    out = Path(config.output)
    rows = pq.read_table(out / "_audit.parquet").to_pylist()
    expected = [
        (str(Path(config.inputs[0]) / name), i)
        for name in sorted(texts)
        for i, text in enumerate(texts[name])
        if text and by_hand(text) < RATE
    ]
    assert [(r["file"], r["index"]) for r in rows] == expected and len(expected) > 100
    sampled = [texts[Path(f).name][i] for f, i in expected]
    fp32 = fp32_by_hand(tiny_checkpoint, sampled, 64)
    assert [r["fp32_label"] for r in rows] == [label for label, _ in fp32]
    assert [r["fp32_score"] for r in rows] == pytest.approx([s for _, s in fp32], abs=1e-5)
    # INT8's side is the row's score in the output file, as scored with all the others.
    for r in rows:
        row = pq.read_table(out / Path(r["file"]).name).slice(r["index"], 1).to_pylist()[0]
        assert (r["int8_label"], r["int8_score"]) == (row["label"], pytest.approx(row["score"]))
    flips = [r for r in rows if r["fp32_label"] != r["int8_label"]]
    manifest = json.loads((out / "_manifest.json").read_text())
    audit = manifest["audit"]
    assert (audit["rows"], audit["agreeing"]) == (len(rows), len(rows) - len(flips))
    assert audit["agreement_lower_bound"] == stats.agreement_lower_bound(
        audit["agreeing"], audit["rows"], 0.95
    )
    assert audit["agreement_upper_bound"] == pytest.approx(
        1 - stats.agreement_lower_bound(audit["rows"] - audit["agreeing"], audit["rows"], 0.95),
        abs=1e-12,
    )
    assert audit["confidence"] == 0.95 and audit["threshold"] == 0.8
    assert (
        audit["verdict"] == "certified" if audit["agreement_lower_bound"] >= 0.8 else "consistent"
    )
    assert [(f["file"], f["index"], f["int8_label"]) for f in audit["flipped"]] == [
        (r["file"], r["index"], r["int8_label"]) for r in flips
    ]
    assert summary.audit.model_dump() == audit
    said = (
        f"audit: {audit['rows']:,} texts of 500 rows re-run in FP32, {audit['agreeing']:,} agree "
        f"({audit['agreement_lower_bound']:.2%} to {audit['agreement_upper_bound']:.2%} at 95%), "
        f"in {audit['seconds']:.1f} s; {audit['verdict']}: bar 80.00%"
    )
    from distilq.report.render import score_summary_line

    assert said in score_summary_line(summary)


def test_the_version_keeps_a_live_record_of_every_audited_run(scored):
    config, summary, _ = scored
    registry = Registry(config.registry)
    (record,) = [r for r in registry.audits(summary.model_version) if r.output == config.output]
    assert (record.rows, record.run_rows, record.passed) == (
        summary.audit.rows,
        summary.audit.rows,
        summary.audit.passed,
    )
    shown = json.loads(run("models", "show", "--json", "--registry", config.registry).stdout)
    live = shown["live_audit"]
    runs = registry.audits(summary.model_version)
    pooled_texts = {key for r in runs for key in r.texts}  # each distinct text once
    assert live["runs"] == len(runs) and live["rows"] == len(pooled_texts)
    assert live["agreement_lower_bound"] == stats.agreement_lower_bound(
        live["agreeing"], live["rows"], 0.95
    )
    assert live["verdict"] in ("certified", "consistent", "failed")
    listed = json.loads(run("models", "audits", "--json", "--registry", config.registry).stdout)
    assert config.output in [r["output"] for r in listed]


def test_a_rerun_audits_nothing_new_and_pools_what_the_manifest_holds(scored):
    config, summary, _ = scored
    again = score_dataset(config)
    assert again.rows_scored == 0 and again.audit.rows == summary.audit.rows
    assert again.audit.agreeing == summary.audit.agreeing
    runs = [r for r in Registry(config.registry).audits(summary.model_version)]
    assert sum(r.output == config.output for r in runs) == 1  # nothing audited: no record


def test_rate_zero_loads_no_fp32_and_says_not_audited(promoted_registry, tmp_path):
    pq.write_table(pa.table({"text": make_texts(50, seed=2)}), tmp_path / "x.parquet")
    config = ScoreConfig(
        inputs=[str(tmp_path / "x.parquet")], output=str(tmp_path / "out"),
        registry=str(promoted_registry), audit_rate=0,
    )  # fmt: skip
    summary = score_dataset(config)
    assert summary.audit.passed is None and summary.audit.reason == "not audited: --audit-rate 0"
    assert not (tmp_path / "out" / "_audit.parquet").exists()


def score_on(registry: Path, out: Path, **fields):
    """The library pipeline on `in.parquet` beside `out`, auditing a fifth of the rows
    unless `fields` say otherwise."""
    config = ScoreConfig(
        inputs=[str(out.parent / "in.parquet")], output=str(out), registry=str(registry),
        **{"audit_rate": 0.2, **fields},
    )  # fmt: skip
    return score_dataset(config)


def test_a_source_gone_or_changed_scores_unaudited_unless_required(tmp_path, tiny_validation):
    from distilq.pipelines.quantize import quantize_and_promote

    source = make_checkpoint(tmp_path / "source", seed=4)
    assert quantize_and_promote(tiny_config(source, tiny_validation, tmp_path / "reg")).promoted
    pq.write_table(pa.table({"text": make_texts(400, seed=9)}), tmp_path / "in.parquet")
    registry = tmp_path / "reg"
    moved = source.with_name("moved")
    source.rename(moved)
    audit = score_on(registry, tmp_path / "gone").audit
    assert audit.passed is None and audit.rows == 0
    assert "not on this machine" in audit.reason and str(source) in audit.reason
    assert len(pq.read_table(tmp_path / "gone" / "in.parquet")) == 400  # scored all the same
    assert "not audited: the FP32 source" in (tmp_path / "gone" / "_manifest.json").read_text()

    with pytest.raises(InputError, match="--require-audit: the FP32 source directory"):
        score_on(registry, tmp_path / "required", require_audit=True)
    assert not (tmp_path / "required").exists()  # refused before anything was written

    # The source is back but its weights changed: never audited against another model.
    moved.rename(source)
    make_checkpoint(source, seed=5)
    audit = score_on(registry, tmp_path / "changed").audit
    assert audit.rows == 0 and "model.safetensors: sha256 differs" in audit.reason


def test_keep_reference_audits_from_the_version_without_the_source(tmp_path, tiny_validation):
    from distilq.pipelines.quantize import quantize_and_promote

    source = make_checkpoint(tmp_path / "source", seed=4)
    config = tiny_config(source, tiny_validation, tmp_path / "reg", keep_reference=True)
    manifest = quantize_and_promote(config).manifest
    kept = {rel: sha for rel, sha in manifest.files.items() if rel.startswith("reference/")}
    assert kept["reference/model.safetensors"] == manifest.source.sha256["model.safetensors"]
    shutil.rmtree(source)
    pq.write_table(pa.table({"text": make_texts(400, seed=9)}), tmp_path / "in.parquet")
    audit = score_on(tmp_path / "reg", tmp_path / "out", require_audit=True).audit
    assert audit.rows > 40 and "kept in the version" in audit.reference
    # Loading the INT8 model never reads the reference: a damaged copy fails the audit only.
    weights = tmp_path / "reg" / "versions" / manifest.version / "reference" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    from distilq.score import audit as audit_module

    audit_module._fp32_models.clear()  # this process loaded the good copy above
    audit = score_on(tmp_path / "reg", tmp_path / "out2").audit
    assert audit.rows == 0 and "reference/model.safetensors" in audit.reason


def read_back(env: dict, fn):
    """`fn(client)` on the test server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(go())


@pytest.mark.slow
def test_an_int8_model_that_disagrees_fails_its_audit_and_raises_the_alarm(
    prefect_server, tmp_path, tiny_validation
):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.events.filters import EventFilter, EventNameFilter

    # An outlier planted in one layer: per-channel INT8 rounds the rest of its rows to zero.
    from distilq.pipelines.quantize import quantize_and_promote

    source = make_checkpoint(tmp_path / "source", seed=1, sensitive=True)
    assert quantize_and_promote(tiny_config(source, tiny_validation, tmp_path / "reg")).promoted
    pq.write_table(
        pa.table({"review": list(range(600)), "text": make_texts(600, seed=8)}),
        tmp_path / "in.parquet",
    )
    out = tmp_path / "out"
    env = {**cli_env(), **prefect_server}
    args = [
        DISTILQ, "score", "--input", str(tmp_path / "in.parquet"), "--output", str(out),
        "--registry", str(tmp_path / "reg"), "--audit-rate", "0.5", "--id-column", "review",
        "--min-audit-agreement", "0.95",
    ]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]  # the run ends with one line, the numbers
    assert last.startswith("distilq: audit FAILED") and "below the bar 95.00%" in last
    assert len(pq.read_table(out / "in.parquet")) == 600  # the scored file is kept
    audit = json.loads((out / "_manifest.json").read_text())["audit"]
    assert audit["passed"] is False and audit["agreement_lower_bound"] < 0.95
    assert audit["rows"] - audit["agreeing"] == len(audit["flipped"]) > 10
    assert pq.read_table(out / "_audit.parquet").column_names[:1] == ["review"]

    def ours() -> list:
        named = EventFilter(event=EventNameFilter(name=["distilq.audit.failed"]))
        # limit: the client's default (100) is above what the server accepts (50).
        events = read_back(prefect_server, lambda c: c.read_events(named, limit=50)).events
        return [e for e in events if e.payload["output"] == str(out)]

    wait_until(lambda: bool(ours()), 60, "the distilq.audit.failed event")
    (event,) = ours()
    version = Registry(tmp_path / "reg").alias()
    assert event.payload["version"] == version and event.payload["rows"] == audit["rows"]
    assert event.resource.id == f"distilq.model.{version}"
    runs = read_back(
        prefect_server,
        lambda c: c.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["audit-failed"]))
        ),
    )
    assert [r.state.is_failed() for r in runs] == [True]

    shown = run("models", "show", "--registry", str(tmp_path / "reg"))
    assert "FAILED audit" in shown.stdout and str(out) in shown.stdout


def test_require_audit_with_the_audit_off_is_refused_in_one_line():
    done = run("score", "--input", "x", "--output", "y", "--audit-rate", "0", "--require-audit")
    assert done.returncode == 2
    assert done.stderr.strip() == "distilq: error: --require-audit needs an --audit-rate above 0"


def recorded_run(run_id: str, rows: int, agreeing: int, version: str) -> RunAudit:
    """A run's record as the pipeline writes it, its figures from `pooled`."""
    keys = {f"{run_id}-{i}": i < agreeing for i in range(rows)}
    record = shard(rows, agreeing)
    record.audit.texts = keys
    audit = pooled([record], plan(0.99))
    figures = audit.model_dump(include=set(AuditFigures.model_fields))
    return RunAudit(
        run_id=run_id, created_at="2026-12-06T00:00:00+00:00", model_version=version,
        output=f"./{run_id}", run_rows=rows, run_agreeing=agreeing, texts=keys, **figures,
    )  # fmt: skip


def fresh_registry(promoted_registry: Path, tmp_path: Path) -> Path:
    """A copy of the shared registry without the audits other tests recorded in it."""
    registry_dir = tmp_path / "reg"
    shutil.copytree(promoted_registry, registry_dir)
    version = Registry(registry_dir).alias()
    shutil.rmtree(registry_dir / "versions" / version / "audits", ignore_errors=True)
    return registry_dir


def test_models_audits_and_show_say_each_verdict(promoted_registry, tmp_path):
    registry_dir = fresh_registry(promoted_registry, tmp_path)
    registry = Registry(registry_dir)
    version = registry.alias()
    for run_id, rows, agreeing in (
        ("certain", 1000, 1000),
        ("unsure", 439, 436),
        ("bad", 439, 409),
    ):
        registry.write_audit(recorded_run(run_id, rows, agreeing, version))
    listed = run("models", "audits", "--registry", str(registry_dir)).stdout.splitlines()
    verdicts = {line.split()[0]: line.split()[-1] for line in listed}
    assert verdicts == {"bad": "FAILED", "certain": "certified", "unsure": "consistent"}
    assert "99.32% agree (98.24% to 99.81% at 95%)" in "".join(listed)
    shown = run("models", "show", "--registry", str(registry_dir)).stdout
    # The pool: 1,878 distinct texts, 33 flips: 98.24%, whose upper bound is below 99%.
    assert "Live audit: 1,878 distinct texts over 3 run(s), 33 flips, 98.24% agree" in shown
    # Judged on the gate's own bar (this tiny version's is low), as the gate certified it.
    bar = registry.manifest(version).decision.thresholds.min_agreement
    expected = verdict(1845, 1878, bar, 0.95)["verdict"]
    assert f"): {expected} (bar {bar:.2%})" in shown
    assert "FAILED audit: bad" in shown and "FAILED audit: unsure" not in shown


def test_a_text_that_is_a_fifth_of_the_rows_counts_once(promoted_registry, tmp_path):
    registry_dir = fresh_registry(promoted_registry, tmp_path)
    boilerplate = "thank you for your feedback , we will get back to you"
    texts = make_texts(400, seed=21)
    assert boilerplate not in texts and len(set(texts)) == 400
    column = [boilerplate if i % 5 == 0 else texts.pop() for i in range(500)]
    pq.write_table(pa.table({"text": column}), tmp_path / "in.parquet")
    summary = score_on(registry_dir, tmp_path / "out", audit_rate=1.0, audit_max_rows=None)
    assert (summary.audit.rows, summary.audit.copies) == (401, 99)
    kept = pq.read_table(tmp_path / "out" / "_audit.parquet").to_pylist()
    assert len(kept) == 401 and kept[0]["copies"] == 99  # row 0 holds the boilerplate
    live = lambda: json.loads(  # noqa: E731
        run("models", "show", "--json", "--registry", str(registry_dir)).stdout
    )["live_audit"]
    assert (live()["rows"], live()["runs"]) == (401, 1)
    # The same rows scored again (another output; or --overwrite) are no new evidence.
    again = score_on(registry_dir, tmp_path / "again", audit_rate=1.0, audit_max_rows=None)
    assert again.audit.rows == 401
    assert (live()["rows"], live()["runs"]) == (401, 2)
    # A resume must audit as the run it resumes did.
    with pytest.raises(InputError, match="audited with other settings"):
        score_on(registry_dir, tmp_path / "again", audit_rate=0.5, audit_max_rows=None)


def test_the_gate_counts_a_repeated_text_once():
    from distilq.gate.data import ValidationSet, split
    from distilq.pipelines.staging import validation_record

    texts = iter(make_texts(800, seed=5))
    column = ["the same old line" if i % 5 == 0 else next(texts) for i in range(1000)]
    data = ValidationSet("x", column, [i % 2 for i in range(1000)], "sha")
    tuning, confirmation = split(data)
    distinct = len(set(column))
    assert len(tuning.texts) + len(confirmation.texts) == distinct
    assert tuning.copies + confirmation.copies == 1000 - distinct
    side = confirmation if "the same old line" in confirmation.texts else tuning
    assert side.texts.count("the same old line") == 1 and side.copies >= 199
    split_record = validation_record(data, confirmation).split
    assert split_record.confirmation == len(confirmation.texts)
    assert split_record.confirmation_copies == confirmation.copies
