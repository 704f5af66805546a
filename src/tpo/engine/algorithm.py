"""TPO, revision and best-of-N as one engine that drives many prompts through their steps at once.

Each prompt is one asyncio chain of dependent calls (sample, score, then per step: loss,
gradient, update, score). All chains share one dispatcher per backend, so a batching
backend receives every request that is ready in one call, and a concurrent backend keeps
all of them in flight; a slow prompt only ever waits for its own chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ..config import TPOConfig
from ..errors import BackendError, ConfigError, InputError, RewardError, RunError, TPOError
from ..protocols import PolicyBackend, RewardModel
from ..result import StepRecord, TPOResult, Usage
from ..types import Generation, GenerationRequest, Message, Prompt, PromptLike, SamplingParams, Score, ScoreRequest
from ._budget import DEFAULT_CONTEXT_WINDOW, ContextBudget
from ._dispatch import Dispatcher
from ._scheduler import bounded_map
from .prompts import extract_answer, render, render_conversation
from .store import Candidate, CandidateStore, answer_id

__all__ = ["UNSCORED_ERROR_PREFIX", "Engine", "StepCallback", "derive_seed"]

#: How the error of a prompt none of whose answers could be scored begins (``tpo serve`` tells it apart by this).
UNSCORED_ERROR_PREFIX = "no answer could be scored: "

#: Called with a partial result after every finished step of every prompt (for progress and checkpoints).
StepCallback = Callable[[TPOResult], Awaitable[None] | None]


def derive_seed(run_seed: int, prompt_id: str, step: int, role: str) -> int:
    """The sampling seed for one call: a hash of (run seed, prompt id, step, role), below 2**31."""
    digest = hashlib.blake2b(f"{run_seed}\x1f{prompt_id}\x1f{step}\x1f{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def _version() -> str:
    from .. import __version__

    return __version__


@dataclass
class _Chain:
    """The mutable state of one prompt while it runs."""

    prompt: Prompt
    config: TPOConfig
    store: CandidateStore = field(default_factory=CandidateStore)
    steps: list[StepRecord] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    stopped_early: str | None = None
    #: Parameters of the sampling model and of the critic, for FLOPs (``_model_sizes``); None when unknown.
    model_sizes: tuple[float, float] | None = None


@dataclass
class _StepTally:
    """What the step in progress has done so far, and which of its values were cut to fit."""

    #: Everything but the wall time, added up call by call (FLOPs stay None when a model's size is unknown).
    work: Usage = field(default_factory=Usage)
    truncated: set[str] = field(default_factory=set)

    def add(self, work: Usage) -> None:
        self.work = self.work + work

    def usage(self, wall_time_s: float) -> Usage:
        return replace(self.work, wall_time_s=wall_time_s)


class Engine:
    """Runs TPO (or revision, or best-of-N) for any number of prompts.

    ``policy`` samples the answers; ``critic`` (default: the policy) writes the critiques,
    the feedback and the rewrites; ``reward`` scores answers. The engine owns none of them:
    closing them is the caller's business.
    """

    def __init__(
        self,
        policy: PolicyBackend,
        reward: RewardModel,
        *,
        critic: PolicyBackend | None = None,
        config: TPOConfig | None = None,
    ) -> None:
        for what, obj, method in (("policy", policy, "generate"), ("reward", reward, "score")):
            if not callable(getattr(obj, method, None)):
                raise ConfigError(f"{what} must have an async {method}() method; got {type(obj).__name__}")
        if critic is not None and not callable(getattr(critic, "generate", None)):
            raise ConfigError(f"critic must have an async generate() method; got {type(critic).__name__}")
        for label, capped in (("policy", policy), ("critic", critic), ("reward", reward)):
            _max_batch_size(capped, label)  # checked now: a bad value is the backend's mistake, not a run failure
        for label, sized in (("policy", policy), ("critic", critic)):
            _parameter_count(sized, label)
        self.policy = policy
        self.critic = critic if critic is not None else policy
        self.reward = reward
        self.config = config if config is not None else TPOConfig()
        #: Totals over every prompt this engine has finished.
        self.usage = Usage()
        self._dispatchers: dict[int, Dispatcher[GenerationRequest, Generation]] = {}
        self._scorer: Dispatcher[ScoreRequest, Score] | None = None
        self._budgets: dict[int, ContextBudget] = {}
        #: The event loop the dispatchers above belong to; set only once they are all built.
        self._started_loop: asyncio.AbstractEventLoop | None = None
        self._preparing: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        #: ``_template_check_key`` of every per-call configuration whose templates were found to fit.
        self._checked_templates: set[tuple[Any, ...]] = set()

    # ------------------------------------------------------------------ public

    async def optimize(
        self,
        prompt: PromptLike,
        *,
        id: str = "0",
        metadata: Mapping[str, Any] | None = None,
        resume_from: TPOResult | None = None,
        on_step: StepCallback | None = None,
        config: TPOConfig | None = None,
    ) -> TPOResult:
        """Optimise one prompt and return its result.

        ``config`` is this prompt's own configuration (default: the engine's). Calls with
        different configurations can run at once and still share the engine's dispatchers,
        so a batching backend gets their requests together; only ``context_window`` must be
        the engine's, as the context budgets are built once per engine.

        A failure while running (a backend or reward model that keeps failing, a conversation
        that cannot be made to fit the context window) gives a result with status
        ``"failed"``; mistakes that can be seen before any model work (bad options, prompt
        templates too long for the critic's window, ``resume_from`` of another
        conversation) raise a ``UserError``.
        """
        p = Prompt.of(prompt, id=id, metadata=metadata)
        _check_resume(p, resume_from)
        await self._prepare()
        return await self._run_chain(p, resume_from, on_step, self._call_config(config))

    async def optimize_many(
        self,
        prompts: Iterable[PromptLike] | AsyncIterable[PromptLike],
        *,
        resume: Mapping[str, TPOResult] | None = None,
        on_step: StepCallback | None = None,
        config: TPOConfig | None = None,
    ) -> AsyncGenerator[TPOResult, None]:
        """Optimise many prompts concurrently; yield each result as soon as its prompt finishes.

        Prompts are read lazily, at most ``config.max_concurrent_prompts`` at a time, so the
        input and output can be streams of any length. A prompt that is not a ``Prompt``
        gets its position (``"0"``, ``"1"``, ...) as id. ``resume`` maps prompt ids to
        partial results to continue from. ``config`` is these prompts' configuration
        (default: the engine's), as for ``optimize``: several calls with different
        configurations share the engine's dispatchers (what ``tpo sweep`` relies on).

        A problem of one prompt (its backend calls keep failing, its conversation cannot be
        made to fit, its ``resume`` entry belongs to another conversation) gives that prompt
        a ``"failed"`` result and the others go on. Mistakes that concern the whole run
        (bad options, templates too long for the critic's window, a malformed prompt in a
        list, repeated ids) raise a ``UserError``, before any model work where they can.
        """
        normalized = _numbered(prompts)
        await self._prepare()
        cfg = self._call_config(config)
        earlier = resume or {}

        def run(p: Prompt) -> Coroutine[Any, Any, TPOResult]:
            return self._run_chain(p, earlier.get(p.id), on_step, cfg)

        # aclosing: leaving this generator early cancels the prompts still running, at once.
        async with aclosing(bounded_map(run, normalized, limit=cfg.max_concurrent_prompts)) as results:
            async for result in results:
                yield result

    # ------------------------------------------------------------------ set-up

    async def prepare(self) -> None:
        """Learn the models' context windows and check that the templates fit them, on the running loop.

        Optional: the first call that optimises does the same. A long-lived caller (``tpo serve``)
        calls it at start-up, so that a configuration that cannot work fails there.
        """
        await self._prepare()

    async def _prepare(self) -> None:
        """Build the dispatchers of the running event loop and the context budgets, once per loop."""
        loop = asyncio.get_running_loop()
        if self._started_loop is loop:
            return
        # Calls that start together on a fresh engine wait for one preparation instead of
        # running on a half-built one; a preparation that failed is tried again by the next call.
        if self._preparing is None or self._preparing[0] is not loop:
            self._preparing = (loop, asyncio.Lock())
        async with self._preparing[1]:
            if self._started_loop is loop:
                return
            backends = {id(self.policy): self.policy, id(self.critic): self.critic}
            budgets = dict(self._budgets)
            for key, backend in backends.items():
                if key not in budgets:
                    window = self.config.context_window
                    if window is None:
                        window = await _ask_context_window(backend)
                    budgets[key] = ContextBudget(backend, window or DEFAULT_CONTEXT_WINDOW)
            self._check_templates(budgets[id(self.critic)], self.config)
            # Dispatchers hold futures of one event loop; a new loop (a new sync call) gets new ones.
            dispatchers: dict[int, Dispatcher[GenerationRequest, Generation]] = {
                key: Dispatcher(
                    backend.generate,
                    batching=bool(getattr(backend, "batching", False)),
                    label=f"policy backend {_name(backend)}",
                    max_batch=_max_batch_size(backend, "policy"),
                )
                for key, backend in backends.items()
            }
            scorer: Dispatcher[ScoreRequest, Score] = Dispatcher(
                self.reward.score,
                batching=bool(getattr(self.reward, "batching", False)),
                label=f"reward model {_name(self.reward)}",
                error=RewardError,
                max_batch=_max_batch_size(self.reward, "reward"),
            )
            self._budgets, self._dispatchers, self._scorer = budgets, dispatchers, scorer
            self._started_loop = loop  # last: only a whole preparation counts

    def _call_config(self, config: TPOConfig | None) -> TPOConfig:
        """The configuration of one call: the engine's by default, else ``config`` once checked (after ``_prepare``)."""
        if config is None or config is self.config:
            return self.config
        self._check_call_config(config)
        return config

    def _check_call_config(self, config: TPOConfig) -> None:
        """Raise ``ConfigError`` when a per-call configuration cannot run on this engine."""
        if not isinstance(config, TPOConfig):
            raise ConfigError(f"config must be a tpo.TPOConfig, not {type(config).__name__}")
        if config.context_window != self.config.context_window:
            raise ConfigError(
                f"a per-call config cannot change context_window ({config.context_window} instead of the "
                f"engine's {self.config.context_window}); give it to the Engine"
            )
        # tpo serve makes a configuration per request: the templates (tokenized) are checked once per
        # combination of what the check reads, not once per request.
        key = _template_check_key(config)
        if key not in self._checked_templates:
            self._check_templates(self._budgets[id(self.critic)], config)
            self._checked_templates.add(key)

    def _check_templates(self, budget: ContextBudget, cfg: TPOConfig) -> None:
        """Raise ``ConfigError`` now if a template the run will use cannot fit the critic's window even empty.

        Found later, the same problem would fail every prompt half-way through its work.
        What it reads of ``cfg`` is ``_template_check_key(cfg)``.
        """
        if cfg.depth == 0:  # best-of-N (and depth 0) never sends a template
            return
        prompts = cfg.prompts
        empty = {"conversation": "", "chosen": "", "rejected": "", "critique": "", "feedback": "", "tag": prompts.tag}
        critic_tokens = cfg.critic_max_tokens or cfg.max_tokens
        owner = f"the critic {_name(self.critic)}"
        # TPO falls back to the revision template when chosen and rejected are the same answer.
        losses = [("loss_tpo", prompts.loss_tpo)] if cfg.mode == "tpo" else []
        losses.append(("loss_revision", prompts.loss_revision))
        for name, loss in losses:
            budget.check_fits(
                partial(_one_user_message, loss), empty, critic_tokens, what=f"the {name} prompt template", owner=owner
            )
            budget.check_fits(
                partial(_gradient_messages, loss, prompts.gradient),
                empty,
                critic_tokens,
                what=f"the gradient prompt template (after {name})",
                owner=owner,
            )
        budget.check_fits(
            partial(_one_user_message, prompts.update),
            empty,
            cfg.max_tokens,
            what="the update prompt template",
            owner=owner,
        )

    # ------------------------------------------------------------------ one prompt

    async def _run_chain(
        self,
        prompt: Prompt,
        resume_from: TPOResult | None,
        on_step: StepCallback | None,
        config: TPOConfig,
    ) -> TPOResult:
        chain = _Chain(prompt, config, model_sizes=_model_sizes(config, self.policy, self.critic))
        started = time.perf_counter()
        error: str | None = None
        try:
            _check_resume(prompt, resume_from)
        except InputError as e:  # this prompt's problem: it fails, the other prompts of the run go on
            error, resume_from = _describe(e), None
        earlier_s = 0.0
        if resume_from is not None and resume_from.status != "failed":
            chain.store = CandidateStore(resume_from.candidates)
            chain.steps = list(resume_from.steps)
            chain.usage = resume_from.usage
            earlier_s = resume_from.usage.wall_time_s
            if resume_from.status == "complete":
                return resume_from
        cfg = chain.config
        # Depth first: a chain that ran all its steps did not stop early, whatever its score.
        while error is None and (
            not chain.steps
            or (len(chain.steps) <= cfg.depth and chain.stopped_early is None and self._should_continue(chain))
        ):
            try:
                await self._timed_step(chain, len(chain.steps), self._update_step if chain.steps else self._sample_step)
            except (RunError, InputError) as e:
                # A backend that keeps failing, or a conversation that cannot be made to fit: this
                # prompt fails and the others go on. Other errors (a bug, a misconfigured run) propagate.
                error = _describe(e)
                break
            # Outside the try: a callback's own error (a checkpoint that cannot be written) stops the
            # run instead of passing for this prompt's failure. The partial result (with the whole
            # configuration in it) is only built for a callback that will read it.
            if on_step is not None:
                await _notify(on_step, self._result(chain, "partial"))
        chain.usage = replace(chain.usage, wall_time_s=earlier_s + time.perf_counter() - started)
        if error is None and not chain.store.scored():
            error = _unscored_error(chain.store)
        result = self._result(chain, "failed" if error else "complete", error)
        self.usage = self.usage + result.usage
        return result

    def _should_continue(self, chain: _Chain) -> bool:
        cfg = chain.config
        best = chain.store.best()
        if best is None or best.score is None:
            return False
        if cfg.early_stop_score is not None and best.score >= cfg.early_stop_score:
            chain.stopped_early = f"best score {best.score:g} reached the threshold {cfg.early_stop_score:g}"
            return False
        k = cfg.early_stop_patience
        if k is not None and len(chain.steps) > k:
            before = chain.steps[-k - 1].best_score
            if before is not None and best.score <= before:
                chain.stopped_early = f"best score did not improve for {k} step(s)"
                return False
        return True

    async def _timed_step(
        self, chain: _Chain, step: int, run: Callable[[_Chain, int, _StepTally], Awaitable[StepRecord]]
    ) -> None:
        tally = _StepTally()
        t0 = time.perf_counter()
        try:
            record = await run(chain, step, tally)
        finally:
            # The usage of a step that failed half-way still counts towards the prompt.
            usage = tally.usage(time.perf_counter() - t0)
            chain.usage = chain.usage + usage
        best = chain.store.best()
        chain.steps.append(
            replace(
                record,
                truncated=tuple(sorted(tally.truncated)),
                best_score=best.score if best else None,
                usage=usage,
                cumulative=chain.usage,
            )
        )

    async def _sample_step(self, chain: _Chain, step: int, tally: _StepTally) -> StepRecord:
        cfg, prompt = chain.config, chain.prompt
        budget = self._budgets[id(self.policy)]
        names = [f"m{i}" for i in range(len(prompt.messages))]
        values = {n: m.content for n, m in zip(names, prompt.messages, strict=True)}

        def build(v: Mapping[str, str]) -> tuple[Message, ...]:
            return tuple(Message(m.role, v[n]) for n, m in zip(names, prompt.messages, strict=True))

        messages, max_tokens, cut = _fit(budget, prompt.id, build, values, names, cfg.max_tokens)
        tally.truncated.update("conversation" for _ in cut)
        gen = await self._generate(
            self.policy,
            tally,
            messages,
            n=cfg.width,
            max_tokens=max_tokens,
            temperature=cfg.temperature,
            purpose="sample",
            chain=chain,
            step=step,
        )
        failures: list[str] = []
        texts: list[tuple[str, str | None]] = []
        for i, text in enumerate(gen.texts):
            if not text.strip():
                failures.append(f"sample {i} was empty")
            else:
                texts.append((text.strip(), _at(gen.finish_reasons, i)))
        if len(gen.texts) < cfg.width:
            failures.append(f"the backend returned {len(gen.texts)} of {cfg.width} samples")
        ids = await self._score_and_store(
            chain, tally, texts, step=step, parent=None, origins=["sample"] * len(texts), failures=failures
        )
        return StepRecord(step=step, kind="sample", candidate_ids=tuple(ids), failures=tuple(failures))

    async def _update_step(self, chain: _Chain, step: int, tally: _StepTally) -> StepRecord:
        prompts = chain.config.prompts
        chosen, rejected = self._select(chain)
        fallback = chain.config.mode == "tpo" and rejected is None
        kind = "revision" if fallback else chain.config.mode
        loss_template = prompts.loss_tpo if kind == "tpo" else prompts.loss_revision
        ask = partial(self._ask_critic, chain, step, tally)
        failures: list[str] = []

        # Textual loss: a critique of the chosen answer against the rejected one (or on its own).
        conversation = render_conversation(chain.prompt.messages)
        loss_values = {
            "conversation": conversation,
            "chosen": chosen.text,
            "rejected": rejected.text if rejected else "",
        }
        loss = await ask("loss", partial(_one_user_message, loss_template), loss_values, list(loss_values))
        critique = _first(loss).strip()
        if not critique:
            failures.append("the critique was empty")

        # Textual gradient: the loss conversation continued with a request for feedback.
        grad_values = {**loss_values, "critique": critique}
        grad = await ask(
            "gradient", partial(_gradient_messages, loss_template, prompts.gradient), grad_values, list(grad_values)
        )
        feedback = _first(grad).strip()
        if not feedback:
            failures.append("the feedback was empty")

        # Update: width rewrites of the chosen answer that follow the feedback, then scored.
        upd_values = {"conversation": conversation, "chosen": chosen.text, "critique": critique, "feedback": feedback}
        update = await ask(
            "update", partial(_one_user_message, prompts.update), {**upd_values, "tag": prompts.tag}, list(upd_values)
        )
        texts, origins, extraction = _extract_rewrites(update, prompts.tag, chain.config.width, failures)
        ids = await self._score_and_store(
            chain, tally, texts, step=step, parent=chosen.id, origins=origins, failures=failures
        )
        return StepRecord(
            step=step,
            kind=kind,  # type: ignore[arg-type]
            candidate_ids=tuple(ids),
            chosen_id=chosen.id,
            rejected_id=rejected.id if rejected else None,
            fallback_to_revision=fallback,
            critique=critique,
            feedback=feedback,
            extraction=extraction,
            failures=tuple(failures),
        )

    def _select(self, chain: _Chain) -> tuple[Candidate, Candidate | None]:
        """The chosen answer (the best so far) and, for TPO, the rejected one (the worst).

        The rejected answer is ``None`` in revision mode, and when TPO has no answer but the
        chosen one to reject (all scores tied, say): that step falls back to revision.
        """
        chosen = chain.store.best()
        if chosen is None:  # _should_continue stops a chain before this can happen
            raise RuntimeError("no scored candidate to improve")
        if chain.config.mode != "tpo":
            return chosen, None
        if chain.config.rejected_from == "latest":
            rejected = _worst_of(chain.store, chain.steps[-1].candidate_ids) or chain.store.worst()
        else:
            rejected = chain.store.worst()
        if rejected is None or rejected.id == chosen.id:
            return chosen, None
        return chosen, rejected

    # ------------------------------------------------------------------ calls

    async def _ask_critic(
        self,
        chain: _Chain,
        step: int,
        tally: _StepTally,
        purpose: str,
        build: Callable[[Mapping[str, str]], tuple[Message, ...]],
        values: Mapping[str, str],
        shrinkable: Sequence[str],
    ) -> Generation:
        """Fit one request to the critic's context window (shortening ``shrinkable`` values if need be), then send it.

        The critique and the feedback are one sample each, with the critic's sampling settings; the
        update asks for ``width`` rewrites with the policy's.
        """
        cfg = chain.config
        if purpose == "update":
            n, max_tokens, temperature = cfg.width, cfg.max_tokens, cfg.temperature
        else:
            n, max_tokens = 1, cfg.critic_max_tokens or cfg.max_tokens
            temperature = cfg.critic_temperature if cfg.critic_temperature is not None else cfg.temperature
        budget = self._budgets[id(self.critic)]
        messages, max_tokens, cut = _fit(budget, chain.prompt.id, build, values, shrinkable, max_tokens)
        tally.truncated.update(cut)
        return await self._generate(
            self.critic,
            tally,
            messages,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            purpose=purpose,
            chain=chain,
            step=step,
        )

    async def _generate(
        self,
        backend: PolicyBackend,
        tally: _StepTally,
        messages: tuple[Message, ...],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        purpose: str,
        chain: _Chain,
        step: int,
    ) -> Generation:
        cfg = chain.config
        request = GenerationRequest(
            messages=messages,
            n=n,
            sampling=SamplingParams(
                temperature=temperature,
                top_p=cfg.top_p,
                max_tokens=max_tokens,
                seed=derive_seed(cfg.seed, chain.prompt.id, step, purpose),
            ),
            purpose=purpose,  # type: ignore[arg-type]
            prompt_id=chain.prompt.id,
            step=step,
        )
        gen = await self._dispatchers[id(backend)].submit(request)
        prompt_tokens, completion_tokens = gen.prompt_tokens or 0, gen.completion_tokens or 0
        params = None if chain.model_sizes is None else chain.model_sizes[0 if purpose == "sample" else 1]
        tally.add(
            Usage(
                policy_calls=1,
                sequences=len(gen.texts),
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                prompt_flops=None if params is None else 2.0 * params * prompt_tokens,
                completion_flops=None if params is None else 2.0 * params * completion_tokens,
            )
        )
        return gen

    async def _score_and_store(
        self,
        chain: _Chain,
        tally: _StepTally,
        texts: Sequence[tuple[str, str | None]],
        *,
        step: int,
        parent: str | None,
        origins: Sequence[str],
        failures: list[str],
    ) -> list[str]:
        """Score the answers not yet in the store, add them, and return the ids of all of them in order."""
        ids = [answer_id(t) for t, _ in texts]
        new: dict[str, int] = {}
        for i, cid in enumerate(ids):
            if cid not in chain.store and cid not in new:
                new[cid] = i
        order = list(new.values())
        scorer = self._scorer
        if scorer is None:
            raise RuntimeError("the engine was not prepared")
        requests = [
            ScoreRequest(chain.prompt.messages, texts[i][0], chain.prompt.metadata, chain.prompt.id) for i in order
        ]
        # Called even with nothing to score: on a batching reward model the chain then resumes
        # together with the chains that did score, so their next requests share a batch.
        # A call that failed fails only the answers it was scoring.
        outcomes = await scorer.submit_many(requests)
        tally.add(Usage(reward_calls=len(requests)))
        for i, outcome in zip(order, outcomes, strict=True):
            score = Score.failed(str(outcome)) if isinstance(outcome, RunError) else outcome
            value = score.value if score.error is None else None
            if value is not None and not _finite(value):
                value, score = (
                    None,
                    Score.failed(f"the reward model returned a non-finite score ({score.value!r})", score.details),
                )
            if value is None:
                tally.add(Usage(reward_failures=1))
                failures.append(f"answer {ids[i]} could not be scored: {score.error or 'no score'}")
            chain.store.add(
                Candidate(
                    id=ids[i],
                    text=texts[i][0],
                    score=float(value) if value is not None else None,
                    step=step,
                    parent_id=parent,
                    origin=origins[i],  # type: ignore[arg-type]
                    score_error=(score.error or "the reward model returned no score") if value is None else None,
                    finish_reason=texts[i][1],
                    score_details=score.details,
                )
            )
        return ids

    # ------------------------------------------------------------------ results

    def _result(self, chain: _Chain, status: str, error: str | None = None) -> TPOResult:
        cfg = chain.config
        final: Candidate | None
        if cfg.final_from == "last_step" and chain.steps:
            final = _best_of(chain.store, chain.steps[-1].candidate_ids) or chain.store.best()
        else:
            final = chain.store.best()
        return TPOResult(
            prompt_id=chain.prompt.id,
            messages=tuple(m.as_dict() for m in chain.prompt.messages),
            status=status,  # type: ignore[arg-type]
            answer=final.text if final else None,
            score=final.score if final else None,
            best_id=final.id if final else None,
            candidates=tuple(chain.store),
            steps=tuple(chain.steps),
            usage=chain.usage,
            seed=cfg.seed,
            config=cfg.to_dict(),
            metadata=dict(chain.prompt.metadata),
            error=error,
            stopped_early=chain.stopped_early,
            policy=_name(self.policy),
            critic=_name(self.critic),
            reward=_name(self.reward),
            tpo_version=_version(),
        )


async def _ask_context_window(backend: PolicyBackend) -> int | None:
    """The backend's context window, or None when it cannot tell (or tells nonsense)."""
    getter = getattr(backend, "context_window", None)
    if getter is None:
        return None
    try:
        window = await getter()
    except TPOError:
        raise
    except Exception as e:  # a backend that let a third-party error escape
        raise BackendError(
            f"policy backend {_name(backend)} failed to tell its context window: {type(e).__name__}: {e}",
            backend=_name(backend),
        ) from e
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        return None
    return window


def _name(obj: object) -> str:
    return str(getattr(obj, "name", type(obj).__name__))


def _unscored_error(candidates: Iterable[Candidate]) -> str:
    """The error of a prompt none of whose answers could be scored: why each could not, or that there were none."""
    reasons = {c.score_error for c in candidates if c.score_error} or {"every sample failed"}
    return UNSCORED_ERROR_PREFIX + "; ".join(sorted(reasons))


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _template_check_key(cfg: TPOConfig) -> tuple[Any, ...]:
    """What ``Engine._check_templates`` reads of ``cfg``: configurations with the same key pass or fail it alike."""
    if cfg.depth == 0:
        return (0,)
    return (cfg.mode == "tpo", cfg.prompts, cfg.critic_max_tokens or cfg.max_tokens, cfg.max_tokens)


def _parameter_count(obj: object, what: str) -> float | None:
    """The optional ``parameter_count`` capability of a policy backend, checked."""
    count = getattr(obj, "parameter_count", None)
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) or count <= 0:
        raise ConfigError(f"{what} {_name(obj)}: parameter_count must be a positive number or None, not {count!r}")
    return float(count)


def _model_sizes(cfg: TPOConfig, policy: PolicyBackend, critic: PolicyBackend) -> tuple[float, float] | None:
    """The parameters of the model that samples and of the one that writes critiques and rewrites, for FLOPs.

    ``None`` unless every model a run of ``cfg`` uses has a known size: estimates for only
    part of the work would be mistaken for the whole.
    """
    sampler = cfg.policy_params if cfg.policy_params is not None else _parameter_count(policy, "policy")
    if cfg.critic_params is not None:
        writer: float | None = cfg.critic_params
    elif critic is policy:
        writer = sampler
    else:
        writer = _parameter_count(critic, "critic")
    if sampler is None or (writer is None and cfg.depth > 0):
        return None
    return sampler, writer if writer is not None else sampler


def _max_batch_size(obj: object, what: str) -> int | None:
    """The optional ``max_batch_size`` capability of a backend or reward model, checked."""
    cap = getattr(obj, "max_batch_size", None)
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(f"{what} {_name(obj)}: max_batch_size must be a positive integer or None, not {cap!r}")
    return cap


def _check_resume(prompt: Prompt, resume_from: TPOResult | None) -> None:
    if resume_from is not None and [dict(m) for m in resume_from.messages] != [m.as_dict() for m in prompt.messages]:
        raise InputError(
            f"prompt {prompt.id!r}: the result to resume from belongs to a different conversation "
            f"(prompt {resume_from.prompt_id!r})"
        )


def _one_user_message(template: str, values: Mapping[str, str]) -> tuple[Message, ...]:
    """The loss and update requests: one user turn, the template filled in."""
    return (Message("user", render(template, values)),)


def _gradient_messages(loss_template: str, gradient_template: str, values: Mapping[str, str]) -> tuple[Message, ...]:
    """The loss conversation continued: the loss request, the critique as the reply, then the ask."""
    return (
        Message("user", render(loss_template, values)),
        Message("assistant", values["critique"]),
        Message("user", render(gradient_template, values)),
    )


def _fit(
    budget: ContextBudget,
    prompt_id: str,
    build: Callable[[Mapping[str, str]], tuple[Message, ...]],
    values: Mapping[str, str],
    shrinkable: Sequence[str],
    max_tokens: int,
) -> tuple[tuple[Message, ...], int, tuple[str, ...]]:
    try:
        return budget.fit(build, values, shrinkable, max_tokens)
    except ConfigError as e:
        # The templates were checked against the window before the run, so what cannot be made
        # to fit is this prompt's own text (a conversation of very many turns, say).
        raise InputError(f"prompt {prompt_id!r}: {e}") from e


def _extract_rewrites(
    gen: Generation, tag: str, width: int, failures: list[str]
) -> tuple[list[tuple[str, str | None]], list[str], dict[str, int]]:
    """The answers inside the rewrites' tags with their finish reasons, how each was found, and a count of each way.

    An empty rewrite, and every rewrite the backend did not return, is noted in ``failures``.
    """
    extraction: dict[str, int] = {}
    texts: list[tuple[str, str | None]] = []
    origins: list[str] = []
    for i, reply in enumerate(gen.texts):
        ex = extract_answer(reply, tag)
        extraction[ex.kind] = extraction.get(ex.kind, 0) + 1
        if not ex.text:
            failures.append(f"rewrite {i} was empty ({ex.kind})")
            continue
        texts.append((ex.text, _at(gen.finish_reasons, i)))
        origins.append(ex.kind)
    if len(gen.texts) < width:
        failures.append(f"the backend returned {len(gen.texts)} of {width} rewrites")
    return texts, origins, extraction


def _first(gen: Generation) -> str:
    return gen.texts[0] if gen.texts else ""


def _at(seq: Sequence[str | None], i: int) -> str | None:
    return seq[i] if i < len(seq) else None


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except TypeError:
        return False


def _best_of(store: CandidateStore, ids: Iterable[str]) -> Candidate | None:
    pool = _scored_among(store, ids)
    return max(pool, key=lambda c: c.score) if pool else None  # type: ignore[arg-type,return-value]


def _worst_of(store: CandidateStore, ids: Iterable[str]) -> Candidate | None:
    pool = _scored_among(store, ids)
    return min(pool, key=lambda c: c.score) if pool else None  # type: ignore[arg-type,return-value]


def _scored_among(store: CandidateStore, ids: Iterable[str]) -> list[Candidate]:
    seen: set[str] = set()
    pool = []
    for cid in ids:
        c = store.get(cid)
        if c is not None and c.score is not None and cid not in seen:
            seen.add(cid)
            pool.append(c)
    return pool


def _numbered(prompts: Iterable[PromptLike] | AsyncIterable[PromptLike]) -> Iterable[Prompt] | AsyncIterable[Prompt]:
    """The prompts as ``Prompt``s, a prompt without an id numbered by its position, ids checked for repeats.

    A list is converted and checked whole now, before any model work, so a typo fails fast;
    a stream is checked as it is read.
    """
    if isinstance(prompts, (str, Prompt)):
        raise InputError("optimize_many takes a list or stream of prompts; for a single prompt use optimize")
    if isinstance(prompts, Sequence):
        return _check_unique([Prompt.of(p, id=str(i)) for i, p in enumerate(prompts)])
    if isinstance(prompts, AsyncIterable):
        return _anumbered(prompts)
    return _unique_ids(Prompt.of(p, id=str(i)) for i, p in enumerate(prompts))


def _check_unique(prompts: list[Prompt]) -> list[Prompt]:
    seen: set[str] = set()
    for p in prompts:
        _check_new_id(p, seen)
    return prompts


def _check_new_id(prompt: Prompt, seen: set[str]) -> None:
    # Ids key seeds, resume checkpoints and output rows: a repeat would mix two prompts up.
    if prompt.id in seen:
        raise InputError(f"two prompts have the id {prompt.id!r}; prompt ids must be unique within a run")
    seen.add(prompt.id)


def _unique_ids(prompts: Iterable[Prompt]) -> Iterator[Prompt]:
    """Pass prompts through, stopping at the first repeated id (a stream cannot be checked up front)."""
    seen: set[str] = set()
    for p in prompts:
        _check_new_id(p, seen)
        yield p


async def _anumbered(prompts: AsyncIterable[PromptLike]) -> AsyncIterator[Prompt]:
    seen: set[str] = set()
    i = 0
    async for item in prompts:
        p = Prompt.of(item, id=str(i))
        _check_new_id(p, seen)
        yield p
        i += 1


async def _notify(callback: StepCallback | None, result: TPOResult) -> None:
    if callback is None:
        return
    out = callback(result)
    if out is not None and asyncio.iscoroutine(out):
        await out
