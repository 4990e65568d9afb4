"""How often an audit raises the alarm, by simulation with the audit's own statistics code.

For a version whose true agreement with FP32 is p, a run that audits n distinct texts sees
Binomial(n, 1 - p) flips. For p in 0.985, 0.99, 0.995, 0.999 and n in 300, 1,000, 10,000,
1,000 runs each are drawn (numpy, fixed seed), and each draw is judged by
`distilq.score.evidence.verdict` at bar 0.99 and 95%: the share of runs that alarm under
the rule before verdicts (the lower bound below the bar, now `--audit-fail-on
uncertified`) and under the default rule (`failed`: the upper bound below the bar), and
the share certified. At or above the bar, the default rule must alarm in at most
1 - confidence of runs; at 0.985 it must catch the version in most runs of 10,000.

Writes its table between markers in bench/RESULTS.md. Usage: python bench/bench_audit_rules.py
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np

from distilq.score.evidence import verdict

ROOT = Path(__file__).resolve().parents[1]
BAR, CONFIDENCE, RUNS = 0.99, 0.95, 1000
TRUE_RATES = (0.985, 0.99, 0.995, 0.999)
AUDITED = (300, 1000, 10_000)

sys.path.insert(0, str(ROOT / "bench"))
from bench_quantize import write_results  # noqa: E402


@functools.cache
def judged(flips: int, n: int) -> str:
    """The audit's verdict on `flips` of `n` (cached: the draws repeat few counts)."""
    return verdict(n - flips, n, BAR, CONFIDENCE)["verdict"]


def shares(p: float, n: int, rng: np.random.Generator) -> dict[str, float]:
    verdicts = [judged(int(f), n) for f in rng.binomial(n, 1 - p, size=RUNS)]
    count = lambda *names: sum(v in names for v in verdicts) / RUNS  # noqa: E731
    return {
        "uncertified": count("consistent", "failed"),
        "failed": count("failed"),
        "certified": count("certified"),
    }


def main() -> None:
    rng = np.random.default_rng(20261206)
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench` "
        f"(`bench/bench_audit_rules.py`; no model, no CPU dependence). Bar {BAR:.2%} at "
        f"{CONFIDENCE:.0%}, {RUNS:,} simulated runs per cell, flips ~ Binomial(n, 1 - p), "
        "each judged by `distilq.score.evidence.verdict`.",
        "",
        "| true agreement | audited texts | alarm, lower-bound rule (`uncertified`) | "
        "alarm, default rule (`failed`) | certified |",
        "|---:|---:|---:|---:|---:|",
    ]
    table = {(p, n): shares(p, n, rng) for p in TRUE_RATES for n in AUDITED}
    for (p, n), s in table.items():
        lines.append(
            f"| {p:.3f} | {n:,} | {s['uncertified']:.1%} | {s['failed']:.1%} | "
            f"{s['certified']:.1%} |"
        )
    false_alarm = max(s["failed"] for (p, _), s in table.items() if p >= BAR)
    strict = table[(0.995, 1000)]["uncertified"]
    caught = table[(0.985, 10_000)]["failed"]
    closing = (
        f"Default rule: the most false alarms at or above the bar, {false_alarm:.1%} of runs "
        f"(the bound: {1 - CONFIDENCE:.0%}); a version at 98.5% caught in {caught:.1%} of runs "
        f"of 10,000 texts. The lower-bound rule alarms on {strict:.1%} of runs of a version "
        "truly at 99.5% with 1,000 audited texts. `too few rows` (under 299 texts for 0.99 at "
        "95%) never alarms under either rule."
    )
    write_results([*lines, "", closing], "bench_audit_rules")
    print("\n".join([*lines, "", closing]))


if __name__ == "__main__":
    main()
