"""The promotion gate: a pure function of measured metrics and thresholds."""

from __future__ import annotations

from distilq.config.shared import GateThresholds
from distilq.errors import InputError
from distilq.gate.stats import agreement_lower_bound, examples_needed
from distilq.manifest import Decision, VersionManifest
from distilq.metrics import Metrics, SetMetrics

# Agreement and accuracy drop are ratios of counts; this absorbs float rounding at the edge.
_EPS = 1e-12


def decide(metrics: Metrics, thresholds: GateThresholds) -> Decision:
    """Approve when, on every validation set, agreement certifies min_agreement (its lower
    bound at the thresholds' confidence reaches it) and, with labels, the accuracy drop is
    at most max_accuracy_drop."""
    return decide_sets(metrics.sets, thresholds)


def decide_manifest(manifest: VersionManifest) -> Decision:
    """The gate's decision re-derived from a version's recorded metrics and thresholds,
    rather than trusting its stored `decision.approved`. Versions gated before bounds have
    no confidence in their thresholds, and are judged on the measured agreement, as then."""
    return decide_sets(manifest.metrics.sets, manifest.decision.thresholds)


def certified_agreement(m: SetMetrics, thresholds: GateThresholds) -> float:
    """The agreement the gate compares with min_agreement: the lower bound, recomputed from
    the counts, or (no confidence) the measured agreement."""
    if thresholds.confidence is None:
        return m.agreement
    return agreement_lower_bound(m.n_examples - m.flips, m.n_examples, thresholds.confidence)


def decide_sets(sets: list[SetMetrics], thresholds: GateThresholds) -> Decision:
    """The decision over per-set figures (see `decide`)."""
    reasons, approved = [], True
    several = len(sets) > 1
    for m in sets:
        prefix = f"{m.name}: " if several else ""
        certified = certified_agreement(m, thresholds)
        ok_agreement = certified + _EPS >= thresholds.min_agreement
        op = ">=" if ok_agreement else "<"
        if thresholds.confidence is None:
            reasons.append(
                f"{prefix}agreement {m.agreement:.4f} {op} {thresholds.min_agreement:.4f} "
                f"({m.flips} of {m.n_examples} flipped)"
            )
        else:
            reasons.append(
                f"{prefix}agreement lower bound {certified:.4f} {op} "
                f"{thresholds.min_agreement:.4f} at {thresholds.confidence:.0%} confidence "
                f"(measured {m.agreement:.4f}: {m.flips} of {m.n_examples} flipped)"
            )
        ok_accuracy = True
        if not thresholds.check_accuracy:
            reasons.append(
                f"{prefix}accuracy not checked (--no-accuracy-check): gated on agreement alone"
            )
        elif m.accuracy_drop is None:
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


def check_certifiable(sizes: dict[str, int], thresholds: GateThresholds) -> None:
    """Refuse, before any work, validation sets too small to pass even with no flip."""
    if thresholds.confidence is None:
        return
    needed = examples_needed(thresholds.min_agreement, thresholds.confidence)
    small = {name: n for name, n in sizes.items() if n < needed}
    if small:
        listed = ", ".join(f"{name} ({n})" for name, n in small.items())
        raise InputError(
            f"validation too small to certify agreement >= {thresholds.min_agreement} at "
            f"{thresholds.confidence:.0%} confidence even with no flip: the confirmation part "
            f"of {listed} needs at least {needed} examples. Give more --validation text "
            "(labels are optional), or lower --min-agreement or --confidence"
        )
