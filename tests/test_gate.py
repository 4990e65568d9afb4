"""The gate is a pure function of metrics and thresholds; its edges are inclusive."""

from __future__ import annotations

import numpy as np
import pytest

from distilq.config.shared import GateThresholds
from distilq.errors import InputError
from distilq.gate.compare import compare
from distilq.gate.data import ValidationSet, combine
from distilq.gate.decide import check_certifiable, decide
from distilq.gate.stats import agreement_lower_bound, agreement_needed, examples_needed
from distilq.inference import Predictions

ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}


def _metrics(n: int, int8_flipped: int, labels: bool = True):
    """FP32 predicts class 1 everywhere and is right; INT8 flips the first rows to 0."""
    fp32 = np.tile([[0.2, 0.8]], (n, 1)).astype(np.float32)
    int8 = fp32.copy()
    int8[:int8_flipped] = [0.7, 0.3]
    data = ValidationSet("t", [f"t{i}" for i in range(n)], [1] * n if labels else None, "x")
    return compare(Predictions(fp32, 1.0, 1), Predictions(int8, 1.0, 1), data, ID2LABEL)


# The measured-agreement rule (confidence None) of versions gated before bounds.
POINT = {"confidence": None}


def test_agreement_exactly_at_the_threshold_passes():
    decision = decide(_metrics(100, 1, labels=False), GateThresholds(min_agreement=0.99, **POINT))
    assert decision.approved
    assert decision.reasons[0].startswith("agreement 0.9900 >= 0.9900 (1 of 100 flipped)")
    assert "not checked" in decision.reasons[1]


def test_agreement_one_flip_below_fails_with_the_numbers():
    decision = decide(_metrics(100, 2, labels=False), GateThresholds(min_agreement=0.99, **POINT))
    assert not decision.approved
    assert "agreement 0.9800 < 0.9900 (2 of 100 flipped)" in decision.reasons[0]


def test_accuracy_drop_exactly_at_the_limit_passes_and_beyond_fails():
    thresholds = GateThresholds(min_agreement=0.9, max_accuracy_drop=0.01, **POINT)
    at_limit = _metrics(100, 1)
    assert at_limit.accuracy_drop == 0.01
    assert decide(at_limit, thresholds).approved
    beyond = decide(_metrics(100, 2), thresholds)
    assert not beyond.approved
    assert "accuracy drop +0.0200 (1.0000 -> 0.9800) > 0.0100" in beyond.reasons[1]


def test_flips_are_listed_with_both_labels_and_scores():
    metrics = _metrics(10, 1)
    assert metrics.flips == 1
    flip = metrics.flipped[0]
    assert (flip.index, flip.label, flip.fp32_label, flip.int8_label) == (
        0,
        "POSITIVE",
        "POSITIVE",
        "NEGATIVE",
    )
    assert abs(flip.fp32_score - 0.8) < 1e-6 and abs(flip.int8_score - 0.7) < 1e-6
    assert abs(metrics.max_abs_prob_change - 0.5) < 1e-6


def test_every_validation_set_must_pass_on_its_own():
    """300 short sentences agree fully, 100 long reviews do not: 99.0% overall, yet rejected."""
    short = ValidationSet("short", [f"s{i}" for i in range(300)], [1] * 300, "a")
    long = ValidationSet("long", [f"l{i}" for i in range(100)], [1] * 100, "b")
    data = combine([short, long])
    fp32 = np.tile([[0.2, 0.8]], (400, 1)).astype(np.float32)
    int8 = fp32.copy()
    int8[300:304] = [0.7, 0.3]  # 4 flips, all in the long set
    metrics = compare(Predictions(fp32, 1.0, 1), Predictions(int8, 1.0, 1), data, ID2LABEL)
    assert metrics.agreement == 0.99 and [s.agreement for s in metrics.sets] == [1.0, 0.96]
    assert [s.name for s in metrics.sets] == ["short", "long"]
    decision = decide(metrics, GateThresholds(min_agreement=0.99, max_accuracy_drop=0.05, **POINT))
    assert not decision.approved
    assert "long: agreement 0.9600 < 0.9900 (4 of 100 flipped)" in decision.reasons
    assert "short: agreement 1.0000 >= 0.9900 (0 of 300 flipped)" in decision.reasons
    assert metrics.flipped[0].index == 300  # indices are into the combined set


def test_the_gate_certifies_a_lower_bound_not_the_measured_agreement():
    """868 of 872 agree: 99.54% measured, but only 98.95% certified at 95%."""
    thresholds = GateThresholds(min_agreement=0.99, confidence=0.95)
    metrics = compare(*_predictions(872, 4), _data(872), ID2LABEL, confidence=0.95)
    assert metrics.sets[0].agreement_lower_bound == pytest.approx(0.98953, abs=1e-5)
    assert metrics.agreement_lower_bound == metrics.sets[0].agreement_lower_bound
    decision = decide(metrics, thresholds)
    assert not decision.approved
    assert decision.reasons[0] == (
        "agreement lower bound 0.9895 < 0.9900 at 95% confidence "
        "(measured 0.9954: 4 of 872 flipped)"
    )
    three = compare(*_predictions(872, 3), _data(872), ID2LABEL, confidence=0.95)
    assert decide(three, thresholds).approved  # bound 0.9911
    low, high = three.sets[0].accuracy_drop_interval
    assert low < three.sets[0].accuracy_drop < high  # reported around the point


def test_bounds_match_the_exact_binomial_figures():
    assert agreement_lower_bound(872, 872, 0.95) == pytest.approx(0.99657, abs=1e-5)
    assert agreement_lower_bound(869, 872, 0.95) == pytest.approx(0.99113, abs=1e-5)
    assert agreement_lower_bound(1996, 2000, 0.95) == pytest.approx(0.99543, abs=1e-5)
    assert examples_needed(0.99, 0.95) == 299
    assert agreement_lower_bound(299, 299, 0.95) >= 0.99 > agreement_lower_bound(298, 298, 0.95)
    # auto's aim: the least agreement on 2,729 confirmation examples that certifies 0.99.
    needed = round(agreement_needed(2729, 0.99, 0.95) * 2729)
    assert agreement_lower_bound(needed, 2729, 0.95) >= 0.99
    assert agreement_lower_bound(needed - 1, 2729, 0.95) < 0.99


def test_a_set_too_small_to_certify_is_refused_before_any_work():
    thresholds = GateThresholds(min_agreement=0.99, confidence=0.95)
    check_certifiable({"big": 299}, thresholds)
    with pytest.raises(InputError, match=r"small \(298\) needs at least 299 examples"):
        check_certifiable({"big": 400, "small": 298}, thresholds)
    check_certifiable({"tiny": 5}, GateThresholds(min_agreement=0.99, **POINT))


def _predictions(n: int, flipped: int):
    fp32 = np.tile([[0.2, 0.8]], (n, 1)).astype(np.float32)
    int8 = fp32.copy()
    int8[:flipped] = [0.7, 0.3]
    return Predictions(fp32, 1.0, 1), Predictions(int8, 1.0, 1)


def _data(n: int) -> ValidationSet:
    return ValidationSet("t", [f"t{i}" for i in range(n)], [1] * n, "x")
