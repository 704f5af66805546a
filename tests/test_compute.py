"""Reward against compute: the exact best-of-n estimator, cumulative costs, and the comparison at matched cost."""

from __future__ import annotations

import itertools
import random
import statistics
from dataclasses import replace
from typing import Any

import pytest

import tpo
from conftest import hash_score, pure_reply
from tpo import InputError
from tpo.analysis.compute import (
    best_of_curve,
    best_of_outcome,
    best_of_prompts,
    compute_curve,
    cumulative_usage,
    expected_best_of,
    matched_compute,
)
from tpo.analysis.evaluate import Run, run_label
from tpo.testing import FunctionReward, ScriptedPolicy

# --------------------------------------------------------------------------- the estimator against enumeration


@pytest.mark.parametrize("seed", range(6))
def test_expected_best_of_n_equals_the_mean_over_every_subset(seed: int) -> None:
    rng = random.Random(seed)
    big_n = rng.randint(1, 9)
    # Ties on purpose: scores from a small set.
    scores = [float(rng.choice([-2, 0, 0.5, 1, 3, 3, 7])) for _ in range(big_n)]
    for n in range(1, big_n + 1):
        subsets = list(itertools.combinations(scores, n))
        brute = statistics.fmean(max(s) for s in subsets)
        assert expected_best_of(scores, n) == pytest.approx(brute, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_win_tie_loss_against_best_of_n_equals_enumeration(seed: int) -> None:
    rng = random.Random(100 + seed)
    scores = [round(rng.uniform(0, 3), 1) for _ in range(rng.randint(1, 8))]
    value = round(rng.uniform(0, 3), 1)
    eps = rng.choice([0.0, 0.25])
    for n in range(1, len(scores) + 1):
        subsets = list(itertools.combinations(scores, n))
        win = sum(1 for s in subsets if value - max(s) > eps) / len(subsets)
        loss = sum(1 for s in subsets if max(s) - value > eps) / len(subsets)
        got = best_of_outcome(scores, n, value, tie_eps=eps)
        assert got == pytest.approx((win, 1 - win - loss, loss), abs=1e-12)


def test_the_estimator_handles_large_n_and_its_limits() -> None:
    scores = [float(i) for i in range(2000)]
    # Best of all is the maximum; best of one is the mean; nothing overflows a float on the way.
    assert expected_best_of(scores, 2000) == 1999.0
    assert expected_best_of(scores, 1) == pytest.approx(999.5)
    # For the scores 0 .. N-1 the expected best of n is n (N + 1) / (n + 1) - 1.
    for n in (2, 10, 1500):
        assert expected_best_of(scores, n) == pytest.approx(n * 2001 / (n + 1) - 1, rel=1e-12)
    with pytest.raises(InputError, match="best-of-3"):
        expected_best_of([1.0, 2.0], 3)
    with pytest.raises(InputError, match="best-of-0"):
        best_of_outcome([1.0], 0, 1.0)


# --------------------------------------------------------------------------- curves from real runs


def _run(**options: Any) -> Run:
    prompts = [tpo.Prompt.of(f"Question {i}", id=f"q{i}") for i in range(6)]
    results = list(
        tpo.optimize_many(prompts, policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), **options)
    )
    return Run("x.jsonl", run_label(results), tuple(results))


def test_best_of_curve_from_one_run_ends_at_that_run() -> None:
    bon = _run(mode="bon", width=8)
    curve = best_of_curve(bon)
    assert [p.n for p in curve] == list(range(1, 9))
    # Best-of-8 from eight samples is the run itself; best-of-1 the mean sample.
    assert curve[-1].reward == pytest.approx(statistics.fmean(r.score for r in bon.results))  # type: ignore[misc]
    means = [statistics.fmean(c.score for c in r.candidates) for r in bon.results]  # type: ignore[misc]
    assert curve[0].reward == pytest.approx(statistics.fmean(means))
    rewards = [p.reward for p in curve]
    assert rewards == sorted(rewards)  # type: ignore[type-var]
    tokens = [p.generated_tokens for p in curve]
    assert tokens[3] == pytest.approx(4 * tokens[0])  # type: ignore[operator]
    assert all(p.flops is None for p in curve)


def test_compute_curve_is_cumulative_and_matches_the_steps() -> None:
    run = _run(width=3, depth=2)
    curve = compute_curve(run)
    assert [p.step for p in curve] == [0, 1, 2]
    tokens = [p.generated_tokens for p in curve]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    total = statistics.fmean(r.usage.completion_tokens for r in run.results)
    assert tokens[-1] == pytest.approx(total)
    # Results written before steps recorded their cumulative usage give the same curve.
    old = Run(
        run.path,
        run.label,
        tuple(replace(r, steps=tuple(replace(s, cumulative=None) for s in r.steps)) for r in run.results),
    )
    assert compute_curve(old) == curve
    r = run.results[0]
    assert cumulative_usage(r, 99) == cumulative_usage(r, 2)


def test_flops_appear_when_every_prompt_has_an_estimate() -> None:
    run = _run(width=2, depth=1, policy_params=1e9)
    curve = compute_curve(run)
    u = cumulative_usage(run.results[0], 1)
    assert u.flops == pytest.approx(2e9 * u.tokens)
    assert curve[-1].flops == pytest.approx(2e9 * curve[-1].tokens)  # type: ignore[operator]


# --------------------------------------------------------------------------- matched cost


def test_matched_compute_picks_the_nearest_best_of_n_and_pairs_by_prompt() -> None:
    bon = _run(mode="bon", width=40)
    tpo_run = _run(width=3, depth=2)
    (m,) = matched_compute([tpo_run, bon], bootstrap_samples=200, seed=3)
    per_sample = statistics.fmean(p.sample_tokens for p in best_of_prompts(bon.results))
    assert m.run == "TPO D2-N3" and m.best_of_run == "BoN-40" and m.basis == "completion_tokens"
    assert abs(m.best_of_cost - m.run_cost) <= per_sample / 2 + 1e-9
    assert m.best_of_cost == pytest.approx(m.n * per_sample)
    assert not m.best_of_too_small and m.paired == 6
    # The paired numbers are the per-prompt exact expectations.
    by_id = {p.prompt_id: p for p in best_of_prompts(bon.results)}
    diffs = [r.score - expected_best_of(by_id[r.prompt_id].scores, m.n) for r in tpo_run.results]  # type: ignore[operator]
    assert m.mean_difference == pytest.approx(statistics.fmean(diffs))
    assert m.win_rate + m.tie_rate + m.loss_rate == pytest.approx(1.0)  # type: ignore[operator]
    assert m.win_rate_ties_half_interval is not None and m.mean_difference_interval is not None
    assert m.mean_difference_interval.low <= m.mean_difference <= m.mean_difference_interval.high  # type: ignore[operator]
    assert matched_compute([tpo_run, bon], bootstrap_samples=200, seed=3) == (m,)
    assert m.to_dict()["mean_difference_interval"]["low"] == m.mean_difference_interval.low


def test_a_best_of_n_run_too_small_to_match_says_so() -> None:
    (m,) = matched_compute([_run(width=3, depth=2), _run(mode="bon", width=2)], bootstrap_samples=50)
    assert m.n == 2 and m.best_of_too_small


def test_no_best_of_n_run_means_no_matched_comparison() -> None:
    assert matched_compute([_run(width=2, depth=1)]) == ()


def test_flops_use_each_model_s_size_and_none_when_one_is_unknown() -> None:
    def run(policy: ScriptedPolicy, critic: ScriptedPolicy | None = None, **options: Any) -> tpo.TPOResult:
        return tpo.optimize(
            "Q", policy=policy, critic=critic, reward=FunctionReward(hash_score), width=2, depth=1, **options
        )

    sized = ScriptedPolicy(pure_reply)
    sized.parameter_count = 3e9  # type: ignore[attr-defined]  # a backend that reports its size
    r = run(sized)
    sample, update = r.steps
    assert sample.usage.prompt_flops == 2 * 3e9 * sample.usage.prompt_tokens
    assert update.usage.completion_flops == 2 * 3e9 * update.usage.completion_tokens
    assert r.usage.flops == pytest.approx(2 * 3e9 * r.usage.tokens)
    assert update.cumulative is not None and update.cumulative.flops == pytest.approx(r.usage.flops)
    # --policy-params wins over the backend's own count; the critic's size counts for its calls.
    r = run(sized, ScriptedPolicy(pure_reply), policy_params=1e9, critic_params=7e9)
    assert r.steps[0].usage.prompt_flops == 2 * 1e9 * r.steps[0].usage.prompt_tokens
    assert r.steps[1].usage.prompt_flops == 2 * 7e9 * r.steps[1].usage.prompt_tokens
    # A critic of unknown size: no estimates at all, rather than estimates of part of the work.
    r = run(sized, ScriptedPolicy(pure_reply))
    assert r.usage.flops is None and all(s.usage.prompt_flops is None for s in r.steps)
    # ... unless the run never asks the critic (best-of-N).
    bon = tpo.optimize(
        "Q", policy=sized, critic=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), mode="bon", width=3
    )
    assert bon.usage.flops == pytest.approx(2 * 3e9 * bon.usage.tokens)
    bad = ScriptedPolicy(pure_reply)
    bad.parameter_count = "8B"  # type: ignore[attr-defined]
    with pytest.raises(tpo.ConfigError, match="parameter_count must be a positive number"):
        run(bad)


def test_a_prompt_with_fewer_scored_samples_stays_on_the_curve_with_the_best_of_all_it_has() -> None:
    """The same prompts all along the curve: one with a failed score is capped, not dropped."""

    def score(messages: Any, answer: str) -> float | None:
        return (
            None
            if "Question 0" in messages[-1].content and answer.startswith("Answer 3")
            else hash_score(messages, answer)
        )

    prompts = [tpo.Prompt.of(f"Question {i}", id=f"q{i}") for i in range(3)]
    results = tuple(
        tpo.optimize_many(prompts, policy=ScriptedPolicy(pure_reply), reward=FunctionReward(score), mode="bon", width=4)
    )
    curve = best_of_curve(Run("x.jsonl", run_label(list(results)), results))
    by_id = {r.prompt_id: sorted(c.score for c in r.candidates if c.score is not None) for r in results}
    assert len(by_id["q0"]) == 3
    # At n = 4 the capped prompt contributes its best of three: the mean over all three prompts.
    assert curve[-1].reward == pytest.approx(statistics.fmean(max(s) for s in by_id.values()))
