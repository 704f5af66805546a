"""The top-level functions: optimise one prompt or many, from synchronous or asynchronous code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Generator, Iterable, Mapping
from typing import Any

from .algorithm import Engine, StepCallback
from .config import TPOConfig
from .errors import UserError
from .protocols import PolicyBackend, RewardModel
from .result import TPOResult
from .types import PromptLike

__all__ = ["aoptimize", "aoptimize_many", "optimize", "optimize_many"]


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
    """Async twin of ``optimize``."""
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
    """
    _no_running_loop("optimize", "aoptimize")
    return asyncio.run(
        aoptimize(prompt, policy=policy, reward=reward, critic=critic, config=config, on_step=on_step,
                  metadata=metadata, resume=resume, **options)
    )


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
    """Async twin of ``optimize_many``: an async iterator of results in the order prompts finish."""
    engine = Engine(policy, reward, critic=critic, config=_config(config, options))
    async for result in engine.optimize_many(prompts, resume=resume, on_step=on_step):
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
    """
    # Checked at the call, not at the first next(): a mistake shows where it was made.
    _no_running_loop("optimize_many", "aoptimize_many")
    resolved = _config(config, options)
    agen = aoptimize_many(prompts, policy=policy, reward=reward, critic=critic, config=resolved, on_step=on_step, resume=resume)
    return _drive(agen)


def _drive(agen: AsyncGenerator[TPOResult, None]) -> Generator[TPOResult, None, None]:
    """Run an async generator on a private event loop, one item per ``next()``."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _no_running_loop(name: str, twin: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise UserError(f"tpo.{name}() was called inside a running event loop; use 'await tpo.{twin}(...)' there instead")
