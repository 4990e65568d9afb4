"""The promotion gate: a pure function of measured metrics and thresholds."""

from __future__ import annotations

from pydantic import BaseModel

from distilq.config import GateThresholds
from distilq.validation import Metrics

# Agreement and accuracy drop are ratios of counts; this absorbs float rounding at the edge.
_EPS = 1e-12


class Decision(BaseModel):
    """Whether a candidate may be promoted, with the numbers behind it."""

    approved: bool
    reasons: list[str]
    thresholds: GateThresholds


def decide(metrics: Metrics, thresholds: GateThresholds) -> Decision:
    """Approve when agreement >= min_agreement and, with labels, the accuracy drop is at most
    max_accuracy_drop."""
    reasons = []
    ok_agreement = metrics.agreement + _EPS >= thresholds.min_agreement
    reasons.append(
        f"agreement {metrics.agreement:.4f} {'>=' if ok_agreement else '<'} "
        f"{thresholds.min_agreement:.4f} ({metrics.flips} of {metrics.n_examples} flipped)"
    )
    ok_accuracy = True
    if metrics.accuracy_drop is None:
        reasons.append("no labels: accuracy drop not checked")
    else:
        ok_accuracy = metrics.accuracy_drop <= thresholds.max_accuracy_drop + _EPS
        reasons.append(
            f"accuracy drop {metrics.accuracy_drop:+.4f} "
            f"({metrics.accuracy_fp32:.4f} -> {metrics.accuracy_int8:.4f}) "
            f"{'<=' if ok_accuracy else '>'} {thresholds.max_accuracy_drop:.4f}"
        )
    return Decision(approved=ok_agreement and ok_accuracy, reasons=reasons, thresholds=thresholds)
