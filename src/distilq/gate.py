"""The promotion gate: a pure function of measured metrics and thresholds."""

from __future__ import annotations

from pydantic import BaseModel

from distilq.config import GateThresholds
from distilq.metrics import Metrics, SetMetrics, set_metrics_of

# Agreement and accuracy drop are ratios of counts; this absorbs float rounding at the edge.
_EPS = 1e-12


class Decision(BaseModel):
    """Whether a candidate may be promoted, with the numbers behind it."""

    approved: bool
    reasons: list[str]
    thresholds: GateThresholds


def decide(metrics: Metrics, thresholds: GateThresholds) -> Decision:
    """Approve when, on every validation set, agreement >= min_agreement and, with labels,
    the accuracy drop is at most max_accuracy_drop."""
    return decide_sets(metrics.sets, thresholds)


def decide_manifest(manifest: dict) -> Decision:
    """The gate's decision re-derived from a version's recorded metrics and thresholds,
    rather than trusting its stored `decision.approved`."""
    thresholds = GateThresholds(**manifest["decision"]["thresholds"])
    return decide_sets(set_metrics_of(manifest["metrics"]), thresholds)


def decide_sets(sets: list[SetMetrics], thresholds: GateThresholds) -> Decision:
    """The decision over per-set figures (see `decide`)."""
    reasons, approved = [], True
    several = len(sets) > 1
    for m in sets:
        prefix = f"{m.name}: " if several else ""
        ok_agreement = m.agreement + _EPS >= thresholds.min_agreement
        reasons.append(
            f"{prefix}agreement {m.agreement:.4f} {'>=' if ok_agreement else '<'} "
            f"{thresholds.min_agreement:.4f} ({m.flips} of {m.n_examples} flipped)"
        )
        ok_accuracy = True
        if m.accuracy_drop is None:
            reasons.append(f"{prefix}no labels: accuracy drop not checked")
        else:
            ok_accuracy = m.accuracy_drop <= thresholds.max_accuracy_drop + _EPS
            reasons.append(
                f"{prefix}accuracy drop {m.accuracy_drop:+.4f} "
                f"({m.accuracy_fp32:.4f} -> {m.accuracy_int8:.4f}) "
                f"{'<=' if ok_accuracy else '>'} {thresholds.max_accuracy_drop:.4f}"
            )
        approved = approved and ok_agreement and ok_accuracy
    return Decision(approved=approved, reasons=reasons, thresholds=thresholds)
