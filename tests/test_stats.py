"""The shared statistics: Wilson and bootstrap intervals, and the logistic regression on data with a known answer."""

from __future__ import annotations

import math
import random

import pytest

from tpo import InputError
from tpo.analysis.stats import (
    bootstrap_mean_interval,
    fit_logistic,
    percentile_interval,
    quantile,
    sigmoid,
    wilson_interval,
)


def test_wilson_interval_matches_the_textbook_values() -> None:
    # 8 successes of 10 at 95%: the Wilson interval is [0.4902, 0.9433] (Newcombe 1998, table I).
    iv = wilson_interval(8, 10)
    assert iv is not None
    assert iv.low == pytest.approx(0.4902, abs=1e-4) and iv.high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10).low == 0.0  # type: ignore[union-attr]
    assert wilson_interval(10, 10).high == 1.0  # type: ignore[union-attr]
    assert wilson_interval(0, 0) is None
    with pytest.raises(InputError, match="confidence"):
        wilson_interval(1, 2, confidence=1.5)


def test_quantiles_interpolate_like_numpy() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert quantile(xs, 0.5) == 2.5
    assert quantile(xs, 0.9) == pytest.approx(3.7)
    assert percentile_interval([5.0, 1.0, 3.0], 0.5).low == pytest.approx(2.0)
    with pytest.raises(InputError):
        quantile([], 0.5)


def test_the_bootstrap_is_seeded_and_covers_the_mean() -> None:
    rng = random.Random(1)
    values = [rng.gauss(3.0, 1.0) for _ in range(400)]
    a = bootstrap_mean_interval(values, rng=random.Random(7), samples=500)
    b = bootstrap_mean_interval(values, rng=random.Random(7), samples=500)
    c = bootstrap_mean_interval(values, rng=random.Random(8), samples=500)
    assert a == b and a != c
    assert a is not None and a.low < sum(values) / len(values) < a.high
    # About ±1.96 standard errors (0.1 here): the width is right, not just the centre.
    assert 0.15 < a.high - a.low < 0.25
    assert bootstrap_mean_interval([], rng=random.Random(0)) is None
    with pytest.raises(InputError, match="bootstrap samples"):
        bootstrap_mean_interval([1.0], rng=random.Random(0), samples=0)


def test_sigmoid_is_stable_at_the_extremes() -> None:
    assert sigmoid(0) == 0.5
    assert sigmoid(800) == 1.0 and sigmoid(-800) == 0.0
    assert sigmoid(2.0) == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_the_logistic_regression_recovers_known_coefficients() -> None:
    rng = random.Random(0)
    b0, b1 = 0.8, -1.5
    xs = [rng.uniform(-2, 2) for _ in range(5000)]
    ys = [1.0 if rng.random() < sigmoid(b0 + b1 * x) else 0.0 for x in xs]
    fit = fit_logistic([[x] for x in xs], ys)
    assert fit.converged
    # Within about three standard errors of the truth, and the errors are of the right size.
    assert fit.coef[0] == pytest.approx(b0, abs=3 * fit.se[0])
    assert fit.coef[1] == pytest.approx(b1, abs=3 * fit.se[1])
    assert 0.02 < fit.se[0] < 0.06 and 0.02 < fit.se[1] < 0.06
    iv = fit.intercept_interval()
    assert iv.low < sigmoid(b0) < iv.high
    assert fit.predict([0.0]) == pytest.approx(sigmoid(fit.coef[0]))


def test_fractional_targets_count_ties_as_half() -> None:
    # Every outcome a tie: the fitted probability is one half, whatever the feature.
    fit = fit_logistic([[x / 10] for x in range(-10, 11)], [0.5] * 21)
    assert sigmoid(fit.coef[0]) == pytest.approx(0.5, abs=1e-9)
    assert fit.coef[1] == pytest.approx(0.0, abs=1e-9)


def test_perfect_separation_stays_finite() -> None:
    # One side wins every time: without the ridge penalty the coefficients would run off to infinity.
    fit = fit_logistic([[-1.0], [0.0], [1.0]], [1.0, 1.0, 1.0])
    assert all(math.isfinite(b) for b in fit.coef + fit.se)
    assert fit.predict([0.0]) > 0.98


@pytest.mark.parametrize(
    ("features", "targets", "message"),
    [
        ([], [], "at least one observation"),
        ([[1.0]], [1.0, 0.0], "rows of features"),
        ([[1.0], [1.0, 2.0]], [1.0, 0.0], "row 1 has 2 features"),
        ([[math.nan]], [1.0], "not a finite number"),
        ([[1.0]], [2.0], "targets must be in"),
    ],
)
def test_bad_regression_input_is_refused(features: list[list[float]], targets: list[float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        fit_logistic(features, targets)
