"""Flow: checkpoint -> INT8 -> agreement gate -> registry, promoted only if the gate passed."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from distilq.config.quantize import QuantizeConfig
from distilq.pipelines import quantize as pipeline
from distilq.pipelines.quantize import QuantizeResult
from tasks.runner import PrefectRunner

__all__ = ["QuantizeResult", "quantize_and_promote"]


def run_name() -> str:
    """`quantize <source>[@<revision>] <recipe>`: what ran, in the runs list."""
    return pipeline.run_name(QuantizeConfig.model_validate(flow_run.parameters.get("config") or {}))


# persist_result=False: nothing reads a stored copy of the run's result.
@flow(name="quantize_and_promote", flow_run_name=run_name, persist_result=False)
def quantize_and_promote(config: QuantizeConfig | None = None) -> QuantizeResult:
    """Quantize a checkpoint to INT8, validate it against FP32, publish it, and promote it
    to `production` only if the gate approved it. A failed gate fails the run."""
    return pipeline.quantize_and_promote(config or QuantizeConfig(), PrefectRunner())
