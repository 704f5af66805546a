"""Pairwise judging of two runs' final answers by a held-out model, in both orders, resumable, with its statistics.

A run optimised against a reward model and then scored by the same reward model is rewarded
for over-optimising it; a model that took no part in the optimisation judges more fairly (the
paper used GPT-4, through AlpacaEval and Arena-Hard). For every prompt both runs finished,
the judge sees the conversation and the two final answers and says which is better, twice:
once with run A's answer first and once with run B's first. Its verdicts are combined:

* both orders prefer the same run's answer: that run wins the prompt;
* both orders call it a tie, or the orders disagree: a tie (a judge that always prefers
  the first answer, say, produces only ties this way: position bias cancels).

The file of verdicts (one JSON object per prompt, ``docs/experiments.md``) is written like a
``tpo batch`` output: each line whole and durable before the next prompt is counted, a
sidecar ``OUT.tpo/`` with the fingerprint of the judge set-up and the run's lock, and a
rerun that judges only what is missing (a prompt whose answers changed, or whose judging
failed, is judged again). ``summarize_verdicts`` reports the rates; see its docstring.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .._redact import redact
from ..batch.durable import (
    GroupLog,
    WriteFailed,
    claim_output,
    fsync_dir,
    read_fingerprint,
    repair_tail,
    rewrite_lines,
    write_atomic,
)
from ..batch.fingerprint import _differences, result_options
from ..batch.jsonl import read_result_lines
from ..batch.runner import sidecar_dir
from ..engine._budget import DEFAULT_CONTEXT_WINDOW, ContextBudget
from ..engine._dispatch import Dispatcher
from ..engine.algorithm import derive_seed
from ..engine.prompts import check_template, render, render_conversation
from ..engine.store import answer_id
from ..errors import ConfigError, InputError, RunError
from ..options import check_fields, integer, number, option
from ..protocols import PolicyBackend
from ..result import dumps_json
from ..rewards.judge import DEFAULT_RUBRIC
from ..types import Generation, GenerationRequest, Message, SamplingParams
from .evaluate import Run, _conversation
from .stats import Interval, bootstrap_mean_interval, fit_logistic, sigmoid, wilson_interval

__all__ = [
    "DEFAULT_JUDGE_PROMPTS",
    "JudgeOutcome",
    "JudgeProgress",
    "JudgePrompts",
    "JudgeRun",
    "JudgeSettings",
    "JudgeSummary",
    "OrderVerdict",
    "Verdict",
    "parse_winner",
    "read_verdicts",
    "summarize_verdicts",
]

Side = Literal["a", "b"]
Winner = Literal["a", "b", "tie"]
Position = Literal["1", "2", "tie"]

#: Version of the verdict file's layout; a different one is refused like a different set-up.
_LAYOUT_VERSION = 1

PAIRWISE_INSTRUCTIONS = """\
You are an impartial reviewer. Two AI assistants replied to the same conversation; decide \
which reply is better by this standard:
{{rubric}}

Read both replies in full before you decide. The order in which they are shown says nothing \
about their quality, and neither does their length: a longer reply is better only when its \
extra text helps the user. Explain your reasoning in a few sentences, then write your decision \
as the last line, exactly one of:
Winner: 1
Winner: 2
Winner: tie"""

PAIRWISE_CASE = """\
<conversation>
{{conversation}}
</conversation>

<reply_1>
{{first}}
</reply_1>

<reply_2>
{{second}}
</reply_2>

Which reply is better? Reason briefly, then end with "Winner: 1", "Winner: 2" or "Winner: tie"."""


@dataclass(frozen=True)
class JudgePrompts:
    """The pairwise judge's prompt: ``instructions`` (with ``{{rubric}}``) then ``case`` (the conversation and replies).

    Both are sent as one user message. ``case`` must use ``{{conversation}}``, ``{{first}}``
    and ``{{second}}``, and should ask for the last line ``Winner: 1``, ``Winner: 2`` or
    ``Winner: tie`` (what ``parse_winner`` reads).
    """

    instructions: str = PAIRWISE_INSTRUCTIONS
    case: str = PAIRWISE_CASE

    def __post_init__(self) -> None:
        check_template("the judge's instructions template", self.instructions, {"rubric"})
        check_template("the judge's case template", self.case, {"conversation", "first", "second"})

    def messages(self, rubric: str, conversation: str, first: str, second: str) -> tuple[Message, ...]:
        """The judge's request for one order of one pair."""
        opening = render(self.instructions, {"rubric": rubric}).rstrip()
        case = render(self.case, {"conversation": conversation, "first": first, "second": second})
        return (Message("user", f"{opening}\n\n{case}"),)

    def to_dict(self) -> dict[str, str]:
        """The templates by name."""
        return {"instructions": self.instructions, "case": self.case}


DEFAULT_JUDGE_PROMPTS = JudgePrompts()

_WINNER = re.compile(r"winner\s*(?:is)?\s*[:=]?\s*[*_\"'\[(]*\s*(?:reply\s*)?(1|2|tie)\b", re.IGNORECASE)


def parse_winner(text: str) -> Position | None:
    """The judge's decision in its reply: the last ``Winner: 1``, ``Winner: 2`` or ``Winner: tie``; ``None`` when absent."""
    found = _WINNER.findall(text)
    if not found:
        return None
    value = found[-1].lower()
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge is asked: rubric, templates, sampling, seed and how many prompts are judged at once.

    ``temperature`` of the first attempt; a reply without a decision is asked again once
    with ``retry_temperature`` and the next seed. Seeds derive from ``seed``, the prompt id,
    the order and both answers, so a rerun asks exactly the same.
    """

    owner: ClassVar[str] = "judge"

    rubric: str = DEFAULT_RUBRIC
    prompts: JudgePrompts = DEFAULT_JUDGE_PROMPTS
    temperature: float = option(0.0, number(0, 5), "sampling temperature of the first attempt")
    retry_temperature: float = option(0.7, number(0, 5), "sampling temperature of the one retry")
    max_tokens: int = option(1024, integer(min=1), "token limit of the judge's reply")
    seed: int = option(0, integer(), "seed the judge's seeds derive from")
    concurrency: int = option(64, integer(min=1), "prompts judged at once", affects_results=False)
    context_window: int | None = option(None, integer(min=256), "the judge's context window in tokens")

    def __post_init__(self) -> None:
        if not isinstance(self.rubric, str) or not self.rubric.strip():
            raise ConfigError(
                "the judge's rubric is empty; give the criterion in words, or leave it out for the default"
            )
        # The same checks and messages as every plugin's options; None is not a value here.
        check_fields(self, none_means_default=False)

    def fingerprint(self) -> dict[str, Any]:
        """What the verdicts depend on (how many run at once does not)."""
        text = json.dumps({"rubric": self.rubric, **self.prompts.to_dict()}, sort_keys=True)
        return {
            "rubric_and_templates_sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
            "temperature": self.temperature,
            "retry_temperature": self.retry_temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "context_window": self.context_window,
        }


# ---------------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class OrderVerdict:
    """The judge's decision for one order of one pair.

    ``first`` is the run whose answer was shown first. ``position`` is what the judge wrote
    (``"1"``, ``"2"`` or ``"tie"``), ``winner`` the run it means. ``reply`` is the judge's
    last reply (its reasoning); ``replies`` every attempt's. ``error`` says why there is no
    decision (the backend failed, or no reply held one).
    """

    first: Side
    position: Position | None
    winner: Winner | None
    reply: str | None
    replies: tuple[str, ...] = ()
    seed: int = 0
    truncated: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OrderVerdict:
        """Read one order back from a verdict line."""
        first = d["first"]
        if first not in ("a", "b"):
            raise ValueError(f"an order's 'first' is 'a' or 'b', not {first!r}")
        return cls(
            first,
            d.get("position"),
            d.get("winner"),
            d.get("reply"),
            tuple(d.get("replies", ())),
            int(d.get("seed", 0)),
            tuple(d.get("truncated", ())),
            d.get("error"),
        )


@dataclass(frozen=True)
class Verdict:
    """The judging of one prompt: both orders and the combined verdict (``None`` when an order failed)."""

    prompt_id: str
    a_label: str
    b_label: str
    a_id: str
    b_id: str
    a_chars: int
    b_chars: int
    verdict: Winner | None
    orders: tuple[OrderVerdict, ...]
    judge: str
    error: str | None = None

    @property
    def position_bias(self) -> bool:
        """Both orders chose the same position (so the preferred answer changed with the order)."""
        positions = {o.position for o in self.orders}
        return len(self.orders) == 2 and len(positions) == 1 and positions <= {"1", "2"}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of one line of the verdict file."""
        data = asdict(self)
        data["orders"] = [asdict(o) for o in self.orders]
        return data

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        """Read one line of the verdict file."""
        verdict = d.get("verdict")
        if verdict not in ("a", "b", "tie", None):
            raise ValueError(f"a verdict is 'a', 'b', 'tie' or null, not {verdict!r}")
        return cls(
            prompt_id=d["prompt_id"],
            a_label=d["a_label"],
            b_label=d["b_label"],
            a_id=d["a_id"],
            b_id=d["b_id"],
            a_chars=int(d["a_chars"]),
            b_chars=int(d["b_chars"]),
            verdict=verdict,
            orders=tuple(OrderVerdict.from_dict(o) for o in d["orders"]),
            judge=d["judge"],
            error=d.get("error"),
        )


def _combine(orders: Sequence[OrderVerdict]) -> tuple[Winner | None, str | None]:
    failed = [o for o in orders if o.winner is None]
    if failed:
        return None, "; ".join(f"order {o.first}-first: {o.error or 'no decision'}" for o in failed)
    winners = {o.winner for o in orders}
    if winners == {"a"}:
        return "a", None
    if winners == {"b"}:
        return "b", None
    return "tie", None


def read_verdicts(path: str | Path) -> tuple[list[Verdict], list[str]]:
    """The verdicts in a ``tpo judge`` output (the last line of a prompt counts), and warnings about the file."""
    read = read_result_lines(path, Verdict.from_dict)
    if not read.lines:
        raise InputError(f"{read.path}: holds no verdicts (an empty file?)")
    return [line.value for line in read.lines.values()], read.warnings()


# ---------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class JudgeSummary:
    """Win, tie and loss rates of run A against run B by the judge's combined verdicts.

    * ``wins`` / ``ties`` / ``losses`` count prompts A won, tied and lost (``judged`` in all),
      each rate with a Wilson interval. Prompts whose judging failed are in ``failed`` only.
    * ``win_rate_ties_half`` counts a tie as half a win, with a percentile-bootstrap interval
      over prompts (``bootstrap_samples`` resamples from ``random.Random(seed)``).
    * ``position_bias_rate``: share of judged prompts where the judge chose the same position
      in both orders, i.e. its preference followed the order, not the answers (Wilson
      interval). ``first_position_rate``: of the single-order decisions that named a reply,
      the share that named the one shown first (0.5 for an unbiased judge).
    * ``lc_win_rate``: the length-controlled win rate, as AlpacaEval 2 controls for length.
      A logistic regression of the verdict (1 win, 0.5 tie, 0 loss) on
      ``tanh((chars_A - chars_B) / sd)``, where sd is the standard deviation of those
      differences, with a weak ridge penalty; the win rate it predicts at zero length
      difference is ``sigmoid(intercept)``, with a Wald interval. When every verdict is the
      same there is nothing to regress: it is that verdict's value, without an interval.
      ``length_coefficient`` is the fitted slope (positive: longer answers win more).
    """

    a: str
    b: str
    judge: str | None
    judged: int
    failed: int
    wins: int
    ties: int
    losses: int
    win_rate: float | None
    tie_rate: float | None
    loss_rate: float | None
    win_interval: Interval | None
    tie_interval: Interval | None
    loss_interval: Interval | None
    win_rate_ties_half: float | None
    win_rate_ties_half_interval: Interval | None
    position_bias: int
    position_bias_rate: float | None
    position_bias_interval: Interval | None
    first_position_rate: float | None
    lc_win_rate: float | None
    lc_win_rate_interval: Interval | None
    length_coefficient: float | None
    mean_chars_a: float | None
    mean_chars_b: float | None
    confidence: float
    bootstrap_samples: int
    seed: int
    path: str | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def summarize_verdicts(
    verdicts: Sequence[Verdict],
    *,
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
    seed: int = 0,
    path: str | None = None,
    warnings: Sequence[str] = (),
) -> JudgeSummary:
    """The statistics of a judging (see ``JudgeSummary`` for the definitions)."""
    if not verdicts:
        raise InputError("there are no verdicts to summarise")
    judged = [v for v in verdicts if v.verdict is not None]
    n = len(judged)
    wins = sum(1 for v in judged if v.verdict == "a")
    losses = sum(1 for v in judged if v.verdict == "b")
    ties = n - wins - losses
    outcomes = [1.0 if v.verdict == "a" else 0.0 if v.verdict == "b" else 0.5 for v in judged]
    rng = random.Random(seed)  # noqa: S311  # resampling for an interval, not secrecy
    half_ci = bootstrap_mean_interval(outcomes, rng=rng, samples=bootstrap_samples, confidence=confidence)
    biased = sum(1 for v in judged if v.position_bias)
    decisive = [o.position for v in judged for o in v.orders if o.position in ("1", "2")]
    lc, lc_ci, slope = _length_controlled(judged, outcomes, confidence)
    last = verdicts[-1]
    return JudgeSummary(
        a=last.a_label,
        b=last.b_label,
        judge=last.judge,
        judged=n,
        failed=len(verdicts) - n,
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
        position_bias=biased,
        position_bias_rate=biased / n if n else None,
        position_bias_interval=wilson_interval(biased, n, confidence),
        first_position_rate=decisive.count("1") / len(decisive) if decisive else None,
        lc_win_rate=lc,
        lc_win_rate_interval=lc_ci,
        length_coefficient=slope,
        mean_chars_a=statistics.fmean(v.a_chars for v in judged) if n else None,
        mean_chars_b=statistics.fmean(v.b_chars for v in judged) if n else None,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
        path=path,
        warnings=tuple(warnings),
    )


def _length_controlled(
    judged: Sequence[Verdict], outcomes: Sequence[float], confidence: float
) -> tuple[float | None, Interval | None, float | None]:
    if not judged:
        return None, None, None
    if len(set(outcomes)) == 1:
        return outcomes[0], None, None
    diffs = [float(v.a_chars - v.b_chars) for v in judged]
    sd = statistics.pstdev(diffs)
    features = [[math.tanh(d / sd) if sd > 0 else 0.0] for d in diffs]
    fit = fit_logistic(features, outcomes)
    return sigmoid(fit.coef[0]), fit.intercept_interval(confidence), fit.coef[1]


# ---------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class _Pair:
    prompt_id: str
    messages: tuple[Message, ...]
    a: str
    b: str


@dataclass
class JudgeProgress:
    """Counts as the judging goes, for a progress display."""

    total: int
    done: int = 0
    failed: int = 0
    finished_before: int = 0


@dataclass
class JudgeOutcome:
    """What ``JudgeRun.arun`` did (``read_verdicts`` and ``summarize_verdicts`` give the statistics of the file)."""

    output: Path
    #: Prompts in only one of the runs, or not finished with an answer in both.
    unpaired: int
    #: Prompts judged in this session, and how many of those failed.
    judged_now: int
    failed_now: int
    notes: list[str] = field(default_factory=list)


class JudgeRun:
    """Judge run A against run B into a verdict file, resumable after any interruption.

    ``judge`` describes the judge model, ``{"spec": ..., "options": {...}}``, for the
    fingerprint; secrets are masked. Call ``open()`` before loading the model, so that a mismatching file is
    refused early, then ``arun(backend)``.
    """

    def __init__(
        self,
        a: Run,
        b: Run,
        output: str | os.PathLike[str],
        *,
        judge: Mapping[str, Any],
        settings: JudgeSettings | None = None,
        on_verdict: Callable[[Verdict, JudgeProgress], None] | None = None,
    ) -> None:
        self.a, self.b = a, b
        self.output = Path(output)
        self.sidecar = sidecar_dir(self.output)
        self.judge = redact(judge)
        self.settings = settings or JudgeSettings()
        self.on_verdict = on_verdict
        self.pairs, self.unpaired = _pairs(a, b)
        self._done: set[str] = set()
        self._lock_file: Any = None
        self.notes: list[str] = []

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What the verdicts depend on: the judge model and how it is asked.

        The judge's backend options that cannot change a verdict (timeouts, retries,
        concurrency: those its plugin declares ``affects_results=False``) are left out, so a
        resumed judging may change them.
        """
        judge = dict(self.judge)
        spec, options = judge.get("spec"), judge.get("options")
        if isinstance(spec, str) and isinstance(options, Mapping):
            judge["options"] = result_options({"policy": spec, "policy_options": options})["policy_options"]
        data = {"layout": _LAYOUT_VERSION, "judge": judge, "settings": self.settings.fingerprint()}
        return json.loads(json.dumps(data))  # type: ignore[no-any-return]

    @property
    def remaining(self) -> int:
        """Pairs without a verdict in the file (known after ``open()``)."""
        return sum(1 for p in self.pairs if p.prompt_id not in self._done)

    def open(self, *, restart: bool = False) -> list[str]:
        """Check the output against this set-up, repair a torn last line, and find what is left to judge.

        A new file gets the fingerprint; an existing one must match (else ``ConfigError``
        lists what differs), unless ``restart`` removes it first. Takes the lock until
        ``arun`` ends or ``close()``. Returns what was removed.
        """
        if self._lock_file is not None:
            return []
        fp_path = self.sidecar / "fingerprint.json"
        for source in (self.a.path, self.b.path):
            if Path(source).exists() and self.output.resolve() == Path(source).resolve():
                raise ConfigError(f"the output {self.output} is one of the runs being judged; choose another file")
        self._lock_file = claim_output(self.output, self.sidecar, made_by="tpo judge", restart=restart)
        removed: list[str] = []
        try:
            if restart:
                removed = self._remove_old()
            fingerprint = (json.dumps(self.fingerprint, indent=2) + "\n").encode()
            old = read_fingerprint(fp_path, start_over="start over")
            if old is not None:
                diffs = _differences(old, self.fingerprint)
                if diffs and self.output.exists() and self.output.stat().st_size > 0:
                    raise ConfigError(
                        f"{self.output} holds verdicts of a different judge set-up:\n  "
                        + "\n  ".join(diffs)
                        + "\nRun with the same options to resume it, or add --restart to discard its verdicts."
                    )
            write_atomic(fp_path, fingerprint)
            self._load()
        except BaseException:
            self.close()
            raise
        return removed

    def _remove_old(self) -> list[str]:
        removed = []
        if self.output.exists():
            self.output.unlink()
            removed.append(str(self.output))
        for p in self.sidecar.iterdir():
            if p.name != "lock":
                p.unlink()
        return removed

    def _load(self) -> None:
        if not self.output.exists():
            self.output.touch()
            fsync_dir(self.output.parent)
        torn = repair_tail(self.output)
        if torn:
            self.notes.append(f"repaired {self.output}: removed an unfinished last line ({torn} bytes)")
        read = read_result_lines(
            self.output,
            Verdict.from_dict,
            hint="; the file was changed by hand? Fix or remove that line, or add --restart to start over",
        )
        current = {p.prompt_id: (answer_id(p.a), answer_id(p.b)) for p in self.pairs}
        keep: dict[str, tuple[int, int]] = {}
        redo_failed = changed = gone = 0
        for pid, line in read.lines.items():
            v = line.value
            if pid not in current:
                gone += 1
                continue
            if current[pid] != (v.a_id, v.b_id):
                changed += 1
                continue
            if v.verdict is None:
                redo_failed += 1
                continue
            keep[pid] = (line.offset, line.length)
        if read.superseded or len(keep) != len(read.lines):
            # Rewritten with only the lines that count, so the file holds one line per prompt.
            rewrite_lines(self.output, {offset for offset, _ in keep.values()}.__contains__)
        if redo_failed:
            self.notes.append(f"judging again {redo_failed} prompt(s) whose judging failed before")
        if changed:
            self.notes.append(f"judging again {changed} prompt(s) whose answers changed since they were judged")
        if gone:
            self.notes.append(
                f"dropped the verdicts of {gone} prompt(s) no longer finished with an answer in both runs"
            )
        self._done = set(keep)

    def close(self) -> None:
        """Release the lock (``arun`` does this when it ends)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def arun(self, backend: PolicyBackend) -> JudgeOutcome:
        """Judge every pair not judged yet, appending each prompt's verdict as soon as both orders are in."""
        self.open()
        log = GroupLog(self.output)
        try:
            todo = [p for p in self.pairs if p.prompt_id not in self._done]
            progress = JudgeProgress(
                total=len(self.pairs), done=len(self.pairs) - len(todo), finished_before=len(self.pairs) - len(todo)
            )
            asker = _Asker(backend, self.settings)
            limit = asyncio.Semaphore(self.settings.concurrency)

            async def one(pair: _Pair) -> None:
                async with limit:
                    verdict = await asker.judge(pair, self.a.label, self.b.label)
                    await log.append((dumps_json(verdict.to_dict()) + "\n").encode("utf-8"))
                progress.done += 1
                progress.failed += verdict.verdict is None
                if self.on_verdict is not None:
                    self.on_verdict(verdict, progress)

            tasks = [asyncio.create_task(one(p)) for p in todo]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await log.drain()
        except WriteFailed as e:
            raise RunError(str(e)) from e.__cause__
        finally:
            log.close()
            self.close()
        judged_now = progress.done - progress.finished_before
        return JudgeOutcome(self.output, self.unpaired, judged_now, progress.failed, list(self.notes))

    def run(self, backend: PolicyBackend) -> JudgeOutcome:
        """``arun`` from synchronous code."""
        return asyncio.run(self.arun(backend))


def _pairs(a: Run, b: Run) -> tuple[list[_Pair], int]:
    answers_b = {r.prompt_id: r for r in b.results}
    pairs = []
    for ra in a.results:
        rb = answers_b.get(ra.prompt_id)
        if rb is None or ra.status != "complete" or rb.status != "complete" or ra.answer is None or rb.answer is None:
            continue
        if [dict(m) for m in ra.messages] != [dict(m) for m in rb.messages]:
            raise InputError(
                f"prompt {ra.prompt_id!r} has different conversations in {a.path} and {b.path}; "
                "judge runs over the same prompts"
            )
        pairs.append(_Pair(ra.prompt_id, _conversation(ra), ra.answer, rb.answer))
    ids = {p.prompt_id for p in pairs}
    every = {r.prompt_id for r in a.results} | set(answers_b)
    return pairs, len(every - ids)


class _Asker:
    """Sends the judge's requests through one dispatcher (batched when the backend batches) and reads the decisions."""

    def __init__(self, backend: PolicyBackend, settings: JudgeSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.name = str(getattr(backend, "name", type(backend).__name__))
        cap = getattr(backend, "max_batch_size", None)
        self.dispatcher: Dispatcher[GenerationRequest, Generation] = Dispatcher(
            backend.generate,
            batching=bool(getattr(backend, "batching", False)),
            label=f"judge {self.name}",
            max_batch=cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None,
        )
        self._budget: ContextBudget | None = None
        self._budget_lock = asyncio.Lock()

    async def budget(self) -> ContextBudget:
        async with self._budget_lock:
            if self._budget is None:
                window = self.settings.context_window
                getter = getattr(self.backend, "context_window", None)
                if window is None and getter is not None:
                    window = await getter()
                self._budget = ContextBudget(self.backend, window or DEFAULT_CONTEXT_WINDOW)
        return self._budget

    async def judge(self, pair: _Pair, a_label: str, b_label: str) -> Verdict:
        orders = await asyncio.gather(self.order(pair, "a"), self.order(pair, "b"))
        verdict, error = _combine(orders)
        return Verdict(
            pair.prompt_id,
            a_label,
            b_label,
            answer_id(pair.a),
            answer_id(pair.b),
            len(pair.a),
            len(pair.b),
            verdict,
            tuple(orders),
            self.name,
            error,
        )

    async def order(self, pair: _Pair, first: Side) -> OrderVerdict:
        s = self.settings
        seed = derive_seed(s.seed, pair.prompt_id, 0, f"judge-{first}:{answer_id(pair.a)}:{answer_id(pair.b)}")
        first_text, second_text = (pair.a, pair.b) if first == "a" else (pair.b, pair.a)
        values = {"conversation": render_conversation(pair.messages), "first": first_text, "second": second_text}

        def build(v: Mapping[str, str]) -> tuple[Message, ...]:
            return s.prompts.messages(s.rubric, v["conversation"], v["first"], v["second"])

        budget = await self.budget()
        try:
            messages, max_tokens, cut = budget.fit(build, values, ["conversation", "first", "second"], s.max_tokens)
        except ConfigError as e:
            return OrderVerdict(first, None, None, None, (), seed, (), f"the judge prompt does not fit: {e}")
        replies: list[str] = []
        for attempt, temperature in enumerate((s.temperature, s.retry_temperature)):
            request = GenerationRequest(
                messages=messages,
                n=1,
                sampling=SamplingParams(
                    temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=(seed + attempt) & 0x7FFFFFFF
                ),
                purpose="judge",
                prompt_id=pair.prompt_id,
            )
            try:
                gen = await self.dispatcher.submit(request)
            except RunError as e:
                return OrderVerdict(
                    first,
                    None,
                    None,
                    replies[-1] if replies else None,
                    tuple(replies),
                    seed,
                    cut,
                    f"the judge backend failed: {e}",
                )
            reply = gen.texts[0] if gen.texts else ""
            replies.append(reply)
            position = parse_winner(reply)
            if position is not None:
                return OrderVerdict(first, position, _winner(position, first), reply, tuple(replies), seed, cut)
        return OrderVerdict(
            first,
            None,
            None,
            replies[-1],
            tuple(replies),
            seed,
            cut,
            "the judge wrote no 'Winner: 1', 'Winner: 2' or 'Winner: tie' in two attempts",
        )


def _winner(position: Position, first: Side) -> Winner:
    if position == "tie":
        return "tie"
    other: Side = "b" if first == "a" else "a"
    return first if position == "1" else other
