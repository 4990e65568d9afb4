"""What audited rows are evidence of: each distinct text once (one row, one answer: a copy
is no new evidence), pooled over an output's shards and over a version's runs, and the
verdict both bounds give against the bar."""

from __future__ import annotations

from distilq.config.shared import DEFAULT_CONFIDENCE
from distilq.gate.stats import (
    agreement_lower_bound,
    agreement_upper_bound,
    examples_needed,
    rows_to_decide,
)
from distilq.manifest import AuditRecord, RunAudit, ShardRecord
from distilq.score.audit import AUDIT_FILE, AuditPlan


def verdict(agreeing: int, rows: int, threshold: float, confidence: float) -> dict:
    """What `agreeing` of `rows` distinct texts say of the bar `threshold` at `confidence`:
    both bounds, the verdict (see `AuditFigures`), `passed` as records before verdicts
    read it, and a reason when it is not certified."""
    lower = agreement_lower_bound(agreeing, rows, confidence)
    upper = agreement_upper_bound(agreeing, rows, confidence)
    needed = examples_needed(threshold, confidence)
    reason = None
    if rows < needed:
        result = "too few rows"
        reason = (
            f"too few rows to certify: {rows:,} audited, and even with no flip "
            f"{needed:,} are needed for {threshold:.2%} at {confidence:.0%}"
        )
    elif lower >= threshold:
        result = "certified"
    elif upper < threshold:
        result = "failed"
    else:
        result = "consistent"
        decide = rows_to_decide(agreeing / rows, threshold, confidence)
        reason = (
            f"the sample can neither prove nor refute {threshold:.2%} at {confidence:.0%}; "
            + (
                f"about {decide:,} audited rows would decide at the measured {agreeing / rows:.2%}"
                if decide
                else "no number of rows decides at exactly the bar"
            )
        )
    passed = {"certified": True, "failed": False}.get(result)
    return {
        "agreement_lower_bound": lower,
        "agreement_upper_bound": upper,
        "verdict": result,
        "passed": passed,
        "reason": reason,
    }


def pool_texts(audits: list[dict[str, bool]]) -> dict[str, bool]:
    """Distinct texts over several audits (key -> agreed); a text that flipped anywhere
    counts as flipped."""
    pooled: dict[str, bool] = {}
    for texts in audits:
        for key, agreed in texts.items():
            pooled[key] = pooled.get(key, True) and agreed
    return pooled


def pooled(shards: list[ShardRecord], plan: AuditPlan) -> AuditRecord:
    """The output's audit over every shard in it (this run's and those a resume kept), each
    distinct text counted once."""
    audits = [s.audit for s in shards if s.audit is not None]
    texts = pool_texts([a.texts for a in audits])
    # Shards recorded before text keys were kept are counted as they were.
    rows = len(texts) + sum(a.rows for a in audits if not a.texts)
    agreeing = sum(texts.values()) + sum(a.agreeing for a in audits if not a.texts)
    copies = sum(a.copies for a in audits) + sum(len(a.texts) for a in audits) - len(texts)
    reasons = [plan.reason] if plan.reason else []
    failed = [a.reason for a in audits if a.reason]
    if failed:
        reasons.append(f"{len(failed)} shard(s) not audited: {'; '.join(dict.fromkeys(failed))}")
    figures: dict = {"agreement_lower_bound": None, "passed": None}
    if rows:
        figures = verdict(agreeing, rows, plan.threshold, plan.confidence)
        why = figures.pop("reason")
        if why:
            reasons.append(why)
    else:
        reasons = reasons or [f"no row fell in the sample at rate {plan.sampling_rate:g}"]
        reasons = [f"not audited: {'; '.join(reasons)}"]
    return AuditRecord(
        rate=plan.rate,
        sampling_rate=plan.sampling_rate,
        max_rows=plan.max_rows,
        fail_on=plan.fail_on,
        rows=rows,
        agreeing=agreeing,
        copies=copies,
        agreement=agreeing / rows if rows else None,
        confidence=plan.confidence,
        threshold=plan.threshold,
        reason="; ".join(reasons) or None,
        reference=plan.reference.describe() if plan.reference else None,
        flipped=[row for a in audits for row in a.flipped],
        file=AUDIT_FILE if rows else None,
        seconds=round(sum(a.seconds for a in audits), 3),
        **figures,
    )


def live_audit(runs: list[RunAudit], thresholds) -> dict:
    """A version's agreement with FP32 where it is used, pooled over every run: each distinct
    text once (runs over the same or growing data audit the same texts again), both bounds
    at the gate's confidence and the verdict on the gate's bar; and the runs that alarmed."""
    confidence = thresholds.confidence or DEFAULT_CONFIDENCE
    texts = pool_texts([r.texts for r in runs if r.texts is not None])
    older = [r for r in runs if r.texts is None]  # written before text keys: as counted then
    rows = len(texts) + sum(r.run_rows for r in older)
    agreeing = sum(texts.values()) + sum(r.run_agreeing for r in older)
    live = {
        "runs": len(runs),
        "rows": rows,
        "agreeing": agreeing,
        "flips": rows - agreeing,
        "agreement": agreeing / rows if rows else None,
        "agreement_lower_bound": None,
        "agreement_upper_bound": None,
        "confidence": confidence,
        "threshold": thresholds.min_agreement,
        "verdict": None,
        "reason": None,
        "failed_runs": [r.run_id for r in runs if r.passed is False],
    }
    if rows:
        live |= verdict(agreeing, rows, thresholds.min_agreement, confidence)
        del live["passed"]
    return live
