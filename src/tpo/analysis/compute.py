"""Reward against compute: best-of-n from one best-of-N run, cumulative cost per step, and comparisons at matched cost.

The definitions, precisely (``docs/evaluation.md`` says the same in prose):

* **Best-of-n from best-of-N.** For one prompt with N scored samples ``s(1) <= ... <= s(N)``,
  the best of n samples drawn without replacement is ``s(i)`` with probability
  ``C(i-1, n-1) / C(N, n)``, so its expectation is exactly
  ``sum_i s(i) C(i-1, n-1) / C(N, n)`` (``expected_best_of``). The samples of one run are
  independent draws, so this is what a best-of-n run would score on average, for every
  n <= N, from one best-of-N run. Samples that could not be scored are left out (n is
  capped at the number scored).
* **Cost.** Generated tokens (``completion_tokens``) per prompt, and prompt + generated
  tokens, and FLOPs where the results carry estimates. The cost after step s is the
  prompt's usage up to the end of that step (``StepRecord.cumulative``, or the sum of the
  steps' usage in older results). A best-of-n costs the prompt tokens of the sampling
  request and n times the mean generated tokens of one sample of that prompt.
* **Reward after step s** is the best score found up to step s (the answer a run of that
  depth returns with ``final_from="all"``), averaged over finished prompts; a prompt that
  stopped early keeps its last values.
* **Matched cost.** For a TPO or revision run, the best-of-n (from the largest best-of-N
  run given) whose mean generated tokens per prompt is nearest the run's. Paired by
  prompt id over prompts finished in both: the mean of ``score - E[best of n]``, and the
  win rate counting ties as half, where a prompt's outcome is its exact expectation
  (``P(win) + P(tie) / 2`` against a random n-subset of that prompt's samples), each
  with a percentile-bootstrap interval over prompts from a seeded generator. When the
  runs report no tokens, answers generated (``sequences``) are matched instead.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InputError
from ..result import TPOResult, Usage
from .stats import Interval, bootstrap_mean_interval

if TYPE_CHECKING:
    from .evaluate import Run

__all__ = [
    "BestOfPrompt",
    "ComputePoint",
    "MatchedComparison",
    "best_of_curve",
    "best_of_outcome",
    "best_of_prompts",
    "compute_curve",
    "cumulative_usage",
    "expected_best_of",
    "matched_compute",
]

Basis = Literal["completion_tokens", "sequences"]


# ---------------------------------------------------------------------------------- best-of-n


def expected_best_of(scores: Sequence[float], n: int) -> float:
    """The expected maximum of ``n`` scores drawn without replacement from ``scores`` (exact)."""
    big_n = len(scores)
    if not 1 <= n <= big_n:
        raise InputError(f"best-of-{n} needs 1 <= n <= {big_n}, the number of scores")
    ordered = sorted(scores)
    total = math.comb(big_n, n)
    # Exact integer weights, divided last: C(N, n) overflows a float long before it troubles an int.
    return math.fsum(s * (math.comb(i, n - 1) / total) for i, s in enumerate(ordered) if i >= n - 1)


def best_of_outcome(
    scores: Sequence[float], n: int, value: float, *, tie_eps: float = 0.0
) -> tuple[float, float, float]:
    """``(P(win), P(tie), P(loss))`` of ``value`` against the best of ``n`` of ``scores`` drawn without replacement.

    A win is ``value - best > tie_eps``, a loss ``best - value > tie_eps``, else a tie.
    ``P(best < t) = C(#{s < t}, n) / C(N, n)``.
    """
    big_n = len(scores)
    if not 1 <= n <= big_n:
        raise InputError(f"best-of-{n} needs 1 <= n <= {big_n}, the number of scores")
    total = math.comb(big_n, n)
    below = sum(1 for s in scores if s < value - tie_eps)
    at_most = sum(1 for s in scores if s <= value + tie_eps)
    win = math.comb(below, n) / total
    loss = 1.0 - math.comb(at_most, n) / total
    return win, max(0.0, 1.0 - win - loss), loss


@dataclass(frozen=True)
class BestOfPrompt:
    """One prompt of a best-of-N run: its scored samples and what one sample cost."""

    prompt_id: str
    #: The scored samples, ascending.
    scores: tuple[float, ...]
    #: Prompt tokens of the sampling request, and their FLOPs (``None``: unknown).
    prompt_tokens: float
    prompt_flops: float | None
    #: Mean generated tokens of one sample, and their FLOPs.
    sample_tokens: float
    sample_flops: float | None

    def cost(self, n: int, basis: Basis = "completion_tokens") -> float:
        """Generated tokens (or answers, with ``basis="sequences"``) of a best-of-n of this prompt."""
        return float(n) if basis == "sequences" else n * self.sample_tokens


def best_of_prompts(results: Sequence[TPOResult]) -> list[BestOfPrompt]:
    """The finished prompts of a best-of-N run that have at least one scored sample."""
    out = []
    for r in results:
        if r.status != "complete" or not r.steps:
            continue
        first = r.steps[0]
        by_id = {c.id: c.score for c in r.candidates}
        scores = sorted(s for s in (by_id.get(cid) for cid in first.candidate_ids) if s is not None)
        if not scores:
            continue
        u = first.usage
        per = max(u.sequences, 1)
        out.append(
            BestOfPrompt(
                r.prompt_id,
                tuple(scores),
                float(u.prompt_tokens),
                u.prompt_flops,
                u.completion_tokens / per,
                u.completion_flops / per if u.completion_flops is not None else None,
            )
        )
    return out


# ---------------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class ComputePoint:
    """The mean reward of the answer a configuration returns, against its mean cost per prompt.

    ``step`` is set for a point after a step of a run; ``n`` for a best-of-n derived from a
    best-of-N run. ``flops`` is ``None`` unless every prompt's usage carries an estimate.
    """

    label: str
    step: int | None
    n: int | None
    prompts: int
    reward: float | None
    generated_tokens: float | None
    tokens: float | None
    flops: float | None
    #: Answers generated (sequences) per prompt.
    sequences: float | None = None


def cumulative_usage(result: TPOResult, step: int) -> Usage:
    """The prompt's usage up to the end of ``step`` (its last step's, if it stopped before)."""
    steps = [s for s in result.steps if s.step <= step]
    if not steps:
        return Usage()
    last = steps[-1]
    if last.cumulative is not None:
        return last.cumulative
    total = Usage()
    for s in steps:
        total = total + s.usage
    return total


def compute_curve(run: Run) -> tuple[ComputePoint, ...]:
    """One point per step of a run: best reward so far against the cumulative cost (finished prompts).

    For a best-of-N run this is the single point after its sampling; ``best_of_curve``
    gives its whole best-of-n curve.
    """
    done = [r for r in run.results if r.status == "complete" and r.steps]
    last = max((s.step for r in done for s in r.steps), default=-1)
    out = []
    for step in range(last + 1):
        best: list[float] = []
        usages: list[Usage] = []
        for r in done:
            b = _best_up_to(r, step)
            if b is None:
                continue
            best.append(b)
            usages.append(cumulative_usage(r, step))
        out.append(_point(run.label, step, best, usages))
    return tuple(out)


def _best_up_to(result: TPOResult, step: int) -> float | None:
    """The highest score among the prompt's answers first seen at a step <= ``step`` (``None``: none scored)."""
    scores = [c.score for c in result.candidates if c.score is not None and c.step <= step]
    return max(scores) if scores else None


def best_of_curve(run: Run) -> tuple[ComputePoint, ...]:
    """The expected best-of-n reward and cost for every n from 1 to N from one best-of-N run."""
    prompts = best_of_prompts(run.results)
    if not prompts:
        return ()
    largest = max(len(p.scores) for p in prompts)
    out = []
    for n in range(1, largest + 1):
        # A prompt with fewer than n scored samples takes the best of all it has.
        rewards = [expected_best_of(p.scores, min(n, len(p.scores))) for p in prompts]
        flops = [
            p.prompt_flops + n * p.sample_flops
            for p in prompts
            if p.prompt_flops is not None and p.sample_flops is not None
        ]
        out.append(
            ComputePoint(
                label=f"BoN-{n}",
                step=None,
                n=n,
                prompts=len(prompts),
                reward=statistics.fmean(rewards),
                generated_tokens=statistics.fmean(n * p.sample_tokens for p in prompts),
                tokens=statistics.fmean(p.prompt_tokens + n * p.sample_tokens for p in prompts),
                flops=statistics.fmean(flops) if len(flops) == len(prompts) else None,
                sequences=float(n),
            )
        )
    return tuple(out)


def _point(label: str, step: int, rewards: Sequence[float], usages: Sequence[Usage]) -> ComputePoint:
    flops = [u.flops for u in usages]
    known = [f for f in flops if f is not None]
    return ComputePoint(
        label=label,
        step=step,
        n=None,
        prompts=len(rewards),
        reward=statistics.fmean(rewards) if rewards else None,
        generated_tokens=statistics.fmean(u.completion_tokens for u in usages) if usages else None,
        tokens=statistics.fmean(u.tokens for u in usages) if usages else None,
        flops=statistics.fmean(known) if usages and len(known) == len(usages) else None,
        sequences=statistics.fmean(u.sequences for u in usages) if usages else None,
    )


# ---------------------------------------------------------------------------------- matched cost


@dataclass(frozen=True)
class MatchedComparison:
    """A run against the best-of-n of about the same cost (see the module docstring)."""

    run: str
    #: The best-of-N run the best-of-n was derived from, and n.
    best_of_run: str
    n: int
    #: What was matched: generated tokens, or answers generated when no tokens were reported.
    basis: Basis
    #: Mean cost per prompt of the run and of the best-of-n, in the basis' unit.
    run_cost: float
    best_of_cost: float
    #: True when the run costs more than the whole best-of-N: n is N, and the match is short of the run.
    best_of_too_small: bool
    #: Prompts finished with a score in both runs.
    paired: int
    run_reward: float | None
    best_of_reward: float | None
    mean_difference: float | None
    mean_difference_interval: Interval | None
    #: Expected shares of prompts the run wins, ties and loses against a random best-of-n.
    win_rate: float | None
    tie_rate: float | None
    loss_rate: float | None
    win_rate_ties_half: float | None
    win_rate_ties_half_interval: Interval | None
    tie_eps: float
    confidence: float
    bootstrap_samples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def matched_compute(
    runs: Sequence[Run],
    *,
    tie_eps: float = 0.0,
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> tuple[MatchedComparison, ...]:
    """Every TPO and revision run of ``runs`` against the best-of-n of nearest cost, from the largest best-of-N run.

    Empty when ``runs`` hold no best-of-N run, or no other run.
    """
    if tie_eps < 0 or math.isnan(tie_eps):
        raise InputError(f"tie_eps must be >= 0, not {tie_eps}")
    bon_runs = [r for r in runs if r.mode == "bon"]
    if not bon_runs:
        return ()
    source = max(bon_runs, key=lambda r: r.width or 0)
    prompts = best_of_prompts(source.results)
    if not prompts:
        return ()
    by_id = {p.prompt_id: p for p in prompts}
    largest = max(len(p.scores) for p in prompts)
    bases: tuple[Basis, ...] = ("completion_tokens", "sequences")
    costs = {
        basis: {n: statistics.fmean(p.cost(n, basis) for p in prompts) for n in range(1, largest + 1)}
        for basis in bases
    }
    out = []
    for run in runs:
        if run.mode == "bon":
            continue
        done = [(r, r.score) for r in run.results if r.status == "complete" and r.score is not None]
        if not done:
            continue
        basis: Basis = "completion_tokens"
        if not any(r.usage.completion_tokens for r, _ in done) or not any(p.sample_tokens for p in prompts):
            basis = "sequences"
        run_cost = statistics.fmean(
            r.usage.completion_tokens if basis == "completion_tokens" else r.usage.sequences for r, _ in done
        )
        cost = costs[basis]
        n = min(cost, key=lambda k: (abs(cost[k] - run_cost), k))
        out.append(
            _matched(
                label=run.label,
                source=source.label,
                done=done,
                by_id=by_id,
                n=n,
                basis=basis,
                run_cost=run_cost,
                best_of_cost=cost[n],
                largest=largest,
                tie_eps=tie_eps,
                confidence=confidence,
                bootstrap_samples=bootstrap_samples,
                seed=seed,
            )
        )
    return tuple(out)


def _matched(
    *,
    label: str,
    source: str,
    done: Sequence[tuple[TPOResult, float]],
    by_id: Mapping[str, BestOfPrompt],
    n: int,
    basis: Basis,
    run_cost: float,
    best_of_cost: float,
    largest: int,
    tie_eps: float,
    confidence: float,
    bootstrap_samples: int,
    seed: int,
) -> MatchedComparison:
    """One run's results, each with its score, against the best-of-``n`` of the prompts in ``by_id``."""
    diffs, outcomes, wins, ties, losses, mine, theirs = [], [], [], [], [], [], []
    for r, score in done:
        p = by_id.get(r.prompt_id)
        if p is None:
            continue
        k = min(n, len(p.scores))
        expected = expected_best_of(p.scores, k)
        win, tie, loss = best_of_outcome(p.scores, k, score, tie_eps=tie_eps)
        mine.append(score)
        theirs.append(expected)
        diffs.append(score - expected)
        outcomes.append(win + tie / 2)
        wins.append(win)
        ties.append(tie)
        losses.append(loss)
    paired = len(diffs)
    rng = random.Random(seed)  # noqa: S311  # resampling for an interval, not secrecy
    diff_ci = bootstrap_mean_interval(diffs, rng=rng, samples=bootstrap_samples, confidence=confidence)
    half_ci = bootstrap_mean_interval(outcomes, rng=rng, samples=bootstrap_samples, confidence=confidence)

    def mean(xs: Sequence[float]) -> float | None:
        return statistics.fmean(xs) if xs else None

    return MatchedComparison(
        run=label,
        best_of_run=source,
        n=n,
        basis=basis,
        run_cost=run_cost,
        best_of_cost=best_of_cost,
        best_of_too_small=n == largest and run_cost > best_of_cost,
        paired=paired,
        run_reward=mean(mine),
        best_of_reward=mean(theirs),
        mean_difference=mean(diffs),
        mean_difference_interval=diff_ci,
        win_rate=mean(wins),
        tie_rate=mean(ties),
        loss_rate=mean(losses),
        win_rate_ties_half=mean(outcomes),
        win_rate_ties_half_interval=half_ci,
        tie_eps=tie_eps,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )
