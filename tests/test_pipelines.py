"""The library pipelines without Prefect: clean-up, no import side effects, and registries
and outputs written by earlier distilq versions (tests/data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import distilq
from distilq.config.score import ScoreConfig
from distilq.gate.decide import decide_manifest
from distilq.pipelines.quantize import quantize_and_promote
from distilq.pipelines.score import score_dataset
from distilq.pipelines.staging import STAGING_PREFIX
from distilq.registry.registry import Registry
from distilq.report.render import render_report
from tests.conftest import tiny_config

DATA = Path(__file__).parent / "data"
WRITTEN_BEFORE = ["written-by-0cc8cc5", "written-by-0964a64"]


def _staging_dirs() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{os.getpid()}-*"))


def test_dry_run_and_failed_publish_leave_no_staging(tiny_checkpoint, tiny_validation, tmp_path):
    before = _staging_dirs()
    dry = quantize_and_promote(
        tiny_config(tiny_checkpoint, tiny_validation, tmp_path / "reg", dry_run=True)
    )
    assert dry.location is None and not (tmp_path / "reg").exists()
    assert Path(dry.report).read_text().startswith(f"# distilq INT8 candidate {dry.version}")
    Path(dry.report).unlink()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "versions").write_text("a file where the versions directory goes")
    with pytest.raises(OSError):
        quantize_and_promote(tiny_config(tiny_checkpoint, tiny_validation, broken))
    assert _staging_dirs() == before


def test_importing_distilq_flows_and_tasks_changes_nothing_in_the_process():
    code = """
import logging, os, sys
before = dict(os.environ)
import distilq.pipelines.quantize, distilq.pipelines.score, distilq.quantize.int8
import flows.quantize_and_promote, flows.score_parquet
import tasks.runner
import torch
from transformers.utils import logging as hf_logging
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert logging.getLogger("distilq").level == logging.NOTSET
assert hf_logging.is_progress_bar_enabled()
assert torch.backends.quantized.engine == "x86"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("written_by", WRITTEN_BEFORE)
def test_a_registry_written_before_keeps_working(
    written_by, tiny_checkpoint, tiny_validation, tmp_path
):
    shutil.copytree(DATA / written_by / "registry", tmp_path / "reg")
    registry = Registry(tmp_path / "reg")
    (old,) = registry.versions()
    manifest = registry.manifest(old)  # read and upgraded
    assert manifest.schema_version == 2 and manifest.recipe.name == "dynamic-int8-pc"
    assert decide_manifest(manifest).approved and registry.alias() == old
    if written_by == "written-by-0cc8cc5":  # gated before bounds: the measured agreement
        assert manifest.decision.thresholds.confidence is None and manifest.platform is None
    assert f"candidate {old}" in render_report(manifest)
    classifier = distilq.load(tmp_path / "reg")
    assert classifier.version == old
    # It answers as it did when written: the labels, and the scores up to the INT8 kernels of
    # another CPU (every score there is at least 0.59: no label is near a tie).
    then = pq.read_table(DATA / written_by / "scored" / "in.parquet").to_pydict()
    now = classifier.predict(pq.read_table(DATA / written_by / "in.parquet")["text"].to_pylist())
    assert [p["label"] for p in now] == then["label"]
    assert max(abs(p["score"] - s) for p, s in zip(now, then["score"], strict=True)) < 0.02

    new = quantize_and_promote(tiny_config(tiny_checkpoint, tiny_validation, tmp_path / "reg"))
    assert new.promoted and registry.versions() == [old, new.version]
    assert (
        json.loads((tmp_path / "reg" / "versions" / new.version / "manifest.json").read_text())[
            "schema_version"
        ]
        == 2
    )
    assert registry.rollback("back").get("to") == old and registry.alias() == old


@pytest.mark.parametrize("written_by", WRITTEN_BEFORE)
def test_a_scored_output_written_before_resumes_or_is_refused_clearly(written_by, tmp_path):
    source = DATA / written_by
    shutil.copytree(source / "registry", tmp_path / "reg")
    shutil.copytree(source / "scored", tmp_path / "scored")
    shutil.copyfile(source / "in.parquet", tmp_path / "in.parquet")
    # The output names its input by absolute path and mtime: point it at the copy, as if
    # the directory had been moved with its files' times kept. Nothing else is edited.
    path = tmp_path / "scored" / "_manifest.json"
    record = json.loads(path.read_text())
    (entry,) = record["shards"].values()
    entry["input"] = str(tmp_path / "in.parquet")
    path.write_text(json.dumps(record))
    mtime = int(Decimal(entry["identity"]["version"]) * 10**9)
    os.utime(tmp_path / "in.parquet", ns=(mtime, mtime))
    config = ScoreConfig(
        inputs=[str(tmp_path / "in.parquet")],
        output=str(tmp_path / "scored"),
        registry=str(tmp_path / "reg"),
    )
    if written_by == "written-by-0cc8cc5":
        # Its settings say max_length 512 on a 64-position model; since 0964a64 the length
        # is capped at the model's positions: other settings, refused until --overwrite.
        from distilq.errors import InputError

        with pytest.raises(InputError, match="other settings"):
            score_dataset(config)
        config = config.model_copy(update={"overwrite": True})
        summary = score_dataset(config)
        assert summary.rows_written == 40 and summary.files == 1
        return
    before = (tmp_path / "scored" / "in.parquet").stat().st_mtime_ns
    summary = score_dataset(config)  # resumed: nothing left to score
    assert (tmp_path / "scored" / "in.parquet").stat().st_mtime_ns == before
    assert summary.rows_written == 40 and summary.files == 1 and not summary.failed
    assert json.loads(path.read_text())["schema_version"] == 1
