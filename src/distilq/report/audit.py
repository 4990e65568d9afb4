"""The words for FP32 audits: one scoring run's audit line, a recorded run's row, and a
version's live record."""

from __future__ import annotations

from distilq.manifest import AuditFigures, AuditRecord

# Records written before verdicts said only `passed` (the lower bound against the bar).
BEFORE_VERDICTS = {True: "passed", False: "FAILED", None: "too few rows to certify"}


def verdict_word(figures: AuditFigures) -> str:
    """`certified`, `consistent`, `FAILED`, `too few rows`, or an older record's word."""
    if figures.verdict is None:
        return BEFORE_VERDICTS[figures.passed]
    return _said(figures.verdict)


def _said(verdict: str) -> str:
    return "FAILED" if verdict == "failed" else verdict  # the alarm, in capitals


def bounds(figures: AuditFigures) -> str:
    """`98.24% to 99.81% at 95%`, or just the lower bound for an older record."""
    if figures.agreement_upper_bound is None:
        return f"lower bound {figures.agreement_lower_bound:.2%} at {figures.confidence:.0%}"
    return (
        f"{figures.agreement_lower_bound:.2%} to {figures.agreement_upper_bound:.2%} at "
        f"{figures.confidence:.0%}"
    )


def texts_counted(figures: AuditFigures) -> str:
    """`439 texts` or `439 distinct texts (+52 copies)`."""
    if not figures.copies:
        return f"{figures.rows:,} texts"
    return f"{figures.rows:,} distinct texts (+{figures.copies:,} copies)"


def audit_line(audit: AuditRecord | None, rows_written: int) -> str:
    """`audit: 439 texts of 5,463 rows re-run in FP32, 436 agree (98.24% to 99.81% at 95%),
    in 3.1 s; consistent: bar 99.00%; ...`: the verdict and what it rests on."""
    if audit is None:
        return "audit: none (scored before audits)"
    if not audit.rows:
        return f"audit: {audit.reason}"
    line = (
        f"audit: {texts_counted(audit)} of {rows_written:,} rows re-run in FP32, "
        f"{audit.agreeing:,} agree ({bounds(audit)}), in {audit.seconds:.1f} s; "
        f"{verdict_word(audit)}: bar {audit.threshold:.2%}"
    )
    return f"{line}; {audit.reason}" if audit.reason else line


def run_row(run) -> str:
    """`<run id>  ./scored  439 texts  99.32% agree (98.24% to 99.81% at 95%)  consistent`: a
    recorded run's audit of its output, as the run ended."""
    return (
        f"{run.run_id}  {run.output}  {texts_counted(run)}  {run.agreement:.2%} agree "
        f"({bounds(run)})  {verdict_word(run)}"
    )


def live_audit_line(live: dict) -> str:
    """`Live audit: 1,204 distinct texts over 3 runs, 7 flips, 99.42% agree (98.9% to 99.7%
    at 95%): certified (bar 99.00%).`"""
    if not live["rows"]:
        return "Live audit: no audited scoring run recorded."
    line = (
        f"Live audit: {live['rows']:,} distinct texts over {live['runs']} run(s), "
        f"{live['flips']:,} flips, {live['agreement']:.2%} agree "
        f"({live['agreement_lower_bound']:.2%} to {live['agreement_upper_bound']:.2%} at "
        f"{live['confidence']:.0%}): {_said(live['verdict'])} (bar {live['threshold']:.2%})"
    )
    if live["reason"]:
        line += f"; {live['reason']}"
    return f"{line}. {len(live['failed_runs'])} run(s) failed their audit."
