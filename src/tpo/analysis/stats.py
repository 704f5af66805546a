"""The statistics the analyses share: quantiles, confidence intervals, the bootstrap and a small logistic regression.

Pure Python, so tpo's analyses need no numerical package. Every random choice takes a
``random.Random`` from the caller (seeded there), so an analysis gives the same numbers on
every run.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError

__all__ = [
    "Interval",
    "LogisticFit",
    "bootstrap_mean_interval",
    "fit_logistic",
    "percentile_interval",
    "quantile",
    "sigmoid",
    "wilson_interval",
]


@dataclass(frozen=True)
class Interval:
    """A confidence interval."""

    low: float
    high: float


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolating linearly between closest ranks (NumPy's default)."""
    if not sorted_xs:
        raise InputError("the quantile of no values is undefined")
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be between 0 and 1, not {confidence}")
    return statistics.NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval | None:
    """The Wilson score interval for a proportion; ``None`` when ``n == 0``."""
    if n <= 0:
        return None
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 and n the bound is exactly 0 or 1; rounding would leave a speck.
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return Interval(low, high)


def percentile_interval(values: Sequence[float], confidence: float) -> Interval:
    """The central ``confidence`` share of ``values`` (a bootstrap distribution, say)."""
    xs = sorted(values)
    alpha = 1 - confidence
    return Interval(quantile(xs, alpha / 2), quantile(xs, 1 - alpha / 2))


def bootstrap_mean_interval(
    values: Sequence[float], *, rng: random.Random, samples: int = 2000, confidence: float = 0.95
) -> Interval | None:
    """A percentile-bootstrap interval of the mean of ``values`` (``None`` for no values).

    ``rng`` draws the resamples: pass ``random.Random(seed)`` for the same interval every time.
    """
    if samples < 1:
        raise InputError(f"bootstrap samples must be at least 1, not {samples}")
    _z(confidence)
    n = len(values)
    if n == 0:
        return None
    means = []
    for _ in range(samples):
        means.append(math.fsum(values[i] for i in rng.choices(range(n), k=n)) / n)
    return percentile_interval(means, confidence)


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class LogisticFit:
    """A fitted logistic regression: ``P(y = 1) = sigmoid(coef[0] + coef[1] * x1 + ...)``.

    ``se`` are the standard errors of the coefficients (from the inverse of the penalised
    Hessian at the optimum); ``converged`` says whether Newton's method met its tolerance.
    """

    coef: tuple[float, ...]
    se: tuple[float, ...]
    iterations: int
    converged: bool

    def predict(self, features: Sequence[float]) -> float:
        """The fitted probability for one row of features (without the intercept's 1)."""
        return sigmoid(self.coef[0] + sum(b * x for b, x in zip(self.coef[1:], features, strict=True)))

    def intercept_interval(self, confidence: float = 0.95) -> Interval:
        """A Wald interval of ``sigmoid(intercept)``: the probability when every feature is 0."""
        z = _z(confidence)
        b, se = self.coef[0], self.se[0]
        return Interval(sigmoid(b - z * se), sigmoid(b + z * se))


def fit_logistic(
    features: Sequence[Sequence[float]],
    targets: Sequence[float],
    *,
    l2: float = 0.01,
    max_iterations: int = 100,
    tolerance: float = 1e-10,
) -> LogisticFit:
    """Fit ``P(y = 1 | x) = sigmoid(b0 + b · x)`` by Newton's method (iteratively reweighted least squares).

    ``features`` has one row per observation (the intercept is added here); ``targets`` are
    in [0, 1], so a tie can count as 0.5. ``l2`` is a weak ridge penalty on every
    coefficient: it keeps the fit finite when one outcome always wins (perfect separation)
    and changes a fit on real data negligibly. Each Newton step is halved until the
    penalised log-likelihood does not fall.
    """
    n = len(targets)
    if n == 0:
        raise InputError("a logistic regression needs at least one observation")
    if len(features) != n:
        raise InputError(f"{len(features)} rows of features for {n} targets")
    width = len(features[0]) if features else 0
    rows = []
    for i, (row, y) in enumerate(zip(features, targets, strict=True)):
        if len(row) != width:
            raise InputError(f"row {i} has {len(row)} features, not {width}")
        if not all(math.isfinite(x) for x in row):
            raise InputError(f"row {i} has a feature that is not a finite number: {list(row)}")
        if not 0.0 <= y <= 1.0:
            raise InputError(f"target {i} is {y}; targets must be in [0, 1]")
        rows.append((1.0, *row))
    if l2 < 0:
        raise InputError(f"the ridge penalty l2 must be >= 0, not {l2}")
    k = width + 1
    beta = [0.0] * k

    def objective(b: Sequence[float]) -> float:
        total = -0.5 * l2 * math.fsum(v * v for v in b)
        for x, y in zip(rows, targets, strict=True):
            eta = math.fsum(bi * xi for bi, xi in zip(b, x, strict=True))
            # y log p + (1 - y) log(1 - p), written to stay finite for large |eta|.
            total += y * eta - (eta + math.log1p(math.exp(-eta)) if eta > 0 else math.log1p(math.exp(eta)))
        return total

    current = objective(beta)
    converged = False
    iterations = 0
    hessian: list[list[float]] = []
    while iterations < max_iterations:
        iterations += 1
        gradient = [-l2 * b for b in beta]
        hessian = [[l2 if r == c else 0.0 for c in range(k)] for r in range(k)]
        for x, y in zip(rows, targets, strict=True):
            p = sigmoid(math.fsum(bi * xi for bi, xi in zip(beta, x, strict=True)))
            w = p * (1.0 - p)
            for r in range(k):
                gradient[r] += (y - p) * x[r]
                for c in range(k):
                    hessian[r][c] += w * x[r] * x[c]
        step = _solve(hessian, gradient)
        scale = 1.0
        while True:
            candidate = [b + scale * s for b, s in zip(beta, step, strict=True)]
            value = objective(candidate)
            if value >= current - 1e-12 * abs(current):
                break
            scale /= 2
            if scale < 1e-8:  # no step improves: this is the optimum, as far as doubles can tell
                candidate, value = beta, current
                break
        beta, current = candidate, value
        if max(abs(scale * s) for s in step) < tolerance:
            converged = True
            break
    covariance = _inverse(hessian) if hessian else [[math.nan]]
    se = tuple(math.sqrt(max(covariance[i][i], 0.0)) for i in range(k))
    return LogisticFit(tuple(beta), se, iterations, converged)


def _solve(matrix: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float]:
    """Solve ``matrix · x = rhs`` by Gaussian elimination with partial pivoting (small systems only)."""
    k = len(rhs)
    a = [[*row, rhs[i]] for i, row in enumerate(matrix)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-300:
            raise InputError("the regression is singular (a feature that never varies, or no data)")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, k):
            f = a[r][col] / a[col][col]
            for c in range(col, k + 1):
                a[r][c] -= f * a[col][c]
    x = [0.0] * k
    for r in range(k - 1, -1, -1):
        x[r] = (a[r][k] - math.fsum(a[r][c] * x[c] for c in range(r + 1, k))) / a[r][r]
    return x


def _inverse(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    k = len(matrix)
    columns = [_solve(matrix, [1.0 if i == j else 0.0 for i in range(k)]) for j in range(k)]
    return [[columns[j][i] for j in range(k)] for i in range(k)]
