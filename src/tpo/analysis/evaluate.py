"""Statistics over batch outputs: reward curves per step, costs, failures, paired comparisons, math accuracy.

Every function returns plain frozen data (with ``to_dict()`` for JSON) that ``tpo eval``
prints and ``tpo report`` draws. The definitions, precisely (``docs/evaluation.md`` says
the same in prose):

* **Step reward.** For prompt *p* and step *s*, take the scores of the answers that step
  produced (``StepRecord.candidate_ids``; a rewrite identical to an earlier answer counts
  again with that answer's score; unscored answers are left out). The step's *mean* is
  their mean, its *std* their population standard deviation (the spread of that step's
  N samples). A run's curve averages both over the prompts that have scored answers at
  that step. ``between_prompt_std`` is the sample standard deviation of the per-prompt
  means.
* **Finished prompts only.** Rewards (curves, final scores, gains, comparisons, math
  accuracy) are taken over prompts whose result is ``complete``; a failed or unfinished
  prompt is counted under failures (and as wrong for math accuracy) instead.
* **Best so far.** For prompt *p* at step *s*: the highest score among its answers first
  seen at a step <= *s*. A prompt that stopped early keeps its last value for later steps.
* **Costs** are per prompt, over every prompt of the run (failed ones included: they cost).
* **Paired comparison.** Prompts are matched by id; both runs need a finished result. With
  ``d = score_a - score_b``: a win when ``d > tie_eps``, a loss when ``d < -tie_eps``,
  else a tie. Each rate has a Wilson score interval; the win rate counting ties as half
  and the mean of ``d`` have percentile-bootstrap intervals from a seeded generator.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..batch.jsonl import read_result_lines
from ..errors import InputError
from ..protocols import RewardModel
from ..result import TPOResult
from ..types import Message, Score, ScoreRequest
from .compute import ComputePoint, MatchedComparison, _best_up_to, best_of_curve, compute_curve, matched_compute
from .stats import Interval, percentile_interval, quantile, wilson_interval

__all__ = [
    "Comparison",
    "Costs",
    "Distribution",
    "Evaluation",
    "Failures",
    "Interval",
    "MathAccuracy",
    "Run",
    "RunSummary",
    "StepStats",
    "compare_runs",
    "costs",
    "evaluate",
    "failures",
    "load_run",
    "math_accuracy",
    "read_results",
    "run_label",
    "step_stats",
    "summarize_run",
    "unique_labels",
    "wilson_interval",
]

_T = TypeVar("_T")

#: Bumped whenever a field of ``Evaluation.to_dict()`` changes meaning or disappears.
EVAL_SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------- reading


def read_results(path: str | Path) -> tuple[list[TPOResult], list[str]]:
    """The results in a batch output file (JSONL, one ``TPOResult.to_dict()`` per line), and warnings.

    Read by tpo's one reader of result files (the rules of ``tpo.batch.jsonl``, which ``tpo
    batch`` follows when it resumes): blank lines are skipped; a line that is not a result
    raises ``InputError`` naming the file and line, except a last line cut short (a run
    still writing, or killed mid-write), which is skipped with a warning; when a prompt id
    appears on several lines the last one counts, with a warning.
    """
    read = read_result_lines(path, TPOResult.from_dict)
    if not read.lines:
        raise InputError(f"{read.path}: holds no results (an empty file?)")
    return [line.value for line in read.lines.values()], read.warnings()


@dataclass(frozen=True)
class Run:
    """The results of one batch output, with a label for tables and charts."""

    path: str
    label: str
    results: tuple[TPOResult, ...]
    warnings: tuple[str, ...] = ()

    @property
    def mode(self) -> str | None:
        """The method (``tpo``, ``revision``, ``bon``) of the run's first result."""
        mode = _config_value(self.results, "mode")
        return str(mode) if mode is not None else None

    @property
    def width(self) -> int | None:
        """Answers per step (N)."""
        return _int_or_none(_config_value(self.results, "width"))

    @property
    def depth(self) -> int | None:
        """Improvement steps (D)."""
        return _int_or_none(_config_value(self.results, "depth"))


def load_run(path: str | Path, *, label: str | None = None) -> Run:
    """Read a batch output; the label defaults to the method, e.g. ``"TPO D2-N5"`` or ``"BoN-30"``."""
    results, warnings = read_results(path)
    configs = {(r.config.get("mode"), r.config.get("width"), r.config.get("depth")) for r in results}
    if len(configs) > 1:
        warnings.append(f"{path}: results of {len(configs)} different configurations are mixed in one file")
    return Run(str(path), label or run_label(results), tuple(results), tuple(warnings))


def run_label(results: Sequence[TPOResult]) -> str:
    """``"TPO D2-N5"``, ``"Revision D3-N10"`` or ``"BoN-30"``: the paper's names for a configuration."""
    mode = _config_value(results, "mode")
    width = _config_value(results, "width")
    depth = _config_value(results, "depth")
    if mode == "bon":
        return f"BoN-{width}"
    return f"{_method_name(mode)} D{depth}-N{width}"


def _method_name(mode: Any) -> str:
    """The paper's name of a method (``"TPO"``, ``"Revision"``, ``"BoN"``); ``"run"`` when unknown."""
    return {"tpo": "TPO", "revision": "Revision", "bon": "BoN"}.get(str(mode), str(mode or "run"))


def _config_value(results: Sequence[TPOResult], key: str) -> Any:
    return results[0].config.get(key) if results else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def unique_labels(runs: Sequence[Run]) -> list[Run]:
    """The runs, with file names added to labels that would otherwise repeat."""
    counts = Counter(r.label for r in runs)
    out = []
    for r in runs:
        if counts[r.label] > 1:
            r = Run(r.path, f"{r.label} ({Path(r.path).stem})", r.results, r.warnings)
        out.append(r)
    return out


# ---------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Distribution:
    """Summary of one number per prompt."""

    n: int
    mean: float | None
    median: float | None
    p90: float | None
    total: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        """Summarise values (an empty input gives ``n == 0`` and ``None`` statistics)."""
        xs = sorted(values)
        if not xs:
            return cls(0, None, None, None, 0.0)
        return cls(len(xs), statistics.fmean(xs), quantile(xs, 0.5), quantile(xs, 0.9), float(sum(xs)))


@dataclass(frozen=True)
class StepStats:
    """Reward at one step of a run (see the module docstring for the definitions)."""

    step: int
    #: Prompts with scored answers at this step (the mean and std average over these).
    prompts: int
    #: Scored answers at this step, over all prompts.
    answers: int
    mean: float | None
    std: float | None
    between_prompt_std: float | None
    #: Prompts with a best-so-far value at this step (early stops carried forward).
    best_so_far_prompts: int
    best_so_far: float | None


@dataclass(frozen=True)
class Costs:
    """Work per prompt."""

    tokens: Distribution
    prompt_tokens: Distribution
    completion_tokens: Distribution
    policy_calls: Distribution
    sequences: Distribution
    answers_scored: Distribution
    wall_time_s: Distribution


@dataclass(frozen=True)
class Failures:
    """What went wrong, counted over a run."""

    #: Prompts whose result is ``failed``.
    failed_prompts: int
    #: Prompts left ``partial`` (a checkpoint, not a finished result).
    partial_prompts: int
    #: Answers whose score could not be computed.
    score_failures: int
    #: Rewrites whose reply lacked properly closed answer tags (taken by a fallback).
    extraction_fallbacks: int
    #: TPO steps that fell back to revision because chosen and rejected were the same answer.
    revision_fallbacks: int
    #: Steps with a field shortened to fit the context window.
    truncated_steps: int
    #: Failure notes of all steps (empty critiques, rewrites without text, ...).
    step_failures: int
    #: The errors of failed prompts, most frequent first, with their counts.
    errors: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MathAccuracy:
    """Final answers checked against a reference with math-verify.

    ``accuracy = correct / checked``. ``checked`` counts every prompt with a usable
    reference (one math-verify parses). A prompt that did not finish with an answer counts
    as wrong (``no_answer``), and so does an answer whose check failed or ran out of time
    (``check_failures``): a check that cannot confirm an answer neither makes it right nor
    takes the prompt out of the count.
    """

    reference_field: str
    checked: int
    correct: int
    accuracy: float | None
    interval: Interval | None
    no_answer: int
    #: Prompts without a usable reference: none in that field, or one math-verify cannot parse (not in ``checked``).
    missing_reference: int
    #: Answers whose check raised an error or timed out (counted as wrong).
    check_failures: int = 0


@dataclass(frozen=True)
class RunSummary:
    """Everything ``tpo eval`` reports about one run."""

    label: str
    path: str
    mode: str | None
    width: int | None
    depth: int | None
    policy: str | None
    reward: str | None
    prompts: int
    complete: int
    #: Final reward over finished prompts.
    final_score: Distribution
    final_score_std: float | None
    #: Best of the initial samples (what best-of-N with the same N would return).
    initial_best: Distribution
    #: Final score minus the best initial sample, per prompt.
    gain: Distribution
    steps: tuple[StepStats, ...]
    costs: Costs
    failures: Failures
    math: MathAccuracy | None = None
    warnings: tuple[str, ...] = ()
    #: Reward against cumulative cost (``tpo.analysis.compute``): one point per step, or for a
    #: best-of-N run the expected best-of-n for every n up to N.
    compute: tuple[ComputePoint, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return _plain(self)  # type: ignore[no-any-return]


def summarize_run(run: Run, *, reference_field: str | None = None) -> RunSummary:
    """Curves, costs and failures of one run; math accuracy too when ``reference_field`` is given."""
    results = run.results
    done = [r for r in results if r.status == "complete"]
    finals = [r.score for r in done if r.score is not None]
    initial: list[float] = []
    gains: list[float] = []
    for r in done:
        first = _best_up_to(r, 0)
        if first is not None:
            initial.append(first)
            if r.score is not None:
                gains.append(r.score - first)
    first_result = results[0] if results else None
    return RunSummary(
        label=run.label,
        path=run.path,
        mode=run.mode,
        width=run.width,
        depth=run.depth,
        policy=first_result.policy if first_result else None,
        reward=first_result.reward if first_result else None,
        prompts=len(results),
        complete=len(done),
        final_score=Distribution.of(finals),
        final_score_std=statistics.stdev(finals) if len(finals) > 1 else None,
        initial_best=Distribution.of(initial),
        gain=Distribution.of(gains),
        steps=step_stats(done),
        costs=costs(results),
        failures=failures(results),
        math=math_accuracy(results, reference_field=reference_field) if reference_field else None,
        warnings=run.warnings,
        compute=best_of_curve(run) if run.mode == "bon" else compute_curve(run),
    )


def step_stats(results: Sequence[TPOResult]) -> tuple[StepStats, ...]:
    """Reward per step over ``results`` (pass only the prompts to include; see the module docstring)."""
    means: dict[int, list[float]] = {}
    stds: dict[int, list[float]] = {}
    answers: Counter[int] = Counter()
    last_step = -1
    for r in results:
        by_id = {c.id: c for c in r.candidates}
        for rec in r.steps:
            last_step = max(last_step, rec.step)
            scores = [s for s in (_score_of(by_id, cid) for cid in rec.candidate_ids) if s is not None]
            if not scores:
                continue
            means.setdefault(rec.step, []).append(statistics.fmean(scores))
            stds.setdefault(rec.step, []).append(statistics.pstdev(scores))
            answers[rec.step] += len(scores)
    out = []
    for step in range(last_step + 1):
        m = means.get(step, [])
        best = [b for b in (_best_up_to(r, step) for r in results) if b is not None]
        out.append(
            StepStats(
                step=step,
                prompts=len(m),
                answers=answers[step],
                mean=statistics.fmean(m) if m else None,
                std=statistics.fmean(stds[step]) if m else None,
                between_prompt_std=statistics.stdev(m) if len(m) > 1 else None,
                best_so_far_prompts=len(best),
                best_so_far=statistics.fmean(best) if best else None,
            )
        )
    return tuple(out)


def _score_of(by_id: Mapping[str, Any], candidate_id: str) -> float | None:
    c = by_id.get(candidate_id)
    return c.score if c is not None else None


def costs(results: Sequence[TPOResult]) -> Costs:
    """Per-prompt work: tokens, calls, answers scored and wall time."""
    us = [r.usage for r in results]
    return Costs(
        tokens=Distribution.of(u.prompt_tokens + u.completion_tokens for u in us),
        prompt_tokens=Distribution.of(u.prompt_tokens for u in us),
        completion_tokens=Distribution.of(u.completion_tokens for u in us),
        policy_calls=Distribution.of(u.policy_calls for u in us),
        sequences=Distribution.of(u.sequences for u in us),
        answers_scored=Distribution.of(u.reward_calls for u in us),
        wall_time_s=Distribution.of(u.wall_time_s for u in us),
    )


def failures(results: Sequence[TPOResult]) -> Failures:
    """Failure counts over a run."""
    errors = Counter(r.error or "unknown error" for r in results if r.status == "failed")
    steps = [s for r in results for s in r.steps]
    return Failures(
        failed_prompts=sum(1 for r in results if r.status == "failed"),
        partial_prompts=sum(1 for r in results if r.status == "partial"),
        score_failures=sum(r.score_failures for r in results),
        extraction_fallbacks=sum(s.fallbacks for s in steps),
        revision_fallbacks=sum(1 for s in steps if s.fallback_to_revision),
        truncated_steps=sum(1 for s in steps if s.truncated),
        step_failures=sum(len(s.failures) for s in steps),
        errors=dict(errors.most_common()),
    )


# ---------------------------------------------------------------------------------- math


def math_accuracy(results: Sequence[TPOResult], *, reference_field: str = "answer") -> MathAccuracy:
    """Check each final answer against ``metadata[reference_field]`` with math-verify (tpo's ``MathReward``).

    Only a problem with the reference (missing, or not parsable) takes a prompt out of the
    count; a failed or timed-out check of an answer counts it as wrong.
    """
    from ..rewards.verifier import MathReward

    checker = MathReward(field=reference_field)
    # The checker itself says whether a reference is usable: it fails an empty answer only when the
    # reference is missing or cannot be parsed (otherwise an empty answer is simply wrong). Asking it
    # keeps tpo eval and --reward math in agreement, and tells reference problems from answer problems.
    probes = _run_sync(lambda: _check_each(checker, [_score_request(r, "") for r in results]))
    usable = [r for r, probe in zip(results, probes, strict=True) if probe.error is None and probe.value is not None]
    answered = [r for r in usable if r.status == "complete" and r.answer is not None]
    scores = _run_sync(lambda: _check_each(checker, [_score_request(r, r.answer or "") for r in answered]))
    correct = sum(1 for s in scores if s.value == 1.0)
    checked = len(usable)
    return MathAccuracy(
        reference_field=reference_field,
        checked=checked,
        correct=correct,
        accuracy=correct / checked if checked else None,
        interval=wilson_interval(correct, checked),
        no_answer=checked - len(answered),
        missing_reference=len(results) - checked,
        check_failures=sum(1 for s in scores if s.error is not None or s.value is None),
    )


def _score_request(result: TPOResult, answer: str) -> ScoreRequest:
    return ScoreRequest(_conversation(result), answer, result.metadata, result.prompt_id)


def _conversation(result: TPOResult) -> tuple[Message, ...]:
    """The result's stored conversation (plain dicts) as messages."""
    return tuple(Message(m["role"], m["content"]) for m in result.messages)  # type: ignore[arg-type]


async def _check_each(checker: RewardModel, requests: Sequence[ScoreRequest]) -> list[Score]:
    """One score per request, each checked on its own, so one that raises fails only itself."""
    out = []
    for request in requests:
        try:
            scores = list(await checker.score([request]))
        except Exception as e:  # math-verify raising on one odd answer must not stop the evaluation
            scores = [Score.failed(f"{type(e).__name__}: {e}")]
        out.append(scores[0] if len(scores) == 1 else Score.failed(f"{len(scores)} scores for one answer"))
    return out


def _run_sync(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from synchronous code, even inside a running event loop (a notebook)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# ---------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Comparison:
    """Run ``a`` against run ``b`` on the prompts both answered (see the module docstring)."""

    a: str
    b: str
    #: Prompts with a final score in both runs (the denominator of the rates).
    paired: int
    #: Prompts in only one of the runs, or in both but not finished with a score in both.
    only_a: int
    only_b: int
    unfinished: int
    wins: int
    ties: int
    losses: int
    win_rate: float | None
    tie_rate: float | None
    loss_rate: float | None
    win_interval: Interval | None
    tie_interval: Interval | None
    loss_interval: Interval | None
    #: (wins + ties / 2) / paired, with a bootstrap interval.
    win_rate_ties_half: float | None
    win_rate_ties_half_interval: Interval | None
    #: Mean of score_a - score_b, with a bootstrap interval.
    mean_difference: float | None
    mean_difference_interval: Interval | None
    tie_eps: float
    confidence: float
    bootstrap_samples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return _plain(self)  # type: ignore[no-any-return]


def compare_runs(
    a: Run,
    b: Run,
    *,
    tie_eps: float = 0.0,
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Win/tie/loss of ``a`` against ``b`` by final reward, paired by prompt id."""
    if tie_eps < 0 or math.isnan(tie_eps):
        raise InputError(f"tie_eps must be >= 0, not {tie_eps}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be between 0 and 1, not {confidence}")
    if bootstrap_samples < 1:
        raise InputError(f"bootstrap_samples must be at least 1, not {bootstrap_samples}")
    scores_a = {r.prompt_id: r.score if r.status == "complete" else None for r in a.results}
    scores_b = {r.prompt_id: r.score if r.status == "complete" else None for r in b.results}
    common = [pid for pid in scores_a if pid in scores_b]
    diffs = []
    for pid in common:
        sa, sb = scores_a[pid], scores_b[pid]
        if sa is not None and sb is not None:
            diffs.append(sa - sb)
    n = len(diffs)
    wins = sum(1 for d in diffs if d > tie_eps)
    losses = sum(1 for d in diffs if d < -tie_eps)
    ties = n - wins - losses
    outcomes = [1.0 if d > tie_eps else 0.0 if d < -tie_eps else 0.5 for d in diffs]
    half_ci = diff_ci = None
    if n:
        rng = random.Random(seed)  # noqa: S311  # resampling for an interval, not secrecy
        half_boot, diff_boot = [], []
        for _ in range(bootstrap_samples):
            idx = rng.choices(range(n), k=n)
            half_boot.append(sum(outcomes[i] for i in idx) / n)
            diff_boot.append(sum(diffs[i] for i in idx) / n)
        half_ci = percentile_interval(half_boot, confidence)
        diff_ci = percentile_interval(diff_boot, confidence)
    return Comparison(
        a=a.label,
        b=b.label,
        paired=n,
        only_a=sum(1 for pid in scores_a if pid not in scores_b),
        only_b=sum(1 for pid in scores_b if pid not in scores_a),
        unfinished=len(common) - n,
        wins=wins,
        ties=ties,
        losses=losses,
        win_rate=wins / n if n else None,
        tie_rate=ties / n if n else None,
        loss_rate=losses / n if n else None,
        win_interval=wilson_interval(wins, n, confidence),
        tie_interval=wilson_interval(ties, n, confidence),
        loss_interval=wilson_interval(losses, n, confidence),
        win_rate_ties_half=statistics.fmean(outcomes) if n else None,
        win_rate_ties_half_interval=half_ci,
        mean_difference=statistics.fmean(diffs) if n else None,
        mean_difference_interval=diff_ci,
        tie_eps=tie_eps,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )


# ---------------------------------------------------------------------------------- all together


@dataclass(frozen=True)
class Evaluation:
    """Summaries of several runs and their paired comparisons."""

    runs: tuple[RunSummary, ...]
    comparisons: tuple[Comparison, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: Each TPO or revision run against the best-of-n of nearest cost (when a best-of-N run is given).
    matched: tuple[MatchedComparison, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written by ``tpo eval --json``."""
        return {
            "schema_version": EVAL_SCHEMA_VERSION,
            "settings": dict(self.settings),
            "runs": [r.to_dict() for r in self.runs],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "matched_compute": [m.to_dict() for m in self.matched],
        }


def evaluate(
    runs: Sequence[Run],
    *,
    reference_field: str | None = None,
    tie_eps: float = 0.0,
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
    seed: int = 0,
    all_pairs: bool = False,
) -> Evaluation:
    """Summarise every run and compare the first with each other (every pair with ``all_pairs``).

    A pair is compared only when the two runs share at least one prompt id.
    """
    runs = unique_labels(runs)
    summaries = tuple(summarize_run(r, reference_field=reference_field) for r in runs)
    if all_pairs:
        pairs = [(runs[i], runs[j]) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    else:
        pairs = [(runs[0], other) for other in runs[1:]]
    comparisons = []
    for a, b in pairs:
        ids_b = {r.prompt_id for r in b.results}
        if not any(r.prompt_id in ids_b for r in a.results):
            continue
        comparisons.append(
            compare_runs(a, b, tie_eps=tie_eps, confidence=confidence, bootstrap_samples=bootstrap_samples, seed=seed)
        )
    settings = {
        "reference_field": reference_field,
        "tie_eps": tie_eps,
        "confidence": confidence,
        "bootstrap_samples": bootstrap_samples,
        "seed": seed,
        "all_pairs": all_pairs,
    }
    matched = matched_compute(
        runs, tie_eps=tie_eps, confidence=confidence, bootstrap_samples=bootstrap_samples, seed=seed
    )
    return Evaluation(summaries, tuple(comparisons), settings, matched)


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as JSON-ready dicts and lists."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
