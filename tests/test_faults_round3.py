"""Bad inputs and faults, third round (the issue's cases, by number): each test fails on the
code before the fix it covers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distilq.config.quantize import QuantizeConfig
from distilq.config.score import ScoreConfig
from distilq.errors import InputError
from distilq.storage.parquet import discover_inputs
from tests.conftest import make_texts, write_parquet

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
