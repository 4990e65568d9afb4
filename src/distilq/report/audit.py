"""The words for FP32 audits: one scoring run's audit line, and a version's live record."""

from __future__ import annotations

from distilq.manifest import AuditRecord

VERDICTS = {True: "passed", False: "FAILED", None: "too few rows to certify"}  # by `passed`


def audit_line(audit: AuditRecord | None, rows_written: int) -> str:
    """`audit: 52 of 5,200 rows re-run in FP32, 52 agree (lower bound 94.4% at 95%)`, and
    what that means against the bar."""
    if audit is None:
        return "audit: none (scored before audits)"
    if not audit.rows:
        return f"audit: {audit.reason}"
    line = (
        f"audit: {audit.rows:,} of {rows_written:,} rows re-run in FP32, {audit.agreeing:,} "
        f"agree (lower bound {audit.agreement_lower_bound:.1%} at {audit.confidence:.0%}), "
        f"in {audit.seconds:.1f} s"
    )
    if audit.passed is None:
        return f"{line}; {audit.reason}"
    line += f"; {VERDICTS[audit.passed]}: bar {audit.threshold:.2%}"
    return f"{line}; {audit.reason}" if audit.reason else line


def live_audit_line(live: dict) -> str:
    """`Live audit: 1,204 rows over 3 runs, 99.58% agree (lower bound 99.05% at 95%)`."""
    if not live["rows"]:
        return "Live audit: no audited scoring run recorded."
    failed = live["failed_runs"]
    return (
        f"Live audit: {live['rows']:,} rows over {live['runs']} run(s), {live['agreement']:.2%} "
        f"agree (lower bound {live['agreement_lower_bound']:.2%} at {live['confidence']:.0%}); "
        f"{len(failed)} run(s) failed their audit."
    )
