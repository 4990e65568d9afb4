"""The quantize_and_promote flow under a real (temporary) Prefect API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from distilq.config import QuantizeConfig
from distilq.errors import GateRejected
from distilq.registry import Registry
from flows.quantize_and_promote import quantize_and_promote

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _config(checkpoint, validation, registry, **overrides) -> QuantizeConfig:
    values = dict(
        source=str(checkpoint),
        validation=str(validation),
        registry=str(registry),
        recipe="dynamic-int8-pc",
        min_agreement=0.9,
        max_accuracy_drop=1.0,
    )
    return QuantizeConfig(**(values | overrides))


def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    return asyncio.run(read())


def test_passing_gate_publishes_and_promotes_then_rerun_is_reused(
    tiny_checkpoint, tiny_validation, tmp_path
):
    config = _config(tiny_checkpoint, tiny_validation, tmp_path / "reg")
    result = quantize_and_promote(config)
    assert result.approved and result.promoted and not result.reused
    registry = Registry(tmp_path / "reg")
    assert registry.alias() == result.version == registry.versions()[-1]
    assert (
        (tmp_path / "reg" / "versions" / result.version / "report.md")
        .read_text()
        .startswith(f"# distilq INT8 candidate {result.version}")
    )
    assert {"quantize-report", "quantize-metrics"} <= _artifact_keys()

    again = quantize_and_promote(config)
    assert again.reused and again.version == result.version
    assert len(registry.versions()) == 1


def test_failed_gate_fails_the_run_keeps_the_candidate_and_production(
    sensitive_checkpoint, tiny_checkpoint, tiny_validation, tmp_path
):
    good = quantize_and_promote(_config(tiny_checkpoint, tiny_validation, tmp_path / "reg"))
    config = _config(sensitive_checkpoint, tiny_validation, tmp_path / "reg", min_agreement=0.95)
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


def test_dry_run_publishes_nothing(tiny_checkpoint, tiny_validation, tmp_path):
    config = _config(tiny_checkpoint, tiny_validation, tmp_path / "reg", dry_run=True)
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
