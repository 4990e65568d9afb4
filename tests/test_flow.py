"""The quantize_and_promote flow under a real (temporary) Prefect API."""

from __future__ import annotations

from pathlib import Path

import pytest

from distilq.config.quantize import QuantizeConfig
from distilq.errors import GateRejected
from distilq.recipes import resolve_recipe
from distilq.registry.registry import Registry
from flows.quantize_and_promote import quantize_and_promote
from tests.conftest import as_shown, free_port, tiny_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_passing_gate_publishes_and_promotes_then_rerun_is_reused(
    tiny_checkpoint, tiny_validation, tmp_path
):
    config = tiny_config(tiny_checkpoint, tiny_validation, tmp_path / "reg", min_agreement=0.9)
    state = quantize_and_promote(config, return_state=True)
    result = state.result()
    assert result.approved and result.promoted and not result.reused
    registry = Registry(tmp_path / "reg")
    assert registry.alias() == result.version == registry.versions()[-1]
    assert (
        (tmp_path / "reg" / "versions" / result.version / "report.md")
        .read_text()
        .startswith(f"# distilq INT8 candidate {result.version}")
    )
    chart = tmp_path / "reg" / "versions" / result.version / "report.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "report.png" in result.manifest.files
    report = (chart.parent / "report.md").read_text()
    assert "![agreement with FP32 and layer sensitivity](report.png)" in report
    run, artifacts = as_shown(state)
    assert "](data:image/png;base64," in artifacts["quantize-report"].data  # the UI shows it
    assert run.name == f"quantize {tiny_checkpoint} dynamic-int8-token"
    assert run.tags == ["dynamic-int8-token", "promoted"]
    headline = f"APPROVED and promoted: production {result.version} (was no version before)"
    assert artifacts["quantize-report"].description.startswith(f"{headline}. Gate: agreement")
    assert artifacts["quantize-report"].data.startswith(f"**{headline}.**\n\n# distilq INT8")
    assert "quantize-metrics" in artifacts

    state = quantize_and_promote(config, return_state=True)
    again = state.result()
    assert again.reused and again.version == result.version
    assert len(registry.versions()) == 1
    run, artifacts = as_shown(state)
    assert run.tags == ["approved", "dynamic-int8-token", "reused"]
    assert artifacts["quantize-report"].description.startswith(
        f"Unchanged inputs, {result.version} reused. APPROVED {result.version}: already in "
        "production. Gate: agreement"
    )
    where = f"`versions/{result.version}/report.md` in the registry"
    assert artifacts["quantize-report"].data.endswith(f"the version's report is {where}.")
    assert "quantize-metrics" not in artifacts  # nothing was measured again


def test_failed_gate_fails_the_run_keeps_the_candidate_and_production(
    sensitive_checkpoint, tiny_checkpoint, tiny_validation, tmp_path
):
    good = quantize_and_promote(
        tiny_config(tiny_checkpoint, tiny_validation, tmp_path / "reg", min_agreement=0.9)
    )
    config = tiny_config(
        sensitive_checkpoint, tiny_validation, tmp_path / "reg", min_agreement=0.95
    )
    state = quantize_and_promote(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(
        GateRejected, match=r"agreement lower bound 0\.\d{4} < 0\.9500 at 95%"
    ) as rejected:
        state.result()
    registry = Registry(tmp_path / "reg")
    version = rejected.value.manifest.version
    assert version in registry.versions()
    assert registry.manifest(version).decision.approved is False
    assert registry.alias() == good.version
    run, artifacts = as_shown(state)
    assert run.tags == ["dynamic-int8-token", "rejected"]
    headline = f"REJECTED {version}: kept in the registry with its report; production unchanged."
    assert artifacts["quantize-report"].description.startswith(headline)
    assert "agreement lower bound" in artifacts["quantize-report"].description


@pytest.mark.parametrize(
    "features", [["avx2"], ["avx2", "avx512f", "avx512_vnni"]], ids=["avx2", "vnni"]
)
def test_auto_shows_its_search_as_it_goes(
    sensitive_checkpoint, tiny_validation, tmp_path, monkeypatch, features
):
    # The one place a run reads the host CPU, given a value: the same code on every CPU.
    monkeypatch.setattr("distilq.pipelines.quantize.cpu_features", lambda: features)
    config = tiny_config(
        sensitive_checkpoint, tiny_validation, tmp_path / "reg", recipe="auto", min_agreement=0.9
    )
    state = quantize_and_promote(config, return_state=True)
    result = state.result()
    attempts = result.manifest.recipe.auto.attempts
    assert any(a.fp32_layers for a in attempts)  # the start failed: it fell back
    auto = resolve_recipe("auto", features)  # the torch preset, measured against ONNX Runtime
    assert result.manifest.recipe.auto.base in {auto.base, *(r.name for r in auto.alternatives)}
    _, artifacts = as_shown(state)
    progress = artifacts["auto-progress"]
    assert progress.data == 100.0
    assert progress.description.startswith(f"attempt {len(attempts)}: ")


def test_dry_run_publishes_nothing(tiny_checkpoint, tiny_validation, tmp_path):
    config = tiny_config(
        tiny_checkpoint, tiny_validation, tmp_path / "reg", min_agreement=0.9, dry_run=True
    )
    result = quantize_and_promote(config)
    assert result.dry_run and not result.promoted
    assert Registry(tmp_path / "reg").versions() == []
    assert (tmp_path / "reg").exists() is False
    assert "report.md" in result.manifest.files and result.location is None
    assert Path(result.report).read_text().startswith("# distilq INT8 candidate")


def test_validation_parameter_takes_one_spec_or_several():
    """Deployments made before sets could repeat pass one string: the schema must accept it."""
    import jsonschema
    from prefect.utilities.callables import parameter_schema

    assert QuantizeConfig(validation="a.tsv").validation == ["a.tsv"]
    assert QuantizeConfig(validation=["a.tsv", "b.csv"]).validation == ["a.tsv", "b.csv"]
    schema = parameter_schema(quantize_and_promote).model_dump()
    field = schema["definitions"]["QuantizeConfig"]["properties"]["validation"]
    jsonschema.validate("a.tsv", field)
    jsonschema.validate(["a.tsv", "b.csv"], field)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], field)


def test_an_unreachable_mlflow_is_said_and_tagged_and_production_moves(
    tiny_checkpoint, tiny_validation, tmp_path
):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = tiny_config(
        tiny_checkpoint, tiny_validation, tmp_path / "reg", mlflow_tracking_uri=down,
        mlflow_model="sst2-int8",
    )  # fmt: skip
    state = quantize_and_promote(config, return_state=True)
    result = state.result()
    assert result.promoted and Registry(tmp_path / "reg").alias() == result.version
    assert result.mirror.startswith(f"MLflow mirror behind: MLflow at {down} does not answer")
    run, artifacts = as_shown(state)
    assert run.tags == ["dynamic-int8-token", "mlflow-behind", "promoted"]
    assert f"\n\n{result.mirror}.\n\n# distilq INT8" in artifacts["quantize-report"].data
