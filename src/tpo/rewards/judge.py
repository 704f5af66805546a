"""A reward that asks a language model to rate each answer from 1 to 10 against a rubric.

The judge is any policy backend; by default the policy being optimised judges its own
answers, which is what ``tpo run`` does on the bundled model. The rubric is a short
helpfulness, harmlessness and honesty guide, or the user's own preference in words::

    reward = JudgeReward(policy)                                   # the default rubric
    reward = JudgeReward(policy, prefer="Short answers with one concrete example.")
    reward = JudgeReward.from_spec("openai:gpt-4o-mini")           # another model judges

The prompt
----------
The instructions with the rubric come first, then three worked examples as earlier turns
(they teach the ``Rating: N`` format to small models; ``examples=False`` leaves them out),
then the conversation and the reply to rate. Everything before the reply is the same for
every answer to a prompt, so backends with a prompt cache evaluate it once. A conversation
or reply too long for the judge's context window is shortened in the middle, visibly.

How a rating becomes a score
----------------------------
The judge is asked to reply ``Rating: N``. When its backend returns log-probabilities, the
score is the *expected* rating: at the token where the number is written, the probabilities
of the tokens ``1`` … ``10`` are renormalised to sum to one and averaged with their values,
which ranks answers more finely than the sampled digit alone. Tokenizers that write ``10``
as ``1`` followed by ``0`` make the token ``1`` ambiguous; its probability is split between
the ratings 1 and 10 by what follows it:

* if the vocabulary offered ``10`` as one token at that position, ``1`` means 1;
* if the judge wrote ``1``, the next position's probabilities say how likely a ``0`` was to
  follow (``0`` → 10, anything but a digit → 1);
* otherwise the continuation was never computed and the probability is split evenly.

Without log-probabilities (or when they do not line up with the reply) the score is the
parsed number. A reply with no rating is asked again once, with another seed and a higher
temperature; if that fails too the answer gets a failed ``Score`` whose details hold both
replies.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..engine._budget import DEFAULT_CONTEXT_WINDOW, ContextBudget
from ..engine.algorithm import derive_seed
from ..engine.prompts import check_template, render, render_conversation
from ..engine.store import answer_id
from ..errors import ConfigError, TPOError
from ..options import PluginOptions, flag, integer, mapping, number, option, string
from ..protocols import PolicyBackend
from ..registry import policy_from_spec
from ..types import Generation, GenerationRequest, Message, SamplingParams, Score, ScoreRequest, TokenLogprob

__all__ = [
    "DEFAULT_RUBRIC",
    "JUDGE_CASE",
    "JUDGE_EXAMPLES",
    "JUDGE_INSTRUCTIONS",
    "JudgeOptions",
    "JudgeReward",
    "expected_rating",
    "parse_rating",
]

DEFAULT_RUBRIC = """\
- Helpful: it does what the user asked, is correct and complete for the question, and is clear \
and well organised.
- Harmless: it contains nothing dangerous, hateful or unsafe, and turns down a harmful request politely.
- Honest: it states only what is true, invents no facts, and says so when it is unsure."""

JUDGE_INSTRUCTIONS = """\
You grade replies written by an AI assistant. A good reply is:
{{rubric}}

Grade each reply with one whole number from 1 (very poor) to 10 (excellent), written as \
"Rating: " followed by the number, and nothing else."""

JUDGE_CASE = """\
Rate the reply from 1 (very poor) to 10 (excellent).

Conversation: {{conversation}}

Reply: {{answer}}"""

#: Worked examples shown as earlier turns before every judgement (``examples=True``). They
#: teach the reply format to small models, which otherwise rarely write a rating at all;
#: their ratings follow from plain correctness, which any rubric shares.
JUDGE_EXAMPLES: tuple[tuple[str, str, int], ...] = (
    ("What is the capital of France?", "The capital of France is Paris.", 9),
    ("How many legs does a spider have?", "Spiders have six legs.", 2),
    ("Give me a tip for sleeping better.", "Try to go to bed at the same time every night.", 7),
)


@dataclass(frozen=True)
class JudgeOptions(PluginOptions):
    """The options of ``JudgeReward`` (``--reward-option NAME=VALUE``); see the class for what each does."""

    owner: ClassVar[str] = "judge"

    prefer: str | None = option(None, string(), "your preference in words, replacing the default rubric")
    instructions: str | None = option(None, string(), "the template that opens the prompt, with {{rubric}}")
    case: str | None = option(None, string(), "the template of one reply, with {{conversation}} and {{answer}}")
    examples: bool = option(True, flag(), "show the worked examples before each judgement")
    max_tokens: int = option(16, integer(min=1), "token limit of the judge's reply")
    temperature: float = option(0.2, number(0, 5), "the judge's sampling temperature")
    retry_temperature: float = option(0.8, number(0, 5), "the temperature of the one retry of a reply without a rating")
    seed: int = option(0, integer(min=0), "where the judge's seeds derive from")
    top_logprobs: int = option(20, integer(min=0), "alternatives per token, from backends with log-probabilities")
    context_window: int | None = option(None, integer(min=256), "the judge's context window (default: its backend's)")
    backend_options: Mapping[str, Any] | None = option(None, mapping(), "options of the judge's backend (judge:SPEC)")


_RATING_PATTERNS = (
    re.compile(r"rating\s*(?:[:=]|is|of)?\s*[*_\"']*\s*(\d{1,2})(?!\d)", re.IGNORECASE),
    re.compile(r"(?<![\d.])(\d{1,2})\s*(?:/|out of)\s*10(?!\d)", re.IGNORECASE),
    re.compile(r"^\W*(\d{1,2})\W*$"),
)


def parse_rating(text: str) -> re.Match[str] | None:
    """The first rating from 1 to 10 in a judge's reply, as a match whose group 1 is the number.

    ``Rating: N`` is preferred; ``N/10``, ``N out of 10`` and a reply that is only a number
    are accepted too.
    """
    for pattern in _RATING_PATTERNS:
        for m in pattern.finditer(text):
            if 1 <= int(m.group(1)) <= 10 and not m.group(1).startswith("0"):
                return m
    return None


def expected_rating(logprobs: Sequence[TokenLogprob]) -> tuple[float, dict[int, float]] | None:
    """The expected rating and the probability of each rating, from the reply's log-probabilities.

    ``None`` when the rating cannot be located among the tokens, or when no alternative at
    that position is a rating. See the module's docstring for how ``10`` is handled.
    """
    text = "".join(t.token for t in logprobs)
    m = parse_rating(text)
    if m is None:
        return None
    start, pos = m.start(1), 0
    k = -1
    for i, t in enumerate(logprobs):
        if pos <= start < pos + len(t.token):
            k = i
            break
        pos += len(t.token)
    if k < 0:
        return None
    chosen = logprobs[k]
    # The number must begin its token (after any spaces), or the alternatives are not ratings.
    if chosen.token[: start - pos].strip() or not chosen.token.strip().isdigit():
        return None
    alternatives = dict(chosen.top)
    alternatives.setdefault(chosen.token, chosen.logprob)

    mass: dict[int, float] = {}
    p_one = 0.0
    for token, logprob in alternatives.items():
        digits = token.strip()
        if not (digits.isascii() and digits.isdigit()) or digits.startswith("0"):
            continue
        value = int(digits)
        if value == 1:
            p_one += math.exp(logprob)
        elif value <= 10:
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
    if p_one:
        share_ten = _share_of_ten(logprobs, k, ten_is_a_token=10 in mass)
        mass[1] = mass.get(1, 0.0) + p_one * (1.0 - share_ten)
        if share_ten:
            mass[10] = mass.get(10, 0.0) + p_one * share_ten
    total = sum(mass.values())
    if total <= 0.0:
        return None
    probs = {v: p / total for v, p in sorted(mass.items())}
    return sum(v * p for v, p in probs.items()), probs


def _share_of_ten(logprobs: Sequence[TokenLogprob], k: int, *, ten_is_a_token: bool) -> float:
    """How much of the token ``1``'s probability belongs to the rating 10 (``1`` then ``0``)."""
    if ten_is_a_token:
        return 0.0
    if logprobs[k].token.strip() != "1":
        return 0.5  # the text after "1" was never computed
    if k + 1 >= len(logprobs):
        return 0.0  # the judge stopped right after "1"
    following = logprobs[k + 1]
    options = dict(following.top)
    options.setdefault(following.token, following.logprob)
    zero = sum(math.exp(lp) for t, lp in options.items() if t.startswith("0"))
    other = sum(math.exp(lp) for t, lp in options.items() if not t[:1].isdigit())
    if zero + other <= 0.0:
        return 1.0 if following.token.startswith("0") else 0.0
    return zero / (zero + other)


class JudgeReward:
    """Scores answers by asking a policy backend to rate them from 1 to 10 against a rubric.

    ``policy``: the backend that judges (the optimised policy itself, by default in
    ``tpo run``). ``prefer``: the user's preference in words, replacing the default
    helpfulness/harmlessness/honesty rubric. ``instructions`` (with ``{{rubric}}``) opens the
    judge's prompt and ``case`` (with ``{{conversation}}`` and ``{{answer}}``) presents one
    reply; ``examples`` puts ``JUDGE_EXAMPLES`` before it as earlier turns. Instructions and
    examples come first and are the same for every answer, so a backend with a prompt cache
    (llama.cpp, vLLM) evaluates them once.

    ``max_tokens`` and ``temperature`` keep the judge's reply short and nearly greedy; a
    reply without a rating is asked again once with the next seed and ``retry_temperature``.
    Seeds derive from ``seed``, the prompt id and the answer, so a rerun judges identically.
    ``top_logprobs``: alternatives asked for at each token when the backend supports
    log-probabilities. ``context_window`` overrides the backend's window.

    All the judge prompts of one ``score`` call go to the backend in one ``generate`` call
    when it batches (llama.cpp, vLLM), and concurrently otherwise; ``batching`` follows the
    backend so that the engine gathers judge requests across prompts when that pays.
    """

    name: str = "judge"
    description = (
        "An LLM judge: the policy (or another model) rates each answer 1-10 against a rubric or your --prefer text"
    )
    uses_policy = True
    supports_n = False
    supports_logprobs = False
    options_class = JudgeOptions

    def __init__(
        self,
        policy: PolicyBackend,
        prefer: str | None = None,
        *,
        options: JudgeOptions | None = None,
        owns_policy: bool = False,
        **kwargs: Any,
    ) -> None:
        """Judge with ``policy``; the options as keywords (``prefer`` may come second) or in ``options``."""
        if kwargs.get("backend_options") is not None:
            raise ConfigError("judge: backend_options are for from_spec, which builds the judge's backend")
        opts = self.options = JudgeOptions.from_options({**kwargs, "prefer": prefer}, base=options)
        if not callable(getattr(policy, "generate", None)):
            raise ConfigError(f"the judge needs a policy backend with an async generate(); got {type(policy).__name__}")
        self.instructions = check_template(
            "judge: the instructions template",
            JUDGE_INSTRUCTIONS if opts.instructions is None else opts.instructions,
            {"rubric"},
        )
        self.case = check_template(
            "judge: the case template", JUDGE_CASE if opts.case is None else opts.case, {"conversation", "answer"}
        )
        self.policy = policy
        self.rubric = opts.prefer.strip() if opts.prefer is not None else DEFAULT_RUBRIC
        examples = self.examples = opts.examples
        self.max_tokens = opts.max_tokens
        self.temperature = opts.temperature
        self.retry_temperature = opts.retry_temperature
        self.seed = opts.seed
        self.top_logprobs = opts.top_logprobs
        self.name = f"judge:{getattr(policy, 'name', type(policy).__name__)}"
        self.batching = bool(getattr(policy, "batching", False))
        #: The backend's cap on requests per call, so that the engine sends no more answers at once.
        self.max_batch_size: int | None = getattr(policy, "max_batch_size", None)
        #: A judge that made its own HTTP backend closes that backend's connections per event loop.
        self.closes_per_loop = owns_policy and getattr(policy, "closes_per_loop", False) is True
        self._window = opts.context_window
        self._owns_policy = owns_policy
        self._budget: ContextBudget | None = None
        # The opening and the worked examples are the same for every answer: rendered once.
        self._opening = render(self.instructions, {"rubric": self.rubric}).rstrip() + "\n\n"
        shots: list[Message] = []
        if examples:
            for question, reply, rating in JUDGE_EXAMPLES:
                text = render(self.case, {"conversation": question, "answer": reply})
                shots += [
                    Message("user", text if shots else self._opening + text),
                    Message("assistant", f"Rating: {rating}"),
                ]
        self._shots = tuple(shots)

    @classmethod
    def from_spec(
        cls, target: str, *, policy: PolicyBackend | None = None, prefer: str | None = None, **options: Any
    ) -> JudgeReward:
        """``judge`` (the given policy judges) or ``judge:SPEC`` (another backend, e.g. ``judge:openai:gpt-4o-mini``).

        ``backend_options`` (a mapping) is passed to the judge's own backend.
        """
        opts = JudgeOptions.from_options({**options, "prefer": prefer})
        backend_options = opts.backend_options or {}
        if target.strip():
            judge_backend = policy_from_spec(target.strip(), **backend_options)
            return cls(judge_backend, options=opts, owns_policy=True)
        if backend_options:
            raise ConfigError("judge: backend_options needs a judge backend, e.g. judge:openai:gpt-4o-mini")
        if policy is None:
            raise ConfigError(
                "the judge reward needs a model: use it with a policy, or name one, e.g. judge:openai:gpt-4o-mini"
            )
        return cls(policy, options=opts)

    def with_rubric(self, prefer: str) -> JudgeReward:
        """The same judge (same backend, templates and settings) grading against ``prefer`` instead.

        The copy shares this judge's backend and never closes it: ``tpo serve`` makes one per
        rubric that requests ask for.
        """
        return JudgeReward(self.policy, prefer, options=self.options)

    def messages(self, conversation: str, answer: str) -> tuple[Message, ...]:
        """The judge's prompt for one answer; ``conversation`` is already rendered as text."""
        text = render(self.case, {"conversation": conversation, "answer": answer})
        return (*self._shots, Message("user", text if self._shots else self._opening + text))

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Rate every answer: one ``generate`` call for all of them, and one more for any retries."""
        if not requests:
            return []
        budget = await self._get_budget()
        scores: list[Score | None] = [None] * len(requests)
        jobs: list[_Job] = []
        for i, r in enumerate(requests):
            try:
                messages, max_tokens, cut = self._fit(budget, r)
            except ConfigError as e:
                scores[i] = Score.failed(f"the judge prompt does not fit the judge's context window: {e}")
                continue
            seed = derive_seed(self.seed, r.prompt_id, 0, "judge:" + answer_id(r.answer))
            jobs.append(_Job(i, messages, max_tokens, seed, cut))

        retry: list[_Job] = []
        for job, outcome in zip(jobs, await self._ask(jobs, retry=False), strict=True):
            if isinstance(outcome, str):
                scores[job.index] = Score.failed(outcome)
                continue
            job.replies.append(_first_text(outcome))
            scores[job.index] = self._score_of(outcome, job)
            if scores[job.index] is None:
                retry.append(job)
        for job, outcome in zip(retry, await self._ask(retry, retry=True), strict=True):
            if isinstance(outcome, str):
                scores[job.index] = Score.failed(outcome, {"replies": list(job.replies)})
                continue
            job.replies.append(_first_text(outcome))
            scores[job.index] = self._score_of(outcome, job) or Score.failed(
                "the judge gave no rating from 1 to 10 in two attempts",
                {"reply": job.replies[-1], "replies": list(job.replies), "attempts": len(job.replies)},
            )
        return [s if s is not None else Score.failed("not scored") for s in scores]

    async def preflight(self) -> None:
        """Check the judge's own backend before a run (a judge on the run's policy leaves that to the run)."""
        check = getattr(self.policy, "preflight", None)
        if self._owns_policy and check is not None:
            await check()

    async def aclose(self) -> None:
        """Close the judge's backend when the judge created it."""
        if self._owns_policy:
            close = getattr(self.policy, "aclose", None)
            if close is not None:
                await close()

    # ------------------------------------------------------------------ internals

    async def _get_budget(self) -> ContextBudget:
        if self._budget is None:
            window = self._window
            if window is None:
                getter = getattr(self.policy, "context_window", None)
                window = await getter() if getter is not None else None
            self._budget = ContextBudget(self.policy, window or DEFAULT_CONTEXT_WINDOW)
        return self._budget

    def _fit(self, budget: ContextBudget, request: ScoreRequest) -> tuple[tuple[Message, ...], int, tuple[str, ...]]:
        def build(values: Mapping[str, str]) -> tuple[Message, ...]:
            return self.messages(values["conversation"], values["answer"])

        values = {"conversation": render_conversation(request.messages), "answer": request.answer}
        return budget.fit(build, values, ["conversation", "answer"], self.max_tokens)

    async def _ask(self, jobs: Sequence[_Job], *, retry: bool) -> list[Generation | str]:
        """Send the judge prompts; each outcome is a ``Generation`` or the error that prevented it."""
        if not jobs:
            return []
        logprobs = self.top_logprobs if getattr(self.policy, "supports_logprobs", False) else None
        temperature = self.retry_temperature if retry else self.temperature
        requests = [
            GenerationRequest(
                messages=job.messages,
                n=1,
                sampling=SamplingParams(
                    temperature=temperature,
                    top_p=1.0,
                    max_tokens=job.max_tokens,
                    seed=(job.seed + 1) & 0x7FFFFFFF if retry else job.seed,
                ),
                logprobs=logprobs,
                purpose="judge",
            )
            for job in jobs
        ]
        if self.batching:
            step = self.max_batch_size or len(requests)
            out_batched: list[Generation | str] = []
            for start in range(0, len(requests), step):
                out_batched.extend(await self._ask_batch(requests[start : start + step]))
            return out_batched
        outcomes = await asyncio.gather(*(self.policy.generate([r]) for r in requests), return_exceptions=True)
        out: list[Generation | str] = []
        for o in outcomes:
            if isinstance(o, BaseException):
                if not isinstance(o, Exception):
                    raise o
                out.append(_failure(o))
            elif len(o) != 1:
                out.append(f"the judge backend returned {len(o)} replies for 1 prompt")
            else:
                out.append(o[0])
        return out

    async def _ask_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation | str]:
        try:
            gens = await self.policy.generate(requests)
        except Exception as e:  # the backend's failure becomes each answer's failed score
            return [_failure(e)] * len(requests)
        if len(gens) != len(requests):
            return [f"the judge backend returned {len(gens)} replies for {len(requests)} prompts"] * len(requests)
        return list(gens)

    def _score_of(self, gen: Generation, job: _Job) -> Score | None:
        """The score in a judge's reply, or ``None`` when the reply has no rating."""
        reply = _first_text(gen)
        m = parse_rating(reply)
        if m is None:
            return None
        rating = int(m.group(1))
        details: dict[str, Any] = {"reply": reply, "rating": rating, "attempts": len(job.replies)}
        if job.truncated:
            details["truncated"] = list(job.truncated)
        token_logprobs = gen.logprobs[0] if gen.logprobs else None
        if token_logprobs:
            found = expected_rating(token_logprobs)
            if found is not None:
                value, probs = found
                details.update(method="logprobs", probabilities={str(k): round(v, 6) for k, v in probs.items()})
                return Score(value, details=details)
            details["logprobs_unusable"] = True
        details["method"] = "parsed"
        return Score(float(rating), details=details)


@dataclass
class _Job:
    """One answer to judge: where its score goes, its prompt, its seed and the replies so far."""

    index: int
    messages: tuple[Message, ...]
    max_tokens: int
    seed: int
    truncated: tuple[str, ...]
    replies: list[str] = field(default_factory=list)


def _first_text(gen: Generation) -> str:
    return gen.texts[0] if gen.texts else ""


def _failure(e: Exception) -> str:
    if isinstance(e, TPOError):
        return f"the judge backend failed: {e}"
    return f"the judge backend failed: {type(e).__name__}: {e}"
