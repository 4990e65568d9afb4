"""What a measured agreement certifies: exact binomial bounds, no SciPy needed.

The gate's promise is about texts it has not seen. Agreement measured on n examples is an
estimate; the one-sided Clopper-Pearson lower bound is the smallest agreement rate that
would still produce at least as many agreements with probability 1 - confidence.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def _at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p). Summed over the n - k + 1 upper terms, which are
    few when agreement is high."""
    if k <= 0 or p >= 1:
        return 1.0
    if p <= 0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    total = 0.0
    for i in range(k, n + 1):
        log_choose = log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1)
        total += math.exp(log_choose + i * log_p + (n - i) * log_q)
    return min(total, 1.0)


def agreement_lower_bound(agree: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of a rate from `agree` successes in `n` trials:
    the true rate is at least this with probability `confidence`. 868 of 872 at 0.95 gives
    0.9895; 872 of 872 gives 0.9966."""
    if not 0 <= agree <= n or n == 0:
        raise ValueError(f"need 0 <= agree <= n and n > 0, got {agree} of {n}")
    alpha = 1 - confidence
    if agree == 0:
        return 0.0
    if agree == n:
        return alpha ** (1 / n)
    low, high = 0.0, agree / n
    for _ in range(60):  # bisection: P(X >= agree | p) grows with p
        mid = (low + high) / 2
        if _at_least(agree, n, mid) < alpha:
            low = mid
        else:
            high = mid
    return low


def agreement_upper_bound(agree: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound: the true rate is at most this with probability
    `confidence`, the largest rate that still gives at most `agree` successes with
    probability 1 - confidence. 436 of 439 at 0.95 gives 0.9981; 409 of 439 gives 0.9504."""
    if not 0 <= agree <= n or n == 0:
        raise ValueError(f"need 0 <= agree <= n and n > 0, got {agree} of {n}")
    alpha = 1 - confidence
    if agree == n:
        return 1.0
    if agree == 0:
        return 1 - alpha ** (1 / n)
    low, high = agree / n, 1.0
    for _ in range(60):  # bisection: P(X <= agree | p) = 1 - P(X >= agree + 1) falls with p
        mid = (low + high) / 2
        if 1 - _at_least(agree + 1, n, mid) > alpha:
            low = mid
        else:
            high = mid
    return high


def rows_to_decide(agreement: float, bar: float, confidence: float) -> int | None:
    """About how many rows a sample needs before one bound decides `bar` when the rate it
    measures is `agreement` (the normal approximation: z^2 p(1 - p) / (p - bar)^2); None at
    the bar itself, where no sample size decides."""
    if agreement == bar:
        return None
    z = NormalDist().inv_cdf(confidence)
    variance = max(agreement * (1 - agreement), bar * (1 - bar))
    return math.ceil(z * z * variance / (agreement - bar) ** 2)


def examples_needed(min_agreement: float, confidence: float) -> int:
    """The fewest examples whose lower bound reaches `min_agreement` with no disagreement
    at all (299 for 0.99 at 0.95); a smaller set can never pass."""
    if min_agreement <= 0:
        return 1
    if min_agreement >= 1:
        raise ValueError("a lower bound never reaches 1: lower --min-agreement")
    return math.ceil(math.log(1 - confidence) / math.log(min_agreement))


def flips_allowed(n: int, min_agreement: float, confidence: float | None) -> int:
    """The most flips on `n` examples that still pass `min_agreement` (its lower bound at
    `confidence`, or the measured agreement when None); -1 if even none passes."""
    if min_agreement <= 0:
        return n
    if confidence is None:
        return math.floor(n * (1 - min_agreement) + 1e-9)
    if agreement_lower_bound(n, n, confidence) < min_agreement:
        return -1
    low, high = 0, n  # the bound falls as flips grow: find the most flips that still pass
    while low < high:
        flips = (low + high + 1) // 2
        if agreement_lower_bound(n - flips, n, confidence) >= min_agreement:
            low = flips
        else:
            high = flips - 1
    return low


def agreement_needed(n: int, min_agreement: float, confidence: float) -> float:
    """The smallest measured agreement on `n` examples whose lower bound reaches
    `min_agreement` (above 1 if none does)."""
    return (n - flips_allowed(n, min_agreement, confidence)) / n


# Jeffreys' prior for a rate: Beta(1/2, 1/2), whose posterior intervals have close to their
# nominal frequentist coverage, even with no flip at all.
JEFFREYS = (0.5, 0.5)


def pass_probability(
    flips: int, n: int, future_n: int, allowed: int, prior: tuple[float, float] = JEFFREYS
) -> float:
    """Predicted probability that `future_n` new examples show at most `allowed` flips,
    having seen `flips` in `n`: the Beta posterior of the flip rate, and the beta-binomial
    predictive count of flips. At most 6 of 1,275 after 0 flips in 546: 0.97; after 1: 0.84
    (a Monte Carlo draw of rate, then flips, agrees)."""
    if not 0 <= flips <= n:
        raise ValueError(f"need 0 <= flips <= n, got {flips} of {n}")
    if allowed < 0:
        return 0.0
    if allowed >= future_n:
        return 1.0
    a, b = prior[0] + flips, prior[1] + n - flips
    log_beta_ab = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    log_m = math.lgamma(future_n + 1)
    total = 0.0
    for k in range(allowed + 1):  # few terms: the flips that still pass
        log_choose = log_m - math.lgamma(k + 1) - math.lgamma(future_n - k + 1)
        log_beta = (
            math.lgamma(k + a) + math.lgamma(future_n - k + b) - math.lgamma(future_n + a + b)
        )
        total += math.exp(log_choose + log_beta - log_beta_ab)
    return min(total, 1.0)


def paired_difference_interval(
    only_first: int, only_second: int, n: int, confidence: float
) -> tuple[float, float]:
    """Two-sided interval of the difference of two paired rates on the same n examples,
    from the discordant counts (first right and second wrong, and the reverse): the normal
    approximation of McNemar's setting, for the accuracy drop of INT8 against FP32."""
    diff = (only_first - only_second) / n
    variance = (only_first + only_second - (only_first - only_second) ** 2 / n) / n**2
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    half = z * math.sqrt(max(variance, 0.0))
    return diff - half, diff + half
