"""Attestation: a version gated on one platform is self-checked before it scores on another.

The platform key changes with torch's kernel level, which ATEN_CPU_CAPABILITY sets;
`default` (no vector kernels) differs from what any x86 CPU here runs by default, AVX2-only
and AVX-512 alike, so these tests see a new platform on every machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distilq.gate.attest import SELFCHECK
from distilq.registry.registry import Registry
from distilq.storage.store import sha256_file
from tests.conftest import DISTILQ, cli_env, make_texts, stage_tiny_version

pytestmark = pytest.mark.slow
OTHER_PLATFORM = {"ATEN_CPU_CAPABILITY": "default"}


def run(*args: str) -> subprocess.CompletedProcess:
    env = cli_env() | OTHER_PLATFORM
    return subprocess.run([DISTILQ, *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_new_platform_is_self_checked_once_then_attested(promoted_registry, tmp_path):
    shutil.copytree(promoted_registry, tmp_path / "reg")
    registry = Registry(tmp_path / "reg")
    version = registry.alias()
    gated_on = registry.manifest(version).platform.key
    first = run("models", "attest", "--registry", str(tmp_path / "reg"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "self-check passed on platform x86_64-default-" in first.stdout
    gate, record = sorted(
        registry.attestations(version), key=lambda a: a["platform"]["key"] != gated_on
    )
    assert (
        gate["platform"]["key"] == gated_on and gate["max_abs_prob_diff"] == 0.0
    )  # the gate's own
    assert record["platform"]["key"] != gated_on
    assert record["platform"]["torch_cpu_capability"] == "DEFAULT"
    assert {"platform", "agreement", "agreement_lower_bound", "created_at"} <= set(record)
    assert record["agreement_lower_bound"] <= record["agreement"]
    again = run("models", "attest", "--registry", str(tmp_path / "reg"))
    assert again.returncode == 0 and "attested earlier on platform" in again.stdout
    shown = run("models", "show", "--registry", str(tmp_path / "reg"))
    (attested,) = [line for line in shown.stdout.splitlines() if "Attested platforms" in line]
    assert f"`{record['platform']['key']}`" in attested


@pytest.fixture
def failing_version(tmp_path, tiny_checkpoint, tiny_validation) -> Path:
    """A promoted version whose stored FP32 labels are all inverted: no platform but the
    gate's can pass its self-check."""
    staging = tmp_path / "staging"
    staging.mkdir()
    manifest = stage_tiny_version(staging, tiny_checkpoint, tiny_validation, min_agreement=0.9)
    assert manifest.decision.approved
    table = pq.read_table(staging / SELFCHECK)
    flipped = table.set_column(
        2, "fp32_label", pc.subtract(pa.scalar(1, pa.int16()), table["fp32_label"])
    )
    pq.write_table(flipped, staging / SELFCHECK)
    manifest.files[SELFCHECK] = sha256_file(staging / SELFCHECK)
    registry = Registry(tmp_path / "reg")
    registry.promote(registry.publish(staging, manifest), "test")
    return tmp_path / "reg"


def test_a_failed_self_check_refuses_to_score_and_writes_nothing(failing_version, tmp_path):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": make_texts(20)}), data)
    score = ["score", "--input", str(data), "--registry", str(failing_version)]
    done = run(*score, "--output", str(tmp_path / "out"))
    assert done.returncode == 3, done.stderr[-2000:]
    assert "fails its self-check on this platform (x86_64-default-" in done.stderr
    assert "agreement lower bound 0.0" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before the output was touched
    version = Registry(failing_version).alias()
    assert Registry(failing_version).attestations(version) == []
    attest = run("models", "attest", "--registry", str(failing_version))
    assert attest.returncode == 3 and "fails its self-check" in attest.stderr
    allowed = run(*score, "--output", str(tmp_path / "out2"), "--allow-unattested")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "scoring anyway (--allow-unattested)" in allowed.stderr
    assert (
        json.loads((tmp_path / "out2" / "_manifest.json").read_text())["model_version"] == version
    )
