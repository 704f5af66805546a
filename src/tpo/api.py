"""The top-level functions: optimise one prompt or many, from synchronous or asynchronous code."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Generator, Iterable, Iterator, Mapping
from typing import Any

from .config import TPOConfig
from .engine.algorithm import Engine, StepCallback
from .errors import UserError
from .protocols import PolicyBackend, RewardModel
from .result import TPOResult
from .types import PromptLike

__all__ = ["aclose_per_loop", "aoptimize", "aoptimize_many", "apreflight", "optimize", "optimize_many"]


def _config(config: TPOConfig | None, options: Mapping[str, Any]) -> TPOConfig:
    base = config if config is not None else TPOConfig()
    return base.with_options(**options) if options else base


async def aoptimize(
    prompt: PromptLike,
    *,
    policy: PolicyBackend,
    reward: RewardModel,
    critic: PolicyBackend | None = None,
    config: TPOConfig | None = None,
    on_step: StepCallback | None = None,
    metadata: Mapping[str, Any] | None = None,
    resume: TPOResult | None = None,
    **options: Any,
) -> TPOResult:
    """Async twin of ``optimize``. It closes nothing: the backends are the caller's to close."""
    engine = Engine(policy, reward, critic=critic, config=_config(config, options))
    return await engine.optimize(prompt, metadata=metadata, resume_from=resume, on_step=on_step)


def optimize(
    prompt: PromptLike,
    *,
    policy: PolicyBackend,
    reward: RewardModel,
    critic: PolicyBackend | None = None,
    config: TPOConfig | None = None,
    on_step: StepCallback | None = None,
    metadata: Mapping[str, Any] | None = None,
    resume: TPOResult | None = None,
    **options: Any,
) -> TPOResult:
    """Optimise the answer to one prompt with TPO and return the result.

    ``prompt`` is a string (one user turn), an OpenAI-style list of messages, or a
    ``tpo.Prompt`` (which carries an id and metadata). Options are those of ``TPOConfig``
    (``width=5, depth=2, mode="tpo", seed=0, ...``), given directly or as ``config``.
    ``critic`` writes critiques, feedback and rewrites (default: ``policy``). ``resume`` is
    a partial result of this prompt (from ``on_step``) to continue from its next step.

    The call runs a private event loop. The sync functions close the backends' connections
    at the end; the models stay loaded: ``aclose()`` is called on the policy, critic and
    reward that declare ``closes_per_loop = True`` (HTTP clients, which reopen on reuse),
    so the same objects can be passed to the next call.
    """
    _no_running_loop("optimize", "aoptimize")

    async def run_and_close() -> TPOResult:
        try:
            return await aoptimize(
                prompt,
                policy=policy,
                reward=reward,
                critic=critic,
                config=config,
                on_step=on_step,
                metadata=metadata,
                resume=resume,
                **options,
            )
        finally:
            await aclose_per_loop(policy, critic, reward)

    # asyncio.run then shuts down the loop's async generators and worker threads, and closes it.
    return asyncio.run(run_and_close())


async def aoptimize_many(
    prompts: Iterable[PromptLike] | AsyncIterable[PromptLike],
    /,
    *,
    policy: PolicyBackend,
    reward: RewardModel,
    critic: PolicyBackend | None = None,
    config: TPOConfig | None = None,
    on_step: StepCallback | None = None,
    resume: Mapping[str, TPOResult] | None = None,
    **options: Any,
) -> AsyncGenerator[TPOResult, None]:
    """Async twin of ``optimize_many``: an async iterator of results in the order prompts finish.

    It closes nothing: the backends are the caller's to close.
    """
    engine = Engine(policy, reward, critic=critic, config=_config(config, options))
    # Closed with this generator: ``async for`` alone would leave the engine's prompts running
    # until the garbage collector finalised its generator.
    async with contextlib.aclosing(engine.optimize_many(prompts, resume=resume, on_step=on_step)) as results:
        async for result in results:
            yield result


def optimize_many(
    prompts: Iterable[PromptLike],
    /,
    *,
    policy: PolicyBackend,
    reward: RewardModel,
    critic: PolicyBackend | None = None,
    config: TPOConfig | None = None,
    on_step: StepCallback | None = None,
    resume: Mapping[str, TPOResult] | None = None,
    **options: Any,
) -> Generator[TPOResult, None, None]:
    """Optimise many prompts at once; yield each result as soon as its prompt finishes.

    Prompts are strings, lists of messages or ``tpo.Prompt`` objects (which carry an id and
    metadata); others get their position as id. Work stays in flight for up to
    ``max_concurrent_prompts`` prompts, and batching backends receive every ready request
    in one call. The loop pauses while the caller handles a result.

    ``prompts`` is positional-only, so the ``prompts=`` option (a ``PromptSet``) can be given too.
    Closing the returned generator early (``.close()``) cancels the prompts still running.

    The generator runs a private event loop. The sync functions close the backends'
    connections at the end (when the generator is exhausted or closed); the models stay
    loaded, as for ``optimize``.
    """
    # Checked at the call, not at the first next(): a mistake shows where it was made.
    _no_running_loop("optimize_many", "aoptimize_many")
    resolved = _config(config, options)
    agen = aoptimize_many(
        prompts, policy=policy, reward=reward, critic=critic, config=resolved, on_step=on_step, resume=resume
    )
    return _drive(agen, (policy, critic, reward))


async def aclose_per_loop(*objects: object) -> None:
    """Close the event-loop-bound connections of backends and reward models, each object once.

    Calls ``aclose()`` on every object that declares ``closes_per_loop = True`` (see
    ``tpo.protocols``), looking inside wrappers through their ``parts``; others are left
    alone, since their ``aclose()`` may free a model.
    A failure to close is reported as a ``RuntimeWarning``, never raised: the work is done.
    Whoever runs tpo on an event loop of its own and then closes the loop calls this first.
    """
    # A wrapper (weighted, cached, judge reward) is not per-loop itself, but what it wraps may be.
    for obj in _each_once(objects, descend=lambda o: not _per_loop(o)):
        if not _per_loop(obj):
            continue
        close = getattr(obj, "aclose", None)
        if close is None:
            continue
        try:
            await close()
        except Exception as e:  # cleanup after the work: a result must not be lost to it
            name = getattr(obj, "name", type(obj).__name__)
            warnings.warn(f"closing {name} failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


async def apreflight(*objects: object) -> None:
    """Run the cheap checks of backends and reward models before any prompt, each object once.

    Awaits ``preflight()`` on every object that has one (see ``tpo.protocols``), and looks
    inside a wrapper without one through its ``parts``. The first failure is raised as is: a
    server that cannot be reached (``BackendError``, ``RewardError``), a key it refuses or a
    reward function with the wrong parameters (``ConfigError``). Objects without checks pass.
    ``tpo batch``'s runner, ``tpo sweep`` and ``tpo run`` call this before their first prompt, so that such
    a mistake costs seconds instead of every prompt's retries.
    """
    for obj in _each_once(objects, descend=lambda o: getattr(o, "preflight", None) is None):
        check = getattr(obj, "preflight", None)
        if check is not None:
            await check()


def _per_loop(obj: object) -> bool:
    return getattr(obj, "closes_per_loop", False) is True


def _each_once(
    objects: Iterable[object], descend: Callable[[object], bool], seen: set[int] | None = None
) -> Iterator[object]:
    """``objects`` and, inside each for which ``descend`` is true, its ``parts`` (depth first), each object once.

    ``None`` is skipped. ``seen`` (object ids) lets several walks share what counts as visited.
    """
    seen = set() if seen is None else seen
    stack = list(reversed(list(objects)))
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if descend(obj):
            stack.extend(reversed(list(getattr(obj, "parts", ()))))


def _drive(agen: AsyncGenerator[TPOResult, None], owned: tuple[object, ...]) -> Generator[TPOResult, None, None]:
    """Run an async generator on a private event loop, one item per ``next()``."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            step = loop.create_task(_anext(agen))
            try:
                yield loop.run_until_complete(step)
            except StopAsyncIteration:
                return
            except BaseException:
                # Ctrl-C (or another BaseException) in the middle of a step: finish cancelling that
                # step first, so the generator is not left running and the caller sees the real cause.
                if not step.done():
                    step.cancel()
                    loop.run_until_complete(asyncio.gather(step, return_exceptions=True))
                raise
    finally:
        try:
            loop.run_until_complete(agen.aclose())
        finally:
            _close_loop(loop, owned)


async def _anext(agen: AsyncGenerator[TPOResult, None]) -> TPOResult:
    return await agen.__anext__()


def _close_loop(loop: asyncio.AbstractEventLoop, owned: tuple[object, ...]) -> None:
    """Close what ``owned`` opened on ``loop``, then the loop's own resources, then the loop (as ``asyncio.run`` does)."""
    try:
        loop.run_until_complete(aclose_per_loop(*owned))
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


def _no_running_loop(name: str, twin: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise UserError(f"tpo.{name}() was called inside a running event loop; use 'await tpo.{twin}(...)' there instead")
